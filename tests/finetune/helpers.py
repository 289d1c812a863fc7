"""Tiny exported encoders and synthetic NIfTI cases for fast fine-tuning tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import timm

from ssl3d.export import export_encoder

TINY_BACKBONE = "test_efficientnet"
AFFINE = np.array([[2.0, 0, 0, -20], [0, 2.0, 0, -30], [0, 0, 3.0, 10], [0, 0, 0, 1]])


def make_encoder(folder: Path, name: str = TINY_BACKBONE, seed: int = 0) -> Path:
    """Export a randomly initialised timm encoder as scripts/pretrain.py does; return its folder."""
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, in_chans=1, num_classes=0)
    export_encoder(model, name, folder)
    return folder


def synthetic_case(seed: int, shape: tuple[int, int, int] = (20, 24, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy volume with a bright ball (label 1) and a dark box (label 2); the first two slices empty."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    ball = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + ((z - centre[2]) * 2) ** 2 < 30
    box = (x < 6) & (y > shape[1] - 8)
    label = np.zeros(shape, dtype=np.uint8)
    label[ball] = 1
    label[box] = 2
    label[:, :, :2] = 0
    image = rng.normal(0.5, 0.05, shape).astype(np.float32)
    image[label == 1] += 0.4
    image[label == 2] -= 0.3
    return image, label


def write_case(
    folder: Path, name: str, image: np.ndarray, label: np.ndarray | None, affine=AFFINE, label_affine=None
) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"image": str(folder / f"{name}_image.nii.gz")}
    nib.save(nib.Nifti1Image(image, affine), paths["image"])
    if label is not None:
        paths["label"] = str(folder / f"{name}_label.nii.gz")
        nib.save(nib.Nifti1Image(label, affine if label_affine is None else label_affine), paths["label"])
    return paths


def write_datalist(folder: Path, train: int = 2, val: int = 1, test: int = 1) -> Path:
    """A decathlon-style datalist with relative paths and the synthetic cases it lists."""
    lists, seed = {}, 0
    for key, count in (("training", train), ("validation", val), ("test", test)):
        lists[key] = []
        for _ in range(count):
            image, label = synthetic_case(seed)
            paths = write_case(folder / "cases", f"case{seed}", image, label)
            lists[key].append({k: str(Path(v).relative_to(folder)) for k, v in paths.items()})
            seed += 1
    path = folder / "datalist.json"
    path.write_text(json.dumps(lists))
    return path


def segmentation_args(datalist: Path, encoder: str | Path | None) -> list[str]:
    """Tiny ``scripts/finetune.py`` segmentation arguments on a ``write_datalist`` set (one epoch, no bars)."""
    return [
        f"--data.init_args.datalist={datalist}",
        "--data.init_args.class_names=[background, ball, box]",
        "--data.init_args.label_map={0: 0, 1: 1, 2: 2}",
        "--data.init_args.size=[32, 32]",
        "--data.init_args.batch_size=8",
        f"--model.init_args.backbone={TINY_BACKBONE}",
        f"--model.init_args.encoder={encoder}",
        "--model.init_args.lr=0.01",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
