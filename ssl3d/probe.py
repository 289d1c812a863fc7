"""Frozen-feature tissue probe: kNN classification of patch features on held-out MNI152 slices.

Training slices come from one band of the slicing axis and test slices from a disjoint band with a gap, so
no test slice has a near-duplicate neighbour in the training set. Each patch of a slice is labelled
background, grey matter, white matter or other brain (nilearn's masks, see ``ssl3d.data.mni``), and a
weighted kNN vote over the frozen features of training patches classifies the test patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agreement.knn import check_knn_settings, weighted_knn_predict
from agreement.metrics import per_class_accuracy
from ssl3d.data.mni import MNI152, TISSUE_NAMES, load_mni152
from ssl3d.data.volumes import VolumeLoader, scale_to_unit

FeatureFn = Callable[[torch.Tensor], Sequence[torch.Tensor] | torch.Tensor]


@dataclass(frozen=True)
class ProbeSplit:
    """Slices of one band: images, pixel labels at image size, patch labels and the patches to use."""

    images: torch.Tensor  # (N, 1, H, W) float32 in 0..1
    pixel_labels: torch.Tensor  # (N, H, W) int64, majority label of the area each pixel covers
    patch_labels: torch.Tensor  # (N, gh, gw) int64, majority label of each patch
    keep: torch.Tensor  # (N, gh, gw) bool, patches left after subsampling background
    slices: tuple[int, ...]  # indices along the slicing axis

    @property
    def num_patches(self) -> int:
        return int(self.keep.sum())

    def kept_labels(self) -> torch.Tensor:
        """Labels of the kept patches in the order of ``patch_features`` rows."""
        return self.patch_labels.reshape(-1)[self.keep.reshape(-1)]


@dataclass(frozen=True)
class TissueProbeData:
    """Training and held-out test slices with per-patch tissue labels on a ``grid`` of patches."""

    train: ProbeSplit
    test: ProbeSplit
    size: tuple[int, int]
    patch: int
    slice_axis: int
    class_names: tuple[str, ...] = TISSUE_NAMES

    @property
    def grid(self) -> tuple[int, int]:
        return (self.size[0] // self.patch, self.size[1] // self.patch)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def slice_bands(
    length: int, train_range: tuple[float, float], test_range: tuple[float, float]
) -> tuple[list[int], list[int]]:
    """Slice indices ``i`` with ``lo * length <= i < hi * length`` for each band.

    The bands must be non-empty and separated by at least one unused slice, because neighbouring slices are
    nearly identical and would leak test content into the training set.
    """
    if length < 1:
        raise ValueError(f"axis length must be positive, got {length}")
    bands = []
    for name, band in (("train_range", train_range), ("test_range", test_range)):
        if len(band) != 2:
            raise ValueError(f"{name} must be a pair (lo, hi) of fractions, got {band!r}")
        lo, hi = float(band[0]), float(band[1])
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"{name} must satisfy 0 <= lo < hi <= 1, got {band!r}")
        indices = list(range(math.ceil(lo * length), math.ceil(hi * length)))
        if not indices:
            raise ValueError(f"{name} {band!r} contains no slice of an axis of length {length}")
        bands.append(indices)
    train, test = bands
    first, second = (train, test) if train[0] <= test[0] else (test, train)
    if second[0] - first[-1] < 2:
        raise ValueError(
            f"train_range {train_range!r} and test_range {test_range!r} overlap or touch on an axis of "
            f"length {length}; leave at least one slice between them"
        )
    return train, test


def patch_label_grid(labels: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Majority label of each cell of ``grid`` over a label map ``(N, H, W)`` of any resolution.

    The one-hot map is area-averaged onto the grid, so every cell sees the class fractions of the region it
    covers; ties go to the lower class index.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (N, H, W), got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}"
        )
    one_hot = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, grid).argmax(dim=1)


def _pretraining_slices(t1: np.ndarray, slice_axis: int, size: tuple[int, int]) -> torch.Tensor:
    """``(S, H, W)`` sections along ``slice_axis``, normalised and resized as the pretraining loader does.

    The loader maps its percentiles (0.5/99.5) of the whole volume to 0 and 1 with clipping, then resamples
    every section to ``size`` (anti-aliased linear interpolation, the whole section visible). The template is
    already in RAS orientation, so the loader's reorientation is a no-op here.
    """
    loader = VolumeLoader(size=size, slice_axis=slice_axis, resize=True)
    volume = scale_to_unit(
        torch.from_numpy(np.asarray(t1, dtype=np.float32)), loader.percentiles, "the volume"
    )
    return loader.arrange(volume[None])[0].clamp_(0.0, 1.0)


def _subsample_background(labels: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
    """Keep every tissue patch and at most as many background patches as the most frequent tissue class."""
    flat = labels.reshape(-1).numpy()
    counts = np.bincount(flat, minlength=2)
    cap = int(counts[1:].max())
    if cap == 0:
        raise ValueError("the slices contain no tissue patches; choose bands that cut through the brain")
    keep = flat != 0
    background = np.flatnonzero(flat == 0)
    chosen = generator.choice(background, size=min(cap, background.size), replace=False)
    keep[chosen] = True
    return torch.from_numpy(keep).reshape(labels.shape)


def _make_split(
    sections: torch.Tensor,
    tissue: np.ndarray,
    slices: list[int],
    size: tuple[int, int],
    grid: tuple[int, int],
    num_classes: int,
    generator: np.random.Generator,
) -> ProbeSplit:
    images = sections[slices][:, None]
    labels = torch.from_numpy(np.ascontiguousarray(tissue[slices])).long()
    pixel_labels = patch_label_grid(labels, size, num_classes)
    # From the full-resolution map, so patch labels do not inherit the rounding of the resized one.
    patch_labels = patch_label_grid(labels, grid, num_classes)
    keep = _subsample_background(patch_labels, generator)
    return ProbeSplit(images.contiguous(), pixel_labels, patch_labels, keep, tuple(slices))


def make_tissue_probe_data(
    resolution: int = 2,
    slice_axis: int = 2,
    train_range: tuple[float, float] = (0.25, 0.5),
    test_range: tuple[float, float] = (0.55, 0.8),
    size: tuple[int, int] = (64, 64),
    patch: int = 4,
    seed: int = 0,
    mni: MNI152 | None = None,
) -> TissueProbeData:
    """Slices of the MNI152 T1 along ``slice_axis`` (2: axial) from two disjoint bands of that axis.

    With the defaults, training slices are the inferior band and test slices the superior one. Intensities
    are normalised over the volume (0.5/99.5 percentiles, clipped to [0, 1]) and each whole section is
    resized to ``size`` by the pretraining loader's own resampling; labels are resized by area majority.
    Background stays a class but, within each split, is subsampled (with ``seed``) to at most the count of
    the most frequent tissue class, so it cannot dominate accuracy. ``mni`` reuses a loaded template.
    """
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be a pair of positive ints, got {size!r}")
    size = (int(size[0]), int(size[1]))
    if patch < 1 or size[0] % patch or size[1] % patch:
        raise ValueError(f"patch must be a positive divisor of both sides of size {size}, got {patch!r}")
    if mni is None:
        mni = load_mni152(resolution)
    if mni.t1.ndim != 3 or mni.t1.shape != mni.tissue.shape:
        raise ValueError(f"t1 {mni.t1.shape} and tissue {mni.tissue.shape} must be the same 3D shape")
    tissue = np.moveaxis(mni.tissue, slice_axis, 0)
    train_slices, test_slices = slice_bands(tissue.shape[0], train_range, test_range)
    sections = _pretraining_slices(mni.t1, slice_axis, size)
    grid = (size[0] // patch, size[1] // patch)
    generator = np.random.default_rng(seed)
    num_classes = len(TISSUE_NAMES)
    train = _make_split(sections, tissue, train_slices, size, grid, num_classes, generator)
    test = _make_split(sections, tissue, test_slices, size, grid, num_classes, generator)
    return TissueProbeData(train=train, test=test, size=size, patch=int(patch), slice_axis=slice_axis)


def _resize_to_grid(feature: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    if feature.shape[-2:] == grid:
        return feature
    if feature.shape[-2] >= grid[0] and feature.shape[-1] >= grid[1]:
        # Area averaging when shrinking: each patch summarises all its pixels instead of a few samples.
        return F.adaptive_avg_pool2d(feature, grid)
    return F.interpolate(feature, size=grid, mode="bilinear", align_corners=False)


def patch_features(
    feature_fn: FeatureFn, images: torch.Tensor, grid: tuple[int, int], batch_size: int = 64
) -> torch.Tensor:
    """Per-patch features ``(N * gh * gw, C)`` in image, row, column order: the levels of
    ``level_patch_features`` concatenated, so every level weighs the same in a cosine kNN."""
    return torch.cat(level_patch_features(feature_fn, images, grid, batch_size)[0], dim=1)


def level_patch_features(
    feature_fn: FeatureFn, images: torch.Tensor, grid: tuple[int, int], batch_size: int = 64
) -> tuple[list[torch.Tensor], list[float]]:
    """Per-level patch features ``[(N * gh * gw, C_i)]`` in image, row, column order, and each level's stride.

    ``feature_fn`` maps ``(B, 1, H, W)`` images to a list of feature maps ``(B, C_i, h_i, w_i)``. Each level
    is resized to the patch grid (bilinear when enlarging, area average when shrinking) and L2-normalised
    over channels. The stride is the image width over the map width (pixels per feature-map cell).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be a pair of positive ints, got {grid!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    grid = (int(grid[0]), int(grid[1]))
    module = feature_fn if isinstance(feature_fn, nn.Module) else None
    was_training = module.training if module is not None else False
    parameter = next(module.parameters(), None) if module is not None else None
    device = parameter.device if parameter is not None else images.device
    if module is not None:
        module.eval()
    chunks: list[list[torch.Tensor]] = []
    strides: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].to(device)
                levels = feature_fn(batch)
                if isinstance(levels, torch.Tensor):
                    levels = [levels]
                if len(levels) == 0:
                    raise ValueError("feature_fn returned no feature maps")
                if chunks and len(levels) != len(chunks[0]):
                    raise ValueError(f"feature_fn returned {len(levels)} levels, then {len(chunks[0])}")
                resized = []
                for index, level in enumerate(levels):
                    if not isinstance(level, torch.Tensor) or level.ndim != 4:
                        shape = (
                            tuple(level.shape) if isinstance(level, torch.Tensor) else type(level).__name__
                        )
                        raise ValueError(
                            f"feature_fn level {index} must be a (B, C, h, w) tensor, got {shape}"
                        )
                    if level.shape[0] != batch.shape[0]:
                        raise ValueError(
                            f"feature_fn level {index} has batch size {level.shape[0]} for {batch.shape[0]} images"
                        )
                    if not chunks:
                        strides.append(images.shape[-1] / level.shape[-1])
                    level = _resize_to_grid(level.float(), grid)
                    flat = F.normalize(level, dim=1).permute(0, 2, 3, 1)
                    resized.append(flat.reshape(-1, flat.shape[-1]).cpu())
                chunks.append(resized)
    finally:
        if module is not None:
            module.train(was_training)
    if not chunks:
        raise ValueError("images is empty")
    return [torch.cat(parts) for parts in zip(*chunks)], strides


