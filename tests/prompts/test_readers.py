"""The dataset readers of ``prompts/datasets.py`` on tiny fake datasets with the CoOp / PromptSRC layouts:
FGVCAircraft, ImageNet and its variants (V2, Sketch, A, R), CSV lists and ImageFolder with a class-name file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prompts.datasets import (
    Item,
    _read_aircraft,
    _read_csv,
    _read_imagefolder,
    _read_imagenet,
    _read_imagenet_variant,
    load_dataset,
    validate_items,
)
from tests.prompts.tiny import NAMES, make_image_folder


def _image(path: Path, value: int = 0) -> Path:
    """A tiny 8x8 image; PIL picks the format from the suffix (.png, .jpg, .JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value % 256, dtype=np.uint8)).save(path)
    return path


def _escaped(path: Path | str) -> str:
    return re.escape(str(path))


# ---------------------------------------------------------------------------------------------- FGVCAircraft
# variants.txt order (not alphabetical) decides the labels; names may hold spaces and slashes.
AIRCRAFT = ["Cessna 172", "707-320", "F-16A/B", "A300B4"]
AIRCRAFT_SPLITS = {
    "train": [
        ("1514522", "Cessna 172"),
        ("0034309", "707-320"),
        ("0056978", "F-16A/B"),
        ("0034958", "A300B4"),
    ],
    "val": [("0043164", "707-320"), ("0040235", "Cessna 172")],
    "test": [("1003090", "A300B4"), ("0062764", "F-16A/B"), ("1205331", "Cessna 172")],
}


def make_aircraft(root: Path) -> Path:
    """``<root>/fgvc_aircraft/{variants.txt, images_variant_<split>.txt, images/<id>.jpg}``."""
    base = root / "fgvc_aircraft"
    base.mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(AIRCRAFT) + "\n\n")
    for split, lines in AIRCRAFT_SPLITS.items():
        (base / f"images_variant_{split}.txt").write_text("".join(f"{im} {name}\n" for im, name in lines))
        for i, (im, _) in enumerate(lines):
            _image(base / "images" / f"{im}.jpg", 30 * i)
    return base


def _aircraft_expected(base: Path) -> dict[str, list[Item]]:
    return {
        split: [Item(str(base / "images" / f"{im}.jpg"), AIRCRAFT.index(name), name) for im, name in lines]
        for split, lines in AIRCRAFT_SPLITS.items()
    }


def test_aircraft_reads_variants_and_split_files(tmp_path):
    base = make_aircraft(tmp_path)
    expected = _aircraft_expected(base)
    assert _read_aircraft(base, base / "images") == expected
    name, splits, classnames = load_dataset("aircraft", tmp_path)
    assert name == "FGVCAircraft"
    assert classnames == AIRCRAFT
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "val": 2, "test": 3}
    assert splits == expected
    assert [i.label for i in splits["test"]] == [3, 2, 0]


def test_aircraft_class_names_from_a_names_file(tmp_path):
    base = make_aircraft(tmp_path)
    names = tmp_path / "names.txt"
    names.write_text("Cessna 172 aircraft\nBoeing 707-320\nF-16A/B fighter\nAirbus A300B4\n")
    _, splits, classnames = load_dataset("FGVCAircraft", tmp_path, classnames_file=str(names))
    assert classnames == ["Cessna 172 aircraft", "Boeing 707-320", "F-16A/B fighter", "Airbus A300B4"]
    assert [(i.label, i.classname) for i in splits["val"]] == [
        (1, "Boeing 707-320"),
        (0, "Cessna 172 aircraft"),
    ]
    assert [i.impath for i in splits["train"]] == [i.impath for i in _aircraft_expected(base)["train"]]
    names.write_text("a\nb\n")
    with pytest.raises(ValueError, match=rf"class-name list {_escaped(names)} has 2 names but .* 4 labels"):
        load_dataset("FGVCAircraft", tmp_path, classnames_file=str(names))


