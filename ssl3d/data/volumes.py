"""Loading 3D volumes into fixed-size ``(1, num_slices, H, W)`` tensors in 0..1, with per-file validation.

Loading has a deterministic part (:meth:`VolumeLoader.load`: read, orient, resample, scale, put the slice axis
first, optionally resize in-plane) that datasets may cache, and a fitting part (:meth:`VolumeLoader.fit`: pad
and crop to the target) that is random for training. Every problem with a file is a ``ValueError`` that names
the file, so a bad scan is caught before training rather than in a worker mid-epoch.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import NibabelReader, NumpyReader
from monai.transforms import (
    CenterSpatialCrop,
    EnsureChannelFirst,
    LoadImage,
    Orientation,
    RandSpatialCrop,
    Resize,
    Spacing,
    SpatialPad,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile

from agreement.inputs import check_files
from agreement.optional import optional_import
from ssl3d.data.sources import volume_kind


def _dicom_reader():
    """MONAI's pydicom reader when pydicom is installed, else its ITK reader, else an ImportError naming the extra."""
    from monai.data import ITKReader, PydicomReader

    if importlib.util.find_spec("pydicom") is None and importlib.util.find_spec("itk") is not None:
        return ITKReader()
    optional_import("pydicom", extra="dicom", purpose="reading DICOM series")
    return PydicomReader()


def _root_cause(message: str) -> str:
    """The first ``SomeError: ...`` line of MONAI's reader tracebacks, which says what was actually wrong."""
    for line in message.splitlines():
        if re.match(r"^[\w.]*(Error|Exception): ", line):
            return line
    return message.splitlines()[0] if message else "unknown error"


