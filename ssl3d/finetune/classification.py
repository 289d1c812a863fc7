"""2D image classification (chest X-ray style, single- or multi-label) with the exported encoder and a timm head.

Images come from a folder with one subfolder per class (single-label) or a CSV with a ``path`` column and
either a ``label`` column (class name, single-label) or one 0/1 column per class (multi-label). They are
preprocessed like pretraining slices: grey, percentiles 0.5/99.5 to 0..1, resized to ``size``.
Metrics: AUROC (MONAI, macro over classes) and accuracy (top-1, or per-label at 0.5 for multi-label).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ssl3d.data.images import load_image
from ssl3d.data.sources import IMAGE_EXTENSIONS
from ssl3d.finetune.encoders import (
    create_timm_encoder,
    load_encoder_weights,
    set_trainable,
)
from ssl3d.finetune.splits import SplitsDataModule
from ssl3d.finetune.task import ClassificationTask

log = logging.getLogger(__name__)


def images_from_folder(folder: str | Path) -> tuple[list[Path], torch.Tensor, list[str]]:
    """``folder/<class>/<image>``: paths, class indices and the sorted class names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{folder}: needs one subfolder per class (at least two), found {classes}")
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(
            p for p in (folder / name).iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        )
        paths += files
        labels += [index] * len(files)
    if not paths:
        raise ValueError(f"{folder}: no images with extensions {IMAGE_EXTENSIONS}")
    return paths, torch.tensor(labels), classes


def images_from_csv(
    path: str | Path, class_names: list[str], multi_label: bool, image_root: str | Path | None = None
) -> tuple[list[Path], torch.Tensor]:
    """Rows of a CSV: ``path`` plus a ``label`` column (single-label) or one 0/1 column per class."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV not found: {path}")
    root = Path(image_root) if image_root else path.parent
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no rows")
    columns = set(rows[0])
    needed = {"path", *class_names} if multi_label else {"path", "label"}
    if not needed <= columns:
        raise ValueError(f"{path}: missing columns {sorted(needed - columns)} (has {sorted(columns)})")
    paths = [root / row["path"] for row in rows]
    if multi_label:
        try:
            labels = torch.tensor([[float(row[c]) for c in class_names] for row in rows])
        except ValueError as error:
            raise ValueError(f"{path}: class columns must hold 0 or 1 ({error})") from error
        if not torch.isin(labels, torch.tensor([0.0, 1.0])).all():
            raise ValueError(f"{path}: class columns must hold 0 or 1")
        return paths, labels
    unknown = sorted({row["label"] for row in rows} - set(class_names))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not in class_names {class_names}")
    return paths, torch.tensor([class_names.index(row["label"]) for row in rows])


class ImageDataset(Dataset):
    """Images loaded, checked and resized once (small 2D datasets fit in memory)."""

    def __init__(self, paths: list[Path], labels: torch.Tensor, size: tuple[int, int], desc: str = "images"):
        images = []
        for path in tqdm(paths, desc=f"loading {desc}", unit="image", leave=False):
            image = load_image(path)[None]
            images.append(F.interpolate(image, size=tuple(size), mode="bilinear", antialias=True)[0])
        self.images = torch.stack(images).clamp_(0.0, 1.0)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


class ImageClassificationData(SplitsDataModule):
    """2D classification data: ``<split>_dir`` class folders or ``<split>_csv`` files.

    Args:
        train_dir, val_dir, test_dir: folders with one subfolder per class (single-label).
        train_csv, val_csv, test_csv: CSVs with ``path`` and ``label`` or one 0/1 column per class.
        image_root: folder the CSV paths start from (default: each CSV's folder).
        class_names: class order (linked to the model); class folders must have these names.
        multi_label: CSV class columns are independent 0/1 targets (e.g. chest X-ray findings).
        size: images are resized to this, as pretraining slices.
    """

    missing_test = "no test images: give test_dir or test_csv"

    def __init__(
        self,
        train_dir: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        train_csv: str | None = None,
        val_csv: str | None = None,
        test_csv: str | None = None,
        image_root: str | None = None,
        class_names: list[str] | None = None,
        multi_label: bool = False,
        size: tuple[int, int] = (64, 64),
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if (train_dir is None) == (train_csv is None):
            raise ValueError("give exactly one of train_dir and train_csv")
        if multi_label and train_csv is None:
            raise ValueError("multi_label needs CSV files with one 0/1 column per class")
        if not class_names:
            raise ValueError("class_names is required (the order of the model's outputs)")

    @property
    def has_validation(self) -> bool:
        return self.hparams.val_dir is not None or self.hparams.val_csv is not None

    def _load(self, split: str) -> ImageDataset | None:
        hp = self.hparams
        folder, table = getattr(hp, f"{split}_dir"), getattr(hp, f"{split}_csv")
        if folder is not None:
            paths, folder_labels, classes = images_from_folder(folder)
            if sorted(classes) != sorted(hp.class_names):
                raise ValueError(
                    f"{folder}: class folders {classes} differ from class_names {hp.class_names}"
                )
            labels = torch.tensor([list(hp.class_names).index(classes[i]) for i in folder_labels])
        elif table is not None:
            paths, labels = images_from_csv(table, list(hp.class_names), hp.multi_label, hp.image_root)
        else:
            return None
        return ImageDataset(paths, labels, hp.size, desc=split)

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val", "test"):
            if split not in self.splits and (dataset := self._load(split)) is not None:
                self.splits[split] = dataset


class ImageClassifier(ClassificationTask):
    """The exported timm encoder with a fresh timm classifier head (``reset_classifier``).

    Args:
        backbone: timm model name of the encoder.
        encoder: exported encoder folder or file, loaded strictly before the head is added; ``None``: random.
        class_names: one per output (linked from the data).
        multi_label: sigmoid + binary cross-entropy per class instead of softmax + cross-entropy.
        freeze_encoder: train the head only (a linear probe).
        kwargs: the optimizer and schedule settings of :class:`~ssl3d.finetune.task.FinetuneTask`.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        encoder: str | None = None,
        class_names: list[str] | None = None,
        multi_label: bool = False,
        freeze_encoder: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if not class_names or len(class_names) < (1 if multi_label else 2):
            raise ValueError(
                f"class_names needs at least {1 if multi_label else 2} entries, got {class_names}"
            )
        self.class_names = list(class_names)
        self.model = create_timm_encoder(backbone)
        if encoder is not None:
            load_encoder_weights(self.model, encoder, backbone)
            log.info("encoder weights loaded from %s", encoder)
        else:
            log.info("encoder %s is randomly initialised (no encoder file given)", backbone)
        if freeze_encoder:
            set_trainable(self.model, False)
        self.model.reset_classifier(len(self.class_names))

    def setup(self, stage: str) -> None:
        self.check_data(getattr(self.trainer, "datamodule", None))

    def encoder_backbone(self) -> torch.nn.Module:
        return self.model

    def head_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.get_classifier().parameters())

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.model] if self.hparams.freeze_encoder else []

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.model.get_classifier().train()  # the head trains even inside a frozen encoder

    def split_batch(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        images, targets = batch
        return images, targets, None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)
