"""``discover``: the three-stage pipeline on face embeddings, weak names and frames; a name per face."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import numpy as np

from agreement.matching import BipartiteGraph
from entities.metrics import evaluate, evaluate_expected
from entities.names import UNKNOWN, Gazetteer, report_out_of_cast
from entities.records import FaceRecords, RecordsError, stack_embeddings
from entities.stages import (
    RefineRule,
    Vote,
    agree_on_names,
    cluster_faces,
    cluster_name_graph,
    one_name_per_frame,
    random_weak_labels,
    refine_with_prototypes,
    vote_scores,
    weak_label_distribution,
    weak_label_graph,
)


@dataclass
class DiscoveryResult:
    """Labels of every stage (class ids into ``classes``); iterating gives the final name per face."""

    classes: list[str]
    stage1: np.ndarray
    stage1_probs: np.ndarray
    clusters: np.ndarray
    cluster_labels: np.ndarray
    stage2: np.ndarray
    stage3: np.ndarray
    refine_passes: int
    hungarian_changes: int
    k: int

    @property
    def unknown_id(self) -> int:
        return self.classes.index(UNKNOWN)

    @property
    def names(self) -> list[str]:
        return [self.classes[c] for c in self.stage3]

    def stage_names(self, stage: int) -> list[str]:
        labels = {1: self.stage1, 2: self.stage2, 3: self.stage3}[stage]
        return [self.classes[c] for c in labels]

    def __len__(self) -> int:
        return len(self.stage3)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __getitem__(self, index: int) -> str:
        return self.classes[self.stage3[index]]

    def evaluate(self, true_names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Metrics of every stage against ground-truth names (names outside the classes count as Unknown)."""
        y_true = names_to_ids(true_names, self.classes)
        unknown = self.unknown_id
        return {
            "stage 1: random weak label (expected)": evaluate_expected(
                y_true, self.stage1_probs, self.classes, unknown
            ),
            "stage 1: random weak label (one draw)": evaluate(y_true, self.stage1, self.classes, unknown),
            "stage 2: visual entity agreement": evaluate(y_true, self.stage2, self.classes, unknown),
            "stage 3: prototype refinement": evaluate(y_true, self.stage3, self.classes, unknown),
        }


