"""Sinkhorn-Knopp equipartition of soft cluster assignments, as SwAV uses it.

Written by hand because no library offers the distributed variant: the batch is split over processes, so the
normalisation over samples needs the K-length sums (and maxima) of all ranks, and nothing else crosses processes.
The iteration runs in the log domain, which is the same fixed point as SwAV's ``exp(scores / epsilon)`` form but
cannot overflow for large scores.
"""

from __future__ import annotations

import math

import torch

from agreement import dist


def _distributed_logsumexp_over_batch(log_q: torch.Tensor) -> torch.Tensor:
    """log sum_b exp(log_q[b, k]) over the samples of every rank, for each k (shape (K,))."""
    row_max = log_q.max(dim=0).values
    dist.all_reduce(row_max, op="max")
    sums = torch.exp(log_q - row_max).sum(dim=0)
    dist.all_reduce(sums)
    return row_max + torch.log(sums)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Equipartitioned soft assignments of a batch of samples to K prototypes.

    Args:
        scores: (B, K) similarities between samples and prototypes (local part of the batch under DDP).
        epsilon: entropy regularisation; smaller means harder assignments.
        iterations: Sinkhorn-Knopp iterations (SwAV uses 3).

    Returns:
        (B, K) float32 assignments; each row sums to 1 and, over the global batch, each prototype receives
        B_total / K samples' worth of mass at convergence.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn: scores must be 2-D (batch, prototypes), got shape {tuple(scores.shape)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"sinkhorn: scores are empty, shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn: epsilon must be positive, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn: iterations must be at least 1, got {iterations}")
    if not torch.isfinite(scores).all():
        raise ValueError("sinkhorn: scores contain NaN or inf")

    log_q = scores.float() / epsilon
    num_prototypes = scores.shape[1]
    batch_total = torch.tensor(float(scores.shape[0]), device=scores.device)
    dist.all_reduce(batch_total)
    log_batch_total = torch.log(batch_total)
    for _ in range(iterations):
        # Each prototype gets total mass 1/K over the global batch ...
        log_q = log_q - _distributed_logsumexp_over_batch(log_q) - math.log(num_prototypes)
        # ... then each sample gets mass 1/B_total; the rows are local, so no communication.
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_batch_total
    return torch.exp(log_q + log_batch_total)
