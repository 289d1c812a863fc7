"""Pictures and tables of a pretraining run: loss curves and cluster usage from the run's ``metrics.csv``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the headless backend


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Columns of a Lightning ``CSVLogger`` file as ``{name: [(step, value), ...]}``, empty cells skipped."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for name, cell in row.items():
                if name in ("step", "epoch") or cell in (None, ""):
                    continue
                value = float(cell)
                if math.isfinite(value):
                    series.setdefault(name, []).append((step, value))
    return series


def plot_loss_curves(metrics_csv: str | Path, out_png: str | Path) -> Path | None:
    """Per-step training losses (one panel per loss term) and cluster usage, if logged; ``None`` without data."""
    series = read_metrics(metrics_csv)
    losses = sorted(name for name in series if name.startswith("train/loss") and name.endswith("_step"))
    usage = sorted(name for name in series if name.startswith("clusters/") and name.endswith("/entropy"))
    panels = losses + usage
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for axis, name in zip(axes.flat, panels):
        steps, values = zip(*series[name])
        axis.plot(steps, values, linewidth=1.2)
        axis.set_title(name.removesuffix("_step"))
        axis.set_xlabel("step" if name in losses else "step (epoch end)")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    return save_figure(figure, out_png)


def save_figure(figure, out_png: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close a Matplotlib figure; returns its path."""
    figure.tight_layout()
    out_png = Path(out_png)
    figure.savefig(out_png, dpi=dpi)
    plt.close(figure)
    return out_png
