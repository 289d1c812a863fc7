"""The slice model's architecture: one settings object for the slice encoder and the slice Transformer, shared by
pretraining (``JointSSL``, whose flat arguments of the same names fill it) and volume classification."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from ssl3d.attention import SliceTransformer
from ssl3d.encoder import SliceEncoder


@dataclass(frozen=True)
class SliceModelConfig:
    """The paper's architecture by default: a ResNet-50 slice encoder pooled over several levels into 640-d slice
    tokens, and a 4-layer deformable slice Transformer (8 heads of 64, FFN 720, dropout 0.1, downsampling 4,
    offset scale 2, offset kernel 6). ``num_slices`` fixes the attention shape of ``attention_layout="code"``."""

    backbone: str = "resnet50"
    multi_level: bool = True
    d_model: int = 640
    num_slices: int = 64
    num_layers: int = 4
    heads: int = 8
    dim_head: int = 64
    ffn_hidden: int = 720
    dropout: float = 0.1
    attention_layout: Literal["slices", "code"] = "slices"
    downsample_factor: int = 4
    offset_scale: float = 2.0
    offset_kernel_size: int = 6

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SliceModelConfig:
        """The architecture settings among ``values`` (e.g. a run's hyper-parameters); the rest is ignored."""
        return cls(**{name: values[name] for name in cls.names() if name in values})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build(self, pretrained_backbone: str | None = None) -> tuple[SliceEncoder, SliceTransformer]:
        """A freshly initialised slice encoder (backbone weights from ``pretrained_backbone`` when given) and
        slice Transformer."""
        encoder = SliceEncoder(
            self.backbone, self.d_model, multi_level=self.multi_level, pretrained_path=pretrained_backbone
        )
        transformer = SliceTransformer(
            d_model=self.d_model,
            num_layers=self.num_layers,
            heads=self.heads,
            dim_head=self.dim_head,
            ffn_hidden=self.ffn_hidden,
            dropout=self.dropout,
            layout=self.attention_layout,
            num_slices=self.num_slices if self.attention_layout == "code" else None,
            downsample_factor=self.downsample_factor,
            offset_scale=self.offset_scale,
            offset_kernel_size=self.offset_kernel_size,
        )
        return encoder, transformer
