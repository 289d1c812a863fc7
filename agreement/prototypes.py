"""Prototype layers and projection heads for SwAV and DeepCluster-V2.

Prototypes are bias-free linear layers whose rows are kept on the unit sphere, so with L2-normalised embeddings the
scores are cosine similarities. Several heads (e.g. DeepCluster-V2's three k-means runs with different k) share the
same embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Prototypes(nn.Module):
    """``len(num_prototypes)`` bias-free linear heads ``dim -> num_prototypes[h]``.

    ``freeze_steps`` is SwAV's ``freeze_prototypes_niters``: during the first ``freeze_steps`` optimizer steps the
    prototype gradients are dropped (see :meth:`zero_grad_if_frozen`), which SwAV found stabilises the start of
    training.
    """

    def __init__(self, dim: int, num_prototypes: int | list[int], freeze_steps: int = 0) -> None:
        super().__init__()
        if not _is_int(dim) or dim < 1:
            raise ValueError(f"Prototypes: dim must be a positive integer, got {dim!r}")
        sizes = [num_prototypes] if _is_int(num_prototypes) else num_prototypes
        if not isinstance(sizes, (list, tuple)) or not sizes or not all(_is_int(k) and k >= 1 for k in sizes):
            raise ValueError(
                f"Prototypes: num_prototypes must be a positive integer or a non-empty list of them, "
                f"got {num_prototypes!r}"
            )
        if not _is_int(freeze_steps) or freeze_steps < 0:
            raise ValueError(f"Prototypes: freeze_steps must be a non-negative integer, got {freeze_steps!r}")
        self.dim = dim
        self.num_prototypes = list(sizes)
        self.freeze_steps = freeze_steps
        self.heads = nn.ModuleList(nn.Linear(dim, k, bias=False) for k in self.num_prototypes)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def _check_head(self, head: int) -> None:
        if not _is_int(head) or not 0 <= head < self.num_heads:
            raise ValueError(f"Prototypes: head must be an integer in [0, {self.num_heads}), got {head!r}")

    def weight(self, head: int = 0) -> torch.Tensor:
        """The (num_prototypes[head], dim) prototype matrix of ``head`` (the parameter itself)."""
        self._check_head(head)
        return self.heads[head].weight

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project every prototype back onto the unit sphere; SwAV does this before each training step."""
        for layer in self.heads:
            layer.weight.copy_(F.normalize(layer.weight, dim=1))

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Scores of ``z`` (N, dim), expected L2-normalised, against each head: a list of (N, num_prototypes[h])."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"Prototypes: input must have shape (N, {self.dim}), got {tuple(z.shape)}")
        return [layer(z) for layer in self.heads]

    @torch.no_grad()
    def set_centroids(self, head: int, centroids: torch.Tensor) -> None:
        """Overwrite ``head``'s prototypes with k-means centroids (DeepCluster-V2, once per epoch), copied as given."""
        self._check_head(head)
        weight = self.heads[head].weight
        if not isinstance(centroids, torch.Tensor) or tuple(centroids.shape) != tuple(weight.shape):
            shape = (
                tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__
            )
            raise ValueError(
                f"Prototypes.set_centroids: centroids for head {head} must have shape {tuple(weight.shape)}, "
                f"got {shape}"
            )
        if not torch.isfinite(centroids).all():
            raise ValueError("Prototypes.set_centroids: centroids contain NaN or inf")
        weight.copy_(centroids.to(device=weight.device, dtype=weight.dtype))

    def is_frozen(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) falls in the frozen warm-up."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"Prototypes: step must be a non-negative integer, got {step!r}")
        return step < self.freeze_steps

    def zero_grad_if_frozen(self, step: int) -> bool:
        """Drop the prototype gradients (set to ``None``, so the optimizer skips them entirely, weight decay
        included) when ``step`` is frozen; call after backward, before the optimizer step. Returns whether it did."""
        frozen = self.is_frozen(step)
        if frozen:
            for parameter in self.parameters():
                parameter.grad = None
        return frozen

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_prototypes={self.num_prototypes}, freeze_steps={self.freeze_steps}"


class ProjectionHead(nn.Sequential):
    """MLP ``in_dim -> hidden_dim -> ... -> out_dim`` with ``num_layers`` linear layers, the hidden ones followed by
    BatchNorm (optional) and ReLU, as in SwAV and DeepCluster-V2.

    ``num_layers=0`` is the identity (``out_dim`` must equal ``in_dim``); ``hidden_dim=0`` or ``num_layers=1`` is a
    single linear layer.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = True
    ) -> None:
        for name, value, low in (
            ("in_dim", in_dim, 1),
            ("hidden_dim", hidden_dim, 0),
            ("out_dim", out_dim, 1),
        ):
            if not _is_int(value) or value < low:
                raise ValueError(f"ProjectionHead: {name} must be an integer >= {low}, got {value!r}")
        if not _is_int(num_layers) or num_layers < 0:
            raise ValueError(f"ProjectionHead: num_layers must be a non-negative integer, got {num_layers!r}")
        if num_layers == 0 and out_dim != in_dim:
            raise ValueError(
                f"ProjectionHead: num_layers=0 is the identity, so out_dim ({out_dim}) must equal in_dim ({in_dim})"
            )
        layers: list[nn.Module] = []
        if num_layers == 0:
            layers.append(nn.Identity())
        elif hidden_dim == 0 or num_layers == 1:
            layers.append(nn.Linear(in_dim, out_dim))
        else:
            width = in_dim
            for _ in range(num_layers - 1):
                # The bias is redundant in front of BatchNorm, which re-centres.
                layers.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.ReLU(inplace=True))
                width = hidden_dim
            layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
