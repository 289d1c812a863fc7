"""Data of the two classification tasks, one dataset per split behind one loader base (``SplitsDataModule``).

``ImageClassificationData``: 2D images from class folders or CSVs (``path`` plus a ``label`` column, or one 0/1
column per class), preprocessed like pretraining slices (grey, percentiles 0.5/99.5 to 0..1, resized).
``VolumeClassificationData``: volumes and labels from a decathlon-style JSON datalist, every volume and label
validated when the data module is set up, before training.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from agreement.runs import ResumableDataLoader
from ssl3d.data.images import load_image
from ssl3d.data.sources import class_folder_images, list_volumes, read_datalist
from ssl3d.data.volumes import VolumeLoader, check_volumes

log = logging.getLogger(__name__)


class SplitsDataModule(pl.LightningDataModule):
    """Loaders over ``self.splits`` (``"train"``, ``"val"``, ``"test"`` datasets, filled by ``setup``): training
    shuffled through ``ResumableDataLoader`` (a resumed run continues mid-epoch exactly), evaluation in order, an
    empty list for a split without data. Subclasses have ``batch_size`` and ``num_workers`` hyperparameters and
    say in ``missing_test`` how to give a test split."""

    missing_test = "no test data"

    def __init__(self) -> None:
        super().__init__()
        self.splits: dict[str, Dataset] = {}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader | list:
        if split not in self.splits:
            return []
        loader = ResumableDataLoader if shuffle else DataLoader
        return loader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.splits:
            raise ValueError(self.missing_test)
        return self._loader("test")


# --------------------------------------------------------------------------------------------- 2D images
def images_from_folder(folder: str | Path) -> tuple[list[Path], torch.Tensor, list[str]]:
    """``folder/<class>/<image>``: paths, class indices and the sorted class names (at least two classes)."""
    paths, labels, classes = class_folder_images(folder)
    if len(classes) < 2:
        raise ValueError(f"{folder}: needs one subfolder per class (at least two), found {classes}")
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


# ------------------------------------------------------------------------------------------------ volumes
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
    entries = read_datalist(datalist, key)
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
        if key is None:
            return False
        try:
            return bool(read_datalist(self.hparams.datalist, key, required=False))
        except (OSError, ValueError):
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
        read_datalist(
            hp.datalist, hp.train_key
        )  # a missing file, bad JSON or no training list: one clear error
        listed = {
            split: read_labelled_split(hp.datalist, key, self.num_classes, hp.multi_label, hp.base_dir)
            for split, key in self._keys().items()
            if self._listed(key)
        }
        self.splits = {
            split: VolumeDataset(paths, targets, self.loader, train=split == "train", cache=hp.cache)
            for split, (paths, targets) in listed.items()
        }
