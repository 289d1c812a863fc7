"""The MNI152 2009 template and its grey/white-matter maps, shipped by nilearn: real 3D MRI that needs no download."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from agreement.optional import optional_import

TISSUE_NAMES = ("background", "grey matter", "white matter", "other brain")


@dataclass(frozen=True)
class MNI152:
    """T1 volume (float32, 0..1) and a tissue label map (0 background, 1 grey, 2 white, 3 other brain/CSF)."""

    t1: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray


def load_mni152_template(resolution: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The T1 template at ``resolution`` mm (float32, as nilearn ships it) and its affine."""
    datasets = optional_import("nilearn.datasets", extra="demo", purpose="the MNI152 demo data")
    image = datasets.load_mni152_template(resolution=resolution)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine.copy()


def demo_folder(configured: str | Path | None, trainer: Any, fallback: str) -> Path:
    """Where a demo writes its data: ``configured``, else the trainer's ``<default_root_dir>/demo_data``, else
    ``<temporary folder>/<fallback>``."""
    if configured is not None:
        return Path(configured)
    if trainer is not None:
        return Path(trainer.default_root_dir) / "demo_data"
    return Path(tempfile.gettempdir()) / fallback


def load_mni152(resolution: int = 2) -> MNI152:
    """Load the template at ``resolution`` mm (1 or 2) with labels from nilearn's probability maps.

    A voxel inside the brain mask is grey or white matter by the larger of the two probabilities when that
    probability is at least 0.5, otherwise "other brain" (mostly CSF).
    """
    datasets = optional_import("nilearn.datasets", extra="demo", purpose="the MNI152 demo data")
    t1, affine = load_mni152_template(resolution)
    grey = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).dataobj, dtype=np.float32)
    white = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).dataobj, dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).dataobj) > 0
    tissue = np.zeros(t1.shape, dtype=np.int64)
    tissue[brain] = 3
    is_tissue = brain & (np.maximum(grey, white) >= 0.5)
    tissue[is_tissue & (grey >= white)] = 1
    tissue[is_tissue & (white > grey)] = 2
    return MNI152(t1=t1, tissue=tissue, affine=affine)


def mni152_paths(folder: str | Path, resolution: int = 2) -> dict[str, Path]:
    """Where :func:`write_mni152_nifti` puts the template (``image``) and its tissue labels (``label``)."""
    folder = Path(folder)
    return {
        "image": folder / f"mni152_t1_{resolution}mm.nii.gz",
        "label": folder / f"mni152_tissue_{resolution}mm.nii.gz",
    }


def mni152_nifti(folder: str | Path, resolution: int = 2) -> dict[str, Path]:
    """The template and tissue-label files under ``folder``, written on first use."""
    paths = mni152_paths(folder, resolution)
    if all(path.is_file() for path in paths.values()):
        return paths
    return write_mni152_nifti(folder, resolution)


def write_mni152_nifti(folder: str | Path, resolution: int = 2) -> dict[str, Path]:
    """Write the template and its tissue labels as NIfTI files under ``folder``; return their paths. Each file is
    written under a name of this process's own and then renamed, since several processes may write at once."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    mni = load_mni152(resolution)
    paths = mni152_paths(folder, resolution)
    for path, array in ((paths["image"], mni.t1), (paths["label"], mni.tissue.astype(np.uint8))):
        partial = path.with_name(f".{os.getpid()}.{path.name}")
        nib.save(nib.Nifti1Image(array, mni.affine), partial)
        os.replace(partial, path)
    return paths