def test_aircraft_unknown_variant(tmp_path):
    base = make_aircraft(tmp_path)
    split_file = base / "images_variant_test.txt"
    split_file.write_text(split_file.read_text() + "2222222 Concorde\n")
    with pytest.raises(ValueError, match=rf"{_escaped(split_file)}: variant 'Concorde' not in variants.txt"):
        load_dataset("aircraft", tmp_path)


@pytest.mark.parametrize("missing", ["variants.txt", "images_variant_val.txt"])
def test_aircraft_missing_text_file(tmp_path, missing):
    base = make_aircraft(tmp_path)
    (base / missing).unlink()
    with pytest.raises(FileNotFoundError, match=_escaped(base / missing)):
        load_dataset("aircraft", tmp_path)


def test_aircraft_missing_image(tmp_path):
    base = make_aircraft(tmp_path)
    (base / "images" / "0062764.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"fgvc_aircraft: 1 images listed in the split are missing.*0062764"
    ):
        load_dataset("aircraft", tmp_path)
    _, splits, _ = load_dataset("aircraft", tmp_path, check_files=False)
    assert len(splits["test"]) == 3


# ---------------------------------------------------------------------------------------------- ImageNet
# The first 12 lines of CoOp's classnames.txt (wnid order); 12 > 10 so ImageNet-V2's folder "10" sorts before "2".
IMAGENET = [
    ("n01440764", "tench"),
    ("n01443537", "goldfish"),
    ("n01484850", "great white shark"),
    ("n01491361", "tiger shark"),
    ("n01494475", "hammerhead shark"),
    ("n01496331", "electric ray"),
    ("n01498041", "stingray"),
    ("n01514668", "rooster"),
    ("n01514859", "hen"),
    ("n01518878", "ostrich"),
    ("n01530575", "brambling"),
    ("n01531178", "goldfinch"),
]
WNIDS = [w for w, _ in IMAGENET]
IMAGENET_NAMES = [n for _, n in IMAGENET]


def _classnames_txt(path: Path, entries=IMAGENET) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{wnid} {name}\n" for wnid, name in entries))
    return path


def make_imagenet(root: Path, classes: int = 4, train: int = 3, val: int = 2) -> Path:
    """``<root>/imagenet/{classnames.txt, images/train/<wnid>/*.JPEG, images/val/<wnid>/*.JPEG}``."""
    base = root / "imagenet"
    _classnames_txt(base / "classnames.txt", IMAGENET[:classes])
    for label, wnid in enumerate(WNIDS[:classes]):
        for i in range(train):
            _image(base / "images" / "train" / wnid / f"{wnid}_{i}.JPEG", label)
        for i in range(val):
            _image(base / "images" / "val" / wnid / f"ILSVRC2012_val_{label:04d}{i}.JPEG", label)
        (base / "images" / "train" / wnid / "notes.txt").write_text("not an image")
    return base


def test_imagenet_reads_train_and_val_folders(tmp_path):
    base = make_imagenet(tmp_path)
    images = base / "images"
    name, splits, classnames = load_dataset("imagenet", tmp_path)
    assert name == "ImageNet"
    assert classnames == IMAGENET_NAMES[:4]
    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "val": 8, "test": 8}
    assert splits["train"][:4] == [
        Item(str(images / "train" / "n01440764" / f"n01440764_{i}.JPEG"), 0, "tench") for i in range(3)
    ] + [Item(str(images / "train" / "n01443537" / "n01443537_0.JPEG"), 1, "goldfish")]
    assert splits["test"][-1] == Item(
        str(images / "val" / "n01491361" / "ILSVRC2012_val_00031.JPEG"), 3, "tiger shark"
    )
    assert [i.label for i in splits["test"]] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert splits["val"] == splits["test"]  # CoOp: ImageNet's val is its test set
    assert not any(i.impath.endswith("notes.txt") for i in splits["train"])
    assert _read_imagenet(tmp_path, base, images) == {k: splits[k] for k in ("train", "test", "val")}


