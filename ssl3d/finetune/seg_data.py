"""Volume segmentation data: image/label NIfTI pairs, cut into 2D slices for the slice-wise U-Net.

Cases come from a MONAI decathlon-style JSON datalist, from folders (``images/`` and ``labels/`` with matching
file names), or, with neither, from one of two built-in tasks:

- ``demo="tissue"``: nilearn's MNI152 template (grey matter, white matter, background), trained on inferior
  axial slices and tested on superior ones with a gap between the bands, so no test slice has a near-copy in
  training. Tissue classes follow from intensity.
- ``demo="lobes"``: brain lobes from the AAL atlas (7 groups of its 116 regions), trained on MNI152 (AAL
  resampled onto it) and tested on another brain, Colin27 with its own AAL (Debian ``mricron-data``). Lobe
  boundaries are sulci and positions, not intensities: a task that needs anatomy.
 Images are preprocessed as for pretraining (0.5/99.5 percentiles to 0..1, each
section resized to ``size``); labels are mapped through ``label_map`` and resized by area majority.

Every pair is validated when the data module is set up, before training: shapes and affines must agree and
every label value must be in ``label_map``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from tqdm.auto import tqdm

from agreement.runs import ResumableDataLoader
from ssl3d.data.mni import demo_folder
from ssl3d.data.sources import read_datalist
from ssl3d.data.volumes import VolumeLoader, read_nifti
from ssl3d.probe import patch_label_grid, slice_bands

DEMO_TASKS = ("tissue", "lobes")
DEMO_CLASSES = ["background", "grey matter", "white matter"]
LOBE_CLASSES = [
    "background",
    "frontal",
    "insula and limbic",
    "occipital",
    "parietal",
    "deep grey",
    "temporal",
    "cerebellum",
]
# AAL's region codes (third column of aal.nii.txt) start with their lobe's digit: 2 frontal, 3 insula, 4 limbic,
# 5 occipital, 6 parietal, 7 deep grey nuclei, 8 temporal, 9 cerebellum and vermis.
AAL_LOBE_OF_DIGIT = {2: 1, 3: 2, 4: 2, 5: 3, 6: 4, 7: 5, 8: 6, 9: 7}
# nilearn tissue values (see ssl3d.data.mni): 0 background, 1 grey, 2 white, 3 other brain (CSF) -> background.
DEMO_LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 0}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class SegmentationCase:
    """One volume: its image, its label file (``None`` for unlabelled test data) and an optional slice band."""

    image: Path
    label: Path | None = None
    band: tuple[int, int] | None = None  # [start, stop) along the slice axis

    @property
    def name(self) -> str:
        stem = self.image.name
        for suffix in NIFTI_SUFFIXES:
            stem = stem.removesuffix(suffix)
        return stem if self.band is None else f"{stem}_slices{self.band[0]}-{self.band[1]}"


@dataclass
class CaseData:
    """A loaded case: resized slices for the network and full-resolution labels for the metrics."""

    name: str
    images: torch.Tensor  # (S, 1, h, w) float32 in 0..1, the network's input
    labels: torch.Tensor | None  # (S, h, w) int64 class indices at the network's resolution
    full_labels: torch.Tensor | None  # (S, X, Y) int64 class indices at the file's resolution
    full_shape: tuple[int, int]  # in-plane (X, Y) of the file
    affine: np.ndarray  # of the (band of the) volume, slice axis in its original place
    spacing: tuple[float, float, float]  # voxel size in mm, slice axis first
    slice_axis: int


def _nifti_name(path: Path) -> str:
    return path.name if path.name.endswith(NIFTI_SUFFIXES) else ""


def cases_from_datalist(
    datalist: str | Path, key: str, base_dir: str | Path | None = None, required: bool = True
) -> list[SegmentationCase]:
    """Cases listed under ``key`` of a decathlon-style JSON file (entries ``{"image", "label"}`` or paths).

    Relative paths start from ``base_dir`` (default: the datalist's folder). A missing or empty optional
    ``key`` gives no cases.
    """
    from monai.data import load_decathlon_datalist

    datalist = Path(datalist)
    if not read_datalist(datalist, key, required):
        return []
    entries = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=key, base_dir=base_dir)
    for number, entry in enumerate(entries):
        for field in ("image", "label"):
            if entry.get(field) and not Path(entry[field]).is_file():
                raise FileNotFoundError(
                    f"datalist {datalist}: {key} entry {number}: {field} {entry[field]} does not exist"
                )
    return [
        SegmentationCase(Path(entry["image"]), Path(entry["label"]) if entry.get("label") else None)
        for entry in entries
    ]


def cases_from_folder(folder: str | Path) -> list[SegmentationCase]:
    """Pairs ``folder/images/<name>`` and ``folder/labels/<name>``; a missing ``labels/`` means unlabelled."""
    folder = Path(folder)
    images_dir, labels_dir = folder / "images", folder / "labels"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{folder}: expected an images/ subfolder with NIfTI files")
    images = sorted(p for p in images_dir.iterdir() if _nifti_name(p))
    if not images:
        raise ValueError(f"{images_dir}: no .nii or .nii.gz files")
    if not labels_dir.is_dir():
        return [SegmentationCase(p.resolve()) for p in images]
    missing = [p.name for p in images if not (labels_dir / p.name).is_file()]
    if missing:
        raise ValueError(f"{labels_dir}: no label file for {', '.join(missing)}")
    return [SegmentationCase(p.resolve(), (labels_dir / p.name).resolve()) for p in images]


def demo_cases(
    folder: str | Path,
    train_band: tuple[float, float] = (0.15, 0.5),
    test_band: tuple[float, float] = (0.55, 0.85),
    slice_axis: int = 2,
) -> tuple[list[SegmentationCase], list[SegmentationCase]]:
    """The MNI152 2 mm template: training on one band of slices, testing on a disjoint band after a gap."""
    from ssl3d.data.mni import mni152_nifti

    paths = mni152_nifti(folder, resolution=2)
    length = nib.load(str(paths["image"])).shape[slice_axis]
    train, test = slice_bands(length, train_band, test_band)
    return (
        [SegmentationCase(paths["image"], paths["label"], (train[0], train[-1] + 1))],
        [SegmentationCase(paths["image"], paths["label"], (test[0], test[-1] + 1))],
    )


def aal_lobe_lookup(names_file: str | Path) -> np.ndarray:
    """``lookup[label]``: the ``LOBE_CLASSES`` index of each AAL label value, from an MRIcron label file (lines
    ``label name code``); 0 for the background and anything unlisted."""
    names_file = Path(names_file)
    from ssl3d.crosssubject import read_region_table

    pairs = []
    for label, (name, code) in read_region_table(names_file).items():
        if code is None or not code.isdigit() or int(code[0]) not in AAL_LOBE_OF_DIGIT:
            raise ValueError(
                f"{names_file}: region {label} ({name}) has no AAL region code (2xxx-9xxx): {code}"
            )
        pairs.append((label, AAL_LOBE_OF_DIGIT[int(code[0])]))
    lookup = np.zeros(max(label for label, _ in pairs) + 1, dtype=np.uint8)
    for label, lobe in pairs:
        lookup[label] = lobe
    return lookup


def lobe_cases(
    folder: str | Path, colin_dir: str | Path | None = None
) -> tuple[list[SegmentationCase], list[SegmentationCase]]:
    """The lobe task: MNI152 at 2 mm with AAL lobes resampled onto it (training), Colin27 at 1 mm with its own
    AAL lobes (test). The label files are written to ``folder`` once, each on its image's voxel grid."""
    from ssl3d.crosssubject import colin27_paths, resample_to_grid
    from ssl3d.data.mni import mni152_nifti

    colin = colin27_paths(colin_dir)  # first: a missing package is the first error a user sees
    folder = Path(folder)
    mni_image = mni152_nifti(folder, resolution=2)["image"]
    cases = {
        "train": (mni_image, folder / "mni152_aal_lobes_2mm.nii.gz"),
        "test": (colin["t1"], folder / "colin27_aal_lobes.nii.gz"),
    }
    if not all(label.is_file() for _, label in cases.values()):
        lookup = aal_lobe_lookup(colin["names"])
        atlas_nii = read_nifti(colin["atlas"])
        atlas = np.asarray(atlas_nii.dataobj)
        if (
            atlas.ndim != 3
            or not np.array_equal(atlas, np.round(atlas))
            or not 0 <= atlas.min() <= atlas.max() < len(lookup)
        ):
            raise ValueError(f"{colin['atlas']}: expected a 3D atlas of the labels in {colin['names']}")
        for image, label in cases.values():
            image_nii = read_nifti(image)
            # Nearest neighbour in world coordinates; on the atlas's own grid (Colin27) this is the identity.
            regions = resample_to_grid(
                atlas, atlas_nii.affine, image_nii.shape[:3], image_nii.affine, order=0
            )
            nib.save(nib.Nifti1Image(lookup[regions.astype(np.int64)], image_nii.affine), label)
    return [SegmentationCase(*cases["train"])], [SegmentationCase(*cases["test"])]


def read_label_values(path: Path, label_map: dict[int, int]) -> np.ndarray:
    """Integer label array of ``path`` mapped to class indices; values outside ``label_map`` are an error."""
    data = np.asarray(nib.load(str(path)).dataobj)
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise ValueError(f"{path}: label values must be integers")
    values, inverse = np.unique(data.astype(np.int64), return_inverse=True)
    unknown = [int(v) for v in values if int(v) not in label_map]
    if unknown:
        raise ValueError(
            f"{path}: label values {unknown} are not in the class map (known values: {sorted(label_map)}); "
            "add them to label_map"
        )
    lookup = np.array([label_map[int(v)] for v in values], dtype=np.int64)
    return lookup[inverse].reshape(data.shape)


def check_pair(image: Path, label: Path, atol: float = 1e-3) -> None:
    """Image and label must have the same voxel grid: shape and affine."""
    image_nii, label_nii = read_nifti(image), read_nifti(label)
    if image_nii.shape[:3] != label_nii.shape[:3] or len(label_nii.shape) != 3:
        raise ValueError(
            f"image {image} has shape {image_nii.shape} but label {label} has shape {label_nii.shape}; "
            "they must be the same 3D grid"
        )
    if not np.allclose(image_nii.affine, label_nii.affine, atol=atol):
        raise ValueError(
            f"image {image} and label {label} have different affines (voxel-to-world matrices):\n"
            f"{np.array2string(image_nii.affine, precision=4)}\nvs\n{np.array2string(label_nii.affine, precision=4)}\n"
            f"label {label} must be on the grid of image {image}: resample it onto the image"
        )


def _resize_labels(
    labels: np.ndarray, size: tuple[int, int], num_classes: int, chunk: int = 16
) -> torch.Tensor:
    """Area-majority resize of ``(S, X, Y)`` class indices, in chunks of slices to bound the one-hot memory."""
    tensor = torch.from_numpy(np.ascontiguousarray(labels))
    parts = [patch_label_grid(tensor[i : i + chunk], size, num_classes) for i in range(0, len(tensor), chunk)]
    return torch.cat(parts)


def _band_affine(affine: np.ndarray, slice_axis: int, start: int) -> np.ndarray:
    """Affine of a sub-volume that starts at voxel ``start`` of the slice axis."""
    shift = np.eye(4)
    shift[slice_axis, 3] = start
    return affine @ shift


def load_case(
    case: SegmentationCase,
    loader: VolumeLoader,
    label_map: dict[int, int],
    num_classes: int,
) -> CaseData:
    """Validate and load one case: ``loader`` (``resize=True``, no reorientation) gives the network input."""
    if case.label is not None:
        check_pair(case.image, case.label)
    affine = read_nifti(case.image).affine
    axis = loader.slice_axis
    images = loader.load(case.image)[0]  # (S, h, w)
    full_labels = None
    if case.label is not None:
        full_labels = np.moveaxis(read_label_values(case.label, label_map), axis, 0)
    start, stop = case.band if case.band is not None else (0, images.shape[0])
    if not 0 <= start < stop <= images.shape[0]:
        raise ValueError(f"{case.image}: slice band {case.band} is outside 0..{images.shape[0]}")
    images = images[start:stop, None].contiguous()
    labels = None
    if full_labels is not None:
        full_labels = full_labels[start:stop]
        labels = _resize_labels(full_labels, loader.size, num_classes)
        full_labels = torch.from_numpy(np.ascontiguousarray(full_labels))
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = (float(zooms[axis]), *(float(z) for i, z in enumerate(zooms) if i != axis))
    in_plane = tuple(int(s) for i, s in enumerate(nib.load(str(case.image)).shape[:3]) if i != axis)
    return CaseData(
        name=case.name,
        images=images,
        labels=labels,
        full_labels=full_labels,
        full_shape=in_plane,
        affine=_band_affine(affine, axis, start),
        spacing=spacing,
        slice_axis=axis,
    )


class BalancedSliceSampler(Sampler[int]):
    """Every labelled slice plus ``ratio`` times as many unlabelled ones, redrawn each epoch (the paper's
    balanced sampling of slices with and without foreground)."""

    def __init__(self, labelled: Sequence[int], unlabelled: Sequence[int], ratio: float = 1.0, seed: int = 0):
        if ratio < 0:
            raise ValueError(f"unlabelled_ratio must be >= 0, got {ratio}")
        if not labelled:
            raise ValueError("the training volumes contain no slice with a foreground label")
        self.labelled = torch.as_tensor(list(labelled), dtype=torch.long)
        self.unlabelled = torch.as_tensor(list(unlabelled), dtype=torch.long)
        self.num_unlabelled = min(len(self.unlabelled), round(ratio * len(self.labelled)))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labelled) + self.num_unlabelled

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        chosen = self.unlabelled[
            torch.randperm(len(self.unlabelled), generator=generator)[: self.num_unlabelled]
        ]
        indices = torch.cat([self.labelled, chosen])
        return iter(indices[torch.randperm(len(indices), generator=generator)].tolist())


