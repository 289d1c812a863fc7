"""The three stages of self-contained entity discovery (Ayoughi, Mettes, Groth), as pure seedable functions.

1. ``weak_label_graph``: per frame (or caption window), a bipartite graph between its faces and the names of
   its caption; the face-by-name edge weights are co-occurrence counts (duplicates count, as in the paper).
2. ``cluster_faces`` + ``agree_on_names``: k-means over face embeddings, then one name per cluster voted from
   the weak labels of its members (cluster-by-name co-occurrence graph), optionally with one cast name per face
   per frame by Hungarian matching (``one_name_per_frame``).
3. ``refine_with_prototypes``: one prototype per agreed entity; faces of the target entities move to the
   nearest prototype, and prototypes are recomputed until no label changes, or (``weak_agreement``) for as
   long as each pass raises the agreement between the labels and the weak names.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from agreement.kmeans import kmeans
from agreement.matching import BipartiteGraph, cooccurrence_graph, hungarian_match
from agreement.metrics import mutual_information

Vote = Literal["majority", "frequency"]


def weak_label_graph(weak_ids: Sequence[Sequence[int]], num_classes: int) -> BipartiteGraph:
    """Faces x classes graph whose weight ``W[i, c]`` counts how often class ``c`` is among face i's weak names.

    Every face of a frame is linked to every name of the frame's caption (the complete bipartite graph of the
    frame), so a face's row is the multiset of its caption's names; faces without names have an empty row.
    """
    faces = [range(face, face + 1) for face in range(len(weak_ids))]  # one group per face
    names = list(weak_ids)
    flat = np.fromiter(itertools.chain.from_iterable(names), dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_classes):
        raise ValueError(f"weak label ids must lie in [0, {num_classes})")
    return cooccurrence_graph(
        faces, names, num_left=len(faces), num_right=num_classes, sparse=True, count_repeats=True
    )


def weak_label_distribution(graph: BipartiteGraph, unknown_id: int) -> np.ndarray:
    """``P(name | face)`` of the random-weak-label baseline: uniform over the weak list, "Unknown" if empty."""
    probs = graph.normalize_rows().to_dense()
    probs[graph.row_sums() == 0, unknown_id] = 1.0
    return probs


def random_weak_labels(weak_ids: Sequence[Sequence[int]], unknown_id: int, seed: int = 0) -> np.ndarray:
    """Stage-1 baseline: one entry drawn uniformly from each face's weak list (duplicates kept), else Unknown."""
    rng = np.random.default_rng(seed)
    return np.asarray(
        [ids[rng.integers(len(ids))] if len(ids) else unknown_id for ids in weak_ids], dtype=np.int64
    )


def cluster_faces(
    embeddings: np.ndarray,
    k: int,
    *,
    iterations: int = 50,
    restarts: int = 1,
    seed: int = 0,
    backend: Literal["torch", "faiss"] = "torch",
    tol: float = 1e-4,
    sample_size: int | None = 65_536,
    full_iterations: int = 5,
    precision: Literal["float32", "bfloat16"] = "float32",
) -> np.ndarray:
    """k-means cluster id per face (``agreement.kmeans`` with scikit-learn's greedy k-means++ seeding); the best
    of ``restarts`` starts by inertia. Euclidean k-means on L2-normalised embeddings, as the paper: spherical
    k-means (unit centroids) lets the many small minor-character groups leak into the big cast clusters.

    ``tol`` is scikit-learn's convergence rule. Above ``sample_size`` faces the centroids are fitted (up to
    ``iterations``, to ``tol``) on a random subsample of that size, then polished by at most
    ``full_iterations`` passes over all faces: on SC-BBT-scale episodes the full-data Lloyd iterations creep
    on for hundreds of passes (a few hundred faces of look-alike minor people moving per pass) with no effect
    on the stage labels."""
    points = torch.nn.functional.normalize(
        torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)), dim=1
    )
    sampled = sample_size is not None and sample_size < len(points)
    _, assignments = kmeans(
        points,
        k,
        iterations=full_iterations if sampled else iterations,
        spherical=False,
        init="greedy-k-means++",
        seed=seed,
        backend=backend,
        tol=tol,
        sample_size=sample_size if sampled else None,
        sample_iterations=iterations,
        n_init=max(1, restarts),
        precision=precision,
    )
    return assignments.numpy().astype(np.int64)


def cluster_name_graph(clusters: np.ndarray, weak: BipartiteGraph, num_clusters: int) -> BipartiteGraph:
    """Clusters x classes graph: summed weak-label counts of each cluster's faces."""
    return weak.merge_left(clusters, num_clusters)


def vote_scores(graph: BipartiteGraph, vote: Vote = "majority", frequency_power: float = 1.0) -> np.ndarray:
    """Cluster-by-class vote scores.

    ``majority`` is the official rule: the raw co-occurrence counts. ``frequency`` divides the votes for each
    name by (its total number of mentions) ** ``frequency_power``: a name that is said everywhere (the lead
    character, or "Unknown" for the many minor people) no longer wins every cluster by volume, and a cluster
    goes to the name that is over-represented in it.
    """
    counts = graph.to_dense()
    if vote == "majority":
        return counts
    if vote == "frequency":
        totals = counts.sum(axis=0)
        scale = np.divide(1.0, totals**frequency_power, out=np.zeros_like(totals), where=totals > 0)
        return counts * scale[None, :]
    raise ValueError(f"vote must be 'majority' or 'frequency', got {vote!r}")


def agree_on_names(scores: np.ndarray, unknown_id: int) -> np.ndarray:
    """Winning class per cluster (lowest class id on ties); clusters without any weak name get Unknown."""
    labels = BipartiteGraph(scores).best_right_for_left()
    labels[labels < 0] = unknown_id
    return labels


