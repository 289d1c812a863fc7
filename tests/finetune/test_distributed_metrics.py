"""Fine-tuning metrics under DDP: 2 gloo processes, each with half of a split, score the split as 1 process does."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from agreement.dist import all_gather_objects
from ssl3d.finetune.metrics import EpochOutputs, classification_metrics
from ssl3d.finetune.segmentation import SegmentationTask
from ssl3d.finetune.task import ClassificationTask
from tests.finetune.helpers import TINY_BACKBONE
from tests.helpers.distributed import run_distributed

CASES = 10


class _NamedCases(ClassificationTask):
    """A linear classifier over named feature vectors: the smallest ClassificationTask."""

    def __init__(self, multi_label: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def split_batch(self, batch):
        return batch["features"], batch["label"], batch["case"]


def _split(multi_label: bool = False) -> dict:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(CASES, 4, generator=generator)
    if multi_label:
        labels = torch.randint(0, 2, (CASES, 3), generator=generator).float()
    else:
        labels = torch.arange(CASES) % 3  # every class present, so AUROC is defined
    return {"features": features, "label": labels, "case": [f"case{i}" for i in range(CASES)]}


def _shard(split: dict, rank: int, world_size: int) -> list[dict]:
    """This rank's cases as batches of 2 (a DistributedSampler without shuffling deals them round-robin)."""
    index = list(range(rank, CASES, world_size))
    batches = [index[i : i + 2] for i in range(0, len(index), 2)]
    return [
        {
            "features": split["features"][b],
            "label": split["label"][b],
            "case": [split["case"][i] for i in b],
        }
        for b in batches
    ]


def _classify(rank: int, world_size: int, multi_label: bool) -> tuple:
    model = _NamedCases(multi_label)
    model.on_test_epoch_start()
    for batch in _shard(_split(multi_label), rank, world_size):
        model.test_step(batch, 0)
    model.on_test_epoch_end()
    return model.test_summary, model.test_results


@pytest.mark.parametrize("multi_label", [False, True])
def test_classification_scores_the_whole_split_on_every_process(multi_label):
    expected_summary, expected_rows = _classify(0, 1, multi_label)
    assert math.isfinite(expected_summary["auroc"])
    for summary, rows in run_distributed(_classify, 2, multi_label):
        assert summary == pytest.approx(expected_summary)
        by_case = {row["case"]: row for row in rows}
        assert sorted(by_case) == sorted(row["case"] for row in expected_rows)
        for row in expected_rows:
            assert by_case[row["case"]]["label"] == row["label"]
            assert by_case[row["case"]]["probabilities"] == pytest.approx(row["probabilities"], abs=1e-6)


def test_per_shard_auroc_differs_from_the_whole_split():
    # the control: without gathering, each process would score its own half
    split = _split()
    model = _NamedCases()
    with torch.no_grad():
        logits = model(split["features"])
    whole = classification_metrics(logits, split["label"], False)["auroc"]
    halves = [classification_metrics(logits[r::2], split["label"][r::2], False)["auroc"] for r in range(2)]
    assert all(abs(half - whole) > 1e-3 for half in halves)


def _epoch_outputs(rank: int, world_size: int) -> tuple:
    outputs = EpochOutputs()
    split = _split()
    for batch in _shard(split, rank, world_size):
        outputs.update(batch["features"], batch["label"])
    logits, targets = outputs.compute()
    return logits, targets, all_gather_objects([f"from rank {rank}"])


def test_epoch_outputs_concatenate_in_rank_order():
    results = run_distributed(_epoch_outputs, 2)
    split = _split()
    order = list(range(0, CASES, 2)) + list(range(1, CASES, 2))
    for logits, targets, names in results:
        assert torch.equal(logits, split["features"][order])
        assert torch.equal(targets, split["label"][order])
        assert names == ["from rank 0", "from rank 1"]


def _segmentation(rank: int, world_size: int) -> tuple:
    model = SegmentationTask(backbone=TINY_BACKBONE, class_names=["background", "a", "b"], hd95=False)
    model.on_test_epoch_start()
    dice_values = [0.2, 0.4, math.nan, 0.9, 0.5]  # case 2 has no foreground: left out of the mean
    for case in range(rank, len(dice_values), world_size):
        value = dice_values[case]
        model.val_dice.update(value)
        model.test_results.append(
            {
                "case": f"case{case}",
                "metrics": {
                    "background": {"dice": 1.0},
                    "a": {"dice": value},
                    "b": {"dice": value / 2},
                },
            }
        )
    model.on_test_epoch_end()
    return float(model.val_dice.compute()), model.test_summary, sorted(r["case"] for r in model.test_results)


def test_segmentation_validation_and_test_means_cover_every_process():
    one = _segmentation(0, 1)
    assert one[0] == pytest.approx((0.2 + 0.4 + 0.9 + 0.5) / 4)
    assert one[1]["a"]["dice"] == pytest.approx(0.5)
    for dice, summary, cases in run_distributed(_segmentation, 2):
        assert dice == pytest.approx(one[0])
        assert summary.keys() == one[1].keys()
        for name, row in one[1].items():
            assert summary[name] == pytest.approx(row)
        assert cases == one[2]