def test_imagenet_missing_class_folder(tmp_path):
    base = make_imagenet(tmp_path)
    folder = base / "images" / "val" / "n01491361"
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    with pytest.raises(FileNotFoundError, match=rf"ImageNet class folder {_escaped(folder)} is missing"):
        load_dataset("ImageNet", tmp_path)


def test_imagenet_missing_classnames(tmp_path):
    base = make_imagenet(tmp_path)
    (base / "classnames.txt").unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"classnames.txt not found .*{_escaped(base / 'classnames.txt')}"
    ):
        load_dataset("ImageNet", tmp_path)


# ---------------------------------------------------------------------------------------------- ImageNet variants
def make_imagenet_v2(root: Path, classnames: bool = True) -> Path:
    """``<root>/imagenetv2/imagenetv2-matched-frequency-format-val/<0..n-1>/*.jpeg``; folder i holds i % 3 + 1
    images. Without ``classnames``, the class names come from ``<root>/imagenet/classnames.txt``."""
    image_dir = root / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    if classnames:
        _classnames_txt(root / "imagenetv2" / "classnames.txt")
    for label in range(len(IMAGENET)):
        for i in range(label % 3 + 1):
            _image(image_dir / str(label) / f"{i:03d}.jpeg", label)
    return image_dir


@pytest.mark.parametrize("own_classnames", [True, False])
def test_imagenet_v2_maps_numbered_folders_to_classnames_order(tmp_path, own_classnames):
    image_dir = make_imagenet_v2(tmp_path, classnames=own_classnames)
    if not own_classnames:
        _classnames_txt(tmp_path / "imagenet" / "classnames.txt")
    name, splits, classnames = load_dataset("imagenet-v2", tmp_path)
    assert name == "ImageNetV2"
    assert classnames == IMAGENET_NAMES
    assert splits["train"] == [] and splits["val"] == []
    test = splits["test"]
    assert len(test) == sum(label % 3 + 1 for label in range(12)) == 24
    # folder "10" is label 10 (numeric, not sorted-string order) and named by line 11 of classnames.txt
    tens = [i for i in test if Path(i.impath).parent.name == "10"]
    assert tens == [Item(str(image_dir / "10" / f"{i:03d}.jpeg"), 10, "brambling") for i in range(2)]
    assert all(Path(i.impath).parent.name == str(i.label) for i in test)
    assert all(i.classname == IMAGENET_NAMES[i.label] for i in test)


def test_imagenet_v2_missing_folder_and_empty_folder(tmp_path):
    image_dir = make_imagenet_v2(tmp_path)
    empty = image_dir / "5"
    for p in empty.iterdir():
        p.unlink()
    # an empty class folder leaves a gap in the labels, which validate_items reports
    with pytest.raises(ValueError, match=rf"{_escaped(image_dir)}: labels must be 0..n-1 without gaps"):
        load_dataset("ImageNetV2", tmp_path)
    empty.rmdir()
    with pytest.raises(FileNotFoundError, match=_escaped(empty)):
        load_dataset("ImageNetV2", tmp_path)


