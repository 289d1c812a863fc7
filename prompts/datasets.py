"""Few-shot datasets on disk: the CoOp/Dassl dataset folders and split files, ImageFolder and CSV datasets, the
built-in digits demo, and the checks of their images and shots before a run starts."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from agreement.runs import write_text_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class Item:
    impath: str
    label: int
    classname: str


@dataclass(frozen=True)
class DatasetInfo:
    folder: str
    image_dir: str
    split_file: str | None = None
    kind: str = "split_json"  # split_json | aircraft | imagenet | imagenet_variant


# CoOp's DATASETS.md layout: <root>/<folder>/<image_dir>, split file in <root>/<folder>/.
DATASETS: dict[str, DatasetInfo] = {
    "OxfordPets": DatasetInfo("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "Caltech101": DatasetInfo("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "StanfordCars": DatasetInfo("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "OxfordFlowers": DatasetInfo("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "Food101": DatasetInfo("food-101", "images", "split_zhou_Food101.json"),
    "SUN397": DatasetInfo("sun397", "SUN397", "split_zhou_SUN397.json"),
    "DescribableTextures": DatasetInfo("dtd", "images", "split_zhou_DescribableTextures.json"),
    "EuroSAT": DatasetInfo("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "UCF101": DatasetInfo("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "FGVCAircraft": DatasetInfo("fgvc_aircraft", "images", kind="aircraft"),
    "ImageNet": DatasetInfo("imagenet", "images", kind="imagenet"),
    "ImageNetV2": DatasetInfo(
        "imagenetv2", "imagenetv2-matched-frequency-format-val", kind="imagenet_variant"
    ),
    "ImageNetSketch": DatasetInfo("imagenet-sketch", "images", kind="imagenet_variant"),
    "ImageNetA": DatasetInfo("imagenet-adversarial", "imagenet-a", kind="imagenet_variant"),
    "ImageNetR": DatasetInfo("imagenet-rendition", "imagenet-r", kind="imagenet_variant"),
    "Digits": DatasetInfo("sklearn_digits", "images", "split_zhou_Digits.json"),
}
ALIASES = {
    "flowers102": "OxfordFlowers",
    "dtd": "DescribableTextures",
    "aircraft": "FGVCAircraft",
    "imagenet-v2": "ImageNetV2",
    "imagenet-sketch": "ImageNetSketch",
    "imagenet-a": "ImageNetA",
    "imagenet-r": "ImageNetR",
    "digits": "Digits",
}
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def canonical_name(dataset: str) -> str:
    """Registry name of ``dataset`` (case-insensitive, common aliases); ``imagefolder`` and ``csv`` pass through."""
    if dataset.lower() in ("imagefolder", "csv"):
        return dataset.lower()
    lookup = {k.lower(): k for k in DATASETS} | {k: v for k, v in ALIASES.items()}
    key = dataset.lower()
    if key not in lookup:
        raise ValueError(
            f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}, or 'imagefolder' / 'csv' with a root"
        )
    return lookup[key]


# ---------------------------------------------------------------------------------------------- readers
def _items_from_json(entries: list, image_dir: Path) -> list[Item]:
    return [Item(str(image_dir / impath), int(label), str(name)) for impath, label, name in entries]


def read_split_json(split_file: Path, image_dir: Path) -> dict[str, list[Item]]:
    """CoOp's ``split_zhou_*.json``: ``{"train"|"val"|"test": [[relative path, label, classname], ...]}``."""
    if not split_file.is_file():
        raise FileNotFoundError(f"split file {split_file} not found (see CoOp's DATASETS.md for the layout)")
    with open(split_file) as handle:
        raw = json.load(handle)
    missing = [k for k in ("train", "test") if k not in raw]
    if missing:
        raise ValueError(f"split file {split_file} lacks the {missing} lists")
    return {k: _items_from_json(raw.get(k, []), image_dir) for k in ("train", "val", "test")}


