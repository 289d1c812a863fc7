"""Datasets of two-view samples: 3D volumes (for L_inter) and 2D slices/images (for L_intra).

Every item is ``{"index": int, "view1": tensor, "view2": tensor}`` where ``index`` is the sample's global index
(stable across epochs and ranks) for memory banks and cluster assignments.

Randomness: a dataset accepts a plain index, drawing the sample's seed from torch's global generator (seeded by
``torch.manual_seed`` in the main process and by the DataLoader in each worker), or an ``(index, seed)`` key from
:class:`agreement.sampling.SeededSampler`, which derives seeds from ``(seed, stream, epoch, pass, rank,
position)``; then every crop and augmentation is fixed by the data module's seed, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from agreement.sampling import MAX_SEED, split_key
from ssl3d.data.images import load_image
from ssl3d.data.sources import VolumeSource, as_sources
from ssl3d.data.transforms import (
    TwoDifferentVolumeViews,
    TwoViews2D,
    seeded_views_2d,
    seeded_volume_views,
)
from ssl3d.data.volumes import VolumeLoader

CACHE_MODES = ("memory", "disk", None)


def _check_arranged(volume: torch.Tensor, what: str) -> torch.Tensor:
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(
            f"{what}: expected a (1, S, H, W) tensor from VolumeLoader.load, got {tuple(volume.shape)}"
        )
    return volume.to(torch.float32)


class VolumeViewsDataset(Dataset):
    """Two augmented views ``(1, num_slices, H, W)`` of the same random slab of a volume.

    Args:
        volumes: paths, :class:`VolumeSource` (path and slice axis) or tensors already arranged by
            ``loader.load``.
        loader: reads, validates and pads/crops volumes.
        views: picks and applies two different 3D transforms; default :class:`TwoDifferentVolumeViews`.
        samples_per_volume: items per volume and epoch, each a different random slab and augmentation.
        cache: keep ``loader.load`` results (never augmented ones) in ``"memory"`` (loaded here, before any
            worker starts, so forked workers share them), on ``"disk"`` under ``cache_dir``, or not at all.
        volume_ids: global ids of ``volumes`` when this dataset is one rank's shard of a larger list.
        total_volumes: size of that larger list (default: ``max(volume_ids) + 1``), for :attr:`num_indices`.
        random_crop: random slab per item (training) or the centred one (evaluation).
    """

    def __init__(
        self,
        volumes: Sequence[str | Path | torch.Tensor | VolumeSource],
        loader: VolumeLoader,
        views: Callable | None = None,
        samples_per_volume: int = 1,
        cache: str | None = "memory",
        cache_dir: str | Path | None = None,
        volume_ids: Sequence[int] | None = None,
        total_volumes: int | None = None,
        random_crop: bool = True,
    ) -> None:
        self.sources = as_sources(volumes)
        if not self.sources:
            raise ValueError("VolumeViewsDataset: no volumes given")
        if samples_per_volume < 1:
            raise ValueError(
                f"VolumeViewsDataset: samples_per_volume must be at least 1, got {samples_per_volume}"
            )
        if cache not in CACHE_MODES:
            raise ValueError(f"VolumeViewsDataset: cache must be one of {CACHE_MODES}, got {cache!r}")
        if cache == "disk" and cache_dir is None:
            raise ValueError("VolumeViewsDataset: cache='disk' needs a cache_dir")
        ids = list(range(len(self.sources))) if volume_ids is None else [int(i) for i in volume_ids]
        if len(ids) != len(self.sources):
            raise ValueError(f"VolumeViewsDataset: {len(ids)} volume_ids for {len(self.sources)} volumes")
        self.volume_ids = ids
        self.total_volumes = max(ids) + 1 if total_volumes is None else int(total_volumes)
        if self.total_volumes <= max(ids):
            raise ValueError(
                f"VolumeViewsDataset: total_volumes={total_volumes} but a volume id is {max(ids)}"
            )
        self.loader = loader
        self.views = views if views is not None else TwoDifferentVolumeViews()
        self.samples_per_volume = int(samples_per_volume)
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.random_crop = random_crop
        self._memory: dict[int, torch.Tensor] = {}
        if cache == "memory":
            for position in tqdm(
                range(len(self.sources)), desc="caching volumes", unit="volume", leave=False
            ):
                self._memory[position] = self._load(position)

    def __len__(self) -> int:
        return len(self.sources) * self.samples_per_volume

    @property
    def num_indices(self) -> int:
        """Size of the global index space (all ranks' volumes), e.g. for a memory bank."""
        return self.total_volumes * self.samples_per_volume

    def _load(self, position: int) -> torch.Tensor:
        source = self.sources[position]
        if isinstance(source.source, torch.Tensor):
            return _check_arranged(source.source, f"volume {position}")
        if self.cache == "disk":
            return self._load_via_disk(source)
        return self.loader.load(source.source, source.slice_axis)

    def _load_via_disk(self, source: VolumeSource) -> torch.Tensor:
        path = Path(source.source).resolve()
        stat = path.stat()
        key = f"{path}|{stat.st_mtime_ns}|{stat.st_size}|{source.slice_axis}|{self.loader.config()}"
        entry = self.cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"
        if entry.is_file():
            return torch.load(entry, weights_only=True)
        volume = self.loader.load(path, source.slice_axis)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = entry.with_suffix(f".{os.getpid()}.tmp")
        torch.save(volume, partial)
        os.replace(partial, entry)  # atomic, so concurrent workers never read a half-written entry
        return volume

    def volume(self, position: int) -> torch.Tensor:
        """The deterministic ``loader.load`` result of volume ``position`` (cached per ``cache``)."""
        if position in self._memory:
            return self._memory[position]
        return self._load(position)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        index, seed = split_key(key, len(self))
        position, sample = divmod(index, self.samples_per_volume)
        rng = np.random.RandomState(seed)
        slab = self.loader.fit(self.volume(position), rng if self.random_crop else None)
        view1, view2 = seeded_volume_views(self.views, slab, int(rng.randint(MAX_SEED)))
        global_index = self.volume_ids[position] * self.samples_per_volume + sample
        return {"index": global_index, "view1": view1, "view2": view2}


class SliceViewsDataset(Dataset):
    """Two augmented 2D views ``(1, h, w)`` of a 2D image or of one slice of a volume (and, with multi-crop
    ``views2d``, ``small_views`` (small_crops, 1, h', w')).

    Items ``0 .. len(images) - 1`` are the images (read lazily), the rest are slices. Volumes are loaded once
    here and only their kept slices are stored, so memory grows with the number of kept slices; bound it with
    ``slices_per_volume``.

    Args:
        volumes: paths, :class:`VolumeSource` or tensors arranged by ``loader.load`` (``(1, S, H, W)``).
        images: 2D image paths (PNG, JPEG, DICOM).
        loader: loads the volume paths; not needed for tensors.
        views2d: makes the two views (and any small ones after them, as ``small_views``); default
            :class:`TwoViews2D` with output size ``loader.size``.
        slices_per_volume: keep at most this many slices per volume, evenly spaced; ``None`` keeps all.
        min_foreground: skip slices where fewer than this fraction of pixels exceed ``foreground_level``.
        foreground_level: intensity (volumes are in 0..1) above which a pixel counts as foreground.
    """

    def __init__(
        self,
        volumes: Sequence[str | Path | torch.Tensor | VolumeSource] = (),
        images: Sequence[str | Path] = (),
        loader: VolumeLoader | None = None,
        views2d: Callable | None = None,
        slices_per_volume: int | None = None,
        min_foreground: float = 0.05,
        foreground_level: float = 0.05,
    ) -> None:
        if slices_per_volume is not None and slices_per_volume < 1:
            raise ValueError(
                f"SliceViewsDataset: slices_per_volume must be at least 1 or None, got {slices_per_volume}"
            )
        if not 0.0 <= min_foreground <= 1.0:
            raise ValueError(f"SliceViewsDataset: min_foreground must be in [0, 1], got {min_foreground}")
        sources = as_sources(volumes)
        if loader is None and any(not isinstance(s.source, torch.Tensor) for s in sources):
            raise ValueError("SliceViewsDataset: a loader is needed to read volume paths")
        self.images = [Path(p) for p in images]
        self._stacks: list[torch.Tensor] = []
        stack_of, row_of = [], []
        for number, source in enumerate(tqdm(sources, desc="collecting slices", unit="volume", leave=False)):
            if isinstance(source.source, torch.Tensor):
                volume = _check_arranged(source.source, f"volume {number}")
            else:
                volume = loader.load(source.source, source.slice_axis)
            foreground = (volume[0] > foreground_level).float().mean(dim=(1, 2))
            keep = torch.nonzero(foreground >= min_foreground).flatten()
            if slices_per_volume is not None and len(keep) > slices_per_volume:
                keep = keep[np.linspace(0, len(keep) - 1, slices_per_volume).round().astype(np.int64)]
            if len(keep) == 0:
                continue
            stack_of.append(np.full(len(keep), len(self._stacks), dtype=np.int64))
            row_of.append(np.arange(len(keep), dtype=np.int64))
            self._stacks.append(volume[0, keep].unsqueeze(1).clone())
        self._stack_of = np.concatenate(stack_of) if stack_of else np.zeros(0, dtype=np.int64)
        self._row_of = np.concatenate(row_of) if row_of else np.zeros(0, dtype=np.int64)
        if len(self) == 0:
            raise ValueError(
                f"SliceViewsDataset: no 2D samples ({len(self.images)} images, and no slice of {len(sources)} "
                f"volumes has at least {min_foreground:.0%} foreground)"
            )
        size = loader.size if loader is not None else (64, 64)
        self.views2d = views2d if views2d is not None else TwoViews2D(size=size)

    @property
    def num_slices(self) -> int:
        return len(self._stack_of)

    @property
    def num_indices(self) -> int:
        return len(self)

    def __len__(self) -> int:
        return len(self.images) + len(self._stack_of)

    def sample(self, index: int) -> torch.Tensor:
        """The un-augmented ``(1, H, W)`` image or slice at ``index``."""
        if index < len(self.images):
            return load_image(self.images[index])
        index -= len(self.images)
        return self._stacks[self._stack_of[index]][self._row_of[index]]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        index, seed = split_key(key, len(self))
        views = seeded_views_2d(self.views2d, self.sample(index), seed)
        item = {"index": index, "view1": views[0], "view2": views[1]}
        if len(views) > 2:  # multi-crop: the small views, (small_crops, 1, h, w)
            item["small_views"] = torch.stack(views[2:])
        return item


class IndexedConcatDataset(Dataset):
    """Concatenation whose items' ``"index"`` is offset by the index spaces of the datasets before it.

    Each part's own indices start at 0, so without the offset two parts would report the same index for
    different samples and overwrite each other's memory-bank entries. A part's index space is its
    ``num_indices`` attribute when it has one (e.g. a rank's shard of a larger dataset), else its length.
    """

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("IndexedConcatDataset: no datasets given")
        lengths = [len(d) for d in self.datasets]
        spaces = [int(getattr(d, "num_indices", len(d))) for d in self.datasets]
        self.ends = np.cumsum(lengths)
        self.index_offsets = np.concatenate([[0], np.cumsum(spaces)[:-1]]).astype(np.int64)
        self.num_indices = int(sum(spaces))

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index = int(key[0]) if isinstance(key, (tuple, list)) else int(key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        part = int(np.searchsorted(self.ends, index, side="right"))
        local = index - (int(self.ends[part - 1]) if part else 0)
        item = self.datasets[part][(local, int(key[1])) if isinstance(key, (tuple, list)) else local]
        if not isinstance(item, dict) or "index" not in item:
            raise ValueError(f"IndexedConcatDataset: part {part} returned an item without an 'index' key")
        return {**item, "index": int(item["index"]) + int(self.index_offsets[part])}