def recalibrate_batchnorm(
    module: nn.Module, images: torch.Tensor, forward: FeatureFn | None = None, batch_size: int = 64
) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``images`` (in place; returns ``module``).

    A freshly initialised network normalises with mean 0 and variance 1, a trained one with the statistics of
    its training data, so comparing their frozen features would reward the statistics rather than the
    weights. Both get the exact averages over the same unlabelled images instead (cumulative, ``momentum=None``).
    ``forward`` is the call that runs the layers (default ``module`` itself); weights are not touched.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or images.shape[0] == 0:
        return module
    was_training = module.training
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else images.device
    run = forward if forward is not None else module
    module.train()
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                run(images[start : start + batch_size].to(device))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        module.train(was_training)
    return module


def _knn_summary(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    class_names: Sequence[str],
    k: int,
    temperature: float,
) -> dict:
    predictions, _ = weighted_knn_predict(
        train_features,
        train_labels,
        test_features,
        num_classes=len(class_names),
        k=k,
        temperature=temperature,
    )
    predictions = predictions.cpu()
    balanced, recall = per_class_accuracy(test_labels, predictions, num_classes=len(class_names))
    return {
        "accuracy": float((predictions == test_labels).float().mean()),
        "mean_per_class_accuracy": balanced,
        "per_class": {
            name: float(recall[i]) for i, name in enumerate(class_names) if not np.isnan(recall[i])
        },
        "num_train": int(train_labels.numel()),
        "num_test": int(test_labels.numel()),
    }


