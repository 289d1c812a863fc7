import math

import torch

from ssl3d.finetune.metrics import mean_over_classes, volume_metrics


def test_perfect_prediction_scores_one_and_zero_distance():
    target = torch.zeros(4, 8, 8, dtype=torch.long)
    target[1:3, 2:5, 2:5] = 1
    result = volume_metrics(target.clone(), target, ["bg", "a"], spacing=(3.0, 1.0, 1.0))
    for name in ("bg", "a"):
        assert all(result[name][k] == 1.0 for k in ("dice", "iou", "dice_3d", "iou_3d"))
        assert result[name]["hd95"] == 0.0


def test_overlap_scores_match_hand_counts():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    prediction = torch.zeros_like(target)
    target[0, :, :2] = 1  # 8 voxels on slice 0
    prediction[0, :, 1:3] = 1  # 8 voxels, 4 shared
    prediction[1, 0, 0] = 1  # a false positive on a slice without the class
    result = volume_metrics(prediction, target, ["bg", "a"], spacing=(1.0, 1.0, 1.0))["a"]
    assert math.isclose(result["iou_3d"], 4 / (8 + 9 - 4), rel_tol=1e-6)
    assert math.isclose(result["dice_3d"], 2 * 4 / (8 + 9), rel_tol=1e-6)
    # 2D scores skip slice 1, where the class is absent from the truth.
    assert math.isclose(result["iou"], 4 / 12, rel_tol=1e-6)
    assert math.isclose(result["dice"], 0.5, rel_tol=1e-6)


def test_hd95_uses_the_voxel_spacing_and_is_nan_for_an_absent_class():
    target = torch.zeros(3, 6, 6, dtype=torch.long)
    target[1, 2, 2] = 1
    prediction = torch.zeros_like(target)
    prediction[2, 2, 2] = 1  # one slice off
    result = volume_metrics(prediction, target, ["bg", "a", "b"], spacing=(5.0, 1.0, 1.0))
    assert math.isclose(result["a"]["hd95"], 5.0)
    assert math.isnan(result["b"]["hd95"])
    assert math.isnan(mean_over_classes({"bg": result["bg"], "b": result["b"]}, skip=("bg",))["iou_3d"])