def one_name_per_frame(
    frame_ids: np.ndarray, face_scores: np.ndarray, labels: np.ndarray, unknown_id: int
) -> tuple[np.ndarray, int]:
    """Within each frame, give every cast name to at most one face by Hungarian matching on ``face_scores``.

    ``face_scores`` (faces x classes) are the row-normalised vote scores of each face's cluster; "Unknown" may be
    given to any number of faces. Returns the new labels and how many faces changed.
    """
    labels = labels.copy()
    num_classes = face_scores.shape[1]
    cast_ids = np.asarray([c for c in range(num_classes) if c != unknown_id])
    order = np.argsort(frame_ids, kind="stable")
    bounds = np.flatnonzero(np.diff(frame_ids[order])) + 1
    changed = 0
    for faces in np.split(order, bounds):
        if len(faces) < 2:
            continue
        current = labels[faces]
        named = current[current != unknown_id]
        if len(named) == len(np.unique(named)):
            continue
        scores = face_scores[faces]
        # Columns: each cast name once, then one "Unknown" slot per face. A tiny bonus for the current label
        # keeps it whenever it is not in conflict; a tiny Unknown prior sends faces with no evidence there.
        bonus = np.zeros_like(scores)
        bonus[np.arange(len(faces)), current] = 1e-9
        matrix = np.concatenate(
            [
                (scores + bonus)[:, cast_ids],
                np.repeat((scores + bonus)[:, [unknown_id]] + 1e-12, len(faces), 1),
            ],
            axis=1,
        )
        rows, cols = hungarian_match(matrix, maximize=True)
        new = np.where(cols < len(cast_ids), cast_ids[np.minimum(cols, len(cast_ids) - 1)], unknown_id)
        changed += int((labels[faces[rows]] != new).sum())
        labels[faces[rows]] = new
    return labels, changed


def _prototypes(
    embeddings: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    points = torch.from_numpy(np.ascontiguousarray(embeddings))
    sums = points.new_zeros(num_classes, points.shape[1]).index_add_(0, torch.from_numpy(labels), points)
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    prototypes = sums.numpy()
    prototypes[present] /= counts[present, None]
    return prototypes, present


def weak_name_agreement(labels: np.ndarray, weak: BipartiteGraph, num_classes: int) -> float:
    """Mutual information (nats) between the faces' labels and their weak names.

    Each face contributes its weak-name counts to the row of its label; the result is the mutual information of
    that label-by-name table, normalised to a joint distribution. It grows when labels separate the names that
    are said around them, and falls when faces of different people are pooled under one label (a raw count of
    matching names would instead reward moving every face to the most talked-about name).
    """
    return mutual_information(weak.merge_left(labels, num_classes).to_dense())


RefineRule = Literal["until_stable", "weak_agreement"]


def refine_with_prototypes(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    target: Literal["most_frequent", "all"] | Sequence[int] = "most_frequent",
    max_iterations: int = 10,
    distance: Literal["euclidean", "cosine"] = "euclidean",
    rule: RefineRule = "until_stable",
    weak: BipartiteGraph | None = None,
) -> tuple[np.ndarray, int]:
    """Stage 3: move faces to the nearest entity prototype, recomputing prototypes between passes.

    Prototypes are the mean embeddings of the faces of each agreed entity (entities without faces have none).
    ``target`` picks the faces that may move: those whose agreed entity is the most frequent one (the general
    form of the official rule, which hard-codes one entity and makes a single pass, i.e. ``max_iterations=1``),
    all faces, or the faces of the given class ids.

    ``rule`` decides when to stop: ``"until_stable"`` makes passes until no label changes (at most
    ``max_iterations``); ``"weak_agreement"`` keeps a pass only if it raises ``weak_name_agreement`` with the
    ``weak`` graph and stops at the first pass that does not, so refinement never lowers it below stage 2's.
    Returns the labels and the number of passes kept.
    """
    if max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")
    if rule not in ("until_stable", "weak_agreement"):
        raise ValueError(f"rule must be 'until_stable' or 'weak_agreement', got {rule!r}")
    if rule == "weak_agreement" and weak is None:
        raise ValueError("the 'weak_agreement' rule needs the weak-name graph")
    labels = np.asarray(labels, dtype=np.int64).copy()
    x = np.asarray(embeddings)
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    if distance == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    elif distance != "euclidean":
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
    if isinstance(target, str):
        if target == "most_frequent":
            movable = labels == np.bincount(labels, minlength=num_classes).argmax()
        elif target == "all":
            movable = np.ones(len(labels), dtype=bool)
        else:
            raise ValueError(f"target must be 'most_frequent', 'all' or a list of class ids, got {target!r}")
    else:
        movable = np.isin(labels, np.asarray(list(target), dtype=np.int64))
    index = np.flatnonzero(movable)
    moving = x[index]
    score = weak_name_agreement(labels, weak, num_classes) if rule == "weak_agreement" else 0.0
    passes = 0
    for _ in range(max_iterations):
        prototypes, present = _prototypes(x, labels, num_classes)
        if distance == "cosine":
            prototypes = prototypes / np.maximum(np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-12)
            dist = -moving @ prototypes.T
        else:
            # ||x||^2 is the same for every prototype, so the argmin needs only ||p||^2 - 2 x.p.
            dist = (prototypes**2).sum(1)[None] - 2 * moving @ prototypes.T
        dist[:, ~present] = np.inf
        new = dist.argmin(axis=1)
        if np.array_equal(new, labels[index]):
            break
        if rule == "weak_agreement":
            candidate = labels.copy()
            candidate[index] = new
            candidate_score = weak_name_agreement(candidate, weak, num_classes)
            if candidate_score <= score:
                break
            score = candidate_score
        labels[index] = new
        passes += 1
    return labels, passes
