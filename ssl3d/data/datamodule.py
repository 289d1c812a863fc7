"""Lightning data module for joint 2D/3D self-supervised training.

A training batch is ``{"volumes": {"index", "view1", "view2"}, "slices": {"index", "view1", "view2"}}``:
volume views are ``(B3, 1, num_slices, H, W)``, slice/image views ``(B2, 1, H, W)``, indices are global int64.
Lightning wraps the dict of loaders in a ``CombinedLoader`` ("max_size_cycle"), so an epoch lasts as long as
the longer loader and the shorter one is cycled.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from monai.data import partition_dataset
from torch.utils.data import DataLoader

from agreement import dist
from agreement.runs import ResumableDataLoader
from agreement.sampling import SeededSampler
from ssl3d.data.datasets import CACHE_MODES, SliceViewsDataset, VolumeViewsDataset
from ssl3d.data.images import check_images
from ssl3d.data.mni import demo_folder, mni152_nifti
from ssl3d.data.sources import VolumeSource, list_images, list_volumes
from ssl3d.data.transforms import (
    MultiCropViews2D,
    TwoDifferentVolumeViews,
    TwoViews2D,
    default_volume_transforms,
)
from ssl3d.data.volumes import VolumeLoader, check_volumes

DEMO_RESOLUTION = 2


def nibabel_test_scan() -> Path | None:
    """nibabel's small anatomical test scan (33 x 41 x 25 at 2 mm), shipped with the package, if present."""
    import nibabel

    path = Path(os.path.dirname(nibabel.__file__)) / "tests" / "data" / "anatomical.nii"
    return path if path.is_file() else None