def names_to_ids(names: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Class id of each name; names that are not classes map to Unknown."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = index[UNKNOWN]
    return np.asarray([index.get(str(name), unknown) for name in names], dtype=np.int64)


def default_k(num_classes: int, clusters_per_entity: int) -> int:
    """Over-cluster: ``clusters_per_entity`` clusters per class (the paper's k=30 is ~4 per class for 7 classes)."""
    return max(1, clusters_per_entity * num_classes)


def unnamed_cast(weak: BipartiteGraph, classes: Sequence[str], unknown_id: int) -> list[str]:
    """Cast members that no weak name refers to: no cluster can vote for them."""
    mentions = weak.column_sums()
    return [name for c, name in enumerate(classes) if c != unknown_id and mentions[c] == 0]


@dataclass
class DiscoveryOptions:
    """Stage 2 and 3 settings of :func:`discover`, the ``discovery`` section of ``scripts/discover_entities.py``.

    The defaults (those of ``configs/entities/default.yaml``) were chosen on the tuning half of the evaluation
    family (``entities.evaluation``): a name-frequency-corrected vote, one cast name per face per frame, and
    stage-3 passes kept only while they raise the agreement with the weak names. ``OFFICIAL_OPTIONS`` (majority
    vote, no per-frame matching, one stage-3 pass, ``k=30``) is the official algorithm.

    Attributes:
        k: number of k-means clusters; default ``clusters_per_entity * (named cast + 1)``, counting only the
            cast members that some weak name refers to (the others get a warning); at most one per face.
        vote: ``"majority"`` (official) or ``"frequency"`` (votes divided by name frequency ** ``frequency_power``).
        one_name_per_face_per_frame: Hungarian matching so that a cast name labels at most one face per frame.
        refine_target: which faces stage 3 may move (see ``refine_with_prototypes``).
        refine_iterations: maximum stage-3 passes (1 with ``refine_rule="until_stable"`` = the official pass).
        refine_rule: ``"weak_agreement"`` keeps a pass only while it raises the mutual information between the
            labels and the weak names; ``"until_stable"`` makes passes until no label changes.
        distance: stage-3 distance to the prototypes.
        normalize: L2-normalise embeddings first (the paper's FaceNet embeddings are unit vectors).
        kmeans_iterations, kmeans_restarts, kmeans_tol, kmeans_sample_size, kmeans_full_iterations: k-means
            settings (see ``entities.stages.cluster_faces``; ``kmeans_restarts`` starts, the best kept by
            inertia); the last two only matter above that many faces.
        backend, kmeans_precision: k-means backend and assignment precision (see ``agreement.kmeans``).
    """

    k: int | None = None
    clusters_per_entity: int = 4
    vote: Vote = "frequency"
    frequency_power: float = 0.75
    one_name_per_face_per_frame: bool = True
    refine_target: Literal["most_frequent", "all"] = "most_frequent"
    refine_iterations: int = 10
    refine_rule: RefineRule = "weak_agreement"
    distance: Literal["euclidean", "cosine"] = "euclidean"
    normalize: bool = True
    kmeans_iterations: int = 50
    kmeans_restarts: int = 10
    kmeans_tol: float = 1e-4
    kmeans_sample_size: int | None = 65_536
    kmeans_full_iterations: int = 5
    backend: Literal["torch", "faiss"] = "torch"
    kmeans_precision: Literal["float32", "bfloat16"] = "float32"

    def updated(self, **settings: Any) -> DiscoveryOptions:
        """A copy with ``settings`` changed; an unknown name is an error that lists the known ones."""
        unknown = sorted(set(settings) - {f.name for f in fields(self)})
        if unknown:
            known = ", ".join(f.name for f in fields(self))
            raise TypeError(f"unknown discovery settings {', '.join(unknown)}; the settings are: {known}")
        return replace(self, **settings)


# The official algorithm's choices, run by ``discover``.
OFFICIAL_OPTIONS = DiscoveryOptions(
    k=30, vote="majority", one_name_per_face_per_frame=False, refine_iterations=1, refine_rule="until_stable"
)


def discover(
    embeddings: np.ndarray | Sequence[Sequence[float]],
    weak_names: Sequence[Sequence[str]],
    frames: Sequence[Any],
    cast: Sequence[str] | Gazetteer,
    options: DiscoveryOptions | None = None,
    *,
    seed: int = 0,
    **settings: Any,
) -> DiscoveryResult:
    """Name every face from its embedding, the weak names of its frame's caption, and the other faces.

    Args:
        embeddings: (faces, dim) face embeddings.
        weak_names: per face, the name tokens of the caption(s) aligned with its frame (may be empty).
        frames: per face, the key of its frame or caption window (faces of one frame share a bipartite graph).
        cast: the main people (a list of names or a ``Gazetteer``); other names become "Unknown".
        options: the stage 2 and 3 settings (default ``DiscoveryOptions()``).
        seed: seeds k-means and the random stage-1 draw.
        settings: single settings changed from ``options`` (e.g. ``k=30, vote="majority"``).

    Returns:
        A ``DiscoveryResult``: a sequence of final names, with every stage's labels.
    """
    options = (options or DiscoveryOptions()).updated(**settings)
    gazetteer = cast if isinstance(cast, Gazetteer) else Gazetteer(cast)
    n = len(weak_names)
    if len(frames) != n:
        raise RecordsError(f"{len(frames)} frame keys for {n} weak-name lists")
    x = embeddings if isinstance(embeddings, np.ndarray) else stack_embeddings(list(embeddings), "embeddings")
    if x.ndim != 2 or x.shape[0] != n:
        raise RecordsError(f"embeddings have shape {x.shape}, expected ({n}, dim)")
    if n == 0:
        raise RecordsError("no faces to name")
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    if not (np.isfinite(x.sum(dtype=np.float64)) or np.isfinite(x).all()):
        raise RecordsError("embeddings contain NaN or inf")
    if options.normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if (norms == 0).any():
            raise RecordsError(f"{int((norms == 0).sum())} embeddings are all zeros and cannot be normalised")
        x = x / norms
    report_out_of_cast(weak_names, gazetteer)
    classes = gazetteer.classes
    unknown = gazetteer.unknown_id
    weak_ids = [gazetteer.class_ids(names) for names in weak_names]
    frame_keys: dict[Any, int] = {}
    frame_ids = np.asarray([frame_keys.setdefault(f, len(frame_keys)) for f in frames], dtype=np.int64)

    # Stage 1: per-frame complete bipartite graphs, read off as a face-by-name weight matrix.
    weak = weak_label_graph(weak_ids, len(classes))
    stage1_probs = weak_label_distribution(weak, unknown)
    stage1 = random_weak_labels(weak_ids, unknown, seed)
    if weak.row_sums().sum() == 0:
        warnings.warn("no face has a weak name: every stage predicts Unknown", stacklevel=2)

    # Stage 2: over-cluster, then each cluster agrees on one name.
    silent = unnamed_cast(weak, classes, unknown)
    if silent and weak.row_sums().sum() > 0:
        warnings.warn(
            f"cast members never named in the captions: {', '.join(silent)}; no face can be named after "
            "them (check the spelling, or give aliases)"
            + ("; k counts only the named classes" if options.k is None else ""),
            stacklevel=2,
        )
    k = options.k
    if k is None:
        k = default_k(len(classes) - len(silent), options.clusters_per_entity)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > n:
        warnings.warn(f"only {n} faces for k={k} clusters; using k={n} (one cluster per face)", stacklevel=2)
        k = n
    clusters = cluster_faces(
        x,
        k,
        iterations=options.kmeans_iterations,
        restarts=options.kmeans_restarts,
        seed=seed,
        backend=options.backend,
        tol=options.kmeans_tol,
        sample_size=options.kmeans_sample_size,
        full_iterations=options.kmeans_full_iterations,
        precision=options.kmeans_precision,
    )
    scores = vote_scores(cluster_name_graph(clusters, weak, k), options.vote, options.frequency_power)
    cluster_labels = agree_on_names(scores, unknown)
    stage2 = cluster_labels[clusters]
    changes = 0
    if options.one_name_per_face_per_frame:
        totals = scores.sum(axis=1, keepdims=True)
        face_scores = np.divide(scores, totals, out=np.zeros_like(scores), where=totals > 0)[clusters]
        stage2, changes = one_name_per_frame(frame_ids, face_scores, stage2, unknown)

    # Stage 3: prototypes of the agreed entities pull faces of the target entities to their nearest one.
    stage3, passes = refine_with_prototypes(
        x,
        stage2,
        len(classes),
        target=options.refine_target,
        max_iterations=options.refine_iterations,
        distance=options.distance,
        rule=options.refine_rule,
        weak=weak,
    )
    return DiscoveryResult(
        classes=list(classes),
        stage1=stage1,
        stage1_probs=stage1_probs,
        clusters=clusters,
        cluster_labels=cluster_labels,
        stage2=stage2,
        stage3=stage3,
        refine_passes=passes,
        hungarian_changes=changes,
        k=k,
    )


def discover_records(
    records: FaceRecords,
    cast: Sequence[str] | Gazetteer,
    options: DiscoveryOptions | None = None,
    **settings: Any,
) -> DiscoveryResult:
    """``discover`` on ``FaceRecords`` (which must carry embeddings); ``settings`` as for ``discover``."""
    if records.embeddings is None:
        raise RecordsError(f"{records.source}: the records have no embeddings; stages 2 and 3 need them")
    return discover(records.embeddings, records.weak_names, records.frames, cast, options, **settings)
