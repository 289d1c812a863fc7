"""``scripts/benchmark.py entities``: stages 2 and 3 at SC-BBT scale against the official algorithm, and the
video path's frames per second; ``scripts/benchmark.py entities-eval``: the evaluation family of
``entities.evaluation`` as a report.

The official algorithm (``entities.evaluation.official_stages``) clusters with scikit-learn
``KMeans(n_clusters=30, n_init=10)``, takes the cluster majority of weak labels and makes one stage-3 pass.
Ours runs ``entities.discover`` with its defaults (``agreement.kmeans`` on the torch backend: its 10 starts are
fitted on a 65,536-face subsample, the best is refined on all faces). Both run on the same synthetic 512-d
episode with the biases of the evaluation family; accuracy is against the generator's true names.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from entities.evaluation import (
    REGIMES,
    SPLITS,
    STAGES,
    markdown,
    official_stages,
    run_family,
    tune,
    tuning_candidates,
    worst_margins,
)
from entities.metrics import evaluate
from entities.names import Gazetteer
from entities.pipeline import OFFICIAL_OPTIONS, discover, names_to_ids
from entities.records import FaceRecords
from entities.synthetic import EpisodeConfig, make_episode

SCALE_CAST = ("Avery", "Blake", "Corin", "Dale", "Ellis", "Finley", "Gray", "Harper")


def scale_episode(faces: int, dim: int = 512, seed: int = 0) -> tuple[FaceRecords, list[str]]:
    """An SC-BBT-scale episode as hard as the evaluation family: 8 cast members (one of them a lead rarely named
    on screen), 200 minor people of whom 16 look like cast members, noisy names, 512-d faces; about ``faces``
    faces (the generator draws whole scenes)."""
    config = EpisodeConfig(
        cast=SCALE_CAST,
        num_minor=200,
        dim=dim,
        lookalikes=16,
        lookalike_distance=0.5,
        quiet_lead=True,
        mention_noise=0.1,
        seed=seed,
    )
    # ~19.7 faces per scene with these settings (measured); one draw, then cut to the size asked for.
    config = dataclasses.replace(config, num_scenes=int(faces / 19.7 * 1.1) + 1)
    records, cast = make_episode(config)
    cut = FaceRecords(
        frames=records.frames[:faces],
        weak_names=records.weak_names[:faces],
        embeddings=records.embeddings[:faces],
        labels=records.labels[:faces],
        times=records.times[:faces],
        source=records.source,
    )
    return cut, cast


def _scores(truth: np.ndarray, labels: np.ndarray, classes: list[str]) -> tuple[float, float]:
    metrics = evaluate(truth, labels, classes)
    return round(metrics["accuracy"], 4), round(metrics["mean_per_class_accuracy"], 4)


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
    """Time and accuracy of stages 2+3 (ours with its defaults vs official) and the video path's fps; JSON-able
    with ``rows``."""
    n, seed = (10_000 if quick else 300_000), 0
    records, cast = scale_episode(n, seed=seed)
    gazetteer = Gazetteer(cast)
    classes = gazetteer.classes
    truth = names_to_ids(records.labels, classes)
    weak_ids = [gazetteer.class_ids(names) for names in records.weak_names]

    start = time.perf_counter()
    official2, official3, official_iterations = official_stages(
        records.embeddings, weak_ids, len(classes), seed=seed
    )
    official_s = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minor people's names are outside the cast
        ours = discover(records.embeddings, records.weak_names, records.frames, gazetteer, seed=seed)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = discover(
            records.embeddings, records.weak_names, records.frames, gazetteer, OFFICIAL_OPTIONS, seed=seed
        )
    same_s = time.perf_counter() - start
    scores = {
        "official": (_scores(truth, official2, classes), _scores(truth, official3, classes)),
        "ours": (_scores(truth, ours.stage2, classes), _scores(truth, ours.stage3, classes)),
        "ours, official settings": (
            _scores(truth, same.stage2, classes),
            _scores(truth, same.stage3, classes),
        ),
    }
    video = video_fps(frames=8 if quick else 30)
    task = f"stages 2+3, {len(records):,} x {records.embeddings.shape[1]} faces"
    rows = [
        {
            "task": task,
            "method": f"official (sklearn KMeans k=30, n_init=10, {official_iterations} iterations; one pass)",
            "seconds": round(official_s, 2),
            "stage 2 accuracy / mpc": "{} / {}".format(*scores["official"][0]),
            "stage 3 accuracy / mpc": "{} / {}".format(*scores["official"][1]),
        },
        {
            "task": task,
            "method": f"ours (defaults: k={ours.k}, 10 starts on a subsample, {ours.refine_passes} refine passes)",
            "seconds": round(ours_s, 2),
            "stage 2 accuracy / mpc": "{} / {}".format(*scores["ours"][0]),
            "stage 3 accuracy / mpc": "{} / {}".format(*scores["ours"][1]),
        },
        {
            "task": task,
            "method": "ours with the official settings (k=30, majority, one pass; 10 starts on a subsample)",
            "seconds": round(same_s, 2),
            "stage 2 accuracy / mpc": "{} / {}".format(*scores["ours, official settings"][0]),
            "stage 3 accuracy / mpc": "{} / {}".format(*scores["ours, official settings"][1]),
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
        "faces": len(records),
        "speedup": official_s / ours_s,
        "official_settings_speedup": official_s / same_s,
        "target_speedup": 2.0,
        "accuracy_gap": scores["ours"][1][0] - scores["official"][1][0],
        "mean_per_class_gap": scores["ours"][1][1] - scores["official"][1][1],
        "scores": scores,
        "video": video,
        "rows": rows,
    }


def run_entities_evaluation(
    quick: bool = False, split: str = "held-out", tune_defaults: bool = False
) -> dict[str, Any]:
    """``scripts/benchmark.py entities-eval``: the per-regime comparison (or, with ``tune_defaults``, the tuning
    grid), JSON-able with ``rows`` and ``markdown``. ``quick`` uses two regimes and one seed."""
    regimes = list(REGIMES)[:2] if quick else None
    seeds = SPLITS[split][:1] if quick else None
    if tune_defaults:
        if split != "tuning":
            raise ValueError("--tune runs on the tuning half only: add --split tuning")
        candidates = tuning_candidates()[:2] if quick else None
        result = tune(candidates, regimes, SPLITS["tuning"][:1] if quick else None)
        rows = [
            {
                "options": ", ".join(f"{k}={v}" for k, v in row["options"].items()),
                "worst regime gain": round(row["worst"], 4),
                "stage 2 accuracy / mpc gain": f"{row['stage 2 accuracy mean']:+.3f} / "
                f"{row['stage 2 mean_per_class_accuracy mean']:+.3f}",
                "stage 3 accuracy / mpc gain": f"{row['stage 3 accuracy mean']:+.3f} / "
                f"{row['stage 3 mean_per_class_accuracy mean']:+.3f}",
            }
            for row in sorted(result["candidates"], key=lambda row: -row["worst"])
        ]
        chosen = ", ".join(f"{k}={v}" for k, v in result["chosen"].items())
        return {**result, "rows": rows, "markdown": f"Chosen on the tuning half: {chosen}"}
    result = run_family(split, regimes=regimes, seeds=seeds)
    rows = []
    for regime, entry in result["summary"].items():
        row: dict[str, Any] = {"regime": regime, "episodes": entry["episodes"]}
        for stage in STAGES[1:]:
            for method in ("ours", "official"):
                values = entry[method][stage]
                row[f"{stage} {method}"] = (
                    f"{values['accuracy']['mean']:.3f} / {values['mean_per_class_accuracy']['mean']:.3f}"
                )
        chosen = [e for e in result["episodes"] if regime in ("mean", e["regime"])]
        row["seconds"] = round(sum(e["ours"]["seconds"] + e["official"]["seconds"] for e in chosen), 2)
        rows.append(row)
    return {**result, "margins": worst_margins(result["summary"]), "rows": rows, "markdown": markdown(result)}