def _read_aircraft(base: Path, image_dir: Path) -> dict[str, list[Item]]:
    variants_file = base / "variants.txt"
    if not variants_file.is_file():
        raise FileNotFoundError(f"{variants_file} not found (FGVCAircraft layout of CoOp's DATASETS.md)")
    classnames = [line.strip() for line in variants_file.read_text().splitlines() if line.strip()]
    index = {name: i for i, name in enumerate(classnames)}
    splits = {}
    for split in ("train", "val", "test"):
        items = []
        for line in (base / f"images_variant_{split}.txt").read_text().splitlines():
            if line.strip():
                image, name = line.strip().split(" ", 1)
                if name not in index:
                    raise ValueError(
                        f"{base / f'images_variant_{split}.txt'}: variant {name!r} not in variants.txt"
                    )
                items.append(Item(str(image_dir / f"{image}.jpg"), index[name], name))
        splits[split] = items
    return splits


def _imagenet_classnames(*candidates: Path) -> dict[str, str]:
    for path in candidates:
        if path.is_file():
            names = {}
            for line in path.read_text().splitlines():
                if line.strip():
                    wnid, name = line.strip().split(" ", 1)
                    names[wnid] = name
            return names
    raise FileNotFoundError(f"ImageNet classnames.txt not found in any of {[str(p) for p in candidates]}")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_imagenet(root: Path, base: Path, image_dir: Path) -> dict[str, list[Item]]:
    names = _imagenet_classnames(base / "classnames.txt")
    splits: dict[str, list[Item]] = {}
    for split, folder in (("train", "train"), ("test", "val")):
        items = []
        for label, wnid in enumerate(names):
            sub = image_dir / folder / wnid
            if not sub.is_dir():
                raise FileNotFoundError(f"ImageNet class folder {sub} is missing")
            items += [Item(str(p), label, names[wnid]) for p in _list_images(sub)]
        splits[split] = items
    splits["val"] = splits["test"]
    return splits


def _read_imagenet_variant(root: Path, base: Path, image_dir: Path, name: str) -> dict[str, list[Item]]:
    names = _imagenet_classnames(base / "classnames.txt", root / "imagenet" / "classnames.txt")
    wnids = list(names)
    if name == "ImageNetV2":  # folders 0..999 in classnames.txt order
        folders = [(str(i), wnids[i]) for i in range(len(wnids))]
    else:
        folders = [(p.name, p.name) for p in sorted(image_dir.iterdir()) if p.is_dir()]
    items = []
    for label, (folder, wnid) in enumerate(folders):
        if wnid not in names:
            raise ValueError(f"{image_dir / folder}: {wnid!r} is not in ImageNet's classnames.txt")
        items += [Item(str(p), label, names[wnid]) for p in _list_images(image_dir / folder)]
    return {"train": [], "val": [], "test": items}


def _read_classnames_file(path: str | Path) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"class-name file {path} is empty")
    return lines


def _read_imagefolder(root: Path, classnames_file: str | None) -> dict[str, list[Item]]:
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FileNotFoundError(
            f"ImageFolder dataset {root} needs train/ and test/ subfolders (val/ optional)"
        )
    folders = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    names = (
        _read_classnames_file(classnames_file) if classnames_file else [f.replace("_", " ") for f in folders]
    )
    if len(names) != len(folders):
        raise ValueError(
            f"class-name list {classnames_file} has {len(names)} names but {root / 'train'} has "
            f"{len(folders)} class folders"
        )
    splits = {}
    for split in ("train", "val", "test"):
        items = []
        if (root / split).is_dir():
            extra = sorted(p.name for p in (root / split).iterdir() if p.is_dir() and p.name not in folders)
            if extra:
                raise ValueError(f"{root / split} has class folders {extra} that train/ does not have")
            for label, folder in enumerate(folders):
                if (root / split / folder).is_dir():
                    items += [Item(str(p), label, names[label]) for p in _list_images(root / split / folder)]
        splits[split] = items
    return splits


