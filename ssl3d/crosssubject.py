"""Cross-subject probes: what the pretrained networks know about anatomy, measured on a brain they never saw.

Linear probes are fitted on the MNI152 template (nilearn; the demo's pretraining volume) and tested on a
different brain, Colin27 (Debian package ``mricron-data``: ``ch2bet.nii.gz`` with the AAL atlas on its grid).
Both brains are registered to MNI space, so a slice's world coordinate and the AAL regions it cuts are
defined the same way for both, while their appearance differs (one averaged brain, one individual).

- Slice level (what ``L_intra`` trains), on the encoder's pooled slice embedding and on the pooled backbone
  features (what a downstream user of the exported encoder gets): ridge regression of the slice position
  (mean absolute error in mm on Colin27) and one-vs-rest logistic regression of AAL region presence per slice
  (AUROC per region, macro mean over regions with both classes in training and test slices). As both brains
  are in MNI space, the regions a slice cuts follow from its position: the region probe asks for the same
  anatomy through a hundred linear read-outs instead of one, so features that encode position non-linearly
  can still score there.
- Volume level (the 3D branch), on ``JointSSL``'s unit-norm volume embedding of slabs of ``num_slices``
  consecutive slices: ridge regression of the slab centre (mm), and retrieval of the matching slab across
  subjects (the MNI152 slab nearest in cosine to each Colin27 slab: its centre's error in mm, and top-1
  accuracy within one slice).

Both brains are preprocessed as the demo pretraining does (``ssl3d.probe._pretraining_slices``): Colin27 is
first resampled onto the MNI152 training grid (2 mm, cubic spline as nilearn resamples the template), so that
both have the same field of view, slice spacing and background share; then each volume's 0.5/99.5
percentiles map to 0 and 1 with clipping and every whole section is resized to the model's ``size``.
Region labels come from the AAL atlas resampled (nearest neighbour) to the MNI152 grid for the training
slices, and from the native AAL (on Colin27's own 1 mm grid) at the same world position for the test slices.
``compare_with_random`` puts a pretrained model against freshly initialised ones of the same architecture,
every network's BatchNorm statistics re-estimated on the MNI152 training slices first.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_roc_auc
from scipy import ndimage

from agreement.optional import optional_import
from agreement.tables import markdown_table, mean_std
from ssl3d.data.datamodule import DEMO_RESOLUTION
from ssl3d.data.mni import load_mni152_template
from ssl3d.data.volumes import read_nifti
from ssl3d.encoder import SliceEncoder
from ssl3d.export import load_network_state, network_state, read_pretraining_checkpoint
from ssl3d.fashion import DatasetNotFoundError
from ssl3d.module import JointSSL
from ssl3d.probe import _pretraining_slices, recalibrate_batchnorm
from ssl3d.report import save_figure

DEFAULT_COLIN_DIR = Path("/usr/share/mricron/templates")
COLIN_FILES = {"t1": "ch2bet.nii.gz", "atlas": "aal.nii.gz", "names": "aal.nii.txt"}
COLIN_PACKAGE = "mricron-data"
#: A region is present in a slice when it covers at least this area of the section.
MIN_REGION_AREA_MM2 = 20.0
#: Ridge penalties searched by efficient leave-one-out cross-validation on the training subject.
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))
#: Inverse L2 penalty of the logistic regressions, fixed: AUROC barely depends on it (0.972-0.977 for C from
#: 0.01 to 1 on a random encoder's embedding), and cross-validation on one subject would choose by near-duplicates.
LOGISTIC_C = 0.1
PIXEL_GRID = 16  # raw-pixel baseline: each slice area-averaged to PIXEL_GRID x PIXEL_GRID
SLAB_PIXEL_GRID = 8  # raw-pixel baseline of a slab: each of its slices at SLAB_PIXEL_GRID x SLAB_PIXEL_GRID
#: ``beats random beyond spread``: better than every random seed and than their mean by more than this many
#: sample standard deviations of the seeds.
SPREAD_STDS = 2.0

AXIS_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}
POSITION = "position MAE (mm)"
REGIONS = "region AUROC"
SLAB_CENTRE = "slab centre MAE (mm)"
RETRIEVAL_ERROR = "slab retrieval error (mm)"
RETRIEVAL_TOP1 = "slab retrieval top-1"
#: Whether a larger value of each probe is better.
HIGHER_IS_BETTER = {
    POSITION: False,
    REGIONS: True,
    SLAB_CENTRE: False,
    RETRIEVAL_ERROR: False,
    RETRIEVAL_TOP1: True,
}
EMBEDDING = "embedding"
BACKBONE = "backbone"
VOLUME = "volume"


def metric_name(features: str, probe: str) -> str:
    """``"embedding / position MAE (mm)"``: how results name a probe on a feature set."""
    return f"{features} / {probe}"


def higher_is_better(metric: str) -> bool:
    """Direction of a metric named by :func:`metric_name` (or a bare probe name)."""
    probe = metric.rsplit(" / ", 1)[-1]
    if probe not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown probe {probe!r} in metric {metric!r}; known: {sorted(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[probe]


# --------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class SubjectSections:
    """Every section of one brain along the slicing axis, on the MNI152 training grid.

    ``sections`` are ``(S, 1, H, W)`` in 0..1, preprocessed as for pretraining; ``positions`` the world
    coordinate (mm) of each section along the slicing axis; ``presence`` ``(S, R)`` whether each AAL region
    covers at least ``MIN_REGION_AREA_MM2`` of the section.
    """

    name: str
    sections: torch.Tensor
    positions: np.ndarray
    presence: np.ndarray

    @property
    def brain(self) -> np.ndarray:
        """Indices of the sections that cut the brain (some AAL region present): the slice probes' slices."""
        return np.flatnonzero(self.presence.any(axis=1))

    @property
    def images(self) -> torch.Tensor:
        return self.sections[torch.from_numpy(self.brain)]


