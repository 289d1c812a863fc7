"""Feature stores for clustering-based self-supervision.

- :class:`MemoryBank` holds one embedding per view for every sample of the dataset, keyed by its global index, as
  DeepCluster-V2 uses it to run k-means at the start of each epoch. Updates are gathered from all processes, so
  every rank holds the whole bank and clusters the same points.
- :class:`FeatureQueue` is SwAV's queue of recent embeddings, kept per process (as SwAV does), that enlarges the
  batch Sinkhorn sees when the batch is small.

Both keep their contents in persistent buffers, so checkpoints carry them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from agreement import dist

Views = torch.Tensor | Sequence[torch.Tensor]


def _check_positive(name: str, value: int, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def _stack_views(features: Views, num_views: int, dim: int, owner: str) -> torch.Tensor | str:
    """Return the views stacked as (num_views, B, dim), or an error message."""
    if isinstance(features, torch.Tensor):
        if features.ndim == 2 and num_views == 1:
            features = features.unsqueeze(0)
        if features.ndim != 3 or features.shape[0] != num_views or features.shape[2] != dim:
            return (
                f"{owner}: features must be ({num_views}, B, {dim}) or a list of {num_views} tensors of shape "
                f"(B, {dim}), got a tensor of shape {tuple(features.shape)}"
            )
        stacked = features
    else:
        views = list(features)
        if len(views) != num_views:
            return f"{owner}: expected {num_views} views, got {len(views)}"
        for i, view in enumerate(views):
            if not isinstance(view, torch.Tensor) or view.ndim != 2 or view.shape[1] != dim:
                shape = tuple(view.shape) if isinstance(view, torch.Tensor) else type(view).__name__
                return f"{owner}: view {i} must have shape (B, {dim}), got {shape}"
        if len({view.shape[0] for view in views}) != 1:
            return f"{owner}: views have different batch sizes {[view.shape[0] for view in views]}"
        stacked = torch.stack(views)
    if not stacked.is_floating_point():
        return f"{owner}: features must be floating point, got {stacked.dtype}"
    if not torch.isfinite(stacked).all():
        return f"{owner}: features contain NaN or inf"
    return stacked


class MemoryBank(nn.Module):
    """One embedding per view for each of ``size`` samples, stored at the sample's global dataset index.

    Buffers (persistent, so ``state_dict()`` carries them): ``features`` (num_views, size, dim) float32 and
    ``filled`` (size,) bool, which marks the rows written at least once.
    """

    features: torch.Tensor
    filled: torch.Tensor

    def __init__(self, size: int, dim: int, num_views: int = 2) -> None:
        super().__init__()
        for name, value in (("size", size), ("dim", dim), ("num_views", num_views)):
            _check_positive(name, value, "MemoryBank")
        self.size, self.dim, self.num_views = size, dim, num_views
        self.register_buffer("features", torch.zeros(num_views, size, dim, dtype=torch.float32))
        self.register_buffer("filled", torch.zeros(size, dtype=torch.bool))

    def _validate(self, index: torch.Tensor, features: Views) -> tuple[torch.Tensor, torch.Tensor] | str:
        if not isinstance(index, torch.Tensor) or index.ndim != 1:
            return "MemoryBank.update: index must be a 1-D tensor of global sample indices"
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            return f"MemoryBank.update: index must be an integer tensor, got {index.dtype}"
        stacked = _stack_views(features, self.num_views, self.dim, "MemoryBank.update")
        if isinstance(stacked, str):
            return stacked
        if stacked.shape[1] != index.shape[0]:
            return (
                f"MemoryBank.update: {index.shape[0]} indices but {stacked.shape[1]} feature rows per view; "
                "they must match"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            return (
                f"MemoryBank.update: index out of range [0, {self.size}): "
                f"min {int(index.min())}, max {int(index.max())}"
            )
        return index, stacked

    @torch.no_grad()
    def update(self, index: torch.Tensor, features: Views) -> None:
        """Write this step's embeddings from every process at their global indices.

        ``index`` is (B,) global sample indices of the local batch; ``features`` is a list of ``num_views`` tensors
        of shape (B, dim) (or one (num_views, B, dim) tensor). Every process must call this, as it gathers. When an
        index occurs more than once in the gathered batch (e.g. the samples a distributed sampler repeats to even
        out the shards) the last occurrence in rank order wins, so the result equals one process seeing the whole
        batch. Invalid input on any process raises ``ValueError`` on all of them instead of leaving the others
        waiting in the gather.
        """
        checked = self._validate(index, features)
        failed = torch.tensor([int(isinstance(checked, str))], device=self.features.device)
        dist.all_reduce(failed, op="max")
        if isinstance(checked, str):
            raise ValueError(checked)
        if int(failed.item()):
            raise ValueError("MemoryBank.update: another process passed invalid input")
        local_index, stacked = checked
        device = self.features.device
        local_index = local_index.to(device=device, dtype=torch.long)
        # (B, V, dim) so that the batch is dim 0, which all_gather concatenates.
        local_rows = (
            stacked.detach().to(device=device, dtype=self.features.dtype).transpose(0, 1).contiguous()
        )
        all_index = dist.all_gather(local_index)
        all_rows = dist.all_gather(local_rows)
        if all_index.numel() == 0:
            return
        # Keep only the last occurrence of each index: scatter order for duplicates is unspecified.
        position = torch.arange(all_index.numel(), device=device)
        last = torch.full((self.size,), -1, dtype=torch.long, device=device)
        last.scatter_reduce_(0, all_index, position, reduce="amax")
        keep = last[all_index] == position
        all_index, all_rows = all_index[keep], all_rows[keep]
        self.features[:, all_index] = all_rows.transpose(0, 1)
        self.filled[all_index] = True

    @property
    def num_filled(self) -> int:
        return int(self.filled.sum())

    @property
    def fill_fraction(self) -> float:
        """Fraction of samples written at least once (k-means on a partly filled bank would miss samples)."""
        return self.num_filled / self.size

    @property
    def filled_indices(self) -> torch.Tensor:
        """Global indices of the filled rows, ascending."""
        return self.filled.nonzero(as_tuple=True)[0]

    def features_for_clustering(self, view: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(features, indices)``: the filled rows of ``view`` (a copy) and their global indices."""
        if isinstance(view, bool) or not isinstance(view, int) or not 0 <= view < self.num_views:
            raise ValueError(f"MemoryBank: view must be an integer in [0, {self.num_views}), got {view!r}")
        indices = self.filled_indices
        return self.features[view, indices].clone(), indices

    @torch.no_grad()
    def reset(self) -> None:
        self.features.zero_()
        self.filled.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, num_views={self.num_views}"


