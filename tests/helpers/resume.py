"""Helpers for stop-and-resume tests: stop a fit with a real signal, record the final state, compare exactly."""

from __future__ import annotations

import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from agreement.runs import LAST


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process after optimizer step ``step``, as a scheduler or Ctrl-C would."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            signal.raise_signal(self.signum)


class KeepCheckpoints(pl.Callback):
    """Copies ``last.ckpt`` to ``step<N>.ckpt`` whenever a new one appears (to resume from earlier points)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.seen: float | None = None

    def _keep(self, trainer) -> None:
        last = self.folder / LAST
        if last.is_file() and last.stat().st_mtime_ns != self.seen:
            self.seen = last.stat().st_mtime_ns
            step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
            shutil.copy(last, self.folder / f"step{step}.ckpt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._keep(trainer)

    def on_train_end(self, trainer, pl_module):
        self._keep(trainer)


class FinalState(pl.Callback):
    """Records the losses of every step and, at the end of training, everything a resumed run must reproduce."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.state: dict[str, Any] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().clone())

    def on_train_end(self, trainer, pl_module):
        self.state = {
            "model": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizers": [opt.state_dict() for opt in trainer.optimizers],
            "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),  # noqa: NPY002 - the global generator is what is compared
        }


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Every place where two nested states differ (tensors compared with ``torch.equal``)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
        return [] if same and a.shape == b.shape and torch.equal(a, b) else [path]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for key in a for d in differences(a[key], b[key], f"{path}.{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(
        (float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()),
        default=0.0,
    )


class Pace(pl.Callback):
    """Sleeps after every step, so that a test can signal a run in another process while it trains."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time

        time.sleep(self.seconds)