@dataclass(frozen=True)
class CrossSubjectData:
    """MNI152 (``train``) and Colin27 (``test``) sections with positions and AAL region presence."""

    train: SubjectSections
    test: SubjectSections
    region_names: tuple[str, ...]
    size: tuple[int, int]
    num_slices: int
    slice_axis: int
    spacing: float  # mm between sections

    @property
    def slab_starts(self) -> range:
        """First section of every slab of ``num_slices`` consecutive sections."""
        return range(self.train.sections.shape[0] - self.num_slices + 1)

    def slab_centres(self, subject: SubjectSections) -> np.ndarray:
        return np.array([subject.positions[s : s + self.num_slices].mean() for s in self.slab_starts])


def colin27_paths(colin_dir: str | Path | None = None) -> dict[str, Path]:
    """Paths of the Colin27 T1, AAL atlas and region names; else one ``DatasetNotFoundError`` (a
    ``FileNotFoundError``) naming the package to install or the option to pass."""
    folder = Path(colin_dir) if colin_dir is not None else DEFAULT_COLIN_DIR
    paths = {key: folder / name for key, name in COLIN_FILES.items()}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        how = (
            f"install the Debian package with `apt-get install {COLIN_PACKAGE}`, or pass the folder that holds "
            f"{', '.join(COLIN_FILES.values())} as colin_dir (--colin_dir)"
            if colin_dir is None
            else f"colin_dir must be a folder holding {', '.join(COLIN_FILES.values())} "
            f"(Debian package {COLIN_PACKAGE} installs them in {DEFAULT_COLIN_DIR})"
        )
        raise DatasetNotFoundError(
            f"the cross-subject evaluation needs the Colin27 brain and its AAL atlas, but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: {how}"
        )
    return paths


