"""Per-face records: frame, box, embedding, weak names and (optionally) the true name.

One record per detected face. Records come from the video path, from the synthetic episode, or from a JSON or
Parquet file with one entry per face (``frame`` and ``names`` required; ``embedding``, ``box``, ``time``,
``label``, ``crop`` optional). The SC-Friends label fixture (``{"header", "records"}`` with ``clip``,
``frame``, ``weak_names``, ``stage2_label``, ``label``) is read by the same loader.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agreement.optional import optional_import


class RecordsError(ValueError):
    """Face records that cannot be used; the message names the source and the problem."""


@dataclass
class FaceRecords:
    """Column-wise face records; ``frames[i]`` is the frame (or caption window) key of face ``i``."""

    frames: list[str]
    weak_names: list[list[str]]
    embeddings: np.ndarray | None = None
    labels: list[str] | None = None
    boxes: np.ndarray | None = None
    times: np.ndarray | None = None
    crops: list[str] | None = None
    extra: dict[str, list[Any]] = field(default_factory=dict)
    source: str = "records"

    def __post_init__(self) -> None:
        n = len(self.frames)
        if len(self.weak_names) != n:
            raise RecordsError(f"{self.source}: {n} frames but {len(self.weak_names)} weak-name lists")
        for name, column in (
            ("embeddings", self.embeddings),
            ("labels", self.labels),
            ("boxes", self.boxes),
            ("times", self.times),
            ("crops", self.crops),
            *self.extra.items(),
        ):
            if column is not None and len(column) != n:
                raise RecordsError(f"{self.source}: column {name!r} has {len(column)} entries for {n} faces")

    def __len__(self) -> int:
        return len(self.frames)

    def frame_ids(self) -> np.ndarray:
        """Integer id per face of its frame, in order of first appearance."""
        index: dict[str, int] = {}
        return np.asarray([index.setdefault(key, len(index)) for key in self.frames], dtype=np.int64)

    def to_rows(self) -> list[dict[str, Any]]:
        rows = []
        for i in range(len(self)):
            row: dict[str, Any] = {"frame": self.frames[i], "names": list(self.weak_names[i])}
            if self.times is not None:
                row["time"] = float(self.times[i])
            if self.boxes is not None:
                row["box"] = [float(v) for v in self.boxes[i]]
            if self.labels is not None:
                row["label"] = self.labels[i]
            if self.crops is not None:
                row["crop"] = self.crops[i]
            if self.embeddings is not None:
                row["embedding"] = [float(v) for v in self.embeddings[i]]
            for key, column in self.extra.items():
                row[key] = column[i]
            rows.append(row)
        return rows


def stack_embeddings(vectors: list[Any], source: str) -> np.ndarray:
    """Stack per-face vectors into (n, d) float32; mixed dimensions or non-finite values raise ``RecordsError``."""
    dims = Counter()
    for vector in vectors:
        dims[len(vector) if vector is not None else 0] += 1
    if len(dims) > 1:
        detail = ", ".join(f"{count} faces of dimension {dim}" for dim, count in dims.most_common())
        raise RecordsError(f"{source}: embeddings have mixed dimensions ({detail}); use one embedding model")
    (dim,) = dims
    if dim == 0:
        raise RecordsError(f"{source}: embeddings are empty")
    array = np.asarray([np.asarray(v, dtype=np.float32) for v in vectors], dtype=np.float32)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise RecordsError(
            f"{source}: {int(bad.sum())} embeddings contain NaN or inf (first face {int(bad.argmax())})"
        )
    return array


def _names(value: Any, source: str, row: int) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise RecordsError(
            f"{source}: face {row}: names must be a list of strings, got {type(value).__name__}"
        )
    return [str(v) for v in value]


def records_from_rows(rows: list[dict[str, Any]], source: str) -> FaceRecords:
    """Build records from dicts; the SC-Friends fixture keys (``clip``, ``weak_names``) are understood too."""
    if not rows:
        raise RecordsError(f"{source}: no face records")
    frames, names, labels, embeddings, boxes, times, crops = [], [], [], [], [], [], []
    extra: dict[str, list[Any]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RecordsError(f"{source}: face {i} is a {type(row).__name__}, not an object")
        if "frame" not in row:
            raise RecordsError(f"{source}: face {i} has no 'frame' field")
        frame = f"{row['clip']}/{row['frame']}" if "clip" in row else str(row["frame"])
        frames.append(frame)
        names.append(_names(row.get("names", row.get("weak_names")), source, i))
        labels.append(row.get("label"))
        embeddings.append(row.get("embedding"))
        boxes.append(row.get("box"))
        times.append(row.get("time"))
        crops.append(row.get("crop"))
        if "stage2_label" in row:
            extra.setdefault("stage2_label", []).append(row["stage2_label"])

    def column(values: list[Any], what: str) -> list[Any] | None:
        present = sum(v is not None for v in values)
        if present == 0:
            return None
        if present < len(values):
            raise RecordsError(f"{source}: {len(values) - present} of {len(values)} faces have no {what!r}")
        return values

    emb = column(embeddings, "embedding")
    box = column(boxes, "box")
    time = column(times, "time")
    if "stage2_label" in extra and len(extra["stage2_label"]) != len(rows):
        raise RecordsError(f"{source}: only some faces have 'stage2_label'")
    return FaceRecords(
        frames=frames,
        weak_names=names,
        embeddings=None if emb is None else stack_embeddings(emb, source),
        labels=column(labels, "label"),
        boxes=None if box is None else np.asarray(box, dtype=np.float32),
        times=None if time is None else np.asarray(time, dtype=np.float64),
        crops=column(crops, "crop"),
        extra=extra,
        source=source,
    )


def load_records(path: str | Path) -> FaceRecords:
    """Read face records from ``.json`` (a list, or an object with ``records``) or ``.parquet``."""
    path = Path(path)
    if not path.is_file():
        raise RecordsError(f"{path}: records file not found")
    if path.suffix.lower() == ".parquet":
        parquet = optional_import("pyarrow.parquet", extra="faces", purpose="reading Parquet face records")
        rows = parquet.read_table(path).to_pylist()
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise RecordsError(f"{path}: not valid JSON ({error})") from None
        rows = data.get("records") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise RecordsError(f"{path}: expected a list of face records or an object with a 'records' list")
    else:
        raise RecordsError(f"{path}: unsupported records format {path.suffix!r} (use .json or .parquet)")
    return records_from_rows(rows, str(path))


def save_records(records: FaceRecords, path: str | Path) -> Path:
    """Write records as ``.json`` or ``.parquet`` (the format ``load_records`` reads back)."""
    path = Path(path)
    rows = records.to_rows()
    if path.suffix.lower() == ".parquet":
        pyarrow = optional_import("pyarrow", extra="faces", purpose="writing Parquet face records")
        parquet = optional_import("pyarrow.parquet", extra="faces", purpose="writing Parquet face records")
        parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps({"records": rows}))
    return path
