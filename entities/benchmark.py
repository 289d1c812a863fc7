"""``scripts/benchmark.py entities``: stages 2 and 3 at SC-BBT scale against the official choice, and the
video path's frames per second.

The official pipeline clusters with scikit-learn ``KMeans(n_clusters=30)`` (k-means++, the library's default
``n_init``, ``tol=1e-4``), takes the cluster majority of weak labels and makes one stage-3 pass with ``scipy``
distances. Ours runs ``entities.discover`` with its defaults (``agreement.kmeans`` on the torch backend, fitted
on a 65,536-face subsample and then refined on all faces to the same tolerance) and the same single stage-3
pass, so that both compute the same method. Both run on the same synthetic 512-d faces with SC-Friends-like
weak labels; accuracy is against the generator's true names.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from entities.metrics import evaluate
from entities.names import UNKNOWN
from entities.pipeline import discover
from entities.stages import agree_on_names, cluster_name_graph, vote_scores, weak_label_graph


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def synthetic_faces(
    n: int,
    dim: int = 512,
    num_cast: int = 8,
    num_minor: int = 200,
    seed: int = 0,
    lookalike: float = 1.3,
    pose: float = 0.5,
    noise: float = 0.55,
    pose_rank: int = 16,
):
    """Faces with the geometry of real face embeddings, vectorised for SC-BBT scale.

    Identity centres are unit vectors that share a common direction (different people have cosine ~0.2);
    two minor people per cast member are look-alikes (their centre is the cast centre plus ``lookalike`` times a
    random unit vector); pose and lighting are a rank-``pose_rank`` nuisance shared by everybody (norm ~``pose``)
    plus isotropic noise (norm ~``noise``), so two faces of one person have cosine ~0.65. Identities are skewed,
    ~36% of faces belong to minor people (truth: Unknown), and weak names are noisy: 45% of faces have none,
    otherwise the own class 40% of the time, and a second random name half of the time.
    """
    rng = np.random.default_rng(seed)
    people = num_cast + num_minor
    cast_w = 0.64 * (w := 1.0 / np.arange(1, num_cast + 1) ** 0.6) / w.sum()
    minor_w = 0.36 * (m := 1.0 / np.arange(1, num_minor + 1)) / m.sum()
    frequencies = np.concatenate([cast_w, minor_w])
    identity = rng.choice(people, size=n, p=frequencies)
    centres = 0.2**0.5 * _unit_rows(rng, 1, dim) + 0.8**0.5 * _unit_rows(rng, people, dim)
    lookalikes = np.arange(num_cast, min(people, 3 * num_cast))
    centres[lookalikes] = centres[lookalikes % num_cast] + lookalike * _unit_rows(rng, len(lookalikes), dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((dim, pose_rank)))[0].T.astype(np.float32)
    x = centres[identity]
    x += (pose / pose_rank**0.5) * rng.standard_normal((n, pose_rank), dtype=np.float32) @ basis
    x += (noise / dim**0.5) * rng.standard_normal((n, dim), dtype=np.float32)
    truth = np.minimum(identity, num_cast)  # minor people -> Unknown (class num_cast)
    has = rng.random(n) > 0.45
    own = rng.random(n) < 0.4
    other = np.minimum(rng.choice(people, size=n, p=frequencies), num_cast)
    first = np.where(own, truth, other)
    second = np.where(rng.random(n) < 0.5, np.minimum(rng.choice(num_cast + 1, size=n), num_cast), -1)
    weak_ids = [([int(a)] + ([int(b)] if b >= 0 else [])) if h else [] for h, a, b in zip(has, first, second)]
    return x.astype(np.float32), weak_ids, truth


def official_stages(
    x: np.ndarray, weak_ids: list[list[int]], num_classes: int, k: int, seed: int
) -> tuple[np.ndarray, int]:
    """scikit-learn KMeans + cluster majority + one prototype pass on the most frequent label; also returns
    the number of k-means iterations scikit-learn made."""
    from scipy.spatial.distance import cdist
    from sklearn.cluster import KMeans

    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    model = KMeans(n_clusters=k, random_state=seed).fit(x)
    clusters = model.labels_
    weak = weak_label_graph(weak_ids, num_classes)
    stage2 = agree_on_names(vote_scores(cluster_name_graph(clusters, weak, k)), num_classes - 1)[clusters]
    target = np.bincount(stage2, minlength=num_classes).argmax()
    protos = np.stack(
        [
            x[stage2 == c].mean(0) if (stage2 == c).any() else np.full(x.shape[1], np.inf)
            for c in range(num_classes)
        ]
    )
    moving = stage2 == target
    stage3 = stage2.copy()
    stage3[moving] = cdist(x[moving], protos).argmin(1)
    return stage3, int(model.n_iter_)


def video_fps(frames: int = 20, sample_fps: float = 2.0) -> dict[str, float]:
    """Frames per second of decode + dlib detection + dlib embedding on a 320x240 video of a real face."""
    import cv2
    from skimage import data

    from entities.names import Gazetteer
    from entities.video import VideoOptions, records_from_video

    face = cv2.resize(data.astronaut()[56:186, 155:285], (110, 110))
    with tempfile.TemporaryDirectory() as folder:
        video = Path(folder) / "bench.avi"
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), sample_fps, (320, 240))
        rng = np.random.default_rng(0)
        for _ in range(frames):
            image = np.full((240, 320, 3), 100, np.uint8)
            x0, y0 = rng.integers(0, 200), rng.integers(0, 120)
            image[y0 : y0 + 110, x0 : x0 + 110] = face
            writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        writer.release()
        start = time.perf_counter()
        records = records_from_video(video, [], Gazetteer(["Ava"]), VideoOptions(sample_fps=sample_fps))
        seconds = time.perf_counter() - start
    return {"frames": frames, "faces": len(records), "seconds": seconds, "fps": frames / seconds}


def run_entities_benchmark(quick: bool = False) -> dict[str, Any]:
    """Time and accuracy of stages 2+3 (ours vs official) and the video path's fps; JSON-able with ``rows``."""
    n = 30_000 if quick else 300_000
    k, num_cast, seed = 30, 8, 0
    x, weak_ids, truth = synthetic_faces(n, num_cast=num_cast, seed=seed)
    cast = [f"Cast{i}" for i in range(num_cast)]
    classes = [*cast, UNKNOWN]
    names = [[classes[i] for i in ids] for ids in weak_ids]
    frames = np.arange(n) // 2

    start = time.perf_counter()
    official, official_iterations = official_stages(x, weak_ids, len(classes), k, seed)
    official_s = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = discover(x, names, frames, cast, k=k, refine_iterations=1, seed=seed).stage3
    ours_s = time.perf_counter() - start
    m_official, m_ours = evaluate(truth, official, classes), evaluate(truth, ours, classes)
    video = video_fps(frames=8 if quick else 30)
    rows = [
        {
            "task": f"stages 2+3, {n:,} x 512 faces, k={k}",
            "method": f"official (sklearn KMeans, {official_iterations} iterations to tol; one pass)",
            "seconds": round(official_s, 2),
            "accuracy": round(m_official["accuracy"], 4),
            "mean per-class": round(m_official["mean_per_class_accuracy"], 4),
        },
        {
            "task": f"stages 2+3, {n:,} x 512 faces, k={k}",
            "method": "ours (agreement.kmeans: subsample fit, tol; one pass)",
            "seconds": round(ours_s, 2),
            "accuracy": round(m_ours["accuracy"], 4),
            "mean per-class": round(m_ours["mean_per_class_accuracy"], 4),
        },
        {
            "task": "video path (decode + dlib detect + embed)",
            "method": "320x240 MJPG, dlib HOG + ResNet",
            "seconds": round(video["seconds"], 2),
            "fps": round(video["fps"], 2),
        },
    ]
    return {
        "benchmark": "entities",
        "quick": quick,
        "faces": n,
        "speedup": official_s / ours_s,
        "target_speedup": 2.0,
        "accuracy_gap": m_ours["accuracy"] - m_official["accuracy"],
        "video": video,
        "rows": rows,
    }