def read_region_table(path: str | Path) -> dict[int, tuple[str, str | None]]:
    """``{label: (name, code or None)}`` from an MRIcron label file (lines ``label name [code]``)."""
    table: dict[int, tuple[str, str | None]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if not 2 <= len(fields) <= 3 or not fields[0].isdigit():
            raise ValueError(f"{path}:{number}: expected 'label name [code]', got {line!r}")
        table[int(fields[0])] = (fields[1], fields[2] if len(fields) == 3 else None)
    if not table:
        raise ValueError(f"{path}: no region names")
    return table


def read_region_names(path: str | Path) -> dict[int, str]:
    """``{label: name}`` from an MRIcron label file."""
    return {label: name for label, (name, _) in read_region_table(path).items()}


def read_canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D NIfTI volume in RAS voxel order and its (diagonal) affine."""
    image = nib.as_closest_canonical(read_nifti(path))
    try:
        data = np.asarray(image.dataobj)
    except Exception as error:  # a header that reads but truncated voxel data
        raise ValueError(
            f"{path}: cannot be read as a NIfTI volume ({type(error).__name__}: {error})"
        ) from None
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    _check_axis_aligned(image.affine, str(path))
    return data, image.affine.copy()


def _check_axis_aligned(affine: np.ndarray, what: str) -> None:
    rotation = affine[:3, :3]
    if not np.allclose(rotation, np.diag(np.diag(rotation)), atol=1e-4) or (np.diag(rotation) <= 0).any():
        raise ValueError(
            f"{what}: the voxel grid must be axis-aligned RAS (a diagonal affine), got\n{affine}"
        )


def resample_to_grid(
    data: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray, order: int
) -> np.ndarray:
    """``data`` resampled onto the voxel grid ``(shape, target_affine)``; 0 outside, world coordinates matched.

    ``order=0`` for labels (nearest neighbour), ``3`` for images (cubic spline, clipped to the input's range,
    as nilearn's ``resample_img`` makes the 2 mm MNI152 template from the 1 mm one).
    """
    matrix = np.linalg.inv(affine) @ target_affine
    source = data if order == 0 else data.astype(np.float64)
    out = ndimage.affine_transform(
        source, matrix[:3, :3], offset=matrix[:3, 3], output_shape=tuple(shape), order=order, cval=0.0
    )
    if order > 0:
        out = np.clip(out, min(float(data.min()), 0.0), float(data.max()))
    return out


def section_positions(affine: np.ndarray, length: int, axis: int) -> np.ndarray:
    """World coordinate (mm) along ``axis`` of each of the ``length`` sections of an axis-aligned grid."""
    return affine[axis, 3] + affine[axis, axis] * np.arange(length)


def region_presence(
    atlas: np.ndarray,
    affine: np.ndarray,
    axis: int,
    positions: np.ndarray,
    labels: Sequence[int],
    min_area_mm2: float = MIN_REGION_AREA_MM2,
) -> np.ndarray:
    """``(len(positions), len(labels))``: whether each label covers ``min_area_mm2`` of the atlas section
    nearest each world position along ``axis`` (absent where no section lies within half a voxel)."""
    _check_axis_aligned(affine, "atlas")
    spacing = affine[axis, axis]
    voxel_area = float(np.prod(np.delete(np.diag(affine)[:3], axis)))
    top = int(atlas.max())
    lookup = np.full(top + 1, len(labels), dtype=np.int64)  # atlas value -> column of ``labels``; others last
    for column, label in enumerate(labels):
        if 0 <= label <= top:
            lookup[label] = column
    indices = (np.asarray(positions, dtype=np.float64) - affine[axis, 3]) / spacing
    nearest = np.rint(indices).astype(np.int64)
    valid = (np.abs(indices - nearest) <= 0.5 + 1e-6) & (nearest >= 0) & (nearest < atlas.shape[axis])
    sections = np.moveaxis(atlas, axis, 0)[nearest[valid]].reshape(int(valid.sum()), -1)
    columns = lookup[sections.astype(np.int64)]  # (sections, voxels)
    rows = np.repeat(np.arange(columns.shape[0]), columns.shape[1])
    counts = np.bincount(
        rows * (len(labels) + 1) + columns.ravel(), minlength=columns.shape[0] * (len(labels) + 1)
    )
    counts = counts.reshape(columns.shape[0], len(labels) + 1)[:, : len(labels)]
    presence = np.zeros((len(positions), len(labels)), dtype=bool)
    presence[valid] = counts * voxel_area >= min_area_mm2
    return presence


@dataclass(frozen=True)
class _Volumes:
    """Both brains and their atlases on the grids the probes use (see :func:`_load_volumes`)."""

    mni_t1: np.ndarray
    mni_atlas: np.ndarray
    colin_t1: np.ndarray  # on the MNI152 grid
    colin_atlas: np.ndarray  # native grid
    grid_affine: np.ndarray
    colin_affine: np.ndarray
    labels: tuple[int, ...]
    names: tuple[str, ...]


@functools.lru_cache(maxsize=2)
def _load_volumes(colin_dir: str | None) -> _Volumes:
    paths = colin27_paths(colin_dir)  # first, so a missing package is the first error a user sees
    names = read_region_names(paths["names"])
    colin_t1, colin_t1_affine = read_canonical(paths["t1"])
    colin_atlas, colin_affine = read_canonical(paths["atlas"])
    mni_t1, mni_affine = load_mni152_template(DEMO_RESOLUTION)
    _check_axis_aligned(mni_affine, "MNI152 template")
    colin_on_grid = resample_to_grid(colin_t1, colin_t1_affine, mni_t1.shape, mni_affine, order=3)
    mni_atlas = resample_to_grid(colin_atlas, colin_affine, mni_t1.shape, mni_affine, order=0)
    labels = tuple(sorted(names))
    return _Volumes(
        mni_t1=mni_t1,
        mni_atlas=mni_atlas,
        colin_t1=colin_on_grid.astype(np.float32),
        colin_atlas=colin_atlas,
        grid_affine=mni_affine,
        colin_affine=colin_affine,
        labels=labels,
        names=tuple(names[label] for label in labels),
    )


def cross_subject_data(
    size: Sequence[int] = (64, 64),
    num_slices: int = 32,
    slice_axis: int = 2,
    colin_dir: str | Path | None = None,
) -> CrossSubjectData:
    """MNI152 training and Colin27 test sections along ``slice_axis`` (2 axial, 1 coronal, 0 sagittal), for a
    model that takes ``size`` slices and ``num_slices``-slice volumes. Loaded once per argument set (cached).

    ``colin_dir`` is the folder with ``ch2bet.nii.gz``, ``aal.nii.gz`` and ``aal.nii.txt`` (default: where
    ``apt-get install mricron-data`` puts them). Along the sagittal axis, mirrored slices look alike while
    positions are signed and AAL names carry the side, so there the probes also ask for left versus right.
    """
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"size must be two positive ints (H, W), got {size!r}")
    if int(num_slices) < 1:
        raise ValueError(f"num_slices must be at least 1, got {num_slices!r}")
    directory = None if colin_dir is None else str(Path(colin_dir).expanduser().resolve())
    return _cross_subject_data((int(size[0]), int(size[1])), int(num_slices), int(slice_axis), directory)


@functools.lru_cache(maxsize=8)
def _cross_subject_data(
    size: tuple[int, int], num_slices: int, slice_axis: int, colin_dir: str | None
) -> CrossSubjectData:
    volumes = _load_volumes(colin_dir)
    length = volumes.mni_t1.shape[slice_axis]
    if num_slices > length:
        raise ValueError(f"num_slices={num_slices} exceeds the {length} sections along axis {slice_axis}")
    positions = section_positions(volumes.grid_affine, length, slice_axis)
    subjects = []
    for name, t1, atlas, affine in (
        ("MNI152", volumes.mni_t1, volumes.mni_atlas, volumes.grid_affine),
        ("Colin27", volumes.colin_t1, volumes.colin_atlas, volumes.colin_affine),
    ):
        sections = _pretraining_slices(t1, slice_axis, size)[:, None].contiguous()
        presence = region_presence(atlas, affine, slice_axis, positions, volumes.labels)
        subjects.append(SubjectSections(name, sections, positions, presence))
    return CrossSubjectData(
        train=subjects[0],
        test=subjects[1],
        region_names=volumes.names,
        size=size,
        num_slices=num_slices,
        slice_axis=slice_axis,
        spacing=float(volumes.grid_affine[slice_axis, slice_axis]),
    )


# ------------------------------------------------------------------------------------------------- probes
def _sklearn():
    optional_import("sklearn", extra="demo", purpose="the cross-subject probes")
    from sklearn.linear_model import LogisticRegression, RidgeCV

    return LogisticRegression, RidgeCV


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    array = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    return array.reshape(array.shape[0], -1)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features centred and scaled by their training mean and standard deviation; features (nearly) constant
    on the training set are dropped, since they carry nothing a fit could use and dividing by their tiny
    spread would blow up their test values (background pixels that only the test brain reaches)."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    keep = std > 1e-6 * max(float(std.max(initial=0.0)), 1e-12)
    if not keep.any():
        return np.zeros((train.shape[0], 1)), np.zeros((test.shape[0], 1))
    return (train[:, keep] - mean[keep]) / std[keep], (test[:, keep] - mean[keep]) / std[keep]


def ridge_mae(
    train_x: torch.Tensor | np.ndarray,
    train_y: np.ndarray,
    test_x: torch.Tensor | np.ndarray,
    test_y: np.ndarray,
    alphas: Sequence[float] = RIDGE_ALPHAS,
) -> float:
    """Mean absolute error on the test set of a ridge regression on standardised features, its penalty chosen
    from ``alphas`` by leave-one-out error on the training set (``RidgeCV``'s efficient default)."""
    _, RidgeCV = _sklearn()
    train, test = _standardise(_as_numpy(train_x), _as_numpy(test_x))
    model = RidgeCV(alphas=alphas).fit(train, np.asarray(train_y, np.float64))
    return float(np.mean(np.abs(model.predict(test) - np.asarray(test_y, np.float64))))


def presence_auroc(
    train_x: torch.Tensor | np.ndarray,
    train_presence: np.ndarray,
    test_x: torch.Tensor | np.ndarray,
    test_presence: np.ndarray,
    names: Sequence[str] | None = None,
    C: float = LOGISTIC_C,
) -> tuple[float, dict[str, float]]:
    """Macro AUROC of one-vs-rest logistic regressions (standardised features, fixed ``C``), and the AUROC per
    region, over the regions with both classes among the training and among the test samples.

    The fits use liblinear (with ``intercept_scaling=100``, so that the intercept is in effect unpenalised,
    as with sklearn's other solvers) on the coordinates of the standardised features in the span of the
    training samples: an L2-penalised linear model's weights lie in that span, so the fit is the same, on at
    most as many dimensions as there are training samples.
    """
    sklearn = optional_import("sklearn", extra="demo", purpose="the cross-subject probes")
    LogisticRegression = _sklearn()[0]
    train, test = _standardise(_as_numpy(train_x), _as_numpy(test_x))
    _, _, basis = np.linalg.svd(train, full_matrices=False)
    train, test = train @ basis.T, test @ basis.T
    train_presence, test_presence = np.asarray(train_presence, bool), np.asarray(test_presence, bool)
    names = list(names) if names is not None else [str(i) for i in range(train_presence.shape[1])]
    columns = [
        c
        for c in range(train_presence.shape[1])
        if 0 < train_presence[:, c].sum() < len(train_presence)
        and 0 < test_presence[:, c].sum() < len(test_presence)
    ]
    if not columns:
        raise ValueError("no region has both classes in the training and in the test slices")
    scores = np.empty((test.shape[0], len(columns)))
    # Arguments are checked here once; sklearn's per-call validation would cost as much as the small fits.
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        for j, column in enumerate(columns):
            model = LogisticRegression(C=C, solver="liblinear", intercept_scaling=100.0)
            scores[:, j] = model.fit(train, train_presence[:, column]).decision_function(test)
    # MONAI's AUROC, as fine-tuning's: exact in float64 (torchmetrics' multilabel AUROC differs from scikit-learn's
    # by up to 2e-4 on float64 scores).
    auroc = compute_roc_auc(
        torch.from_numpy(scores),
        torch.from_numpy(test_presence[:, columns].astype(np.float64)),
        average="none",
    )
    per_region = {names[c]: float(a) for c, a in zip(columns, np.atleast_1d(auroc))}  # one column: a float
    return float(np.mean(list(per_region.values()))), per_region


def _slice_metrics(
    features: dict[str, tuple[torch.Tensor, torch.Tensor]],
    data: CrossSubjectData,
    per_region: dict[str, dict[str, float]] | None = None,
) -> dict[str, float]:
    """Position and region probes for features of every section, ``{name: (train (S, C), test (S, C))}``;
    the AUROC of each region goes to ``per_region[name]`` when a dict is given."""
    train_brain, test_brain = data.train.brain, data.test.brain
    results = {}
    for name, (train, test) in features.items():
        train_x, test_x = _as_numpy(train)[train_brain], _as_numpy(test)[test_brain]
        results[metric_name(name, POSITION)] = ridge_mae(
            train_x, data.train.positions[train_brain], test_x, data.test.positions[test_brain]
        )
        results[metric_name(name, REGIONS)], regions = presence_auroc(
            train_x,
            data.train.presence[train_brain],
            test_x,
            data.test.presence[test_brain],
            data.region_names,
        )
        if per_region is not None:
            per_region[name] = regions
    return results


def _embed_and_pool(encoder: SliceEncoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(encoder(images), encoder.backbone(images))`` from one pass through the backbone.

    ``SliceEncoder.forward`` pools the final feature map with ``backbone.forward_head(..., pre_logits=True)``,
    which for a timm model without classifier is what ``backbone(images)`` returns; that call is observed
    instead of repeated. If the encoder does not make exactly one such call, the backbone runs again.
    """
    backbone = encoder.backbone
    original = backbone.forward_head
    pooled: list[torch.Tensor] = []

    def forward_head(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)
        pooled.append(out)
        return out

    backbone.forward_head = forward_head
    try:
        embedding = encoder(images)
    finally:
        del backbone.forward_head
    if len(pooled) != 1 or pooled[0].shape[0] != images.shape[0]:
        return embedding, backbone(images)
    return embedding, pooled[0]


@torch.no_grad()
def _section_features(encoder: SliceEncoder, data: CrossSubjectData, batch_size: int = 128) -> dict:
    """Embedding and pooled backbone features of every section of both subjects, in eval mode:
    ``{"embedding": (train (S, d_model), test (S, d_model)), "backbone": (train, test)}``."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out: dict[str, list[torch.Tensor]] = {EMBEDDING: [], BACKBONE: []}
    try:
        for subject in (data.train, data.test):
            parts: dict[str, list[torch.Tensor]] = {EMBEDDING: [], BACKBONE: []}
            for start in range(0, subject.sections.shape[0], batch_size):
                embedding, pooled = _embed_and_pool(
                    encoder, subject.sections[start : start + batch_size].to(device)
                )
                parts[EMBEDDING].append(embedding.float().cpu())
                parts[BACKBONE].append(pooled.float().cpu())
            for key in out:
                out[key].append(torch.cat(parts[key]))
    finally:
        encoder.train(was_training)
    return {key: tuple(value) for key, value in out.items()}


def slice_probes(encoder: SliceEncoder, data: CrossSubjectData) -> dict[str, float]:
    """Slice-level probes of ``encoder`` as it is (BatchNorm statistics untouched; see
    :func:`compare_with_random`): ``{"embedding / position MAE (mm)": ..., "embedding / region AUROC": ...,
    "backbone / ...": ...}`` on the Colin27 slices that cut the brain."""
    return _slice_metrics(_section_features(encoder, data), data)


def baseline_probes(data: CrossSubjectData) -> dict[str, float]:
    """The probes on raw intensities, for scale: ``pixels 16x16`` (each slice area-averaged to 16 x 16),
    ``mean pixel`` (the slice's mean intensity, i.e. the pixels pooled as the encoder pools its features),
    ``constant`` (the training positions' mean, position only), and for slabs ``slab pixels 8x8``."""
    features = {
        f"pixels {PIXEL_GRID}x{PIXEL_GRID}": tuple(
            F.adaptive_avg_pool2d(s.sections, PIXEL_GRID).flatten(1) for s in (data.train, data.test)
        ),
        "mean pixel": tuple(s.sections.mean(dim=(1, 2, 3))[:, None] for s in (data.train, data.test)),
    }
    results = _slice_metrics(features, data)
    train_y = data.train.positions[data.train.brain]
    test_y = data.test.positions[data.test.brain]
    results[metric_name("constant", POSITION)] = float(np.mean(np.abs(test_y - train_y.mean())))
    pixels = tuple(
        F.adaptive_avg_pool2d(s.sections, SLAB_PIXEL_GRID).flatten(1) for s in (data.train, data.test)
    )
    slabs = tuple(_windows(p, data) for p in pixels)
    results.update(_slab_metrics(*slabs, data, f"slab pixels {SLAB_PIXEL_GRID}x{SLAB_PIXEL_GRID}"))
    centres = data.slab_centres(data.train)
    results[metric_name("constant", SLAB_CENTRE)] = float(
        np.mean(np.abs(data.slab_centres(data.test) - centres.mean()))
    )
    return results


def _windows(per_section: torch.Tensor, data: CrossSubjectData) -> torch.Tensor:
    """``(S, C)`` -> ``(num_slabs, num_slices, C)``: the rows of every slab."""
    return per_section.unfold(0, data.num_slices, 1)[: len(data.slab_starts)].permute(0, 2, 1).contiguous()


def _slab_metrics(
    train: torch.Tensor, test: torch.Tensor, data: CrossSubjectData, features: str = VOLUME
) -> dict[str, float]:
    """Slab-centre regression and cross-subject retrieval on per-slab features ``(num_slabs, ...)``."""
    train_y, test_y = data.slab_centres(data.train), data.slab_centres(data.test)
    train_x, test_x = train.flatten(1).double(), test.flatten(1).double()
    similarity = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    retrieved = train_y[similarity.argmax(dim=1).numpy()]
    errors = np.abs(retrieved - test_y)
    return {
        metric_name(features, SLAB_CENTRE): ridge_mae(train_x, train_y, test_x, test_y),
        metric_name(features, RETRIEVAL_ERROR): float(errors.mean()),
        metric_name(features, RETRIEVAL_TOP1): float(np.mean(errors <= data.spacing + 1e-6)),
    }


@torch.no_grad()
def _volume_embeddings(model: JointSSL, tokens: torch.Tensor, data: CrossSubjectData, batch_size: int = 64):
    """Volume embeddings of every slab from the per-section slice tokens ``(S, d_model)``.

    In eval mode the encoder embeds each slice on its own, so ``JointSSL.embed_volumes`` on a slab equals
    the slice Transformer on that slab's rows of the per-section tokens; embedding each section once instead
    of once per slab containing it makes the probe ``num_slices`` times cheaper (tested for equality).
    """
    windows = _windows(tokens, data)
    parameter = next(model.transformer.parameters())
    out = [
        model.transformer.volume_embedding(windows[start : start + batch_size].to(parameter)).float().cpu()
        for start in range(0, windows.shape[0], batch_size)
    ]
    return torch.cat(out)


def _volume_metrics(model: JointSSL, embeddings: tuple[torch.Tensor, torch.Tensor], data) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        slabs = [_volume_embeddings(model, tokens, data) for tokens in embeddings]
    finally:
        model.train(was_training)
    return _slab_metrics(slabs[0], slabs[1], data)


def volume_probes(model: JointSSL, data: CrossSubjectData) -> dict[str, float]:
    """Volume-level probes of the 3D branch (encoder + slice Transformer, as they are): slab-centre ridge
    regression error, cross-subject slab retrieval error (mm) and top-1 accuracy within one slice."""
    return _volume_metrics(model, _section_features(model.encoder, data)[EMBEDDING], data)


# ------------------------------------------------------------------------------------ pretrained vs random
def _probe_model(
    model: JointSSL, data: CrossSubjectData, volume: bool, per_region: dict | None = None
) -> dict[str, float]:
    """Re-estimate the encoder's BatchNorm statistics on the MNI152 training slices (in place), then probe."""
    recalibrate_batchnorm(model.encoder, data.train.images)
    features = _section_features(model.encoder, data)
    results = _slice_metrics(features, data, per_region)
    if volume:
        results.update(_volume_metrics(model, features[EMBEDDING], data))
    return results


def _init_arguments(hparams: dict[str, Any]) -> dict[str, Any]:
    """``JointSSL`` arguments from saved hyperparameters, without weights files or entries that are not
    arguments (LightningCLI adds ``_instantiator``)."""
    names = inspect.signature(JointSSL.__init__).parameters
    arguments = {k: v for k, v in dict(hparams).items() if k in names and k != "self"}
    arguments["pretrained_backbone"] = None
    return arguments


def _fresh_model(model: JointSSL, seed: int) -> JointSSL:
    """``JointSSL`` with ``model``'s hyperparameters, initialised under ``seed``, never from a weights file."""
    arguments = _init_arguments(model.hparams)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return JointSSL(**arguments)


def load_networks(model: JointSSL, state: dict[str, torch.Tensor]) -> JointSSL:
    """Load the encoder and slice Transformer of a ``JointSSL`` state dict (or a Lightning checkpoint's
    ``state_dict``) into ``model``, strictly; clustering state, whose shapes depend on the data, is ignored."""
    load_network_state(model.encoder, model.transformer, state)
    return model


def load_checkpoint_model(path: str | Path) -> JointSSL:
    """A ``JointSSL`` with the hyperparameters and networks of a Lightning checkpoint (``weights_only``)."""
    state, hyperparameters = read_pretraining_checkpoint(path)
    try:
        return load_networks(JointSSL(**_init_arguments(hyperparameters)), state)
    except RuntimeError as error:
        raise ValueError(
            f"{path}: its networks do not fit its hyperparameters ({str(error).splitlines()[0]})"
        ) from None


def _same_networks(model: JointSSL, state: dict[str, torch.Tensor]) -> bool:
    current = network_state(model.state_dict())
    state = network_state(state)
    return current.keys() == state.keys() and all(torch.equal(current[k], state[k].cpu()) for k in current)


def beats_random(pretrained: float, random_values: Sequence[float], higher_better: bool) -> bool:
    """The verdict rule: better than every random seed and than their mean by more than ``SPREAD_STDS``
    sample standard deviations (needs at least two seeds)."""
    values = np.asarray(random_values, dtype=np.float64)
    if values.size < 2 or not math.isfinite(pretrained):
        return False
    sign = 1.0 if higher_better else -1.0
    gain = sign * (pretrained - values.mean())
    return bool(sign * (pretrained - values).min() > 0 and gain > SPREAD_STDS * values.std(ddof=1))


def random_comparison(
    pretrained: float, random_values: Sequence[float], higher_better: bool = True
) -> dict[str, Any]:
    """One metric of a pretrained network against random initialisations: ``pretrained``, ``random mean``,
    ``random std`` (sample), ``random values``, ``gain`` (signed so that positive is better) and ``beats random
    beyond spread`` (:func:`beats_random`)."""
    values = [float(v) for v in random_values]
    mean, std = mean_std(values)
    return {
        "pretrained": pretrained,
        "random mean": mean,
        "random std": std,
        "random values": values,
        "gain": (pretrained - mean) if higher_better else (mean - pretrained),
        "beats random beyond spread": beats_random(pretrained, values, higher_better),
    }


def _baselines_of(baselines: dict[str, float], metric: str) -> dict[str, float]:
    """The raw-intensity baselines of ``metric``'s probe, by feature name."""
    probe = metric.rsplit(" / ", 1)[-1]
    return {name.rsplit(" / ", 1)[0]: v for name, v in baselines.items() if name.endswith(" / " + probe)}


def compare_with_random(
    model: JointSSL,
    initial_state: dict[str, torch.Tensor] | None,
    seeds: Sequence[int],
    data: CrossSubjectData,
    volume: bool = True,
) -> dict[str, Any]:
    """The probes on ``model`` against freshly initialised models of the same architecture, one per seed.

    Every network is probed on a CPU copy whose BatchNorm statistics are re-estimated on the MNI152 training
    slices, so that the comparison is of learned weights. ``initial_state`` (the state dict ``model`` started
    pretraining from; encoder and slice Transformer entries are used) adds the paired difference pretrained
    minus initial; when it equals a seed's initialisation that seed's result is reused. ``volume=False``
    leaves out the volume probes (the 3D branch).

    Returns ``rows`` (one per metric: ``metric``, ``higher is better``, ``pretrained``, ``random mean``,
    ``random std`` (sample std over seeds), ``random values``, ``initial``, ``paired difference``,
    ``beats random beyond spread`` (:func:`beats_random`) and ``baselines`` ``{name: value}`` of the raw-pixel
    probes for the same probe), ``seeds``, ``rule``, ``seconds`` and ``per-region AUROC`` of the pretrained
    model's embedding.
    """
    seeds = [int(s) for s in seeds]
    if len(seeds) < 1:
        raise ValueError("compare_with_random needs at least one random seed (three or more for a verdict)")
    started = time.perf_counter()
    # A CPU copy of the networks, not of the LightningModule (which may hold its trainer).
    networks = {k: v.detach().cpu() for k, v in network_state(model.state_dict()).items()}
    per_region: dict[str, dict[str, float]] = {}
    pretrained = _probe_model(load_networks(_fresh_model(model, 0), networks), data, volume, per_region)
    randoms: list[dict[str, float]] = []
    initial: dict[str, float] | None = None
    for seed in seeds:
        fresh = _fresh_model(model, seed)
        is_initial = initial_state is not None and initial is None and _same_networks(fresh, initial_state)
        randoms.append(_probe_model(fresh, data, volume))
        if is_initial:
            initial = randoms[-1]
    if initial_state is not None and initial is None:
        initial = _probe_model(load_networks(_fresh_model(model, seeds[0]), initial_state), data, volume)
    baselines = baseline_probes(data)
    rows = []
    for metric, value in pretrained.items():
        higher = higher_is_better(metric)
        rows.append(
            {
                "metric": metric,
                "higher is better": higher,
                **random_comparison(value, [r[metric] for r in randoms], higher),
                "initial": None if initial is None else initial[metric],
                "paired difference": None if initial is None else value - initial[metric],
                "baselines": _baselines_of(baselines, metric),
            }
        )
    return {
        "rows": rows,
        "seeds": seeds,
        "rule": (
            f"better than every random seed and than their mean by more than {SPREAD_STDS:g} sample standard "
            "deviations"
        ),
        "axis": AXIS_NAMES[data.slice_axis],
        "seconds": time.perf_counter() - started,
        "per-region AUROC": per_region[EMBEDDING],
    }


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`compare_with_random` rows."""
    table = []
    for row in rows:
        values = row["random values"]
        paired = row.get("paired difference")
        table.append(
            {
                "metric": f"{row['metric']} {'↑' if row['higher is better'] else '↓'}",
                "pretrained": f"{row['pretrained']:.3f}",
                f"random (n={len(values)})": f"{row['random mean']:.3f} ± {row['random std']:.3f}",
                "paired Δ vs init": "" if paired is None else f"{paired:+.3f}",
                "beats random": "yes" if row["beats random beyond spread"] else "no",
                "raw-intensity baselines": "; ".join(
                    f"{name} {value:.3f}" for name, value in row.get("baselines", {}).items()
                ),
            }
        )
    return markdown_table(list(table[0]), table) if table else ""


def _verdict_line(rows: Sequence[dict[str, Any]], flag: str, qualifier: str, rule: str) -> str:
    """One line naming the metrics whose ``flag`` is set: pretraining beats random initialisation there."""
    if not rows:
        return "No cross-subject metrics to compare."
    better = [row["metric"] for row in rows if row[flag]]
    others = [row["metric"] for row in rows if not row[flag]]
    claim = f"beat{'s' if better else ''} random initialisation{qualifier} ({rule})"
    if not others:
        return f"Pretraining {claim} on every metric."
    if not better:
        return f"Pretraining does not {claim} on any metric."
    return (
        f"Pretraining {claim} on {len(better)} of {len(rows)} metrics ({', '.join(better)}), not on "
        f"{', '.join(others)}."
    )


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One line: on which metrics pretraining beats random initialisation beyond the seeds' spread."""
    rule = f"better than every seed and than their mean by > {SPREAD_STDS:g} std"
    return _verdict_line(rows, "beats random beyond spread", " beyond the seeds' spread", rule)


# ------------------------------------------------------------------------- several pretraining runs vs random
@dataclass(frozen=True)
class PretrainedRun:
    """One finished pretraining run: its name (the run folder), the model with its trained networks, and the
    seed its networks were initialised from (``seed_everything``), for the paired difference."""

    name: str
    model: JointSSL
    seed: int


def separates_from_random(
    pretrained: Sequence[float], random_values: Sequence[float], paired: Sequence[float], higher_better: bool
) -> bool:
    """The verdict rule of :func:`compare_runs`: every pretraining run is better than every random
    initialisation, and better than its own initialisation. With 3 runs and 3 random seeds, the first part
    alone happens by chance with probability 1/20 when pretraining changes nothing (a rank test's p-value)."""
    sign = 1.0 if higher_better else -1.0
    pretrained_worst = min(sign * float(v) for v in pretrained)
    random_best = max(sign * float(v) for v in random_values)
    return bool(pretrained_worst > random_best and all(sign * float(d) > 0 for d in paired))


def compare_runs(
    runs: Sequence[PretrainedRun], random_seeds: int, data: CrossSubjectData, volume: bool = True
) -> dict[str, Any]:
    """The probes on several pretraining runs (e.g. three seeds of one configuration) against random
    initialisations of the same architecture.

    The random seeds are the runs' own seeds first (their initialisations, so each run's paired difference is
    pretrained minus its own initialisation), then the smallest unused seeds up to ``random_seeds``. Every
    network's BatchNorm statistics are re-estimated on the MNI152 training slices (:func:`_probe_model`).
    Returns ``rows`` (one per metric: pretrained values, mean and sample std over runs; random values, mean and
    std; paired differences, mean and std; ``separates from random`` by :func:`separates_from_random`; raw-pixel
    ``baselines``), ``runs``, ``random seeds``, ``rule`` and ``seconds``.
    """
    if not runs:
        raise ValueError("compare_runs needs at least one pretraining run")
    started = time.perf_counter()
    template = runs[0].model
    seeds = list(dict.fromkeys(int(run.seed) for run in runs))
    candidate = 0
    while len(seeds) < random_seeds:
        if candidate not in seeds:
            seeds.append(candidate)
        candidate += 1
    random_results = {seed: _probe_model(_fresh_model(template, seed), data, volume) for seed in seeds}
    pretrained_results = []
    for run in runs:
        networks = {k: v.detach().cpu() for k, v in network_state(run.model.state_dict()).items()}
        try:
            model = load_networks(_fresh_model(template, 0), networks)
        except RuntimeError as error:
            raise ValueError(
                f"{run.name}: its networks do not fit the architecture of {runs[0].name}; compare runs of one "
                f"configuration ({str(error).splitlines()[0]})"
            ) from None
        pretrained_results.append(_probe_model(model, data, volume))
    baselines = baseline_probes(data)
    rows = []
    for metric in pretrained_results[0]:
        higher = higher_is_better(metric)
        pretrained = [r[metric] for r in pretrained_results]
        random_values = [random_results[seed][metric] for seed in seeds]
        paired = [r[metric] - random_results[run.seed][metric] for r, run in zip(pretrained_results, runs)]
        rows.append(
            {
                "metric": metric,
                "higher is better": higher,
                "pretrained values": pretrained,
                **dict(zip(("pretrained mean", "pretrained std"), mean_std(pretrained))),
                "random values": random_values,
                **dict(zip(("random mean", "random std"), mean_std(random_values))),
                "paired differences": paired,
                **dict(zip(("paired mean", "paired std"), mean_std(paired))),
                "separates from random": separates_from_random(pretrained, random_values, paired, higher),
                "baselines": _baselines_of(baselines, metric),
            }
        )
    return {
        "rows": rows,
        "runs": [{"name": run.name, "seed": run.seed} for run in runs],
        "random seeds": seeds,
        "rule": "every pretraining run better than every random initialisation and than its own initialisation",
        "axis": AXIS_NAMES[data.slice_axis],
        "seconds": time.perf_counter() - started,
    }


def format_run_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`compare_runs` rows."""
    table = []
    for row in rows:
        table.append(
            {
                "metric": f"{row['metric']} {'↑' if row['higher is better'] else '↓'}",
                f"pretrained (n={len(row['pretrained values'])})": (
                    f"{row['pretrained mean']:.3f} ± {row['pretrained std']:.3f}"
                ),
                f"random (n={len(row['random values'])})": f"{row['random mean']:.3f} ± {row['random std']:.3f}",
                "paired Δ vs own init": f"{row['paired mean']:+.3f} ± {row['paired std']:.3f}",
                "every run beats every random seed": "yes" if row["separates from random"] else "no",
                "raw-intensity baselines": "; ".join(
                    f"{name} {value:.3f}" for name, value in row.get("baselines", {}).items()
                ),
            }
        )
    return markdown_table(list(table[0]), table) if table else ""


def run_verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One line: on which metrics every pretraining run beats every random initialisation and its own."""
    rule = "every run better than every random seed and than its own initialisation"
    return _verdict_line(rows, "separates from random", "", rule)


def plot_runs(rows: Sequence[dict[str, Any]], out_png: str | Path) -> Path:
    """One panel per metric: random initialisations and pretraining runs, each run joined to its own
    initialisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(rows))
    lines = math.ceil(len(rows) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.8 * lines), squeeze=False)
    for axis, row in zip(axes.flat, rows):
        randoms, pretrained = row["random values"], row["pretrained values"]
        axis.scatter(np.zeros(len(randoms)), randoms, color="grey", label="random")
        axis.scatter(np.ones(len(pretrained)), pretrained, color="tab:blue", label="pretrained")
        for value, difference in zip(pretrained, row["paired differences"]):
            axis.plot([0, 1], [value - difference, value], color="tab:blue", alpha=0.4)
        axis.set_xticks([0, 1], ["random", "pretrained"])
        axis.set_xlim(-0.5, 1.5)
        axis.set_title(f"{row['metric']} {'↑' if row['higher is better'] else '↓'}", fontsize=8)
    for axis in list(axes.flat)[len(rows) :]:
        axis.axis("off")
    return save_figure(figure, out_png)