def test_imagenet_sketch_uses_its_own_classnames_first(tmp_path):
    """Sketch has every ImageNet class as a ``<wnid>`` folder: labels are the sorted folder positions, which
    equal the ImageNet indices because classnames.txt is in wnid order."""
    _classnames_txt(tmp_path / "imagenet" / "classnames.txt", [(w, f"wrong {n}") for w, n in IMAGENET])
    _classnames_txt(tmp_path / "imagenet-sketch" / "classnames.txt")
    image_dir = tmp_path / "imagenet-sketch" / "images"
    for label, wnid in enumerate(WNIDS):
        _image(image_dir / wnid / "sketch_0.JPEG", label)
        _image(image_dir / wnid / "sketch_1.png", label)
    name, splits, classnames = load_dataset("imagenet-sketch", tmp_path)
    assert name == "ImageNetSketch"
    assert classnames == IMAGENET_NAMES
    assert len(splits["test"]) == 24 and splits["train"] == splits["val"] == []
    assert splits["test"][:2] == [
        Item(str(image_dir / "n01440764" / "sketch_0.JPEG"), 0, "tench"),
        Item(str(image_dir / "n01440764" / "sketch_1.png"), 0, "tench"),
    ]
    assert [i.label for i in splits["test"]] == [label for label in range(12) for _ in range(2)]
    assert all(Path(i.impath).parent.name == WNIDS[i.label] for i in splits["test"])


@pytest.mark.parametrize(
    ("dataset", "canonical", "folder", "image_dir"),
    [
        ("imagenet-a", "ImageNetA", "imagenet-adversarial", "imagenet-a"),
        ("imagenet-r", "ImageNetR", "imagenet-rendition", "imagenet-r"),
    ],
)
def test_imagenet_a_and_r_label_their_subset_of_classes(tmp_path, dataset, canonical, folder, image_dir):
    """A and R hold 200 of the 1000 classes; as in CoOp, the labels are the positions of the present ``<wnid>``
    folders (sorted), so they are evaluated in their own 200-class label space. A README file is skipped."""
    _classnames_txt(tmp_path / "imagenet" / "classnames.txt")  # falls back to ImageNet's classnames.txt
    images = tmp_path / folder / image_dir
    subset = [9, 1, 11, 4]  # created out of order; read in sorted wnid order
    for n, index in enumerate(subset):
        for i in range(n + 1):
            _image(images / WNIDS[index] / f"{i}.jpg", index)
    (images / "README.txt").write_text("ImageNet-A/R readme")
    name, splits, classnames = load_dataset(dataset, tmp_path)
    assert name == canonical
    assert classnames == ["goldfish", "hammerhead shark", "ostrich", "goldfinch"]
    assert [(i.label, i.classname) for i in splits["test"]] == [
        (0, "goldfish"),
        (0, "goldfish"),
        (1, "hammerhead shark"),
        (1, "hammerhead shark"),
        (1, "hammerhead shark"),
        (1, "hammerhead shark"),
        (2, "ostrich"),
        (3, "goldfinch"),
        (3, "goldfinch"),
        (3, "goldfinch"),
    ]
    assert splits["test"][-1].impath == str(images / "n01531178" / "2.jpg")
    direct = _read_imagenet_variant(tmp_path, tmp_path / folder, images, canonical)
    assert direct == {"train": [], "val": [], "test": splits["test"]}


def test_imagenet_variant_unknown_wnid_folder(tmp_path):
    _classnames_txt(tmp_path / "imagenet-sketch" / "classnames.txt")
    images = tmp_path / "imagenet-sketch" / "images"
    _image(images / "n01440764" / "0.jpg")
    _image(images / "n99999999" / "0.jpg")
    with pytest.raises(
        ValueError,
        match=rf"{_escaped(images / 'n99999999')}: 'n99999999' is not in ImageNet's classnames.txt",
    ):
        load_dataset("ImageNetSketch", tmp_path)


def test_imagenet_variant_without_any_classnames(tmp_path):
    _image(tmp_path / "imagenet-rendition" / "imagenet-r" / "n01440764" / "0.jpg")
    with pytest.raises(FileNotFoundError, match=r"ImageNet classnames\.txt not found") as info:
        load_dataset("ImageNetR", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "imagenet-rendition" / "classnames.txt") in message
    assert str(tmp_path / "imagenet" / "classnames.txt") in message