def tissue_knn_probe(
    feature_fn: FeatureFn,
    data: TissueProbeData | None = None,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 64,
) -> dict:
    """kNN-classify held-out test patches by the frozen features of training patches.

    Returns ``accuracy``, ``mean_per_class_accuracy`` (balanced accuracy over the classes present in the
    test patches), ``per_class`` (class name to accuracy), ``num_train`` and ``num_test`` patch counts.
    """
    check_knn_settings(k, temperature)
    data = make_tissue_probe_data() if data is None else data
    splits = []
    for split in (data.train, data.test):
        features = patch_features(feature_fn, split.images, data.grid, batch_size=batch_size)
        splits.append((features[split.keep.reshape(-1)], split.kept_labels()))
    (train_x, train_y), (test_x, test_y) = splits
    return _knn_summary(train_x, train_y, test_x, test_y, data.class_names, k, temperature)


def level_name(index: int, stride: float, channels: int) -> str:
    """``"level 1 (stride 4, 64 ch)"``: how the per-level probe names a feature level (1-based, finest first)."""
    return f"level {index + 1} (stride {stride:g}, {channels} ch)"


ALL_LEVELS = "all levels"


def tissue_knn_probe_per_level(
    feature_fn: FeatureFn,
    data: TissueProbeData | None = None,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 64,
) -> dict[str, dict]:
    """The tissue probe on each feature level alone and on all levels concatenated (``ALL_LEVELS``).

    Levels are coarser than the probe's patches from some depth on; each alone shows what the encoder keeps
    at that resolution, where the concatenation is dominated by whichever levels separate the patches least.
    Keys are ``level_name`` strings, finest first, then ``ALL_LEVELS``; values are ``tissue_knn_probe`` dicts.
    """
    check_knn_settings(k, temperature)
    data = make_tissue_probe_data() if data is None else data
    (train_levels, strides), (test_levels, _) = (
        level_patch_features(feature_fn, split.images, data.grid, batch_size=batch_size)
        for split in (data.train, data.test)
    )
    train_keep, test_keep = data.train.keep.reshape(-1), data.test.keep.reshape(-1)
    train_y, test_y = data.train.kept_labels(), data.test.kept_labels()
    candidates = [
        (level_name(i, stride, train.shape[1]), train, test)
        for i, (train, test, stride) in enumerate(zip(train_levels, test_levels, strides))
    ]
    if len(candidates) > 1:
        candidates.append((ALL_LEVELS, torch.cat(train_levels, dim=1), torch.cat(test_levels, dim=1)))
    return {
        name: _knn_summary(
            train[train_keep], train_y, test[test_keep], test_y, data.class_names, k, temperature
        )
        for name, train, test in candidates
    }


