"""Markdown tables: the one writer behind run summaries, results files, reports and benchmark output."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MISSING = "–"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value) of results over seeds or episodes:
    the one statistic behind every "mean ± std" the project reports."""
    if len(values) == 0:
        raise ValueError("mean_std needs at least one value")
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def format_mean_std(values: Sequence[float], digits: int = 4, signed: bool = False) -> str:
    """``values`` as ``"mean ± std"`` (:func:`mean_std`) with ``digits`` decimals; ``signed`` writes the mean's sign
    (for differences)."""
    mean, std = mean_std(values)
    return f"{mean:{'+' if signed else ''}.{digits}f} ± {std:.{digits}f}"


def format_cell(value: Any, digits: int = 3) -> str:
    """A float with ``digits`` decimals (significant digits where it is at least 1e5 or below 10^-(digits-1), so
    that small values are not shown as 0), missing values (None, NaN) as a dash, anything else as ``str``."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -(digits - 1)):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    columns: Sequence[str], rows: Sequence[Mapping[str, Any] | Sequence[Any]], digits: int = 3
) -> str:
    """A GitHub-flavoured Markdown table. Each row is a mapping read by column name (a missing key is an empty
    cell) or a sequence in column order; cells go through :func:`format_cell`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        values = [row.get(column, "") for column in columns] if isinstance(row, Mapping) else list(row)
        lines.append("| " + " | ".join(format_cell(value, digits) for value in values) + " |")
    return "\n".join(lines)
