"""Optimisers and per-step learning-rate schedules of the pretraining recipe."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from timm.optim import Lars


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    name: Literal["lars", "adamw", "sgd"] = "lars",
    lr: float = 0.01,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """SGD with LARS as in the official recipe (apex LARC without clipping, through timm's ``Lars``), or AdamW."""
    if name == "lars":
        return Lars(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coeff=trust_coefficient,
            trust_clip=False,
            always_adapt=True,
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'lars', 'adamw' or 'sgd'")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_ratio: float = 0.0) -> float:
    """LR multiplier: linear ramp from 0 over ``warmup_steps``, then cosine down to ``final_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosineSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Per-step warm-up then cosine decay; its state is plain numbers, so checkpoints restore it exactly."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, final_ratio: float = 0.0
    ) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_ratio = final_ratio
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor = warmup_cosine(self.last_epoch, self.warmup_steps, self.total_steps, self.final_ratio)
        return [base * factor for base in self.base_lrs]