def intensity_patch_features(images: torch.Tensor, patch: int) -> torch.Tensor:
    """The pixels of each ``patch x patch`` cell, each encoded as ``(cos, sin)`` of ``pi/2 * intensity``.

    Cosine similarity on raw intensities ignores their level (a uniform grey patch would equal a uniform
    white one); with the angle encoding every vector has the same norm and the similarity of two patches is
    the mean of ``cos(pi/2 * difference)`` over their pixels, which falls as intensities differ.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got shape {tuple(images.shape)}")
    if patch < 1 or images.shape[-2] % patch or images.shape[-1] % patch:
        raise ValueError(f"patch {patch!r} must divide the image sides {tuple(images.shape[-2:])}")
    pixels = F.pixel_unshuffle(images.float(), patch)  # (N, patch * patch, gh, gw)
    angle = pixels * (math.pi / 2)
    encoded = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).permute(0, 2, 3, 1)
    return encoded.reshape(-1, encoded.shape[-1])


def intensity_baseline(data: TissueProbeData | None = None, k: int = 20, temperature: float = 0.07) -> dict:
    """The tissue probe with each patch's own normalised pixel intensities as its feature.

    It shows how much a learned encoder adds beyond local intensity; the result has the same keys as
    ``tissue_knn_probe``.
    """
    check_knn_settings(k, temperature)
    data = make_tissue_probe_data() if data is None else data
    splits = []
    for split in (data.train, data.test):
        features = intensity_patch_features(split.images, data.patch)
        splits.append((features[split.keep.reshape(-1)], split.kept_labels()))
    (train_x, train_y), (test_x, test_y) = splits
    return _knn_summary(train_x, train_y, test_x, test_y, data.class_names, k, temperature)
