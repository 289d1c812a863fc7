"""Fine-tuning speed: training-step time and inference throughput of the downstream models.

``run_finetune_benchmark`` times, on ``device``, one optimizer step of the slice-wise segmentation U-Net and
of the 2D classifier on random inputs at the demo's sizes, and whole-volume segmentation inference
(slices through the U-Net, logits upsampled to the volume's in-plane size, argmax) in volumes per second.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import interleaved_times, synchronizer
from ssl3d.finetune.classification import ImageClassifier
from ssl3d.finetune.seg_data import CaseData
from ssl3d.finetune.segmentation import SegmentationTask


def _timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    return interleaved_times({"call": fn}, repeats, warmup, synchronizer(device))["call"]


def _train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    return step


def run_finetune_benchmark(quick: bool = False, device: str = "cpu") -> dict:
    """Time fine-tuning steps and volume inference; returns ``{"device", "settings", "rows"}`` (JSON-able)."""
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    backbone = "resnet18"
    batch, size, slices, full = (8, 64, 16, (99, 117)) if quick else (16, 64, 48, (99, 117))
    warmup, repeats = (1, 2) if quick else (2, 5)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, size, size, generator=generator).to(torch_device)
    masks = torch.randint(0, 3, (batch, 1, size, size), generator=generator).to(torch_device)
    targets = torch.randint(0, 2, (batch,), generator=generator).to(torch_device)
    rows = []

    segmenter = SegmentationTask(backbone=backbone, hd95=False).to(torch_device).train()
    classifier = (
        ImageClassifier(backbone=backbone, class_names=["normal", "abnormal"]).to(torch_device).train()
    )
    tasks = [
        ("segmentation U-Net train step", segmenter, masks, "slices/s"),
        ("2D classifier train step", classifier, targets, "images/s"),
    ]
    for label, task, target, unit in tasks:
        step = _train_step(task, lambda task=task, target=target: task.loss(task(images), target))
        rows.append(_row(label, _timed(step, torch_device, warmup, repeats), batch, unit))

    case = CaseData(
        name="benchmark",
        images=torch.rand(slices, 1, size, size, generator=generator),
        labels=None,
        full_labels=None,
        full_shape=full,
        affine=np.eye(4),
        spacing=(1.0, 1.0, 1.0),
        slice_axis=2,
    )
    segmenter.eval()
    times = _timed(lambda: segmenter.predict_case(case), torch_device, 1, repeats)
    rows.append(_row(f"volume inference ({slices} slices)", times, 1, "volumes/s"))
    return {
        "device": str(torch_device)
        if torch_device.type != "cuda"
        else torch.cuda.get_device_name(torch_device),
        "settings": {
            "backbone": backbone,
            "batch": batch,
            "size": size,
            "volume_slices": slices,
            "quick": quick,
        },
        "rows": rows,
    }


def _row(name: str, times: list[float], items: int, unit: str) -> dict:
    median = float(np.median(times))
    return {
        "benchmark": name,
        "median ms": 1000.0 * median,
        "min ms": 1000.0 * min(times),
        "throughput": items / median,
        "unit": unit,
    }
