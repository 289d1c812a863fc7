"""Gaussian prompt aggregation (GPA): a Gaussian-weighted average over epochs of the prompt tensors.

Only the prompts are averaged, in float32 (the official code averaged the whole fp16 state dict, which perturbs
the frozen backbone by rounding). The running sums and the epochs already added are plain state that travels
with checkpoints, so an interrupted run resumes to the same aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def gpa_weights(num_epochs: int, mean: float, std: float) -> list[float]:
    """Per-epoch weights for epochs 1..N: ``w_e = g(e) / sum_k g(k)`` with ``g`` the N(mean, std^2) density.

    ``std`` is a standard deviation (the official config value is used that way).
    """
    if int(num_epochs) != num_epochs or num_epochs < 1:
        raise ValueError(f"gpa_weights: num_epochs must be a positive integer, got {num_epochs!r}")
    if not std > 0:
        raise ValueError(f"gpa_weights: std must be positive, got {std!r}")
    # log-densities shifted by their maximum: exact normalisation without underflow for narrow Gaussians
    logs = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, int(num_epochs) + 1)]
    top = max(logs)
    values = [math.exp(v - top) for v in logs]
    total = math.fsum(values)
    return [v / total for v in values]


class PromptAggregator:
    """Running ``sum_e w_e * prompts_e`` for named tensors, in float32."""

    def __init__(self, weights: list[float]) -> None:
        self.weights = [float(w) for w in weights]
        self.sums: dict[str, torch.Tensor] = {}
        self.epochs: list[int] = []

    @property
    def num_epochs(self) -> int:
        return len(self.weights)

    @property
    def weight_added(self) -> float:
        return math.fsum(self.weights[e - 1] for e in self.epochs)

    @property
    def complete(self) -> bool:
        return sorted(self.epochs) == list(range(1, self.num_epochs + 1))

    @torch.no_grad()
    def add(self, epoch: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add the prompts after the last optimiser step of ``epoch`` (1-based); each epoch counts once."""
        if not 1 <= epoch <= self.num_epochs:
            raise ValueError(f"GPA: epoch {epoch} is outside 1..{self.num_epochs}")
        if epoch in self.epochs:
            return
        weight = self.weights[epoch - 1]
        for name, tensor in tensors.items():
            value = tensor.detach().float() * weight
            if name in self.sums:
                self.sums[name] = self.sums[name].to(value.device) + value
            else:
                self.sums[name] = value.clone()
        self.epochs.append(epoch)

    def aggregate(self) -> dict[str, torch.Tensor]:
        """The aggregated prompts; if some epochs are missing, the sums are renormalised by the weight added."""
        if not self.epochs:
            raise RuntimeError("GPA: no epoch has been aggregated yet")
        scale = 1.0 if self.complete else 1.0 / self.weight_added
        return {name: value * scale for name, value in self.sums.items()}

    def state_dict(self) -> dict[str, object]:
        return {
            "weights": list(self.weights),
            "epochs": list(self.epochs),
            "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        weights = [float(w) for w in state["weights"]]  # type: ignore[union-attr]
        if len(weights) != len(self.weights) or any(
            not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in zip(weights, self.weights)
        ):
            raise ValueError(
                "GPA state in the checkpoint was made with other weights (epochs, mean or std differ) "
                "than this run's; resume with the same gpa settings and max_epochs"
            )
        self.epochs = [int(e) for e in state["epochs"]]  # type: ignore[union-attr]
        self.sums = {k: v.float().clone() for k, v in state["sums"].items()}  # type: ignore[union-attr]
