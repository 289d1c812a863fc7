"""Tiny open_clip ViT (width 64, 3 layers, 32 px, patch 8, real tokenizer, 77-token context) and tiny datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from agreement.clip import build_clip

TINY = "prompts-tiny-vit"
NAMES = ["cat", "dog", "red car", "tree", "boat"]


def tiny_clip():
    return build_clip(TINY)


def make_image_folder(root: Path, classes=NAMES, per_split=(6, 2, 4), size=32) -> Path:
    """train/val/test ImageFolder with class-dependent colours (learnable, so training has signal)."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val", "test"), per_split):
        for label, name in enumerate(classes):
            folder = root / split / name.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.full((size, size, 3), 40 * label % 255, dtype=np.uint8)
                noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{i}.png")
    return root


def make_coop_dataset(
    root: Path,
    folder="oxford_pets",
    image_dir="images",
    split_file="split_zhou_OxfordPets.json",
    classes=NAMES,
    per_split=(6, 2, 4),
) -> Path:
    """A CoOp-style dataset folder with a split JSON."""
    base = root / folder
    rng = np.random.default_rng(1)
    split = {"train": [], "val": [], "test": []}
    for which, count in zip(split, per_split):
        for label, name in enumerate(classes):
            for i in range(count):
                rel = f"{name.replace(' ', '_')}_{which}_{i}.png"
                path = base / image_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
                split[which].append([rel, label, name])
    (base / split_file).write_text(json.dumps(split))
    return base
