"""Clustering agreement objectives as small modules: SwAV (online, Sinkhorn) and DeepCluster-V2 (offline k-means).

Both are :class:`ClusteringHead`s: one call shape, ``head(views, index) -> loss`` on the L2-normalised embeddings
of several views of the same samples, and the same hooks for the training loop; a method wires one of them onto
whatever embedding it wants to cluster (2D slices, volumes, faces) without knowing which it is.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

from agreement import dist
from agreement.kmeans import PRECISIONS, Precision, kmeans
from agreement.losses import deepcluster_loss, swav_loss
from agreement.memory import FeatureQueue, MemoryBank
from agreement.prototypes import Prototypes
from agreement.sinkhorn import sinkhorn


class ClusteringHead(nn.Module):
    """The contract of a clustering agreement head, and the training loop's hooks (no-ops unless a head needs them).

    - ``forward(views, index)``: ``views`` are ``num_views`` tensors (B, dim) of L2-normalised embeddings of the
      samples with global indices ``index`` (B,); returns the loss.
    - ``allocate(size)``: size per-sample state for a dataset of ``size`` samples, before training.
    - ``memory``: the head's memory bank, if it keeps one; the loop fills it before the first step.
    - ``on_epoch_start(epoch, seed)``, ``before_step()``, ``after_backward(step)``: called at those points.
    - ``cluster_assignments()``: current hard assignments per head (empty when the head keeps none).
    """

    def __init__(self) -> None:
        super().__init__()
        # An instance attribute, not a class one: nn.Module keeps a later MemoryBank in _modules, which a class
        # attribute would shadow.
        self.memory: MemoryBank | None = None

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def allocate(self, size: int) -> None:
        """Nothing to size unless the head keeps per-sample state."""

    def on_epoch_start(self, epoch: int, seed: int) -> None:
        """Nothing to do unless the head changes at epoch boundaries."""

    def before_step(self) -> None:
        """Nothing to do before the step unless the head constrains its parameters."""

    def after_backward(self, step: int) -> None:
        """Nothing to do after backward unless the head gates its gradients."""

    def cluster_assignments(self) -> list[torch.Tensor]:
        return []


def _check_assign_views(num_views: int, assign_views: int | None, owner: str) -> int:
    if num_views < 2:
        raise ValueError(f"{owner}: agreement needs at least 2 views, got num_views={num_views}")
    if assign_views is None:
        return num_views
    if not 1 <= assign_views <= num_views:
        raise ValueError(f"{owner}: assign_views must be in [1, {num_views}] (num_views), got {assign_views}")
    return assign_views


class SwAVClustering(ClusteringHead):
    """Swapped prediction of Sinkhorn codes between views, with optional per-process queue and frozen prototypes.

    Args:
        dim: embedding dimension.
        num_prototypes: prototypes per head (one int per head).
        temperature: softmax temperature of the predictions (0.1).
        epsilon, sinkhorn_iterations: Sinkhorn-Knopp settings (0.05, 3).
        queue_length: embeddings per view kept from past batches to enlarge the batch Sinkhorn sees (0 = none).
        queue_start_epoch: first epoch whose Sinkhorn uses the queue (once it is full).
        freeze_steps: optimizer steps during which the prototypes get no gradient.
        num_views: views per sample (multi-crop: the large crops first, then the small ones).
        assign_views: the first ``assign_views`` views get Sinkhorn codes, which every other view predicts
            (SwAV's ``crops_for_assign``: the two large crops); ``None``: every view. The queue keeps these only.
    """

    def __init__(
        self,
        dim: int,
        num_prototypes: list[int],
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue_length: int = 0,
        queue_start_epoch: int = 0,
        freeze_steps: int = 0,
        num_views: int = 2,
        assign_views: int | None = None,
    ) -> None:
        super().__init__()
        self.assign_views = _check_assign_views(num_views, assign_views, "SwAVClustering")
        self.prototypes = Prototypes(dim, list(num_prototypes), freeze_steps=freeze_steps)
        self.queue_start_epoch = queue_start_epoch
        self.epoch = 0
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.num_views = num_views
        self.queue = FeatureQueue(queue_length, dim, self.assign_views) if queue_length > 0 else None

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
        """``views``: ``num_views`` tensors (B, dim) of L2-normalised embeddings; returns the loss (``index`` is
        not needed: the codes come from the batch and the queue)."""
        if len(views) != self.num_views:
            raise ValueError(f"SwAVClustering: expected {self.num_views} views, got {len(views)}")
        batch = views[0].shape[0]
        scores = [self.prototypes(z) for z in views]  # [view][head] -> (B, K_h)
        queued = (
            [self.prototypes(self.queue.get(v).to(views[v].dtype)) for v in range(self.assign_views)]
            if self.queue is not None and self.epoch >= self.queue_start_epoch and self.queue.is_full
            else None
        )
        losses = []
        for head in range(self.prototypes.num_heads):
            codes = []
            for v in range(self.assign_views):
                head_scores = scores[v][head].detach()
                if queued is not None:
                    head_scores = torch.cat([queued[v][head].detach(), head_scores])
                codes.append(sinkhorn(head_scores, self.epsilon, self.sinkhorn_iterations)[-batch:])
            losses.append(swav_loss([s[head] for s in scores], codes, self.temperature))
        if self.queue is not None:
            self.queue.enqueue([z.detach() for z in views[: self.assign_views]])
        return torch.stack(losses).mean()

    def on_epoch_start(self, epoch: int, seed: int) -> None:
        self.epoch = epoch

    @torch.no_grad()
    def before_step(self) -> None:
        """Keep prototypes on the unit sphere (SwAV renormalises before every step)."""
        self.prototypes.normalize_()

    def after_backward(self, step: int) -> None:
        self.prototypes.zero_grad_if_frozen(step)


class DeepClusterV2Clustering(ClusteringHead):
    """Cross entropy to per-sample k-means assignments that are recomputed from a memory bank at each epoch start.

    The memory bank and the assignment table are indexed by global sample index and sized by :meth:`allocate`
    (once the dataset is known); both are buffers, so checkpoints carry them. The memory keeps the first
    ``assign_views`` views (DeepCluster-V2's ``crops_for_assign``, the large crops; ``None``: all) and head ``h``
    clusters the memory of view ``h % assign_views``; the loss covers every view, small crops included. The prototypes are the centroids and
    take no gradient (DeepCluster-V2 freezes them for its whole run): the loss trains the embedding only.
    """

    assignments: torch.Tensor
    clustered_epoch: torch.Tensor

    def __init__(
        self,
        dim: int,
        num_prototypes: list[int],
        temperature: float = 0.1,
        kmeans_iterations: int = 10,
        num_views: int = 2,
        backend: Literal["torch", "faiss"] = "torch",
        precision: Precision = "float32",
        assign_views: int | None = None,
    ) -> None:
        super().__init__()
        self.assign_views = _check_assign_views(num_views, assign_views, "DeepClusterV2Clustering")
        if precision not in PRECISIONS:
            raise ValueError(
                f"DeepCluster-V2: k-means precision must be one of {PRECISIONS}, got {precision!r}"
            )
        self.dim = dim
        self.prototypes = Prototypes(dim, list(num_prototypes)).requires_grad_(False)
        self.temperature = temperature
        self.kmeans_iterations = kmeans_iterations
        self.num_views = num_views
        self.backend = backend
        self.precision = precision
        self.register_buffer("assignments", torch.full((len(num_prototypes), 0), -1, dtype=torch.long))
        # The epoch whose k-means produced the current assignments: a run resumed within that epoch keeps them.
        self.register_buffer("clustered_epoch", torch.tensor(-1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.assignments.shape[1]

    def allocate(self, size: int) -> None:
        """Size the memory bank and the assignment table for ``size`` samples (keeps them if already so)."""
        if self.memory is not None and self.size == size:
            return
        max_k = max(self.prototypes.num_prototypes)
        if size < max_k:
            raise ValueError(
                f"DeepCluster-V2 needs at least as many samples as clusters: {size} samples, {max_k} clusters; "
                "lower num_prototypes or add data"
            )
        device = self.assignments.device
        self.memory = MemoryBank(size, self.dim, self.assign_views).to(device)
        self.assignments = torch.full((self.prototypes.num_heads, size), -1, dtype=torch.long, device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The bank is sized by the dataset: take its size from the state being loaded (checkpoints, DDP results).
        key = prefix + "assignments"
        if key in state_dict:
            self.allocate(state_dict[key].shape[1])
            # States saved before the epoch was recorded: k-means runs again at the next epoch start.
            state_dict.setdefault(prefix + "clustered_epoch", torch.tensor(-1, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
        """``views``: ``num_views`` tensors (B, dim) of L2-normalised embeddings of the samples ``index``."""
        if index is None:
            raise ValueError(
                "DeepClusterV2Clustering needs the samples' global indices (its memory is keyed by them)"
            )
        if self.memory is None:
            raise RuntimeError(
                "DeepClusterV2Clustering.allocate(dataset_size) must be called before training"
            )
        if len(views) != self.num_views:
            raise ValueError(f"DeepClusterV2Clustering: expected {self.num_views} views, got {len(views)}")
        scores = self.prototypes(torch.cat(views))
        targets = self.assignments[:, index.to(self.assignments.device)].repeat(1, self.num_views)
        loss = deepcluster_loss(scores, targets, self.temperature, ignore_index=-1)
        self.memory.update(index, [z.detach().float() for z in views[: self.assign_views]])
        return loss

    @torch.no_grad()
    def recluster(self, seed: int, epoch: int | None = None) -> None:
        """Spherical k-means on the memory bank; prototypes become the centroids, assignments are refreshed.

        Each rank holds the whole bank and clusters its own contiguous share of it, so the k-means is the
        distributed one and gives the same result on any number of processes. With ``epoch``, a second call for
        the same epoch (a run resumed within it) keeps the assignments that epoch started with.
        """
        if self.memory is None or self.memory.num_filled == 0:
            return
        if epoch is not None:
            if int(self.clustered_epoch) == epoch:
                return
            self.clustered_epoch.fill_(epoch)
        for head, k in enumerate(self.prototypes.num_prototypes):
            features, indices = self.memory.features_for_clustering(head % self.assign_views)
            if features.shape[0] < k:
                warnings.warn(
                    f"DeepCluster-V2: only {features.shape[0]} samples in memory for {k} clusters; skipping k-means",
                    stacklevel=2,
                )
                continue
            share = torch.tensor_split(torch.arange(features.shape[0]), dist.get_world_size())[
                dist.get_rank()
            ]
            centroids, local = kmeans(
                features[share.to(features.device)],
                k,
                iterations=self.kmeans_iterations,
                spherical=True,
                seed=seed + head,
                backend=self.backend,
                precision=self.precision,
            )
            self.prototypes.set_centroids(head, centroids.to(self.prototypes.weight(head).dtype))
            self.assignments[head].fill_(-1)
            self.assignments[head, indices] = dist.all_gather(local.to(self.assignments.device))

    def on_epoch_start(self, epoch: int, seed: int) -> None:
        self.recluster(seed, epoch=epoch)

    def cluster_assignments(self) -> list[torch.Tensor]:
        return [row[row >= 0] for row in self.assignments]
