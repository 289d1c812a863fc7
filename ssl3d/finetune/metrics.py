"""Fine-tuning metrics: per-volume segmentation scores with MONAI (per-class 2D Dice and IoU, 3D IoU and Dice, HD95),
classification AUROC and accuracy, and ``EpochOutputs``, which gathers an evaluation epoch's logits from every
process so that a split is scored whole under DDP.

2D scores are per slice (the paper's slice-wise Dice/IoU), averaged over the slices where the class is in
the ground truth; 3D scores treat the stacked volume as one object, as the paper's 3D IoU per volume. HD95 is
in mm (voxel spacing from the affine) and NaN where the class is absent from the prediction or the truth.
Classes are computed one at a time so that memory stays at two binary volumes for large scans.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_roc_auc
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def _nanmean(values: torch.Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else math.nan


def volume_metrics(
    prediction: torch.Tensor,
    target: torch.Tensor,
    class_names: Sequence[str],
    spacing: Sequence[float] | None = None,
    hd95: bool = True,
) -> dict[str, dict[str, float]]:
    """``{class name: {metric: value}}`` for ``(S, X, Y)`` class-index volumes, slice axis first."""
    if prediction.shape != target.shape or prediction.ndim != 3:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must be the same (S, X, Y)"
        )
    results = {}
    for index, name in enumerate(class_names):
        pred = (prediction == index).float()
        true = (target == index).float()
        slices_pred, slices_true = pred[:, None], true[:, None]  # (S, 1, X, Y): a batch of 2D slices
        volume_pred, volume_true = pred[None, None], true[None, None]  # (1, 1, S, X, Y)
        row = {
            "dice": _nanmean(compute_dice(slices_pred, slices_true, ignore_empty=True)),
            "iou": _nanmean(compute_iou(slices_pred, slices_true, ignore_empty=True)),
            "dice_3d": _nanmean(compute_dice(volume_pred, volume_true, ignore_empty=True)),
            "iou_3d": _nanmean(compute_iou(volume_pred, volume_true, ignore_empty=True)),
        }
        if hd95:
            if bool(volume_pred.any()) and bool(volume_true.any()):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    distance = compute_hausdorff_distance(
                        volume_pred,
                        volume_true,
                        include_background=True,
                        percentile=95,
                        spacing=list(spacing) if spacing is not None else None,
                    )
                row["hd95"] = float(distance.flatten()[0])
            else:
                row["hd95"] = math.nan
        results[name] = row
    return results


def mean_over_classes(results: dict[str, dict[str, float]], skip: Sequence[str] = ("background",)) -> dict:
    """Mean of each metric over the classes not in ``skip`` (NaNs ignored)."""
    rows = [row for name, row in results.items() if name not in skip]
    keys = rows[0].keys() if rows else ()
    return {key: _nanmean(torch.tensor([row[key] for row in rows], dtype=torch.float64)) for key in keys}


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, multi_label: bool
) -> dict[str, float]:
    """AUROC (macro; NaN when a class has only one outcome in ``targets``) and accuracy."""
    if multi_label:
        probabilities = torch.sigmoid(logits)
        accuracy = float(((probabilities > 0.5).float() == targets).float().mean())
        one_hot = targets
    else:
        probabilities = torch.softmax(logits, dim=1)
        accuracy = float((probabilities.argmax(dim=1) == targets).float().mean())
        one_hot = F.one_hot(targets.long(), logits.shape[1]).float()
    try:
        auroc = float(compute_roc_auc(probabilities, one_hot, average="macro"))
    except (ValueError, AssertionError):
        auroc = math.nan
    return {"auroc": auroc, "accuracy": accuracy}


class EpochOutputs(Metric):
    """The logits and targets of an evaluation epoch; ``compute()`` returns them concatenated over every process in
    rank order (torchmetrics' synced ``cat`` states), so AUROC is computed on the whole split, not per shard. The
    states are not saved in checkpoints. One metric holds both, not two ``CatMetric``s: those cast the targets to
    float and drop NaN entries by default, which would unpair logits and targets."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.logits.append(logits.detach().float())
        self.targets.append(targets.detach())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return dim_zero_cat(self.logits), dim_zero_cat(self.targets)
