"""Loading 2D images (PNG, JPEG, single-frame DICOM) as single-channel float32 tensors in 0..1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from agreement.inputs import check_files
from agreement.optional import optional_import
from ssl3d.data.volumes import scale_to_unit


def load_image(path: str | Path, percentiles: Sequence[float] = (0.5, 99.5)) -> torch.Tensor:
    """``(1, H, W)`` float32, intensities at ``percentiles`` mapped to 0 and 1 and clipped, as for volumes.

    Colour images are converted to grey; a ``ValueError`` naming the file reports unreadable, empty, constant
    or non-finite images.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        if path.suffix.lower() == ".dcm":
            image = _read_dicom(path)
        else:
            image = decode_image(str(path), mode=ImageReadMode.GRAY).to(torch.float32)
    except ImportError:
        raise
    except Exception as error:
        raise ValueError(f"{path}: cannot be read as an image ({type(error).__name__}: {error})") from error
    if image.ndim != 3 or image.shape[0] != 1 or min(image.shape[1:]) < 2:
        raise ValueError(f"{path}: expected a single-channel 2D image, got shape {tuple(image.shape)}")
    bad = int((~torch.isfinite(image)).sum())
    if bad:
        raise ValueError(f"{path}: contains {bad} NaN or infinite pixels")
    return scale_to_unit(image, percentiles, str(path))


def _read_dicom(path: Path) -> torch.Tensor:
    pydicom = optional_import("pydicom", extra="dicom", purpose="reading DICOM images")
    dataset = pydicom.dcmread(str(path))
    pixels = np.asarray(dataset.pixel_array, dtype=np.float32)
    if getattr(dataset, "SamplesPerPixel", 1) > 1:
        pixels = pixels.mean(axis=-1)
    pixels = pixels * float(getattr(dataset, "RescaleSlope", 1.0)) + float(
        getattr(dataset, "RescaleIntercept", 0.0)
    )
    return torch.from_numpy(pixels)[None]


def check_images(paths: Sequence[str | Path], skip_bad_files: bool = False) -> list[Path]:
    """Decode every image up front and return the good paths; skip and warn, or raise on the first bad one."""
    return check_files(paths, load_image, "images", skip_bad_files)
