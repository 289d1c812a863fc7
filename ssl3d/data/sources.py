"""Listing the input files: 3D volumes from a decathlon-style JSON datalist or a folder glob, and 2D images.

A volume is a NIfTI file (``.nii``/``.nii.gz``), a NumPy array (``.npy``) or a DICOM series, i.e. a folder that
holds ``.dcm`` files. Every function returns sorted, absolute paths so listings are the same on every rank.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "dcm")


def volume_kind(path: str | Path) -> str:
    """``"nifti"``, ``"numpy"`` or ``"dicom"`` (a folder of ``.dcm`` files); ``ValueError`` for anything else."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        if _has_dicom_files(path):
            return "dicom"
        raise ValueError(f"{path}: folder holds no .dcm files, so it is not a DICOM series")
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npy"):
        return "numpy"
    raise ValueError(
        f"{path}: unsupported volume format; expected one of {VOLUME_SUFFIXES} or a DICOM series folder"
    )


def _has_dicom_files(folder: Path) -> bool:
    return any(child.is_file() and child.suffix.lower() == ".dcm" for child in folder.iterdir())


@dataclass(frozen=True)
class VolumeSource:
    """One 3D sample: a file (or an already loaded tensor) and the axis sliced for it.

    ``slice_axis=None`` means the loader's own ``slice_axis``. A tensor must already be arranged by
    :meth:`VolumeLoader.load` (``(1, S, H, W)``, slice axis first), so its ``slice_axis`` is ignored.
    """

    source: Path | torch.Tensor
    slice_axis: int | None = None


def as_sources(volumes: Sequence[str | Path | torch.Tensor | VolumeSource]) -> list[VolumeSource]:
    """Wrap plain paths and tensors as :class:`VolumeSource` with the loader's default axis."""
    out = []
    for item in volumes:
        if isinstance(item, VolumeSource):
            out.append(item)
        elif isinstance(item, torch.Tensor):
            out.append(VolumeSource(item))
        elif isinstance(item, (str, Path)):
            out.append(VolumeSource(Path(item)))
        else:
            raise ValueError(f"volumes: expected paths, tensors or VolumeSource, got {type(item).__name__}")
    return out


def with_slice_axes(paths: Sequence[str | Path], slice_axes: Sequence[int]) -> list[VolumeSource]:
    """One source per (path, axis): slicing a scan along each axis gives that many differently-looking volumes."""
    for axis in slice_axes:
        if axis not in (0, 1, 2):
            raise ValueError(f"slice_axes: every axis must be 0, 1 or 2, got {axis}")
    return [VolumeSource(Path(path), int(axis)) for path in paths for axis in slice_axes]


def list_volumes(
    datalist: str | Path | None = None,
    data_dir: str | Path | None = None,
    pattern: str = "**/*.nii*",
    key: str = "image",
    split: str = "training",
) -> list[Path]:
    """Paths of the volumes named by a datalist, or found under ``data_dir`` with ``pattern``.

    The datalist is a MONAI decathlon-style JSON file: ``{split: [{"image": "a.nii.gz"}, "b.nii.gz", ...]}``.
    Entries are dicts with ``key`` or plain strings; relative entries are resolved against ``data_dir`` when
    given, else against the JSON file's folder. (MONAI's ``load_decathlon_datalist`` accepts plain strings only
    in the ``"test"`` split and resolves only ``image``/``label``, hence the small reader here.)

    Without a datalist, files and DICOM series folders under ``data_dir`` matching ``pattern`` are returned;
    a matched ``.dcm`` file stands for its folder, so ``pattern="**/*.dcm"`` lists DICOM series.
    """
    if datalist is not None:
        return _read_datalist(Path(datalist), data_dir, key, split)
    if data_dir is None:
        raise ValueError("list_volumes: give a datalist JSON file or a data_dir to search")
    return _glob_volumes(Path(data_dir), pattern)


def read_datalist(datalist: str | Path, split: str, required: bool = True) -> list[Any]:
    """The entries of the ``split`` list of a decathlon-style JSON datalist (paths, or objects with ``image`` and
    more); a missing or empty list is an error when ``required``, else ``[]``."""
    datalist = Path(datalist)
    if not datalist.is_file():
        raise FileNotFoundError(f"datalist {datalist}: file not found")
    try:
        content = json.loads(datalist.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"datalist {datalist}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(
            f"datalist {datalist}: expected an object of named lists, got {type(content).__name__}"
        )
    entries = content.get(split)
    if entries is not None and not isinstance(entries, list):
        raise ValueError(f"datalist {datalist}: {split!r} must be a list, got {type(entries).__name__}")
    if not entries and required:
        raise ValueError(f"datalist {datalist}: no {split!r} list (found {sorted(content)})")
    return entries or []


def _read_datalist(datalist: Path, data_dir: str | Path | None, key: str, split: str) -> list[Path]:
    entries = read_datalist(datalist, split)
    base = Path(data_dir) if data_dir is not None else datalist.parent
    paths = []
    for number, entry in enumerate(entries):
        if isinstance(entry, dict):
            if key not in entry:
                raise ValueError(
                    f"datalist {datalist}: entry {number} of {split!r} has no {key!r} key: {entry}"
                )
            entry = entry[key]
        if not isinstance(entry, str):
            raise ValueError(f"datalist {datalist}: entry {number} of {split!r} is not a path: {entry!r}")
        path = Path(entry).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if not path.exists():
            raise FileNotFoundError(
                f"datalist {datalist}: entry {entry!r} points to {path}, which does not exist"
            )
        volume_kind(path)
        paths.append(path)
    return paths


def _glob_volumes(data_dir: Path, pattern: str) -> list[Path]:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {data_dir}: folder not found")
    found: set[Path] = set()
    for match in data_dir.glob(pattern):
        name = match.name.lower()
        if match.is_file() and name.endswith(".dcm"):
            found.add(match.parent.resolve())
        elif (match.is_file() and name.endswith(VOLUME_SUFFIXES)) or (
            match.is_dir() and _has_dicom_files(match)
        ):
            found.add(match.resolve())
    if not found:
        raise FileNotFoundError(
            f"data_dir {data_dir}: no volumes match {pattern!r} (looked for {VOLUME_SUFFIXES} and DICOM folders)"
        )
    return sorted(found)


def class_folder_images(
    folder: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[Path], list[int], list[str]]:
    """``folder/<class>/<image>``: the image paths (extension in ``extensions``), their class indices and the sorted
    class names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    wanted = {"." + ext.lower().lstrip(".") for ext in extensions}
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in wanted)
        paths += files
        labels += [index] * len(files)
    if not paths:
        raise ValueError(f"{folder}: no images with extensions {sorted(wanted)} in class sub-folders")
    return paths, labels, classes


def list_images(folder: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """2D image files under ``folder`` (recursively) whose extension is in ``extensions``, case-insensitive."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {folder}: not found")
    wanted = {"." + ext.lower().lstrip(".") for ext in extensions}
    images = sorted(p.resolve() for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
    if not images:
        raise FileNotFoundError(f"images folder {folder}: no files with extensions {sorted(wanted)}")
    return images