class FeatureQueue(nn.Module):
    """SwAV's FIFO queue of this process's past embeddings, one queue per view.

    The newest batch sits at the front (rows ``0..B-1`` in batch order), older rows move back, and rows pushed past
    ``length`` are dropped. Embeddings are stored (not scores) so that scores can be recomputed with the current
    prototypes. Buffers ``queue`` (num_views, length, dim) and ``count`` (number of valid rows) are persistent.
    """

    queue: torch.Tensor
    count: torch.Tensor

    def __init__(self, length: int, dim: int, num_views: int = 2) -> None:
        super().__init__()
        for name, value in (("length", length), ("dim", dim), ("num_views", num_views)):
            _check_positive(name, value, "FeatureQueue")
        self.length, self.dim, self.num_views = length, dim, num_views
        self.register_buffer("queue", torch.zeros(num_views, length, dim, dtype=torch.float32))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, features: Views) -> None:
        """Push a local batch: ``num_views`` tensors of shape (B, dim), or one (num_views, B, dim) tensor."""
        stacked = _stack_views(features, self.num_views, self.dim, "FeatureQueue.enqueue")
        if isinstance(stacked, str):
            raise ValueError(stacked)
        batch = stacked.shape[1]
        if batch > self.length:
            raise ValueError(
                f"FeatureQueue.enqueue: batch of {batch} rows does not fit a queue of length {self.length}"
            )
        if batch == 0:
            return
        rows = stacked.detach().to(device=self.queue.device, dtype=self.queue.dtype)
        self.queue[:, batch:] = self.queue[:, : self.length - batch].clone()
        self.queue[:, :batch] = rows
        self.count.fill_(min(int(self.count) + batch, self.length))

    @property
    def is_full(self) -> bool:
        """True once every row holds an embedding; SwAV only uses the queue from then on."""
        return int(self.count) >= self.length

    def __len__(self) -> int:
        return int(self.count)

    def get(self, view: int = 0) -> torch.Tensor:
        """A copy of the valid rows of ``view``, newest first, shape (len(self), dim).

        A copy, so that a later ``enqueue`` cannot change a tensor autograd saved for backward.
        """
        if isinstance(view, bool) or not isinstance(view, int) or not 0 <= view < self.num_views:
            raise ValueError(f"FeatureQueue: view must be an integer in [0, {self.num_views}), got {view!r}")
        return self.queue[view, : int(self.count)].clone()

    @torch.no_grad()
    def reset(self) -> None:
        self.queue.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"length={self.length}, dim={self.dim}, num_views={self.num_views}"
