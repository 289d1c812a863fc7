"""Volume classification with the pretrained slice encoder and slice Transformer (volume embedding + a head).

A volume ``(B, 1, S, H, W)`` is cut into slices, each embedded by the :class:`~ssl3d.encoder.SliceEncoder`
(timm backbone + projection to ``d_model``); the :class:`~ssl3d.attention.SliceTransformer` mixes the slice
tokens and pools them to the unit-norm volume embedding of pretraining (L2-normalised mean), and a linear
head gives the class logits. Both parts come from a ``scripts/pretrain.py`` checkpoint (``last.ckpt``, loaded
strictly), or are randomly initialised with the same architecture for the comparison.

The volumes come from ``ssl3d.finetune.classification_data.VolumeClassificationData`` (a decathlon-style JSON
datalist, every volume and label validated before training).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from agreement.inputs import state_mismatches
from agreement.runs import CHECKPOINT_DIR, LAST, last_checkpoint
from ssl3d.architecture import SliceModelConfig
from ssl3d.export import load_network_state, read_pretraining_checkpoint
from ssl3d.finetune.classification_data import resolve_num_classes
from ssl3d.finetune.encoders import EncoderWeightsError
from ssl3d.finetune.task import ClassificationTask

log = logging.getLogger(__name__)


class CheckpointWeightsError(EncoderWeightsError):
    """A pretraining checkpoint whose encoder/transformer weights do not fit the model built for it."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The ``last.ckpt`` of a pretraining run: the file itself, a run folder, or the run's ``encoder/`` folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"pretraining checkpoint not found: {path}")
    found = last_checkpoint(path.parent if path.name == "encoder" else path)
    if found is None:
        raise FileNotFoundError(
            f"{path}: no {CHECKPOINT_DIR}/{LAST}; volume classification needs the whole pretraining checkpoint "
            "(slice encoder and slice Transformer), not only the exported encoder"
        )
    return found


def check_state(state: dict[str, torch.Tensor], model: nn.Module, source: str, note: str = "") -> None:
    """Raise :class:`CheckpointWeightsError` listing missing, unexpected and mis-shaped keys, if any."""
    problems = state_mismatches(state, model)
    if problems:
        header = f"{source} does not fit the volume classifier's encoder and transformer (strict loading):"
        action = (
            f"{note}; leave them unset to take the checkpoint's"
            if note
            else "pass the checkpoint of a pretraining run with the same backbone, d_model and layers"
        )
        # The cause and what to do come last, so that they are the last line a user sees.
        raise CheckpointWeightsError("\n".join([header, *problems, f"{source} does not fit: {action}"]))


class VolumeClassifier(ClassificationTask):
    """Pretrained slice encoder + slice Transformer, volume embedding, linear head.

    Args:
        num_classes: outputs of the head (default: ``len(class_names)``).
        encoder: a ``scripts/pretrain.py`` checkpoint (``last.ckpt``), its run folder or the run's ``encoder/``
            folder; the ``encoder.*`` and ``transformer.*`` weights are loaded with ``strict=True``. ``None``:
            random initialisation. (Named ``encoder`` like the other tasks so that ``scripts/finetune.py``'s
            ``latest`` and ``--compare_random`` work.)
        class_names: one name per output (linked from the data); optional.
        backbone, multi_level, d_model, num_slices, num_layers, heads, dim_head, ffn_hidden, dropout,
            attention_layout, downsample_factor, offset_scale, offset_kernel_size: the architecture, as
            JointSSL's arguments. ``None`` (default) takes the checkpoint's value, or JointSSL's default for
            random initialisation; a value that changes the weights' shapes makes loading fail. Set them to
            the checkpoint's values for a like-for-like ``--compare_random``.
        freeze_encoder: keep the slice encoder fixed (weights and batch-norm statistics).
        freeze_transformer: keep the slice Transformer fixed too (with ``freeze_encoder``: a linear probe).
        multi_label: sigmoid + binary cross-entropy per class instead of softmax + cross-entropy.
        kwargs: the optimizer and schedule settings of :class:`~ssl3d.finetune.task.FinetuneTask`
            (``layer_decay`` scales the timm backbone's learning rates per block).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        encoder: str | None = None,
        class_names: list[str] | None = None,
        backbone: str | None = None,
        multi_level: bool | None = None,
        d_model: int | None = None,
        num_slices: int | None = None,
        num_layers: int | None = None,
        heads: int | None = None,
        dim_head: int | None = None,
        ffn_hidden: int | None = None,
        dropout: float | None = None,
        attention_layout: Literal["slices", "code"] | None = None,
        downsample_factor: int | None = None,
        offset_scale: float | None = None,
        offset_kernel_size: int | None = None,
        freeze_encoder: bool = False,
        freeze_transformer: bool = False,
        multi_label: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        num_classes = resolve_num_classes(num_classes, class_names, multi_label)
        self.save_hyperparameters()  # after resolving: Lightning requires equal values in model and data hparams
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]

        names = SliceModelConfig.names()
        given = {name: getattr(self.hparams, name) for name in names}
        state, source_hparams = (
            (None, {}) if encoder is None else read_pretraining_checkpoint(resolve_checkpoint(encoder))
        )
        # Given arguments first, then the checkpoint's, then the defaults (JointSSL's).
        base = SliceModelConfig.from_mapping(source_hparams).as_dict()
        self.architecture = SliceModelConfig(
            **{name: base[name] if given[name] is None else given[name] for name in names}
        )
        self.encoder, self.transformer = self.architecture.build()
        if state is not None:
            self._load_pretrained(state, source_hparams, given, resolve_checkpoint(encoder))
        else:
            log.info("volume classifier randomly initialised: %s", self.architecture)
        self.freeze(*[self.encoder] * freeze_encoder, *[self.transformer] * freeze_transformer)
        self.head = nn.Linear(self.architecture.d_model, self.num_classes)

    def _load_pretrained(
        self, state: dict[str, torch.Tensor], source_hparams: dict, given: dict, path: Path
    ) -> None:
        overridden = [
            f"{name}={given[name]!r} (checkpoint: {source_hparams[name]!r})"
            for name in SliceModelConfig.names()
            if given[name] is not None and name in source_hparams and given[name] != source_hparams[name]
        ]
        note = (
            f"architecture arguments that differ from the checkpoint's: {', '.join(overridden)}"
            if overridden
            else ""
        )
        check_state(
            state, nn.ModuleDict({"encoder": self.encoder, "transformer": self.transformer}), str(path), note
        )
        load_network_state(self.encoder, self.transformer, state)
        log.info("encoder and transformer weights loaded from %s", path)

    # --------------------------------------------------------------------------------------------- model
    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        self.check_data(data)
        hparams = getattr(data, "hparams", None)
        data_classes = getattr(data, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(f"model num_classes={self.num_classes} but data num_classes={data_classes}")
        slices = getattr(hparams, "slices_per_volume", None)
        arch = self.architecture
        if arch.attention_layout == "code" and slices is not None and slices != arch.num_slices:
            raise ValueError(
                f"attention_layout='code' needs exactly num_slices={arch.num_slices} slices, "
                f"but the data gives {slices}"
            )

    def embed(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, H, W) volumes -> (B, d_model) unit-norm volume embeddings."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.freeze_encoder):
            tokens = self.encoder.embed_volumes(volumes)
        return self.transformer.volume_embedding(tokens)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, H, W) volumes -> (B, num_classes) logits."""
        return self.head(self.embed(volumes))

    def encoder_backbone(self) -> nn.Module:
        return self.encoder.backbone

    def split_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        return batch["volume"], batch["label"], list(batch["name"])
