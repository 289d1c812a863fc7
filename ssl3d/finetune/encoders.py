"""The pretrained timm encoder as a MONAI ``FlexibleUNet`` backbone, strict weight loading and optimizer groups.

``scripts/pretrain.py`` exports ``timm.create_model(name, in_chans=1, num_classes=0)`` state dicts. Every
downstream model here holds that same timm model (under ``.model`` of the U-Net encoder, or directly for the
classifiers), so an exported file loads with ``strict=True`` and keys keep their timm names.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn

from agreement.inputs import load_state_dict_file, report_keys, state_mismatches
from ssl3d.encoder import create_backbone
from ssl3d.export import export_encoder, resolve_encoder_file

BACKBONE_PREFIX = "timm-"


class EncoderWeightsError(ValueError):
    """An encoder file that does not fit the configured timm architecture."""


def create_timm_encoder(model_name: str, in_chans: int = 1) -> nn.Module:
    """The exported architecture: a randomly initialised timm model without classifier (nothing downloaded)."""
    try:
        return create_backbone(model_name, in_chans)
    except RuntimeError as error:  # timm's "Unknown model" error
        raise ValueError(f"unknown timm model {model_name!r}: {error}") from error


def check_encoder_state(
    state: dict[str, torch.Tensor], model: nn.Module, model_name: str, source: str
) -> None:
    """Raise :class:`EncoderWeightsError` listing missing, unexpected and mis-shaped keys, if there are any."""
    problems = state_mismatches(state, model)
    if problems:
        header = f"{source} does not fit the timm model {model_name!r} (strict loading):"
        # The cause and what to do come last, so that they are the last line a user sees.
        action = (
            f"{source} is not an encoder of {model_name!r}: set the backbone to the timm model it was exported "
            f"from, or pass an encoder exported from {model_name!r}"
        )
        raise EncoderWeightsError("\n".join([header, *problems, action]))


def load_encoder_weights(model: nn.Module, path: str | Path, model_name: str) -> dict:
    """Load an exported encoder into the full timm ``model`` with ``strict=True``; return its metadata.

    The check runs before ``load_state_dict`` so the error lists every differing key, and says which
    architecture the file was exported from when ``encoder.json`` names another one.
    """
    weights, metadata = resolve_encoder_file(path)
    state = load_state_dict_file(weights)
    exported_as = metadata.get("timm_model")
    source = f"{weights}" + (f" (exported from {exported_as!r})" if exported_as else "")
    check_encoder_state(state, model, model_name, source)
    model.load_state_dict(state, strict=True)
    return metadata


def feature_levels(model: nn.Module) -> tuple[list[int], list[int]]:
    """Channels and reductions of the timm model's feature levels."""
    info = model.feature_info
    return [level["num_chs"] for level in info], [level["reduction"] for level in info]


class TimmUNetEncoder(BaseEncoder, nn.Module):
    """A timm model's feature pyramid (strides 2 to 32) as a FlexibleUNet encoder; subclassed per model name.

    The timm model is built whole, so the exported state dict can be loaded into it strictly
    (:meth:`load_pretrained`), and then pruned of the layers the U-Net never uses (classifier norm, head
    convolution) so every remaining parameter is trained.
    """

    model_name: ClassVar[str] = ""
    channels: ClassVar[tuple[int, ...]] = ()

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, pretrained: bool = False) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(
                f"{self.model_name} is a 2D timm encoder; spatial_dims must be 2, got {spatial_dims}"
            )
        if pretrained:
            raise ValueError("weights are never downloaded; load the exported encoder with load_pretrained()")
        self.in_channels = in_channels
        self.indices = list(range(len(self.channels)))
        self.model = self._pruned(create_timm_encoder(self.model_name, in_channels))

    def _pruned(self, model: nn.Module) -> nn.Module:
        model.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        return model

    def load_pretrained(self, path: str | Path) -> dict:
        """Load an exported encoder strictly into the whole timm model, then keep its pruned part."""
        full = create_timm_encoder(self.model_name, self.in_channels)
        metadata = load_encoder_weights(full, path, self.model_name)
        self.model.load_state_dict(self._pruned(full).state_dict(), strict=True)
        return metadata

    def export(self, folder: str | Path, source: str | Path | None = None) -> Path:
        """Write the (fine-tuned) encoder as ``scripts/pretrain.py`` exports one, so it can start another run.

        Layers the U-Net prunes (never trained here) keep the weights of ``source``, the encoder the run
        started from (random ones without it); ``encoder.json`` lists them under ``not_finetuned``.
        """
        full = create_timm_encoder(self.model_name, self.in_channels)
        if source is not None:
            load_encoder_weights(full, source, self.model_name)
        trained = self.model.state_dict()
        unexpected = full.load_state_dict(trained, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{self.model_name}: keys outside the timm model: {report_keys(unexpected)}")
        extra = {
            "finetuned_from": str(source) if source is not None else None,
            "not_finetuned": sorted(set(full.state_dict()) - set(trained)),
        }
        return export_encoder(full, self.model_name, folder, extra)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"spatial_dims": 2, "in_channels": 1, "pretrained": False}]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [cls.channels]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [len(cls.channels)]

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return [BACKBONE_PREFIX + cls.model_name]


def register_timm_backbone(model_name: str) -> str:
    """Register ``model_name`` with MONAI's ``FLEXUNET_BACKBONE``; return the backbone name to pass to it.

    FlexibleUNet needs up to five feature maps, each half the size of the previous one, the first at
    stride 2 (resnets, efficientnets, regnets, ...); other timm models raise a ``ValueError``.
    """
    name = BACKBONE_PREFIX + model_name
    if name in FLEXUNET_BACKBONE.register_dict:
        return name
    channels, reductions = feature_levels(create_timm_encoder(model_name))
    expected = [2**i for i in range(1, len(reductions) + 1)]
    if reductions != expected or len(reductions) > 5:
        raise ValueError(
            f"timm model {model_name!r} has feature strides {reductions}; a FlexibleUNet encoder needs up to five "
            f"levels at strides 2, 4, 8, 16, 32 (e.g. resnet18, resnet50, efficientnet_b0)"
        )
    encoder_class = type(
        f"TimmUNetEncoder_{model_name}",
        (TimmUNetEncoder,),
        {"model_name": model_name, "channels": tuple(channels), "__module__": __name__},
    )
    FLEXUNET_BACKBONE.register_class(encoder_class)
    return name


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)


def encoder_param_groups(
    encoder: nn.Module, lr: float, weight_decay: float, layer_decay: float | None
) -> list[dict]:
    """Optimizer groups of a timm encoder; with ``layer_decay`` each block's lr is scaled by it per depth.

    Uses timm's ``param_groups_layer_decay`` (the BEiT/MAE recipe: the last block gets ``lr``, each earlier
    block ``layer_decay`` times the next). Frozen parameters are left out.
    """
    if layer_decay is None or layer_decay == 1.0:
        params = [p for p in encoder.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}] if params else []
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    from timm.optim import param_groups_layer_decay

    groups = []
    for group in param_groups_layer_decay(encoder, weight_decay=weight_decay, layer_decay=layer_decay):
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            groups.append(
                {"params": params, "lr": lr * group["lr_scale"], "weight_decay": group["weight_decay"]}
            )
    return groups