def _read_csv(path: Path, classnames_file: str | None) -> dict[str, list[Item]]:
    """CSV with a header ``path,label,split[,classname]``; paths relative to the CSV's folder."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"path", "label", "split"} <= set(rows[0]):
        raise ValueError(
            f"{path}: need a header with columns path,label,split (and classname or a names file)"
        )
    for line, r in enumerate(rows, start=2):
        missing = [column for column, value in r.items() if value is None]
        if missing:
            raise ValueError(f"{path}: line {line}: no value for {', '.join(missing)}")
        value = r.get("label")
        if value is None or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{path}: line {line}: label must be an integer, got {value!r}")
    labels = sorted({int(r["label"]) for r in rows})
    if classnames_file:
        names = _read_classnames_file(classnames_file)
    elif "classname" in rows[0]:
        by_label: dict[int, str] = {}
        for r in rows:
            first = by_label.setdefault(int(r["label"]), r["classname"])
            if first != r["classname"]:
                raise ValueError(f"{path}: label {r['label']} is named both {first!r} and {r['classname']!r}")
        names = [by_label.get(i, "") for i in range(max(labels) + 1)]
    else:
        raise ValueError(f"{path}: no classname column and no classnames file given")
    if labels != list(range(len(names))):
        raise ValueError(
            f"class names ({len(names)}) do not match the labels of {path} (labels {labels[:5]}..., must be 0..{len(names) - 1})"
        )
    splits: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for r in rows:
        if r["split"] not in splits:
            raise ValueError(f"{path}: split must be train, val or test, got {r['split']!r}")
        label = int(r["label"])
        splits[r["split"]].append(Item(str(path.parent / r["path"]), label, names[label]))
    return splits


def validate_items(splits: dict[str, list[Item]], source: str, check_files: bool = True) -> list[str]:
    """Class names in label order; raise one clear error for inconsistent names/labels or missing images."""
    names: dict[int, str] = {}
    for split, items in splits.items():
        for item in items:
            known = names.setdefault(item.label, item.classname)
            if known != item.classname:
                raise ValueError(
                    f"{source}: label {item.label} is named both {known!r} and {item.classname!r} ({split} split); "
                    "the class-name list does not match the labels"
                )
    if not names:
        raise ValueError(f"{source}: no images")
    labels = sorted(names)
    if labels[0] < 0 or labels != list(range(labels[-1] + 1)):
        raise ValueError(f"{source}: labels must be 0..n-1 without gaps, got {labels[:10]}...")
    if check_files:
        missing = [
            item.impath for items in splits.values() for item in items if not os.path.isfile(item.impath)
        ]
        if missing:
            raise FileNotFoundError(
                f"{source}: {len(missing)} images listed in the split are missing, e.g. {', '.join(missing[:3])}"
            )
    return [names[i] for i in labels]


def load_dataset(
    dataset: str, root: str | Path, classnames_file: str | None = None, check_files: bool = True
) -> tuple[str, dict[str, list[Item]], list[str]]:
    """``(canonical name, {"train", "val", "test": items}, classnames)`` for a registered, ImageFolder or CSV set."""
    name = canonical_name(dataset)
    root = Path(root).expanduser()
    if name == "imagefolder":
        splits, source = _read_imagefolder(root, classnames_file), str(root)
    elif name == "csv":
        splits, source = _read_csv(root, classnames_file), str(root)
    else:
        info = DATASETS[name]
        base = root / info.folder
        if name == "Digits" and not (base / info.split_file).is_file():
            prepare_digits(root)
        image_dir = base / info.image_dir if info.image_dir else base
        if info.kind == "split_json":
            source = str(base / info.split_file)
            splits = read_split_json(base / info.split_file, image_dir)
        elif info.kind == "aircraft":
            splits, source = _read_aircraft(base, image_dir), str(base)
        elif info.kind == "imagenet":
            splits, source = _read_imagenet(root, base, image_dir), str(base)
        else:
            splits, source = _read_imagenet_variant(root, base, image_dir, name), str(image_dir)
    if not splits.get("val"):
        splits["val"] = list(splits["train"])
    classnames = validate_items(splits, source, check_files)
    if classnames_file and name not in ("imagefolder", "csv"):
        given = _read_classnames_file(classnames_file)
        if len(given) != len(classnames):
            raise ValueError(
                f"class-name list {classnames_file} has {len(given)} names but {source} has {len(classnames)} labels"
            )
        classnames = given
        splits = {k: [Item(i.impath, i.label, given[i.label]) for i in v] for k, v in splits.items()}
    return name, splits, classnames


# ---------------------------------------------------------------------------------------------- input checks
def read_image(path: str) -> Image.Image:
    """The image at ``path`` as RGB; an unreadable file is an ``OSError`` naming it."""
    try:
        with Image.open(path) as handle:
            return handle.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three for broken files
        raise OSError(f"image {path} cannot be read: {error}") from None


def check_images(items: Sequence[Item], source: str, decode: bool = True) -> None:
    """Raise one ``OSError`` naming every unreadable image (up to 3) of ``items``.

    ``decode`` decodes each image whole; otherwise only its header is read and checked by PIL's ``verify``, which is
    fast enough for large test sets but may miss a truncated JPEG body.
    """
    bad: list[str] = []
    count = 0
    for item in dict.fromkeys(i.impath for i in items):
        try:
            if decode:
                read_image(item)
            else:
                with Image.open(item) as handle:
                    handle.verify()
        except (OSError, ValueError, SyntaxError) as error:
            count += 1
            if len(bad) < 3:
                bad.append(f"{item} ({str(error).removeprefix(f'image {item} cannot be read: ')})")
    if count:
        raise OSError(
            f"{source}: {count} image(s) cannot be read, e.g. {'; '.join(bad)}; remove or replace them before training"
        )


def check_shots(items: Sequence[Item], classnames: Sequence[str], num_shots: int, source: str) -> None:
    """Raise ``ValueError`` unless every class has at least ``num_shots`` training images (``0``: all images)."""
    if num_shots < 0:
        raise ValueError(f"shots must be >= 0 (0 uses every training image), got {num_shots}")
    counts = {label: 0 for label in range(len(classnames))}
    for item in items:
        counts[item.label] = counts.get(item.label, 0) + 1
    if not items:
        raise ValueError(
            f"{source}: no training images (an evaluation-only dataset cannot be the training set)"
        )
    short = sorted((n, label) for label, n in counts.items() if n < max(num_shots, 1))
    if short:
        fewest, label = short[0]
        name = classnames[label] if label < len(classnames) else str(label)
        if fewest == 0:
            raise ValueError(
                f"{source}: {sum(n == 0 for n, _ in short)} of {len(counts)} classes have no training images "
                f"(e.g. {name!r}); add images to them or leave them out"
            )
        raise ValueError(
            f"{source}: --shots {num_shots} but {len(short)} of {len(counts)} classes have fewer training images "
            f"(class {name!r} has {fewest}); use --shots {fewest} or fewer"
        )


# ---------------------------------------------------------------------------------------------- demo data
def prepare_digits(root: str | Path) -> Path:
    """scikit-learn's digits as a CoOp-style dataset: 32x32 upscaled PNGs and ``split_zhou_Digits.json``
    (per class, a fixed shuffle: 50% train, 10% val, 40% test)."""
    from sklearn.datasets import load_digits

    base = Path(root).expanduser() / DATASETS["Digits"].folder
    images_dir = base / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.default_rng(0)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        indices = indices[rng.permutation(len(indices))]
        n_train, n_val = len(indices) // 2, len(indices) // 10
        for position, index in enumerate(indices):
            name = f"{DIGIT_NAMES[label]}/{index:04d}.png"
            target = images_dir / name
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                pixels = (digits.images[index] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").resize((32, 32), Image.BICUBIC).save(target)
            which = "train" if position < n_train else "val" if position < n_train + n_val else "test"
            split[which].append([name, label, DIGIT_NAMES[label]])
    write_text_atomic(base / DATASETS["Digits"].split_file, json.dumps(split))
    return base
