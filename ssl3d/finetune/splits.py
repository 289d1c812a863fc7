"""``SplitsDataModule``: the loaders of a fine-tuning data module that holds one dataset per split."""

from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from agreement.runs import ResumableDataLoader


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
