"""Run outputs: per-face names (JSON, CSV), the stage table (Markdown, JSON) and an HTML gallery per entity."""

from __future__ import annotations

import csv
import html
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from agreement.runs import write_text_atomic
from entities.metrics import per_class_table, stage_table
from entities.pipeline import DiscoveryResult
from entities.records import FaceRecords


def write_names(records: FaceRecords, result: DiscoveryResult, run_dir: Path) -> tuple[Path, Path]:
    """``names.json`` and ``names.csv``: one row per face with its frame, box, weak names and every stage's name."""
    rows = []
    for i in range(len(records)):
        row: dict[str, Any] = {
            "face": i,
            "frame": records.frames[i],
            "time": None if records.times is None else round(float(records.times[i]), 3),
            "box": None if records.boxes is None else [round(float(v), 1) for v in records.boxes[i]],
            "weak_names": records.weak_names[i],
            "cluster": int(result.clusters[i]),
            "stage1": result.classes[result.stage1[i]],
            "stage2": result.classes[result.stage2[i]],
            "name": result.classes[result.stage3[i]],
        }
        if records.labels is not None:
            row["true_name"] = records.labels[i]
        rows.append(row)
    json_path, csv_path = run_dir / "names.json", run_dir / "names.csv"
    write_text_atomic(json_path, json.dumps(rows, indent=1))
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    **row,
                    "weak_names": "|".join(row["weak_names"]),
                    "box": row["box"] and " ".join(map(str, row["box"])),
                }
            )
    os.replace(tmp, csv_path)
    return json_path, csv_path


def write_metrics(metrics: dict[str, dict[str, Any]], classes: list[str], run_dir: Path) -> tuple[Path, Path]:
    """``metrics.json`` (everything) and ``metrics.md`` (stage table and per-class recall / precision)."""
    json_path, md_path = run_dir / "metrics.json", run_dir / "metrics.md"
    write_text_atomic(json_path, json.dumps(metrics, indent=1, default=lambda v: None))
    text = (
        "# Entity discovery: stages side by side\n\n"
        + stage_table(metrics)
        + "\n\n## Per-class recall / precision\n\n"
        + per_class_table(metrics, classes)
        + "\n"
    )
    write_text_atomic(md_path, text)
    return json_path, md_path


def write_gallery(
    records: FaceRecords, result: DiscoveryResult, run_dir: Path, per_entity: int = 40
) -> Path | None:
    """``gallery.html``: face crops grouped by final name (only when crops exist, i.e. for video input)."""
    if records.crops is None:
        return None
    groups: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(result.names):
        groups[name].append(i)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Entity gallery</title><style>"
        "body{font-family:sans-serif} figure{display:inline-block;margin:4px;text-align:center;font-size:11px}"
        "img{height:96px}</style></head><body><h1>Discovered entities</h1>"
    ]
    for name in result.classes:
        faces = groups.get(name, [])
        if not faces:
            continue
        parts.append(f"<h2>{html.escape(name)} ({len(faces)} faces)</h2><div>")
        for i in faces[:per_entity]:
            crop = os.path.relpath(records.crops[i], run_dir)
            caption = f"{records.frames[i]}"
            if records.times is not None:
                caption += f" @ {float(records.times[i]):.1f}s"
            parts.append(
                f"<figure><img src='{html.escape(crop)}' alt='face {i}'><figcaption>{html.escape(caption)}"
                f"<br>stage 2: {html.escape(result.classes[result.stage2[i]])}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    path = run_dir / "gallery.html"
    write_text_atomic(path, "\n".join(parts))
    return path


def summary_counts(result: DiscoveryResult) -> dict[str, int]:
    """Faces per final name."""
    counts = np.bincount(result.stage3, minlength=len(result.classes))
    return {name: int(counts[i]) for i, name in enumerate(result.classes)}