class JointSSLDataModule(pl.LightningDataModule):
    """Volumes for the 3D branch and slices plus 2D images for the 2D branch, validated before training.

    Data come from a decathlon-style ``datalist`` JSON, or ``data_dir`` searched with ``pattern``; 2D images
    from ``images_dir``. With ``demo=True`` or no volumes given, the built-in demo volumes are used: nilearn's
    MNI152 T1 template at 2 mm (written as NIfTI under ``demo_dir``, else ``<trainer root>/demo_data``, else
    the temporary folder) and nibabel's test scan. Each demo scan is sliced along all three axes, and each
    (scan, axis) pair counts as a separate volume, because axial, coronal and sagittal stacks look different
    and two scans alone give too little variety; ``slice_axes`` does the same for real data.

    ``jitter_2d`` (brightness and contrast of the 2D views) and ``intensity_views_3d`` (the bias-field and gamma
    transforms among the volume views) set how far the objectives are made invariant to intensity; downstream
    tasks that read tissue contrast may want less of it.

    ``small_crops_2d`` adds SwAV / DeepCluster-V2's multi-crop to the 2D views: that many small views of
    ``small_size_2d`` pixels (default: half of ``size``) from ``small_crop_scale_2d`` of the slice; the model's
    ``small_crops`` must be the same (``scripts/pretrain.py`` links them).

    ``num_volume_samples`` and ``num_slice_samples`` (dataset sizes for memory banks) exist after
    ``setup("fit")``. Randomness follows from ``seed`` and the epoch only (see :class:`SeededSampler`). Under
    DDP each rank keeps a fixed shard of the volumes (so caches hold only that shard) and a distributed share of
    the slices.
    """

    def __init__(
        self,
        datalist: str | None = None,
        data_dir: str | None = None,
        pattern: str = "**/*.nii*",
        images_dir: str | None = None,
        num_slices: int = 32,
        size: tuple[int, int] | list[int] = (64, 64),
        slice_axis: int = 2,
        slice_axes: list[int] | None = None,
        resize: bool = True,
        spacing: tuple[float, float, float] | list[float] | None = None,
        orientation: str | None = "RAS",
        batch_size_3d: int = 2,
        batch_size_2d: int = 32,
        num_workers: int = 0,
        samples_per_volume: int = 8,
        slices_per_volume: int | None = None,
        min_foreground: float = 0.05,
        crop_scale_2d: tuple[float, float] | list[float] = (0.3, 1.0),
        small_crops_2d: int = 0,
        small_size_2d: tuple[int, int] | list[int] | None = None,
        small_crop_scale_2d: tuple[float, float] | list[float] = (0.05, 0.3),
        jitter_2d: float = 0.4,
        intensity_views_3d: bool = True,
        cache: str | None = "memory",
        cache_dir: str | None = None,
        skip_bad_files: bool = False,
        demo: bool = False,
        demo_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if demo and (datalist is not None or data_dir is not None):
            raise ValueError(
                "JointSSLDataModule: demo=True uses the built-in volumes; drop datalist/data_dir"
            )
        for name, value in (("batch_size_3d", batch_size_3d), ("batch_size_2d", batch_size_2d)):
            if value < 1:
                raise ValueError(f"JointSSLDataModule: {name} must be at least 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"JointSSLDataModule: num_workers must be >= 0, got {num_workers}")
        if samples_per_volume < 1:
            raise ValueError(
                f"JointSSLDataModule: samples_per_volume must be at least 1, got {samples_per_volume}"
            )
        if cache not in CACHE_MODES:
            raise ValueError(f"JointSSLDataModule: cache must be one of {CACHE_MODES}, got {cache!r}")
        if seed < 0:
            raise ValueError(f"JointSSLDataModule: seed must be >= 0, got {seed}")
        for name, scale in (("crop_scale_2d", crop_scale_2d), ("small_crop_scale_2d", small_crop_scale_2d)):
            if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise ValueError(f"JointSSLDataModule: {name} must be (low, high) in (0, 1], got {scale}")
        if small_crops_2d < 0:
            raise ValueError(f"JointSSLDataModule: small_crops_2d must be >= 0, got {small_crops_2d}")
        if small_size_2d is not None and (len(small_size_2d) != 2 or min(small_size_2d) < 4):
            raise ValueError(
                f"JointSSLDataModule: small_size_2d must be (height, width) of at least 4, got {small_size_2d}"
            )
        if not 0.0 <= jitter_2d < 1.0:
            raise ValueError(f"JointSSLDataModule: jitter_2d must be in [0, 1), got {jitter_2d}")
        self.use_demo = demo or (datalist is None and data_dir is None)
        axes = slice_axes if slice_axes is not None else ([0, 1, 2] if self.use_demo else [slice_axis])
        if not axes or any(a not in (0, 1, 2) for a in axes):
            raise ValueError(
                f"JointSSLDataModule: slice_axes must be a non-empty list of 0, 1, 2; got {slice_axes}"
            )
        self.slice_axes = [int(a) for a in axes]
        self.loader = VolumeLoader(
            num_slices=num_slices,
            size=tuple(size),
            slice_axis=slice_axis,
            orientation=orientation,
            spacing=spacing,
            skip_bad_files=skip_bad_files,
            resize=resize,
        )
        self.volume_dataset: VolumeViewsDataset | None = None
        self.slice_dataset: SliceViewsDataset | None = None
        self._num_volumes = 0

    # -- inputs ---------------------------------------------------------------------------------------------

    def _demo_volumes(self) -> list[Path]:
        """Write the MNI152 template once and list the demo scans."""
        folder = demo_folder(self.hparams.demo_dir, self.trainer, "ssl3d_demo_data")
        target = mni152_nifti(folder, DEMO_RESOLUTION)["image"]
        extra = nibabel_test_scan()
        return [target] if extra is None else [target, extra]

    def _volume_paths(self) -> list[Path]:
        if self.use_demo:
            return self._demo_volumes()
        return list_volumes(self.hparams.datalist, self.hparams.data_dir, self.hparams.pattern)

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        return dist.get_rank(), dist.get_world_size()

    # -- Lightning hooks ------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.use_demo:
            self._demo_volumes()

    def setup(self, stage: str | None = None) -> None:
        """Validate every file, then build this rank's datasets; nothing is read once training has started."""
        if stage not in (None, "fit") or self.volume_dataset is not None:
            return
        hp = self.hparams
        paths = self._volume_paths()
        images = list_images(hp.images_dir) if hp.images_dir is not None else []
        arranged: dict[tuple[int, int], torch.Tensor] = {}

        def keep(position: int, path: Path, volume: torch.Tensor) -> None:
            for axis in self.slice_axes:
                arranged[(position, axis)] = self.loader.arrange(volume, axis)

        check_volumes(paths, self.loader, hp.skip_bad_files, on_loaded=keep)
        images = check_images(images, hp.skip_bad_files)
        keys = sorted(arranged)
        sources = [VolumeSource(paths[position], axis) for position, axis in keys]
        tensors = [arranged.pop(k) for k in keys]
        self._num_volumes = len(sources)

        rank, world = self._rank_and_world()
        shard = list(range(len(sources)))
        if world > 1:
            shard = partition_dataset(shard, num_partitions=world, even_divisible=True, shuffle=False)[rank]
        cached = hp.cache == "memory"
        self.volume_dataset = VolumeViewsDataset(
            [tensors[i] if cached else sources[i] for i in shard],
            self.loader,
            views=TwoDifferentVolumeViews(default_volume_transforms(intensity=hp.intensity_views_3d)),
            samples_per_volume=hp.samples_per_volume,
            cache=hp.cache,
            cache_dir=self._cache_dir() if hp.cache == "disk" else None,
            volume_ids=shard,
            total_volumes=len(sources),
        )
        self.slice_dataset = SliceViewsDataset(
            tensors,
            images,
            self.loader,
            views2d=self._views_2d(),
            slices_per_volume=hp.slices_per_volume,
            min_foreground=hp.min_foreground,
        )
        del tensors
        if len(self.volume_dataset) < hp.batch_size_3d:
            raise ValueError(
                f"JointSSLDataModule: {len(self.volume_dataset)} volume samples on this rank "
                f"({len(shard)} volumes x samples_per_volume={hp.samples_per_volume}) are fewer than "
                f"batch_size_3d={hp.batch_size_3d}, so no full batch can be made"
            )
        if len(self.slice_dataset) // world < hp.batch_size_2d:
            raise ValueError(
                f"JointSSLDataModule: {len(self.slice_dataset)} 2D samples over {world} rank(s) are fewer than "
                f"batch_size_2d={hp.batch_size_2d} per rank, so no full batch can be made"
            )

    def _views_2d(self) -> TwoViews2D:
        hp = self.hparams
        large = dict(size=self.loader.size, scale=tuple(hp.crop_scale_2d), jitter=hp.jitter_2d)
        if not hp.small_crops_2d:
            return TwoViews2D(**large)
        small_size = hp.small_size_2d or tuple(max(4, side // 2) for side in self.loader.size)
        return MultiCropViews2D(hp.small_crops_2d, small_size, tuple(hp.small_crop_scale_2d), **large)

    def _cache_dir(self) -> Path:
        if self.hparams.cache_dir is not None:
            return Path(self.hparams.cache_dir)
        if self.trainer is not None:
            return Path(self.trainer.default_root_dir) / "volume_cache"
        return Path(tempfile.gettempdir()) / "ssl3d_volume_cache"

    @property
    def num_volume_samples(self) -> int:
        """Global number of 3D samples per epoch (all ranks): the size of a 3D memory bank."""
        self._require_setup()
        return self._num_volumes * self.hparams.samples_per_volume

    @property
    def num_slice_samples(self) -> int:
        """Number of 2D samples (images and kept slices): the size of a 2D memory bank."""
        self._require_setup()
        return len(self.slice_dataset)

    def _require_setup(self) -> None:
        if self.volume_dataset is None or self.slice_dataset is None:
            raise RuntimeError("JointSSLDataModule: call setup('fit') first")

    def train_dataloader(self) -> dict[str, DataLoader]:
        self._require_setup()
        hp = self.hparams
        rank, world = self._rank_and_world()
        # Volumes are pre-sharded, so their sampler does not shard again; ``stream`` keeps ranks' seeds apart.
        # Resumable loaders: a run resumed from a mid-epoch checkpoint continues from the very next batch.
        volume_sampler = SeededSampler(self.volume_dataset, seed=hp.seed, stream=1 + rank)
        slice_sampler = SeededSampler(
            self.slice_dataset, seed=hp.seed, stream=0, num_replicas=world, rank=rank
        )
        common = {
            "num_workers": hp.num_workers,
            "persistent_workers": hp.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
            "drop_last": True,
        }
        return {
            "volumes": ResumableDataLoader(
                self.volume_dataset, batch_size=hp.batch_size_3d, sampler=volume_sampler, **common
            ),
            "slices": ResumableDataLoader(
                self.slice_dataset, batch_size=hp.batch_size_2d, sampler=slice_sampler, **common
            ),
        }