class CaseDataset(Dataset):
    """Whole cases for validation, testing and prediction (one case per batch)."""

    def __init__(self, cases: list[CaseData]):
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> CaseData:
        return self.cases[index]


def label_subset(num_slices: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of the ``max(1, round(fraction * num_slices))`` training slices whose labels are kept.

    Drawn without replacement by a generator of its own seeded with ``seed`` (the data seed), so each seed
    gets its own subset and the same seed always the same one; ``fraction=1`` keeps every slice.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    if num_slices < 1:
        raise ValueError("no training slices to choose labels from")
    count = max(1, round(fraction * num_slices))
    if count >= num_slices:
        return torch.arange(num_slices)
    rng = np.random.default_rng([seed, 0x1A8E1])  # a stream apart from the sampler's
    return torch.from_numpy(np.sort(rng.choice(num_slices, size=count, replace=False))).long()


def _single(batch: list[CaseData]) -> CaseData:
    return batch[0]


class SegmentationData(pl.LightningDataModule):
    """Slice-wise segmentation data from a datalist, folders, or the built-in MNI152 tissue task.

    Args:
        datalist: decathlon-style JSON (``training``/``validation``/``test`` lists of ``{"image", "label"}``).
        base_dir: folder the datalist's relative paths start from (default: the datalist's folder).
        train_key, val_key, test_key: datalist keys; ``val_key``/``test_key`` may be absent from the file.
        train_dir, val_dir, test_dir: folders with ``images/`` and ``labels/`` (used without a datalist).
        class_names: one name per class index, background first.
        label_map: label-file value -> class index (e.g. MMWHS 205 -> 1); default ``{i: i}`` for each class.
        slice_axis: array axis of the files that is sliced (2: axial for RAS-stored scans).
        size: in-plane size of the network's slices.
        percentiles: intensity percentiles mapped to 0 and 1, as in pretraining.
        unlabelled_ratio: unlabelled (background-only) slices drawn per labelled slice each epoch.
        label_fraction: share of the training slices whose labels are used (low-label setting, e.g. 0.1);
            the subset is drawn once per ``seed`` (:func:`label_subset`) from the slices of all training cases.
        demo: the built-in task used without a datalist or folders: ``"tissue"`` (MNI152 grey / white matter,
            by bands) or ``"lobes"`` (AAL lobes, MNI152 -> Colin27; ``class_names`` must be ``LOBE_CLASSES``
            and ``label_map`` null, as in ``configs/finetune/lobes.yaml``).
        demo_bands: the tissue demo's training and test bands as fractions of the slice axis.
        demo_dir: where the demo's NIfTI files are written (default: ``<run>/demo_data``).
        colin_dir: folder of Colin27 and the AAL atlas for ``demo="lobes"`` (default: Debian mricron-data's).
    """

    def __init__(
        self,
        datalist: str | None = None,
        base_dir: str | None = None,
        train_key: str = "training",
        val_key: str | None = "validation",
        test_key: str | None = "test",
        train_dir: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        class_names: list[str] = DEMO_CLASSES,
        label_map: dict[int, int] | None = DEMO_LABEL_MAP,
        slice_axis: int = 2,
        size: tuple[int, int] = (64, 64),
        percentiles: tuple[float, float] = (0.5, 99.5),
        unlabelled_ratio: float = 1.0,
        label_fraction: float = 1.0,
        batch_size: int = 16,
        inference_batch_size: int = 64,
        num_workers: int = 0,
        demo: str = "tissue",
        demo_bands: tuple[tuple[float, float], tuple[float, float]] = ((0.15, 0.5), (0.55, 0.85)),
        demo_dir: str | None = None,
        colin_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if demo not in DEMO_TASKS:
            raise ValueError(f"demo must be one of {DEMO_TASKS}, got {demo!r}")
        uses_demo = datalist is None and train_dir is None
        if uses_demo and demo == "lobes" and (list(class_names) != LOBE_CLASSES or label_map is not None):
            raise ValueError(
                f"demo='lobes' has the classes {LOBE_CLASSES} with identity labels: set class_names to them and "
                "label_map to null (configs/finetune/lobes.yaml does)"
            )
        if len(class_names) < 2:
            raise ValueError(f"class_names needs background and at least one class, got {class_names}")
        if not 0.0 < label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
        self.label_map = {
            int(k): int(v) for k, v in (label_map or {i: i for i in range(len(class_names))}).items()
        }
        bad = sorted({v for v in self.label_map.values() if not 0 <= v < len(class_names)})
        if bad:
            raise ValueError(
                f"label_map sends values to class indices {bad} outside 0..{len(class_names) - 1}"
            )
        self.loader = VolumeLoader(
            size=size, slice_axis=slice_axis, orientation=None, percentiles=percentiles, resize=True
        )
        self.train_cases: list[CaseData] = []
        self.val_cases: list[CaseData] = []
        self.test_cases: list[CaseData] = []

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    @property
    def has_validation(self) -> bool:
        """Whether a validation split is configured (the CLI then keeps the best checkpoint by it)."""
        hp = self.hparams
        if hp.datalist is not None:
            path = Path(hp.datalist)
            return (
                hp.val_key is not None
                and path.is_file()
                and bool(json.loads(path.read_text()).get(hp.val_key))
            )
        return hp.train_dir is not None and hp.val_dir is not None

    def _demo_dir(self) -> Path:
        return demo_folder(self.hparams.demo_dir, self.trainer, "ssl3d_finetune_demo")

    def list_cases(self) -> dict[str, list[SegmentationCase]]:
        """The cases of each split, from the datalist, the folders or the demo."""
        hp = self.hparams
        if hp.datalist is not None:
            optional = {"val": hp.val_key, "test": hp.test_key}
            return {
                "train": cases_from_datalist(hp.datalist, hp.train_key, hp.base_dir),
                **{
                    split: cases_from_datalist(hp.datalist, key, hp.base_dir, required=False) if key else []
                    for split, key in optional.items()
                },
            }
        if hp.train_dir is not None:
            return {
                "train": cases_from_folder(hp.train_dir),
                "val": cases_from_folder(hp.val_dir) if hp.val_dir else [],
                "test": cases_from_folder(hp.test_dir) if hp.test_dir else [],
            }
        if hp.demo == "lobes":
            train, test = lobe_cases(self._demo_dir(), hp.colin_dir)
        else:
            train, test = demo_cases(self._demo_dir(), *hp.demo_bands, slice_axis=hp.slice_axis)
        return {"train": train, "val": [], "test": test}

    def setup(self, stage: str | None = None) -> None:
        if self.train_cases or self.test_cases:
            return
        splits = self.list_cases()
        unlabelled_train = [c.image for c in splits["train"] if c.label is None]
        if unlabelled_train:
            raise ValueError(f"training cases need labels; none for {', '.join(map(str, unlabelled_train))}")
        loaded = {}
        every = [(split, case) for split, cases in splits.items() for case in cases]
        for split, case in tqdm(every, desc="checking and loading volumes", unit="volume", leave=False):
            loaded.setdefault(split, []).append(
                load_case(case, self.loader, self.label_map, len(self.class_names))
            )
        self.train_cases = loaded.get("train", [])
        self.val_cases = loaded.get("val", [])
        self.test_cases = loaded.get("test", [])

    def labelled_slices(self) -> torch.Tensor:
        """Indices (into the concatenated training slices) of the slices trained on with their labels."""
        total = sum(c.images.shape[0] for c in self.train_cases)
        return label_subset(total, self.hparams.label_fraction, self.hparams.seed)

    def train_dataset(self) -> tuple[TensorDataset, BalancedSliceSampler]:
        images = torch.cat([c.images for c in self.train_cases])
        labels = torch.cat([c.labels for c in self.train_cases])
        kept = self.labelled_slices()
        has_foreground = (labels[kept] > 0).flatten(1).any(dim=1)
        sampler = BalancedSliceSampler(
            kept[has_foreground].tolist(),
            kept[~has_foreground].tolist(),
            self.hparams.unlabelled_ratio,
            self.hparams.seed,
        )
        return TensorDataset(images, labels), sampler

    def train_dataloader(self) -> DataLoader:
        dataset, sampler = self.train_dataset()
        return ResumableDataLoader(  # training resumes mid-epoch exactly
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            drop_last=len(sampler) > self.hparams.batch_size,
        )

    def _cases_loader(self, cases: list[CaseData]) -> DataLoader:
        return DataLoader(CaseDataset(cases), batch_size=1, collate_fn=_single)

    def val_dataloader(self) -> DataLoader | list:
        return self._cases_loader(self.val_cases) if self.val_cases else []

    def test_dataloader(self) -> DataLoader:
        if not self.test_cases:
            raise ValueError("no test volumes: give a datalist with a test list or a test_dir")
        return self._cases_loader(self.test_cases)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
