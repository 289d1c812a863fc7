"""The torch side of few-shot data: the image dataset, the seeded epoch sampler, CLIP's transforms and
``FewShotDataModule``, which reads a dataset (``prompts.datasets``) and applies the protocol's sampling rules
(``prompts.splits``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from agreement import dist
from agreement.runs import ResumableDataLoader
from agreement.sampling import SeededSampler, seeded_call
from prompts.datasets import DATASETS, Item, load_dataset, read_image
from prompts.splits import fewshot_split, subsample_classes


class ImageDataset(Dataset):
    """Items as ``{"image", "label", "index"}``; a key ``(index, sample_seed)`` seeds the augmentation so that
    a resumed or distributed run draws the same crops as an uninterrupted one."""

    def __init__(self, items: Sequence[Item], transform, index_offset: int = 0) -> None:
        self.items = list(items)
        self.transform = transform
        self.index_offset = index_offset

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        item = self.items[index]
        image = read_image(item.impath)
        tensor = self.transform(image) if seed is None else seeded_call(self.transform, seed, image)
        return {"image": tensor, "label": item.label, "index": index + self.index_offset}


def build_transforms(
    preprocess_cfg: dict[str, Any] | None, train_scale: tuple[float, float], train_flip: bool
) -> tuple[Any, Any]:
    """open_clip's eval preprocessing for the model; train: random resized crop (+ flip) with the same size,
    interpolation and normalisation."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(**(preprocess_cfg or {}))
    size = cfg.size if isinstance(cfg.size, int) else cfg.size[0]
    eval_transform = image_transform_v2(cfg, is_train=False)
    interpolation = (
        T.InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    )
    train_ops = [T.RandomResizedCrop(size, scale=train_scale, interpolation=interpolation)]
    if train_flip:
        train_ops.append(T.RandomHorizontalFlip())
    train_ops += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(train_ops), eval_transform


@dataclass
class EvalSet:
    name: str
    classnames: list[str]
    items: list[Item]
    dataset: str


class FewShotDataModule(pl.LightningDataModule):
    """Few-shot training data of one dataset and its evaluation sets.

    ``subsample``: ``"base"`` trains on the base classes and evaluates base and novel separately (base-to-novel);
    ``"all"`` trains and evaluates on all classes. ``num_shots = 0`` uses every training image.
    """

    def __init__(
        self,
        dataset: str = "Digits",
        root: str = "data",
        num_shots: int = 16,
        seed: int = 1,
        subsample: Literal["all", "base"] = "base",
        batch_size: int = 4,
        eval_batch_size: int = 100,
        num_workers: int = 0,
        classnames_file: str | None = None,
        train_scale: tuple[float, float] = (0.08, 1.0),
        train_flip: bool = True,
        cache_dir: str | None = None,
        check_files: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dataset_name, splits, self.all_classnames = load_dataset(
            dataset, root, classnames_file, check_files
        )
        self.full_splits = splits
        self.preprocess_cfg: dict[str, Any] | None = None
        few_train, few_val = fewshot_split(
            splits["train"], splits["val"], num_shots, seed, self._cache_file()
        )
        self.few_splits = {"train": few_train, "val": few_val, "test": splits["test"]}
        if subsample == "base":
            base_splits, self.train_classnames = subsample_classes(self.few_splits, "base")
        else:
            base_splits, self.train_classnames = self.few_splits, list(self.all_classnames)
        self.train_items = base_splits["train"]

    @property
    def display_name(self) -> str:
        """The registry name, or the folder / file name of an ImageFolder or CSV dataset."""
        if self.dataset_name in ("imagefolder", "csv"):
            return Path(self.hparams.root).stem
        return self.dataset_name

    def _cache_file(self) -> Path | None:
        hp = self.hparams
        if hp.num_shots < 1:
            return None
        name = f"shot_{hp.num_shots}-seed_{hp.seed}.json"
        root = Path(hp.root).expanduser()
        if self.dataset_name == "csv":
            folder, name = root.parent / "split_fewshot", f"{root.stem}_{name}"
        elif self.dataset_name == "imagefolder":
            folder = root / "split_fewshot"
        else:
            folder = root / DATASETS[self.dataset_name].folder / "split_fewshot"
        if hp.cache_dir:
            folder = Path(hp.cache_dir).expanduser() / self.dataset_name
        return folder / name

    def eval_sets(self) -> list[EvalSet]:
        """Base and novel test sets in their own label spaces, or the whole test set."""
        if self.hparams.subsample == "base":
            out = []
            for name, which in (("base", "base"), ("novel", "new")):
                splits, names = subsample_classes(self.few_splits, which)
                out.append(EvalSet(name, names, splits["test"], self.dataset_name))
            return out
        return [EvalSet("all", list(self.all_classnames), list(self.full_splits["test"]), self.dataset_name)]

    def _transforms(self):
        cfg = self.preprocess_cfg
        if cfg is None and self.trainer is not None:
            cfg = getattr(self.trainer.lightning_module, "preprocess_cfg", None)
        return build_transforms(cfg, tuple(self.hparams.train_scale), self.hparams.train_flip)

    def train_dataloader(self) -> DataLoader:
        if not self.train_items:
            raise ValueError(f"{self.dataset_name} has no training images (it is an evaluation-only dataset)")
        train_transform, _ = self._transforms()
        dataset = ImageDataset(self.train_items, train_transform)
        per_rank = math.ceil(len(dataset) / dist.get_world_size())
        return ResumableDataLoader(  # a run resumed mid-epoch continues from the very next batch
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=SeededSampler(
                dataset, seed=self.hparams.seed, num_replicas=dist.get_world_size(), rank=dist.get_rank()
            ),
            drop_last=per_rank >= self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=False,
        )

    def eval_dataloader(self, items: Sequence[Item]) -> DataLoader:
        _, eval_transform = self._transforms()
        return DataLoader(
            ImageDataset(items, eval_transform),
            batch_size=self.hparams.eval_batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
        )
