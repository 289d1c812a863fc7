"""One learning-rate schedule for every trainer in the project: a warm-up, then a cosine decay.

The three recipes differ only in their warm-up and decay span, so they are settings of one function:

- pretraining (SwAV / DeepCluster-V2): linear ramp from 0 over ``warmup_steps`` optimizer steps, cosine down to
  ``final_ratio`` at ``total_steps``;
- fine-tuning: the same ramp shifted by one step (``first_step_trains``: the first step has ``1 / (warmup + 1)``
  of the rate instead of 0), cosine to 0;
- prompt tuning (CoOp / PromptSRC's Dassl recipe, per epoch): a constant factor during warm-up, then a cosine
  whose half period is the whole run (``decay_steps=total``), so the last epoch does not reach 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Warmup = Literal["linear", "constant"]


def warmup_cosine(
    step: int,
    warmup_steps: int,
    total_steps: int,
    final_ratio: float = 0.0,
    warmup: Warmup = "linear",
    first_step_trains: bool = False,
    constant_factor: float = 1.0,
    decay_steps: int | None = None,
) -> float:
    """Learning-rate multiplier at ``step`` (0-based).

    During the first ``warmup_steps``: ``step / warmup_steps`` (``warmup="linear"``; ``(step + 1) /
    (warmup_steps + 1)`` with ``first_step_trains``) or ``constant_factor`` (``warmup="constant"``). Then
    ``final_ratio + (1 - final_ratio) * (1 + cos(pi * p)) / 2`` with ``p = (step - warmup_steps) / decay_steps``
    capped at 1; ``decay_steps`` defaults to ``total_steps - warmup_steps``.
    """
    if step < warmup_steps:
        if warmup == "constant":
            return constant_factor
        offset = 1 if first_step_trains else 0
        return (step + offset) / (warmup_steps + offset)
    span = max(1, decay_steps if decay_steps is not None else total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosineSchedule(torch.optim.lr_scheduler.LRScheduler):
    """:func:`warmup_cosine` as a scheduler (stepped per optimizer step or per epoch, as configured); its state
    is plain numbers, so checkpoints restore it exactly."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        final_ratio: float = 0.0,
        warmup: Warmup = "linear",
        first_step_trains: bool = False,
        constant_factor: float = 1.0,
        decay_steps: int | None = None,
    ) -> None:
        if warmup not in ("linear", "constant"):
            raise ValueError(f"warmup must be 'linear' or 'constant', got {warmup!r}")
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(
                f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}"
            )
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_ratio = final_ratio
        self.warmup = warmup
        self.first_step_trains = first_step_trains
        self.constant_factor = constant_factor
        self.decay_steps = decay_steps
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        return warmup_cosine(
            step,
            self.warmup_steps,
            self.total_steps,
            self.final_ratio,
            self.warmup,
            self.first_step_trains,
            self.constant_factor,
            self.decay_steps,
        )

    def get_lr(self) -> list[float]:
        factor = self.factor(self.last_epoch)
        return [base * factor for base in self.base_lrs]


def steps_per_epoch(trainer) -> float:
    """Optimizer steps in one training epoch, also when the run is bounded by ``max_steps`` alone.

    ``estimated_stepping_batches / max_epochs`` is wrong there: with ``max_epochs=-1`` it made the warm-up
    last the whole run, and with ``max_steps`` below ``max_epochs`` epochs it shrank the warm-up. The training
    loader is set up as ``estimated_stepping_batches`` does, so this works inside ``configure_optimizers``.
    """
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if not math.isfinite(batches):  # an iterable dataset without a length
        return trainer.estimated_stepping_batches / max(trainer.max_epochs or 1, 1)
    return max(math.ceil(batches / trainer.accumulate_grad_batches), 1)
