"""Evaluation against ground-truth names: the paper's metrics for every stage, side by side.

Accuracy over all faces, mean per-class accuracy (recall per class) with and without "Unknown" (without it,
Unknown faces leave the average but a cast face predicted Unknown still counts as wrong), per-class precision
and recall, and NMI between predicted and true names. Soft predictions (a probability per class) give the
expected value of each metric, which is how the random-weak-label baseline is scored exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agreement import metrics as core
from agreement.tables import format_cell, markdown_table


def _check(y_true: np.ndarray, num_classes: int) -> np.ndarray:
    y_true = np.asarray(y_true, dtype=np.int64)
    if y_true.ndim != 1 or y_true.size == 0:
        raise ValueError("ground truth must be a non-empty 1-D array of class ids")
    if y_true.min() < 0 or y_true.max() >= num_classes:
        raise ValueError(f"ground-truth class ids must lie in [0, {num_classes})")
    return y_true


def evaluate(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    unknown_id: int | None = None,
) -> dict[str, Any]:
    """Metrics of hard predictions (class ids) against the truth; ``unknown_id`` defaults to the last class."""
    num_classes = len(classes)
    unknown_id = num_classes - 1 if unknown_id is None else unknown_id
    y_true = _check(np.asarray(y_true), num_classes)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_pred.shape != y_true.shape:
        raise ValueError(f"{y_pred.shape[0]} predictions for {y_true.shape[0]} faces")
    mean_all, recall = core.per_class_accuracy(y_true, y_pred, num_classes=num_classes)
    mean_cast, _ = core.per_class_accuracy(y_true, y_pred, num_classes=num_classes, ignore_index=unknown_id)
    predicted = np.bincount(y_pred[(y_pred >= 0) & (y_pred < num_classes)], minlength=num_classes)
    correct = np.bincount(y_true[y_true == y_pred], minlength=num_classes)
    precision = np.divide(correct, predicted, out=np.full(num_classes, np.nan), where=predicted > 0)
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "mean_per_class_accuracy": mean_all,
        "mean_per_class_accuracy_without_unknown": mean_cast,
        "nmi": core.nmi(y_true, y_pred),
        "per_class": {
            name: {
                "precision": _num(precision[c]),
                "recall": _num(recall[c]),
                "support": int((y_true == c).sum()),
            }
            for c, name in enumerate(classes)
        },
    }


def evaluate_expected(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    unknown_id: int | None = None,
) -> dict[str, Any]:
    """Expected metrics of a random prediction drawn from ``probs`` (faces x classes), exact by linearity.

    Accuracy and per-class recall are means of ``P(correct)``; the means over classes follow as for hard
    predictions. NMI has no closed form and is left out.
    """
    num_classes = len(classes)
    unknown_id = num_classes - 1 if unknown_id is None else unknown_id
    y_true = _check(np.asarray(y_true), num_classes)
    probs = np.asarray(probs, dtype=np.float64)
    p_correct = probs[np.arange(len(y_true)), y_true]
    support = np.bincount(y_true, minlength=num_classes)
    recall_sum = np.bincount(y_true, weights=p_correct, minlength=num_classes)
    recall = np.divide(recall_sum, support, out=np.full(num_classes, np.nan), where=support > 0)
    predicted = probs.sum(axis=0)
    precision = np.divide(recall_sum, predicted, out=np.full(num_classes, np.nan), where=predicted > 0)
    present = support > 0
    cast = present & (np.arange(num_classes) != unknown_id)
    return {
        "accuracy": float(p_correct.mean()),
        "mean_per_class_accuracy": float(recall[present].mean()),
        "mean_per_class_accuracy_without_unknown": float(recall[cast].mean()) if cast.any() else float("nan"),
        "nmi": float("nan"),
        "per_class": {
            name: {"precision": _num(precision[c]), "recall": _num(recall[c]), "support": int(support[c])}
            for c, name in enumerate(classes)
        },
    }


def _num(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


TABLE_COLUMNS = (
    ("accuracy", "accuracy"),
    ("mean per-class", "mean_per_class_accuracy"),
    ("mean per-class w/o Unknown", "mean_per_class_accuracy_without_unknown"),
    ("NMI", "nmi"),
)


def stage_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table with one row per method/stage."""
    rows = [[method, *(values.get(key) for _, key in TABLE_COLUMNS)] for method, values in results.items()]
    return markdown_table(["method", *(title for title, _ in TABLE_COLUMNS)], rows, digits=4)


def per_class_table(results: dict[str, dict[str, Any]], classes: Sequence[str]) -> str:
    """Per-class recall and precision (``recall / precision``) for each method."""
    rows = [
        [
            method,
            *(
                f"{format_cell(values['per_class'][name]['recall'])} / "
                f"{format_cell(values['per_class'][name]['precision'])}"
                for name in classes
            ),
        ]
        for method, values in results.items()
    ]
    return markdown_table(["method", *classes], rows)
