import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agreement.losses import (
    deepcluster_loss,
    feature_agreement,
    kl_agreement,
    masked_embedding_regression,
    swav_loss,
)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _codes(batch: int, k: int) -> torch.Tensor:
    return torch.softmax(torch.randn(batch, k, dtype=torch.float64) * 3, dim=1)


# ----------------------------------------------------------------------------------------------- swav_loss


def _np_swav(scores, codes, tau):
    total, pairs = 0.0, 0
    for s, q in enumerate(codes):
        for t, x in enumerate(scores):
            if t == s:
                continue
            log_p = _np_log_softmax(x.numpy() / tau)
            total += -(q.numpy() * log_p).sum(axis=1).mean()
            pairs += 1
    return total / pairs


def test_swav_loss_two_views_matches_hand_formula():
    x0, x1 = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    q0, q1 = _codes(4, 5), _codes(4, 5)
    tau = 0.1
    loss = swav_loss([x0, x1], [q0, q1], temperature=tau)
    # Written out: q0 supervises view 1 and q1 supervises view 0, averaged over the two pairs.
    ce_01 = -(q0.numpy() * _np_log_softmax(x1.numpy() / tau)).sum(1).mean()
    ce_10 = -(q1.numpy() * _np_log_softmax(x0.numpy() / tau)).sum(1).mean()
    np.testing.assert_allclose(loss.item(), 0.5 * (ce_01 + ce_10), rtol=1e-12)


def test_swav_loss_three_views_averages_over_six_pairs():
    scores = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    codes = [_codes(3, 4) for _ in range(3)]
    loss = swav_loss(scores, codes, temperature=0.5)
    np.testing.assert_allclose(loss.item(), _np_swav(scores, codes, 0.5), rtol=1e-12)


def test_swav_loss_codes_for_first_views_only():
    scores = [torch.randn(3, 4, dtype=torch.float64) for _ in range(4)]
    codes = [_codes(3, 4) for _ in range(2)]
    loss = swav_loss(scores, codes, temperature=0.2)
    # 2 code views x 3 other views each = 6 pairs.
    np.testing.assert_allclose(loss.item(), _np_swav(scores, codes, 0.2), rtol=1e-12)


def test_swav_loss_gradient_flows_to_scores_not_codes():
    scores = [torch.randn(4, 6, requires_grad=True) for _ in range(2)]
    codes = [_codes(4, 6).float().requires_grad_() for _ in range(2)]
    swav_loss(scores, codes).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in scores)
    assert all(q.grad is None for q in codes)


def test_swav_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"codes\[1\] has shape"):
        swav_loss([torch.randn(4, 5), torch.randn(4, 5)], [_codes(4, 5), _codes(3, 5)])


def test_swav_loss_rejects_single_view():
    with pytest.raises(ValueError, match="at least 2 views"):
        swav_loss([torch.randn(4, 5)], [_codes(4, 5)])


def test_swav_loss_rejects_too_many_codes():
    with pytest.raises(ValueError, match="code tensors"):
        swav_loss([torch.randn(4, 5)] * 2, [_codes(4, 5)] * 3)


def test_swav_loss_rejects_codes_that_are_not_distributions():
    with pytest.raises(ValueError, match="rows summing to 1"):
        swav_loss([torch.randn(4, 5)] * 2, [_codes(4, 5), torch.rand(4, 5) * 3])


def test_swav_loss_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature must be a positive"):
        swav_loss([torch.randn(4, 5)] * 2, [_codes(4, 5)] * 2, temperature=0.0)


# ----------------------------------------------------------------------------------------- deepcluster_loss


def test_deepcluster_loss_equals_cross_entropy_averaged_over_heads():
    scores = [torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)]
    targets = torch.stack([torch.randint(0, 3, (6,)), torch.randint(0, 5, (6,))])
    tau = 0.1
    loss = deepcluster_loss(scores, targets, temperature=tau)
    expected = 0.5 * sum(F.cross_entropy(x / tau, t) for x, t in zip(scores, targets))
    torch.testing.assert_close(loss, expected)
    by_hand = np.mean(
        [-_np_log_softmax(x.numpy() / tau)[np.arange(6), t.numpy()].mean() for x, t in zip(scores, targets)]
    )
    np.testing.assert_allclose(loss.item(), by_hand, rtol=1e-12)


def test_deepcluster_loss_skips_ignored_targets():
    scores = [torch.randn(5, 4, dtype=torch.float64, requires_grad=True)]
    targets = torch.tensor([[1, -100, 3, -100, 0]])
    loss = deepcluster_loss(scores, targets, temperature=0.5)
    keep = targets[0] != -100
    torch.testing.assert_close(loss, F.cross_entropy(scores[0][keep] / 0.5, targets[0][keep]))
    loss.backward()
    assert torch.all(scores[0].grad[~keep] == 0)


