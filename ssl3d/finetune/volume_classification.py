"""Volume classification with the pretrained slice encoder and slice Transformer (volume embedding + a head).

A volume ``(B, 1, S, H, W)`` is cut into slices, each embedded by the :class:`~ssl3d.encoder.SliceEncoder`
(timm backbone + projection to ``d_model``); the :class:`~ssl3d.attention.SliceTransformer` mixes the slice
tokens and pools them to the unit-norm volume embedding of pretraining (L2-normalised mean), and a linear
head gives the class logits. Both parts come from a ``scripts/pretrain.py`` checkpoint (``last.ckpt``, loaded
strictly), or are randomly initialised with the same architecture for the comparison.

Data: a decathlon-style JSON datalist whose ``training``/``validation``/``test`` entries are
``{"image": path, "label": class index}`` (multi-label: a list of the positive class indices). Every volume
and every label is validated when the data module is set up, before training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from agreement.inputs import load_torch_file
from ssl3d.architecture import SliceModelConfig
from ssl3d.data.sources import list_volumes
from ssl3d.data.volumes import VolumeLoader, check_volumes
from ssl3d.finetune.encoders import EncoderWeightsError, set_trainable, state_mismatches
from ssl3d.finetune.splits import SplitsDataModule
from ssl3d.finetune.task import ClassificationTask

log = logging.getLogger(__name__)

CHECKPOINT_NAMES = ("checkpoints/last.ckpt", "last.ckpt")


class CheckpointWeightsError(EncoderWeightsError):
    """A pretraining checkpoint whose encoder/transformer weights do not fit the model built for it."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The ``last.ckpt`` of a pretraining run: the file itself, a run folder, or the run's ``encoder/`` folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"pretraining checkpoint not found: {path}")
    for folder in (path, path.parent) if path.name == "encoder" else (path,):
        for name in CHECKPOINT_NAMES:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"{path}: no {' or '.join(CHECKPOINT_NAMES)}; volume classification needs the whole pretraining "
        "checkpoint (slice encoder and slice Transformer), not only the exported encoder"
    )


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``encoder.*``/``transformer.*`` state dict (prefixes kept) and ``hyper_parameters`` of a JointSSL
    checkpoint, read with ``weights_only=True``."""
    path = resolve_checkpoint(path)
    checkpoint = load_torch_file(path, what="pretraining checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    state = {
        key: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(("encoder.", "transformer."))
    }
    if not state:
        raise ValueError(
            f"{path}: the state dict has no encoder.* or transformer.* weights (not a JointSSL run)"
        )
    return state, dict(checkpoint.get("hyper_parameters") or {})


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


def resolve_num_classes(num_classes: int | None, class_names: list[str] | None, multi_label: bool) -> int:
    """``num_classes``, or ``len(class_names)``; the two must agree when both are given."""
    if num_classes is None:
        if not class_names:
            raise ValueError("give num_classes or class_names")
        num_classes = len(class_names)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"num_classes={num_classes} but class_names has {len(class_names)}: {class_names}")
    if num_classes < (1 if multi_label else 2):
        raise ValueError(f"num_classes must be at least {1 if multi_label else 2}, got {num_classes}")
    return int(num_classes)


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
        state, source_hparams = (None, {}) if encoder is None else read_checkpoint(encoder)
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
        if freeze_encoder:
            set_trainable(self.encoder, False)
        if freeze_transformer:
            set_trainable(self.transformer, False)
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
        parts = nn.ModuleDict({"encoder": self.encoder, "transformer": self.transformer})
        check_state(state, parts, str(path), note)
        parts.load_state_dict(state, strict=True)
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

    def frozen_modules(self) -> list[nn.Module]:
        hp = self.hparams
        return [self.encoder] * hp.freeze_encoder + [self.transformer] * hp.freeze_transformer

    def split_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        return batch["volume"], batch["label"], list(batch["name"])


# ------------------------------------------------------------------------------------------------- data
def read_labelled_split(
    datalist: str | Path,
    key: str,
    num_classes: int,
    multi_label: bool,
    base_dir: str | Path | None = None,
) -> tuple[list[Path], torch.Tensor]:
    """Paths and targets of the ``key`` list: class indices ``(N,)`` or multi-hot ``(N, num_classes)``.

    Labels are validated all at once; the error lists every bad entry.
    """
    datalist = Path(datalist)
    paths = list_volumes(datalist, base_dir, key="image", split=key)
    entries = json.loads(datalist.read_text())[key]
    targets, bad = [], []
    for number, entry in enumerate(entries):
        label = entry.get("label") if isinstance(entry, dict) else None
        indices = label if multi_label and isinstance(label, list) else [label]
        valid = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_classes for i in indices)
        if not valid:
            image = entry.get("image") if isinstance(entry, dict) else entry
            bad.append(f"entry {number} ({image}): {label!r}")
            continue
        if multi_label:
            row = torch.zeros(num_classes)
            row[indices] = 1.0
            targets.append(row)
        else:
            targets.append(torch.tensor(indices[0]))
    if bad:
        expected = "a list of class indices" if multi_label else "a class index"
        raise ValueError(
            f"datalist {datalist}: {len(bad)} {key!r} entries have labels that are not {expected} in "
            f"range({num_classes}):\n  " + "\n  ".join(bad)
        )
    return paths, torch.stack(targets)


class VolumeDataset(Dataset):
    """Validated volumes (kept in memory after :meth:`VolumeLoader.load`, or reloaded) with their targets;
    training crops a random block of ``num_slices`` slices, evaluation the centred one."""

    def __init__(
        self, paths: list[Path], targets: torch.Tensor, loader: VolumeLoader, train: bool, cache: bool
    ) -> None:
        self.paths, self.targets, self.loader, self.train = paths, targets, loader, train
        self.volumes: dict[int, torch.Tensor] = {}

        def keep(position: int, path: Path, volume: torch.Tensor) -> None:
            if cache:
                self.volumes[position] = loader.arrange(volume)

        check_volumes(paths, loader, skip_bad_files=False, on_loaded=keep)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        volume = self.volumes.get(index)
        if volume is None:
            volume = self.loader.load(self.paths[index])
        rng = np.random.RandomState(int(torch.randint(0, 2**31 - 1, ()))) if self.train else None
        name = self.paths[index].name
        for suffix in (".nii.gz", ".nii", ".npy"):
            name = name.removesuffix(suffix)
        return {"volume": self.loader.fit(volume, rng), "label": self.targets[index], "name": name}


class VolumeClassificationData(SplitsDataModule):
    """Volumes and class labels from a decathlon-style JSON datalist.

    Args:
        datalist: JSON with ``training`` (and optionally ``validation``/``test``) lists of
            ``{"image": path, "label": class index}``; multi-label: ``"label": [positive class indices]``.
            Relative paths start from ``base_dir`` (default: the datalist's folder).
        num_classes: number of classes (default: ``len(class_names)``); labels outside ``range(num_classes)``
            are an error.
        class_names: one name per class index (linked to the model); optional.
        multi_label: labels are lists of positive classes.
        slices_per_volume: slices per volume given to the model (fewer are zero-padded, more cropped: randomly
            for training, centred otherwise). Not called ``num_slices``: that is the model's architecture
            argument (JointSSL's, used only by ``attention_layout="code"``), and Lightning merges both hparams.
        size: in-plane size of the slices; ``resize``: resample the whole section to it (else pad/crop).
        slice_axis, orientation, spacing, percentiles: as :class:`~ssl3d.data.volumes.VolumeLoader`
            (use the pretraining run's settings).
        cache: keep the loaded volumes in memory (else they are reloaded each time; still checked up front).
    """

    def __init__(
        self,
        datalist: str,
        base_dir: str | None = None,
        train_key: str = "training",
        val_key: str | None = "validation",
        test_key: str | None = "test",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        multi_label: bool = False,
        slices_per_volume: int = 32,
        size: tuple[int, int] = (64, 64),
        resize: bool = True,
        slice_axis: int = 2,
        orientation: str | None = "RAS",
        spacing: tuple[float, float, float] | None = None,
        percentiles: tuple[float, float] = (0.5, 99.5),
        cache: bool = True,
        batch_size: int = 4,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        num_classes = resolve_num_classes(num_classes, class_names, multi_label)
        self.save_hyperparameters()  # after resolving: Lightning requires equal values in model and data hparams
        self.num_classes = int(num_classes)
        self.loader = VolumeLoader(
            num_slices=slices_per_volume,
            size=size,
            slice_axis=slice_axis,
            orientation=orientation,
            spacing=spacing,
            percentiles=percentiles,
            resize=resize,
        )

    def _keys(self) -> dict[str, str | None]:
        hp = self.hparams
        return {"train": hp.train_key, "val": hp.val_key, "test": hp.test_key}

    def _listed(self, key: str | None) -> bool:
        path = Path(self.hparams.datalist)
        if key is None or not path.is_file():
            return False
        try:
            return bool(json.loads(path.read_text()).get(key))
        except json.JSONDecodeError:
            return False

    @property
    def has_validation(self) -> bool:
        return self._listed(self.hparams.val_key)

    @property
    def missing_test(self) -> str:
        return f"datalist {self.hparams.datalist}: no {self.hparams.test_key!r} list to test on"

    def setup(self, stage: str | None = None) -> None:
        """Check every label, then read and validate every volume of every split (before training)."""
        if self.splits:
            return
        hp = self.hparams
        if not Path(hp.datalist).is_file():
            raise FileNotFoundError(f"datalist not found: {hp.datalist}")
        if not self._listed(hp.train_key):
            raise ValueError(f"datalist {hp.datalist}: no {hp.train_key!r} list of volumes")
        listed = {
            split: read_labelled_split(hp.datalist, key, self.num_classes, hp.multi_label, hp.base_dir)
            for split, key in self._keys().items()
            if self._listed(key)
        }
        self.splits = {
            split: VolumeDataset(paths, targets, self.loader, train=split == "train", cache=hp.cache)
            for split, (paths, targets) in listed.items()
        }
