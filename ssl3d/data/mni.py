"""The MNI152 2009 template and its grey/white-matter maps, shipped by nilearn: real 3D MRI that needs no download."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def load_mni152(resolution: int = 2) -> MNI152:
    """Load the template at ``resolution`` mm (1 or 2) with labels from nilearn's probability maps.

    A voxel inside the brain mask is grey or white matter by the larger of the two probabilities when that
    probability is at least 0.5, otherwise "other brain" (mostly CSF).
    """
    datasets = optional_import("nilearn.datasets", extra="demo", purpose="the MNI152 demo data")
    t1_img = datasets.load_mni152_template(resolution=resolution)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    grey = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).dataobj, dtype=np.float32)
    white = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).dataobj, dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).dataobj) > 0
    tissue = np.zeros(t1.shape, dtype=np.int64)
    tissue[brain] = 3
    is_tissue = brain & (np.maximum(grey, white) >= 0.5)
    tissue[is_tissue & (grey >= white)] = 1
    tissue[is_tissue & (white > grey)] = 2
    return MNI152(t1=t1, tissue=tissue, affine=t1_img.affine.copy())


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
    """Write the template and its tissue labels as NIfTI files under ``folder``; return their paths."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    mni = load_mni152(resolution)
    paths = mni152_paths(folder, resolution)
    nib.save(nib.Nifti1Image(mni.t1, mni.affine), paths["image"])
    nib.save(nib.Nifti1Image(mni.tissue.astype(np.uint8), mni.affine), paths["label"])
    return paths