# ---------------------------------------------------------------------------------------------- CSV
CSV_ROWS = [  # path, label, split, classname
    ("imgs/cat/0.png", 0, "train", "cat"),
    ("imgs/dog/0.png", 1, "train", "dog"),
    ("imgs/cat/1.png", 0, "train", "cat"),
    ("imgs/car/0.png", 2, "train", "red car"),
    ("imgs/cat/2.png", 0, "test", "cat"),
    ("imgs/car/1.png", 2, "test", "red car"),
    ("imgs/dog/1.png", 1, "test", "dog"),
]


def make_csv(root: Path, rows=CSV_ROWS, classname_column: bool = True, name: str = "list.csv") -> Path:
    """``<root>/<name>`` with ``path,label,split[,classname]``, image paths relative to ``<root>``."""
    header = "path,label,split" + (",classname" if classname_column else "")
    lines = [header]
    for path, label, split, classname in rows:
        lines.append(f"{path},{label},{split}" + (f",{classname}" if classname_column else ""))
        if not (root / path).is_file():
            _image(root / path, 50 * int(label))
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def test_csv_with_a_classname_column(tmp_path):
    path = make_csv(tmp_path / "data")
    expected_train = [
        Item(str(tmp_path / "data" / p), label, n) for p, label, s, n in CSV_ROWS if s == "train"
    ]
    expected_test = [Item(str(tmp_path / "data" / p), label, n) for p, label, s, n in CSV_ROWS if s == "test"]
    assert _read_csv(path, None) == {"train": expected_train, "val": [], "test": expected_test}
    name, splits, classnames = load_dataset("csv", path)
    assert name == "csv"
    assert classnames == ["cat", "dog", "red car"]
    assert splits["train"] == expected_train and splits["test"] == expected_test
    assert splits["val"] == expected_train  # no val rows: val is the train list


def test_csv_with_a_classnames_file(tmp_path):
    rows = [*CSV_ROWS, ("imgs/dog/2.png", 1, "val", "dog")]
    path = make_csv(tmp_path / "data", rows=rows, classname_column=False)
    names = tmp_path / "names.txt"
    names.write_text("tabby cat\n\n  puppy  \nred sports car\n")
    name, splits, classnames = load_dataset("CSV", path, classnames_file=str(names))
    assert name == "csv"
    assert classnames == ["tabby cat", "puppy", "red sports car"]
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "val": 1, "test": 3}
    assert splits["val"] == [Item(str(tmp_path / "data" / "imgs" / "dog" / "2.png"), 1, "puppy")]
    assert [i.classname for i in splits["test"]] == ["tabby cat", "red sports car", "puppy"]
    # a names file wins over a classname column
    with_column = make_csv(tmp_path / "data", rows=rows, name="with_column.csv")
    _, splits, classnames = load_dataset("csv", with_column, classnames_file=str(names))
    assert classnames == ["tabby cat", "puppy", "red sports car"]
    assert {i.classname for i in splits["train"]} == set(classnames)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,label,split\nimgs/a.png,0,train\n", "need a header with columns path,label,split"),
        ("path,label,split\nimgs/a.png,0,train\n", "no classname column and no classnames file given"),
        (
            "path,label,split,classname\nimgs/a.png,0,training,cat\n",
            "split must be train, val or test, got 'training'",
        ),
        (
            "path,label,split,classname\nimgs/a.png,0,train,cat\nimgs/b.png,0\n",
            "line 3: no value for split, classname",
        ),
        ("path,label,split,classname\nimgs/a.png,0,train,cat\nimgs/b.png,2,test,dog\n", r"labels \[0, 2\]"),
    ],
    ids=["bad-header", "no-names", "bad-split", "short-row", "label-gap"],
)
def test_csv_bad_input(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("csv", path)
    assert str(path) in str(info.value)


def test_csv_names_file_not_matching_the_labels(tmp_path):
    path = make_csv(tmp_path / "data", classname_column=False)
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match=rf"class names \(2\) do not match the labels of {_escaped(path)}"):
        load_dataset("csv", path, classnames_file=str(names))


