"""Optimizer and per-step schedule shared by the fine-tuning tasks (``agreement.schedules`` with the ramp shifted
by one step, so that the first step trains)."""

from __future__ import annotations

from typing import Literal

import torch

from agreement.optim import build_optimizer as core_optimizer
from agreement.schedules import WarmupCosineSchedule

Optimizer = Literal["adamw", "sgd"]


def build_optimizer(
    groups: list[dict], name: Optimizer, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """``agreement.optim.build_optimizer`` (AdamW or SGD here) over the groups that hold parameters."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    if name not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")
    return core_optimizer(groups, name, lr=lr, weight_decay=weight_decay, momentum=momentum)


def scheduler_config(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> dict:
    """Lightning scheduler config: linear warm-up over ``warmup_steps`` (the first step at ``1 / (warmup + 1)``),
    then cosine decay to 0 at ``total_steps``, stepped per optimizer step."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps, total_steps, first_step_trains=True)
    return {"scheduler": scheduler, "interval": "step"}
