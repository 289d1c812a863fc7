"""Markdown tables: the one writer behind run summaries, results files, reports and benchmark output."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

MISSING = "–"


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
