"""Frozen-feature evaluation: weighted kNN (as in DINO), a logistic-regression linear probe and a k-means probe.

All take already-extracted features. In distributed runs gather them first (``gather_features`` does the
extraction and the all-gather) so that every rank evaluates against the full training set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agreement import dist
from agreement.kmeans import kmeans
from agreement.metrics import ari, cluster_accuracy, contingency_matrix, nmi
from agreement.optional import optional_import

_BACKENDS = ("torch", "faiss")


def _features(values: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} is empty, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor.float()


def _labels(values: Any, name: str, length: int, num_classes: int) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype in (torch.bool,) or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{name} must hold integer labels, got dtype {tensor.dtype}")
    if tensor.shape[0] != length:
        raise ValueError(f"{name} has {tensor.shape[0]} entries but the features have {length} rows")
    if tensor.min() < 0 or tensor.max() >= num_classes:
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got range [{int(tensor.min())}, {int(tensor.max())}]"
        )
    return tensor.long()


def gather_features(
    extract_fn: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
    batches: Iterable[Any],
    device: torch.device | str | None = None,
    shard: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``extract_fn(batch) -> (features, labels)`` to batches and concatenate the results of all ranks.

    With ``shard=True`` rank ``r`` of ``W`` handles only batches ``r, r + W, ...``, so a plain loader needs
    no ``DistributedSampler``; use ``shard=False`` for loaders that already split the data across ranks.
    Features are flattened to ``(N, D)`` float and labels to ``(N,)`` long, gathered in rank order on
    ``device`` (default: where the features are, else the CPU). Every rank must call this together.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    features, labels = [], []
    for i, batch in enumerate(batches):
        if shard and i % world != rank:
            continue
        feats, labs = extract_fn(batch)
        features.append(feats.detach().float().flatten(1))
        labels.append(labs.detach().long().flatten())
    if device is None:
        device = features[0].device if features else torch.device("cpu")
    # A rank without batches still joins both collectives; it borrows the feature width of the others.
    local_width = torch.tensor([features[0].shape[1] if features else 0], device=device)
    width = int(dist.all_reduce(local_width, op="max").item())
    if features:
        local_feats = torch.cat(features).to(device)
        local_labels = torch.cat(labels).to(device)
    else:
        local_feats = torch.zeros(0, width, device=device)
        local_labels = torch.zeros(0, dtype=torch.long, device=device)
    return dist.all_gather(local_feats), dist.all_gather(local_labels)


def _check_num_classes(num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def _search_torch(train: torch.Tensor, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(query @ train.T, k, dim=1)


def check_knn_settings(k: Any, temperature: Any) -> None:
    """Raise a ``ValueError`` unless ``k`` is a positive integer and ``temperature`` a positive finite number
    (for callers that check before the features are extracted)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not temperature > 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def weighted_knn_predict(
    train_features: Any,
    train_labels: Any,
    query_features: Any,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 4096,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify queries by a similarity-weighted vote of their ``k`` nearest training points.

    Features are L2-normalised and compared by cosine similarity; neighbour ``i`` votes for its class with
    weight ``exp(sim_i / temperature)`` (DINO's kNN protocol). Queries are processed ``chunk_size`` at a time,
    so the similarity block never exceeds ``chunk_size x N``. ``k`` above the training-set size is clamped.
    ``backend="faiss"`` runs the search with an exact ``faiss.IndexFlatIP`` on the CPU instead of a matmul.

    Returns ``(pred, scores)``: ``pred`` a ``(Q,)`` LongTensor and ``scores`` a ``(Q, C)`` float tensor of vote
    shares (each row sums to 1, proportional to DINO's summed weights), on the device of ``train_features``.
    """
    _check_num_classes(num_classes)
    check_knn_settings(k, temperature)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    train = _features(train_features, "train_features")
    query = _features(query_features, "query_features")
    if train.shape[1] != query.shape[1]:
        raise ValueError(
            f"train_features and query_features differ in dimension: {train.shape[1]} vs {query.shape[1]}"
        )
    labels = _labels(train_labels, "train_labels", train.shape[0], num_classes)
    device = train.device
    train = F.normalize(train, dim=1)
    query = F.normalize(query.to(device), dim=1)
    labels = labels.to(device)
    k = min(k, train.shape[0])

    index = None
    if backend == "faiss":
        faiss = optional_import("faiss", purpose="kNN search with backend='faiss'")
        index = faiss.IndexFlatIP(train.shape[1])
        index.add(np.ascontiguousarray(train.detach().cpu().numpy()))

    preds, scores = [], []
    for start in range(0, query.shape[0], chunk_size):
        block = query[start : start + chunk_size]
        if index is None:
            sims, idx = _search_torch(train, block, k)
        else:
            dist, found = index.search(np.ascontiguousarray(block.detach().cpu().numpy()), k)
            sims = torch.from_numpy(dist).to(device)
            idx = torch.from_numpy(found).long().to(device)
        # Shifting by the best similarity keeps exp() finite for tiny temperatures; shares are unchanged.
        weights = torch.exp((sims - sims[:, :1]) / temperature)
        votes = torch.zeros(block.shape[0], num_classes, device=device, dtype=weights.dtype)
        votes.scatter_add_(1, labels[idx], weights)
        votes = votes / votes.sum(dim=1, keepdim=True)
        preds.append(votes.argmax(dim=1))
        scores.append(votes)
    return torch.cat(preds), torch.cat(scores)


def knn_accuracy(
    train_features: Any,
    train_labels: Any,
    query_features: Any,
    query_labels: Any,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 4096,
    backend: str = "torch",
) -> float:
    """Top-1 accuracy of ``weighted_knn_predict`` on labelled queries, as a fraction in [0, 1]."""
    pred, _ = weighted_knn_predict(
        train_features, train_labels, query_features, num_classes, k, temperature, chunk_size, backend
    )
    target = _labels(query_labels, "query_labels", pred.shape[0], num_classes).to(pred.device)
    return float((pred == target).float().mean())


def linear_probe(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    num_classes: int,
    epochs: int = 100,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    optimizer: str = "lbfgs",
) -> float:
    """Test accuracy of a multinomial logistic regression fitted on frozen, standardised features.

    Features are standardised with the training mean and standard deviation. The weights start at zero and the
    whole training set is one batch, so the result is deterministic. ``epochs`` is the number of full-batch
    iterations; ``optimizer`` is ``"lbfgs"`` (default ``lr`` 1.0, strong-Wolfe line search) or ``"adam"``
    (default ``lr`` 0.01). ``weight_decay`` is an L2 penalty ``wd/2 * ||W||^2`` on the weights (not the
    bias) added to the mean cross-entropy, so both optimizers minimise the same objective.
    """
    _check_num_classes(num_classes)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    if lr is None:
        lr = 1.0 if optimizer == "lbfgs" else 0.01
    if not lr > 0 or not np.isfinite(lr):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not weight_decay >= 0 or not np.isfinite(weight_decay):
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
    train = _features(train_features, "train_features").detach()
    test = _features(test_features, "test_features").detach()
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train_features and test_features differ in dimension: {train.shape[1]} vs {test.shape[1]}"
        )
    device = train.device
    test = test.to(device)
    y_train = _labels(train_labels, "train_labels", train.shape[0], num_classes).to(device)
    y_test = _labels(test_labels, "test_labels", test.shape[0], num_classes).to(device)

    # The caller may be inside no_grad / inference mode (e.g. a validation hook); clones of inference
    # tensors made outside inference mode may be saved for backward.
    with torch.inference_mode(False), torch.enable_grad():
        train, test, y_train = train.clone(), test.clone(), y_train.clone()
        mean = train.mean(dim=0)
        std = train.std(dim=0, unbiased=False).clamp_min(1e-6)
        train = (train - mean) / std
        test = (test - mean) / std

        weight = torch.zeros(num_classes, train.shape[1], device=device, requires_grad=True)
        bias = torch.zeros(num_classes, device=device, requires_grad=True)

        def objective() -> torch.Tensor:
            loss = F.cross_entropy(train @ weight.T + bias, y_train)
            return loss + 0.5 * weight_decay * weight.pow(2).sum()

        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS([weight, bias], lr=lr, max_iter=epochs, line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = objective()
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt = torch.optim.Adam([weight, bias], lr=lr)
            for _ in range(epochs):
                opt.zero_grad()
                objective().backward()
                opt.step()
    with torch.no_grad():
        pred = (test @ weight.T + bias).argmax(dim=1)
    return float((pred == y_test).float().mean())


def kmeans_probe(
    features: Any,
    labels: Any,
    num_classes: int,
    n_init: int = 10,
    iterations: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """How well frozen features cluster into the classes without labels: spherical k-means with ``num_classes``
    clusters, scored against ``labels``.

    The usual clustering readout of a representation: Hungarian accuracy (best one-to-one map of clusters to
    classes), NMI and ARI. Cosine k-means (scikit-learn's greedy k-means++ seeding, the best of ``n_init``
    starts, Lloyd to convergence within ``iterations``) matches the cosine similarity of the kNN vote. Also
    returns ``contingency``: the classes x clusters counts, clusters ordered by their majority class, as lists.
    ``features`` are the whole set (gathered first in distributed runs).
    """
    _check_num_classes(num_classes)
    points = _features(features, "features").detach()
    targets = _labels(labels, "labels", points.shape[0], num_classes).cpu()
    if points.shape[0] < num_classes:
        raise ValueError(
            f"kmeans_probe needs at least num_classes={num_classes} points, got {points.shape[0]}"
        )
    _, clusters = kmeans(
        points,
        num_classes,
        iterations=iterations,
        init="greedy-k-means++",
        n_init=n_init,
        seed=seed,
        tol=1e-4,
    )
    clusters = clusters.cpu()
    table = contingency_matrix(targets, clusters)
    order = np.argsort(table.argmax(axis=0), kind="stable")
    return {
        "accuracy": cluster_accuracy(targets, clusters),
        "nmi": nmi(targets, clusters),
        "ari": ari(targets, clusters),
        "contingency": table[:, order].tolist(),
    }
