"""Lightning callbacks that monitor representation quality during training.

``KNNProbeCallback`` logs weighted-kNN top-1 accuracy on frozen features; ``ClusterUsageCallback`` logs how
evenly the clustering heads use their clusters, the first sign of collapse. Both work unchanged under DDP:
features and assignments are gathered from all ranks, so every rank logs the same value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import move_data_to_device

from agreement import dist
from agreement.knn import gather_features, knn_accuracy
from agreement.metrics import cluster_usage

LoaderLike = Iterable[Any] | Callable[[], Iterable[Any]]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class KNNProbeCallback(pl.Callback):
    """Weighted-kNN accuracy of the module's features, logged as ``log_name`` (default ``knn/top1``).

    The LightningModule must define ``extract_features(batch) -> (features, labels)``. After every
    ``every_n_epochs``-th validation epoch (sanity check excluded), or training epoch with ``on="train"`` (for
    pretraining runs without a validation loop), the callback runs it over
    ``feature_loader_train`` (the kNN memory) and ``feature_loader_val`` (the queries) in eval mode without
    gradients. Each loader may be an iterable or a zero-argument callable returning one, built lazily.

    With ``shard=True`` (default) rank ``r`` of ``W`` handles batches ``r, r + W, ...`` of a plain loader and
    the results are all-gathered; pass ``shard=False`` for loaders that already split data across ranks
    (a ``DistributedSampler``). ``num_classes`` defaults to the largest gathered label + 1.
    """

    def __init__(
        self,
        feature_loader_train: LoaderLike,
        feature_loader_val: LoaderLike,
        num_classes: int | None = None,
        k: int = 20,
        temperature: float = 0.07,
        every_n_epochs: int = 1,
        chunk_size: int = 4096,
        backend: str = "torch",
        shard: bool = True,
        log_name: str = "knn/top1",
        on: str = "validation",
    ) -> None:
        super().__init__()
        if on not in ("validation", "train"):
            raise ValueError(f"on must be 'validation' or 'train', got {on!r}")
        self.on = on
        self.feature_loader_train = feature_loader_train
        self.feature_loader_val = feature_loader_val
        self.num_classes = None if num_classes is None else _positive_int(num_classes, "num_classes")
        self.k = _positive_int(k, "k")
        # Checked here so a bad setting fails before training rather than after the first epoch.
        if not temperature > 0:
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if backend not in ("torch", "faiss"):
            raise ValueError(f"backend must be one of ('torch', 'faiss'), got {backend!r}")
        self.temperature = temperature
        self.every_n_epochs = _positive_int(every_n_epochs, "every_n_epochs")
        self.chunk_size = _positive_int(chunk_size, "chunk_size")
        self.backend = backend
        self.shard = shard
        self.log_name = log_name
        self.last_accuracy: float | None = None
        self.history: list[tuple[int, float]] = []  # (epoch, accuracy) of every evaluation

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "extract_features", None)):
            raise ValueError(
                f"KNNProbeCallback needs {type(pl_module).__name__}.extract_features(batch) -> (features, labels)"
            )

    def _extract(
        self, pl_module: pl.LightningModule, loader: LoaderLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if callable(loader) and not hasattr(loader, "__iter__"):
            loader = loader()
        device = pl_module.device

        def extract(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return pl_module.extract_features(move_data_to_device(batch, device))

        return gather_features(extract, loader, device=device, shard=self.shard)

    @torch.no_grad()
    def evaluate(self, pl_module: pl.LightningModule) -> float:
        """Extract, gather and classify; returns the top-1 accuracy. Every rank must call it together."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            train_feats, train_labels = self._extract(pl_module, self.feature_loader_train)
            val_feats, val_labels = self._extract(pl_module, self.feature_loader_val)
        finally:
            pl_module.train(was_training)
        if val_labels.numel() == 0:
            raise ValueError("KNNProbeCallback: feature_loader_val produced no samples")
        num_classes = self.num_classes
        if num_classes is None:
            num_classes = int(torch.cat([train_labels, val_labels]).max()) + 1
        return knn_accuracy(
            train_feats,
            train_labels,
            val_feats,
            val_labels,
            num_classes,
            k=self.k,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        # Iterating loaders draws from the global generator: fork it so that monitoring leaves the run unchanged.
        with torch.random.fork_rng(devices=[]):
            self.last_accuracy = self.evaluate(pl_module)
        self.history.append((trainer.current_epoch, self.last_accuracy))
        # Identical on every rank after the gather, so no further sync is needed.
        pl_module.log(self.log_name, self.last_accuracy, sync_dist=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "validation":
            self._epoch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "train":
            self._epoch_end(trainer, pl_module)


class ClusterUsageCallback(pl.Callback):
    """Logs ``{prefix}/head{i}/entropy``, ``.../empty`` and ``.../largest_fraction`` after each train epoch.

    The module must define ``cluster_assignments()`` returning one LongTensor of cluster ids per clustering
    head (an empty list logs nothing, an empty tensor skips its head). ``num_clusters`` is one ``K`` for all
    heads or one per head. With ``gather=True`` the assignments of all ranks are pooled first; ranks that hold
    identical copies give the same statistics as one copy, since only proportions enter.
    """

    def __init__(
        self, num_clusters: int | Sequence[int], prefix: str = "clusters", gather: bool = True
    ) -> None:
        super().__init__()
        if isinstance(num_clusters, int) and not isinstance(num_clusters, bool):
            self.num_clusters: int | tuple[int, ...] = _positive_int(num_clusters, "num_clusters")
        else:
            self.num_clusters = tuple(_positive_int(n, "num_clusters entries") for n in num_clusters)
        self.prefix = prefix
        self.gather = gather
        self.last_usage: list[dict[str, float] | None] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "cluster_assignments", None)):
            raise ValueError(
                f"ClusterUsageCallback needs {type(pl_module).__name__}.cluster_assignments() -> list of LongTensors"
            )

    def _clusters_for(self, head: int, num_heads: int) -> int:
        if isinstance(self.num_clusters, int):
            return self.num_clusters
        if len(self.num_clusters) != num_heads:
            raise ValueError(
                f"ClusterUsageCallback got {len(self.num_clusters)} num_clusters entries for {num_heads} heads"
            )
        return self.num_clusters[head]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assignments = list(pl_module.cluster_assignments())
        self.last_usage = []
        for head, labels in enumerate(assignments):
            labels = labels.detach().flatten()
            if self.gather:
                # Every rank must take part in the gather even if its own share is empty.
                labels = dist.all_gather(labels.to(pl_module.device))
            if labels.numel() == 0:
                self.last_usage.append(None)
                continue
            usage = cluster_usage(labels.cpu(), self._clusters_for(head, len(assignments)))
            self.last_usage.append(usage)
            for name, value in usage.items():
                pl_module.log(f"{self.prefix}/head{head}/{name}", float(value), sync_dist=False)