def test_csv_conflicting_classnames_raise(tmp_path):
    rows = [*CSV_ROWS, ("imgs/dog/2.png", 1, "test", "wolf")]
    path = make_csv(tmp_path / "data", rows=rows)
    with pytest.raises(ValueError, match="label 1 is named both 'dog' and 'wolf'"):
        load_dataset("csv", path)


@pytest.mark.parametrize("row", ["imgs/b.png,dog,train,dog", "imgs/b.png"], ids=["word-label", "path-only"])
def test_csv_malformed_label_names_the_file(tmp_path, row):
    path = tmp_path / "bad.csv"
    path.write_text(f"path,label,split,classname\nimgs/a.png,0,train,cat\n{row}\n")
    with pytest.raises(ValueError, match=_escaped(path)):
        load_dataset("csv", path)


# ---------------------------------------------------------------------------------------------- ImageFolder
FOLDER_NAMES = ["sailing boat", "tabby cat", "puppy", "red sports car", "oak tree"]  # sorted folder order


def test_imagefolder_with_a_classnames_file(tmp_path):
    """Labels follow the sorted train/ folders (boat, cat, dog, red_car, tree); line i of the file names label i."""
    root = make_image_folder(tmp_path / "data", per_split=(2, 0, 1), size=8)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(FOLDER_NAMES) + "\n\n")
    folders = sorted(n.replace(" ", "_") for n in NAMES)
    assert folders == ["boat", "cat", "dog", "red_car", "tree"]
    raw = _read_imagefolder(root, str(names))
    assert raw["val"] == []  # val/ has only empty class folders
    name, splits, classnames = load_dataset("imagefolder", root, classnames_file=str(names))
    assert name == "imagefolder"
    assert classnames == FOLDER_NAMES
    assert (
        splits["train"]
        == raw["train"]
        == [
            Item(str(root / "train" / f / f"{i}.png"), label, FOLDER_NAMES[label])
            for label, f in enumerate(folders)
            for i in range(2)
        ]
    )
    assert splits["test"] == [
        Item(str(root / "test" / f / "0.png"), label, FOLDER_NAMES[label]) for label, f in enumerate(folders)
    ]
    assert splits["val"] == splits["train"]
    # without the file the names are the folder names with spaces
    assert load_dataset("imagefolder", root)[2] == ["boat", "cat", "dog", "red car", "tree"]


def test_imagefolder_empty_classnames_file(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split=(1, 0, 1), size=8)
    names = tmp_path / "names.txt"
    names.write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"class-name file {_escaped(names)} is empty"):
        load_dataset("imagefolder", root, classnames_file=str(names))


def test_imagefolder_test_class_missing_from_train(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split=(1, 0, 1), size=8)
    _image(root / "test" / "zebra" / "0.png")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(FOLDER_NAMES))
    with pytest.raises(ValueError, match=rf"{_escaped(root / 'test')} has class folders \['zebra'\]"):
        load_dataset("imagefolder", root, classnames_file=str(names))


def test_imagefolder_without_test_folder(tmp_path):
    root = tmp_path / "data"
    _image(root / "train" / "cat" / "0.png")
    with pytest.raises(
        FileNotFoundError, match=rf"ImageFolder dataset {_escaped(root)} needs train/ and test/"
    ):
        load_dataset("imagefolder", root)


# ---------------------------------------------------------------------------------------------- validate_items
def test_validate_items_on_reader_output(tmp_path):
    base = make_aircraft(tmp_path)
    splits = _read_aircraft(base, base / "images")
    assert validate_items(splits, str(base)) == AIRCRAFT
    # dropping every item of a middle label leaves a gap
    gappy = {k: [i for i in v if i.label != 1] for k, v in splits.items()}
    with pytest.raises(
        ValueError, match=rf"{_escaped(base)}: labels must be 0..n-1 without gaps, got \[0, 2, 3\]"
    ):
        validate_items(gappy, str(base))
