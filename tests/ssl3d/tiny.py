"""Tiny configurations and in-memory data for fast tests of the joint 2D/3D method."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from agreement.runs import ResumableDataLoader

TINY_MODEL = dict(
    backbone="test_efficientnet",
    d_model=32,
    num_slices=8,
    num_layers=1,
    heads=2,
    dim_head=8,
    ffn_hidden=32,
    dropout=0.0,
    downsample_factor=2,
    offset_kernel_size=2,
    projection_hidden=32,
    projection_dim=16,
    prototypes_2d=[6, 5],
    prototypes_3d=[3],
    lr=0.05,
    warmup_epochs=0.5,
)
# SwAV-only settings (JointSSL refuses them with DeepCluster-V2): add them to TINY_MODEL for clustering="swav".
TINY_SWAV = dict(freeze_prototypes_steps=2)


class RandomViews(Dataset):
    """Two noisy views of fixed random samples; deterministic per (index, epoch-free) so resumes are exact."""

    def __init__(self, size: int, shape: tuple[int, ...], seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.base = torch.rand(size, 1, *shape, generator=generator)
        self.noise = torch.randn(size, 2, 1, *shape, generator=generator) * 0.05

    def __len__(self) -> int:
        return self.base.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {
            "index": index,
            "view1": self.base[index] + self.noise[index, 0],
            "view2": self.base[index] + self.noise[index, 1],
        }


class TinyDataModule(pl.LightningDataModule):
    def __init__(self, volumes: int = 8, slices: int = 24, num_slices: int = 8, size: int = 32) -> None:
        super().__init__()
        self.volume_data = RandomViews(volumes, (num_slices, size, size), seed=1)
        self.slice_data = RandomViews(slices, (size, size), seed=2)

    @property
    def num_volume_samples(self) -> int:
        return len(self.volume_data)

    @property
    def num_slice_samples(self) -> int:
        return len(self.slice_data)

    def train_dataloader(self):
        return {
            "volumes": ResumableDataLoader(self.volume_data, batch_size=2, shuffle=True, drop_last=True),
            "slices": ResumableDataLoader(self.slice_data, batch_size=6, shuffle=True, drop_last=True),
        }