def test_deepcluster_loss_all_ignored_is_zero_and_attached():
    scores = [torch.randn(3, 4, requires_grad=True)]
    loss = deepcluster_loss(scores, torch.full((1, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(scores[0].grad == 0)


def test_deepcluster_loss_rejects_head_count_mismatch():
    with pytest.raises(ValueError, match="2 heads of scores but 1 rows"):
        deepcluster_loss([torch.randn(4, 3), torch.randn(4, 3)], torch.zeros(1, 4, dtype=torch.long))


def test_deepcluster_loss_rejects_batch_mismatch():
    with pytest.raises(ValueError, match=r"scores\[0\] must be \(N=4, K\)"):
        deepcluster_loss([torch.randn(5, 3)], torch.zeros(1, 4, dtype=torch.long))


def test_deepcluster_loss_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        deepcluster_loss([torch.randn(2, 3)], torch.tensor([[0, 3]]))


def test_deepcluster_loss_rejects_float_targets():
    with pytest.raises(ValueError, match="integer tensor"):
        deepcluster_loss([torch.randn(2, 3)], torch.zeros(1, 2))


# --------------------------------------------------------------------------------------------- kl_agreement


def _np_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row, from the definition."""
    log_p, log_q = _np_log_softmax(p_logits), _np_log_softmax(q_logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def test_kl_directions_match_the_definition():
    student, teacher = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    s, t = student.numpy(), teacher.numpy()
    t_to_s = kl_agreement(student, teacher, "teacher_to_student", reduction="none")
    s_to_t = kl_agreement(student, teacher, "student_to_teacher", reduction="none")
    sym = kl_agreement(student, teacher, "symmetric", reduction="none")
    np.testing.assert_allclose(t_to_s.numpy(), _np_kl(t, s), rtol=1e-10)
    np.testing.assert_allclose(s_to_t.numpy(), _np_kl(s, t), rtol=1e-10)
    np.testing.assert_allclose(sym.numpy(), 0.5 * (_np_kl(t, s) + _np_kl(s, t)), rtol=1e-10)
    assert not np.allclose(t_to_s.numpy(), s_to_t.numpy())


def test_kl_teacher_to_student_follows_kl_div_semantics():
    student, teacher = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    log_s, p_t = F.log_softmax(student, -1), F.softmax(teacher, -1)
    for reduction in ("batchmean", "sum"):
        torch.testing.assert_close(
            kl_agreement(student, teacher, reduction=reduction), F.kl_div(log_s, p_t, reduction=reduction)
        )
    # "none" keeps one value per distribution: kl_div's elementwise terms summed over classes.
    torch.testing.assert_close(
        kl_agreement(student, teacher, reduction="none"), F.kl_div(log_s, p_t, reduction="none").sum(-1)
    )
    # The other direction is kl_div with the roles swapped.
    torch.testing.assert_close(
        kl_agreement(student, teacher, "student_to_teacher"),
        F.kl_div(F.log_softmax(teacher, -1), F.softmax(student, -1), reduction="batchmean"),
    )


def test_kl_mean_averages_over_distributions_and_batchmean_over_dim0():
    student, teacher = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    per_row = _np_kl(teacher.numpy(), student.numpy())
    np.testing.assert_allclose(kl_agreement(student, teacher, reduction="mean").item(), per_row.mean())
    np.testing.assert_allclose(
        kl_agreement(student, teacher, reduction="batchmean").item(), per_row.sum() / 2
    )
    np.testing.assert_allclose(kl_agreement(student, teacher, reduction="sum").item(), per_row.sum())


def test_kl_temperature_and_squared_scaling():
    student, teacher = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    T = 4.0
    expected = _np_kl(teacher.numpy() / T, student.numpy() / T).sum() / 3
    np.testing.assert_allclose(kl_agreement(student, teacher, temperature=T).item(), expected, rtol=1e-10)
    scaled = kl_agreement(student, teacher, temperature=T, scale_by_temperature_squared=True)
    np.testing.assert_allclose(scaled.item(), expected * T**2, rtol=1e-10)


def test_kl_is_zero_for_equal_logits_and_differentiable():
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5)
    assert kl_agreement(teacher.clone(), teacher).abs().item() < 1e-6
    kl_agreement(student, teacher, "symmetric").backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_kl_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="must have the same shape"):
        kl_agreement(torch.randn(3, 5), torch.randn(3, 4))


def test_kl_rejects_unknown_direction():
    with pytest.raises(ValueError, match="direction must be one of"):
        kl_agreement(torch.randn(3, 5), torch.randn(3, 5), direction="forward")


def test_kl_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction must be one of"):
        kl_agreement(torch.randn(3, 5), torch.randn(3, 5), reduction="avg")


def test_kl_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature must be a positive"):
        kl_agreement(torch.randn(3, 5), torch.randn(3, 5), temperature=-1.0)


# ---------------------------------------------------------------------------------------- feature_agreement


def test_feature_agreement_kinds_match_numpy():
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    an, bn = a.numpy(), b.numpy()
    cos = (an * bn).sum(1) / (np.linalg.norm(an, axis=1) * np.linalg.norm(bn, axis=1))
    expected = {
        "l1": np.abs(an - bn),
        "mse": (an - bn) ** 2,
        "l2": np.linalg.norm(an - bn, axis=1),
        "cosine": 1.0 - cos,
    }
    for kind, values in expected.items():
        np.testing.assert_allclose(feature_agreement(a, b, kind, "none").numpy(), values, rtol=1e-10)
        np.testing.assert_allclose(feature_agreement(a, b, kind, "mean").item(), values.mean(), rtol=1e-10)
        np.testing.assert_allclose(feature_agreement(a, b, kind, "sum").item(), values.sum(), rtol=1e-10)


def test_feature_agreement_is_differentiable_and_zero_for_identical_inputs():
    a = torch.randn(2, 5, requires_grad=True)
    b = torch.randn(2, 5)
    for kind in ("l1", "l2", "mse", "cosine"):
        assert feature_agreement(b, b.clone(), kind).abs().item() < 1e-6
        a.grad = None
        feature_agreement(a, b, kind).backward()
        assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_feature_agreement_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"shapes \(2, 3\) and \(2, 4\) differ"):
        feature_agreement(torch.randn(2, 3), torch.randn(2, 4))


def test_feature_agreement_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        feature_agreement(torch.randn(2, 3), torch.randn(2, 3), kind="huber")


def test_feature_agreement_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction must be"):
        feature_agreement(torch.randn(2, 3), torch.randn(2, 3), reduction="batchmean")


# ------------------------------------------------------------------------------ masked_embedding_regression


def test_masked_regression_matches_numpy_over_masked_positions():
    predictions = torch.randn(2, 4, 3, dtype=torch.float64)
    targets = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    diff = (predictions - targets).numpy()[mask.numpy()]
    abs_diff = np.abs(diff)
    expected = {
        "mse": (diff**2).mean(),
        "l1": abs_diff.mean(),
        "smooth_l1": np.where(abs_diff < 0.5, 0.5 * diff**2 / 0.5, abs_diff - 0.25).mean(),
    }
    for kind, value in expected.items():
        loss = masked_embedding_regression(predictions, targets, mask, kind=kind, beta=0.5)
        np.testing.assert_allclose(loss.item(), value, rtol=1e-10)


def test_masked_regression_ignores_unmasked_positions():
    predictions = torch.randn(2, 5, 3, requires_grad=True)
    targets = torch.randn(2, 5, 3)
    mask = torch.rand(2, 5) > 0.5
    mask[0, 0], mask[1, 1] = True, False
    loss = masked_embedding_regression(predictions, targets, mask)
    changed_targets = targets.clone()
    changed_targets[~mask] += 100.0
    with torch.no_grad():
        changed_predictions = predictions.clone()
        changed_predictions[~mask] -= 100.0
    torch.testing.assert_close(masked_embedding_regression(predictions, changed_targets, mask), loss)
    torch.testing.assert_close(masked_embedding_regression(changed_predictions, targets, mask), loss)
    loss.backward()
    assert torch.all(predictions.grad[~mask] == 0)
    assert predictions.grad[mask].abs().sum() > 0


def test_masked_regression_sends_no_gradient_into_targets():
    predictions = torch.randn(2, 3, 4, requires_grad=True)
    targets = torch.randn(2, 3, 4, requires_grad=True)
    masked_embedding_regression(predictions, targets, torch.ones(2, 3, dtype=torch.bool)).backward()
    assert targets.grad is None
    assert predictions.grad is not None


def test_masked_regression_empty_mask_is_zero():
    predictions = torch.randn(1, 3, 2, requires_grad=True)
    loss = masked_embedding_regression(predictions, torch.randn(1, 3, 2), torch.zeros(1, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(predictions.grad == 0)


def test_masked_regression_rejects_target_shape_mismatch():
    with pytest.raises(ValueError, match="must match predictions"):
        masked_embedding_regression(
            torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool)
        )


def test_masked_regression_rejects_bad_mask():
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        masked_embedding_regression(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3))


def test_masked_regression_rejects_non_3d_predictions():
    with pytest.raises(ValueError, match=r"predictions must be \(B, N, D\)"):
        masked_embedding_regression(torch.randn(6, 4), torch.randn(6, 4), torch.ones(6, dtype=torch.bool))


def test_masked_regression_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        masked_embedding_regression(
            torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), kind="cosine"
        )