class VolumeLoader:
    """Read one volume file and return a float32 tensor ``(1, num_slices, *size)`` in 0..1.

    Args:
        num_slices: slices along ``slice_axis`` in the output; fewer are zero-padded, more are cropped.
        size: in-plane output size ``(H, W)``.
        slice_axis: spatial axis (0, 1 or 2, after reorientation) that becomes the slice dimension.
        orientation: axis codes for MONAI ``Orientation`` (``None`` keeps the file's orientation).
        spacing: target voxel size in mm for MONAI ``Spacing``; ``None`` keeps the native grid.
        percentiles: intensities at these percentiles map to 0 and 1, values outside are clipped.
        skip_bad_files: what :func:`check_volumes` does with bad files by default: skip and warn, or raise.
        resize: resample in-plane to ``size`` (whole section visible) instead of padding/cropping to it.
    """

    def __init__(
        self,
        num_slices: int = 32,
        size: Sequence[int] = (64, 64),
        slice_axis: int = 2,
        orientation: str | None = "RAS",
        spacing: Sequence[float] | None = None,
        percentiles: Sequence[float] = (0.5, 99.5),
        skip_bad_files: bool = False,
        resize: bool = False,
    ) -> None:
        if int(num_slices) < 1:
            raise ValueError(f"VolumeLoader: num_slices must be at least 1, got {num_slices}")
        if len(size) != 2 or min(int(s) for s in size) < 1:
            raise ValueError(f"VolumeLoader: size must be two positive ints (H, W), got {size}")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"VolumeLoader: slice_axis must be 0, 1 or 2, got {slice_axis}")
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise ValueError(f"VolumeLoader: spacing must be three positive numbers in mm, got {spacing}")
        low, high = (float(p) for p in percentiles)
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(
                f"VolumeLoader: percentiles must satisfy 0 <= low < high <= 100, got {percentiles}"
            )
        self.num_slices = int(num_slices)
        self.size = (int(size[0]), int(size[1]))
        self.slice_axis = int(slice_axis)
        self.orientation = orientation
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else None
        self.percentiles = (low, high)
        self.skip_bad_files = skip_bad_files
        self.resize = resize
        self.target = (self.num_slices, *self.size)
        self._readers: dict[str, Callable] = {
            "nifti": LoadImage(reader=NibabelReader(squeeze_non_spatial_dims=True), image_only=True),
            "numpy": LoadImage(reader=NumpyReader(), image_only=True),
        }
        self._channel_first = EnsureChannelFirst()
        self._orient = Orientation(axcodes=orientation, labels=None) if orientation else None
        self._spacing = Spacing(pixdim=self.spacing, mode="bilinear") if self.spacing else None
        self._pad = SpatialPad(self.target)
        self._center_crop = CenterSpatialCrop(self.target)
        self._random_crop = RandSpatialCrop(self.target, random_size=False)
        self._resize = Resize((-1, *self.size), mode="trilinear", anti_aliasing=True)

    def config(self) -> str:
        """Everything that changes :meth:`load`'s result, e.g. for naming disk-cache entries."""
        return (
            f"orientation={self.orientation};spacing={self.spacing};percentiles={self.percentiles};"
            f"resize={self.resize};size={self.size}"
        )

    def _loader_for(self, path: Path, kind: str) -> Callable:
        if kind == "dicom":
            if "dicom" not in self._readers:
                self._readers["dicom"] = LoadImage(reader=_dicom_reader(), image_only=True)
            return self._readers["dicom"]
        return self._readers[kind]

    def read(self, path: str | Path) -> torch.Tensor:
        """Validated ``(1, X, Y, Z)`` float32 volume in 0..1, oriented and resampled; slice axis not moved yet."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: volume file not found")
        kind = volume_kind(path)
        if path.is_file() and path.stat().st_size == 0:
            raise ValueError(f"{path}: empty file (0 bytes)")
        self._probe(path, kind)
        try:
            image = self._loader_for(path, kind)(str(path))
        except ImportError:
            raise
        except Exception as error:
            raise ValueError(
                f"{path}: cannot be read as a {kind} volume ({_root_cause(str(error))})"
            ) from error
        if kind == "numpy":
            while image.ndim > 3 and image.shape[0] == 1:  # a stored channel axis, as in (1, D, H, W)
                image = image[0]
        image = self._channel_first(image)
        shape = tuple(image.shape[1:])
        if image.shape[0] != 1:
            raise ValueError(
                f"{path}: has {image.shape[0]} channels or time points; a single 3D volume is expected"
            )
        if len(shape) != 3 or min(shape) < 2:
            raise ValueError(f"{path}: data of shape {shape} is 2D, but a 3D volume is expected")
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            raise ValueError(f"{path}: contains {bad} NaN or infinite voxels")
        if self._orient is not None:
            image = self._orient(image)
        if self._spacing is not None:
            image = self._spacing(image)
        if float(image.max()) == float(image.min()):
            raise ValueError(f"{path}: constant volume (every voxel is {float(image.min()):g})")
        return _plain(scale_to_unit(image, self.percentiles, str(path)))

    @staticmethod
    def _probe(path: Path, kind: str) -> None:
        """Open the header cheaply so a corrupt file gets the reader's own message rather than MONAI's summary."""
        try:
            if kind == "nifti":
                nib.load(str(path))  # parses the header eagerly, the voxel data lazily
            elif kind == "numpy":
                np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as error:
            raise ValueError(
                f"{path}: cannot be read as a {kind} volume ({type(error).__name__}: {error})"
            ) from error

    def arrange(self, volume: torch.Tensor, slice_axis: int | None = None) -> torch.Tensor:
        """Move ``slice_axis`` first and, with ``resize``, resample in-plane to ``size``: ``(1, S, H', W')``."""
        axis = self.slice_axis if slice_axis is None else slice_axis
        if axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {axis}")
        volume = volume.movedim(1 + axis, 1)
        if self.resize:
            volume = _plain(self._resize(volume))
        return volume.contiguous()

    def load(self, path: str | Path, slice_axis: int | None = None) -> torch.Tensor:
        """The deterministic, cacheable part: :meth:`read` then :meth:`arrange`."""
        return self.arrange(self.read(path), slice_axis)

    def fit(self, volume: torch.Tensor, rng: np.random.RandomState | None = None) -> torch.Tensor:
        """Zero-pad to at least the target, then crop to ``(1, num_slices, H, W)``: random with ``rng``, else centred."""
        volume = self._pad(volume)
        if rng is None:
            volume = self._center_crop(volume)
        else:
            self._random_crop.set_random_state(state=rng)
            volume = self._random_crop(volume)
        return _plain(volume).contiguous()

    def __call__(self, path: str | Path, slice_axis: int | None = None) -> torch.Tensor:
        return self.fit(self.load(path, slice_axis))


def scale_to_unit(image: torch.Tensor, percentiles: Sequence[float], what: str) -> torch.Tensor:
    """``image`` with the intensities at its ``percentiles`` mapped to 0 and 1 and clipped: the scaling of every
    pretraining input (volumes and 2D images alike). ``what`` names the input in the error for a (nearly)
    constant one."""
    low, high = (float(v) for v in percentile(image, list(percentiles)))
    if high <= low:
        raise ValueError(
            f"{what}: intensity percentiles {tuple(percentiles)} are equal ({low:g}); it is nearly constant and "
            "cannot be scaled to 0..1"
        )
    return ((image - low) / (high - low)).clamp(0.0, 1.0)


def read_nifti(path: Path) -> nib.Nifti1Image:
    """``nib.load`` with an error that names the file (a missing, truncated or non-NIfTI file)."""
    try:
        return nib.load(str(path))
    except Exception as error:  # nibabel raises several types for broken files
        raise ValueError(
            f"{path}: cannot be read as a NIfTI volume ({type(error).__name__}: {error})"
        ) from None


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain float32 tensor: MONAI's MetaTensor metadata is not needed after loading and slows collation."""
    if hasattr(tensor, "as_tensor"):
        tensor = tensor.as_tensor()
    return torch.as_tensor(tensor, dtype=torch.float32)


def check_volumes(
    paths: Sequence[str | Path],
    loader: VolumeLoader,
    skip_bad_files: bool | None = None,
    on_loaded: Callable[[int, Path, torch.Tensor], None] | None = None,
) -> list[Path]:
    """Read and validate every file up front; return the good paths in order.

    With ``skip_bad_files`` (default: ``loader.skip_bad_files``) bad files are left out and one warning lists
    them with their reasons; otherwise the first bad file raises. ``on_loaded(position, path, volume)`` receives
    each good file's :meth:`VolumeLoader.read` result, so callers can reuse it instead of reading twice.
    """
    skip = loader.skip_bad_files if skip_bad_files is None else skip_bad_files
    good = check_files(paths, loader.read, "volumes", skip, on_loaded)
    if not good:
        raise ValueError(f"none of the {len(paths)} volumes could be used; see the warning for each file")
    return good
