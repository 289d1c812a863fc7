"""Agreement losses: SwAV's swapped prediction, DeepCluster-V2's cross entropy against k-means assignments, KL
between two predicted distributions, feature-level agreement and masked embedding regression.

All are pure functions of their inputs, differentiable, and raise ``ValueError`` on inconsistent shapes or
arguments. Logits are evaluated in float32 (or float64 if given) so that half-precision inputs stay stable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_REDUCTIONS = ("batchmean", "sum", "mean", "none")
_DIRECTIONS = ("teacher_to_student", "student_to_teacher", "symmetric")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check_temperature(temperature: float, owner: str) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"{owner}: temperature must be a positive number, got {temperature!r}")


def swav_loss(
    scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float = 0.1
) -> torch.Tensor:
    """SwAV's swapped prediction loss.

    ``scores[t]`` (B, K) are the prototype scores of view ``t``; ``codes[s]`` (B, K) are the soft assignments
    (Sinkhorn codes, rows summing to 1) of view ``s``, treated as constants. ``codes`` may cover only the first
    views (SwAV computes codes for the two large crops and predicts them from every crop, small ones included).
    The codes of each view ``s`` supervise the predictions of every other view ``t != s``::

        loss = mean over pairs (s, t != s) of  -1/B sum_i sum_k codes[s][i, k] * log_softmax(scores[t][i] / T)[k]
    """
    _check_temperature(temperature, "swav_loss")
    scores, codes = list(scores), list(codes)
    if len(scores) < 2:
        raise ValueError(f"swav_loss: need scores for at least 2 views, got {len(scores)}")
    if not 1 <= len(codes) <= len(scores):
        raise ValueError(
            f"swav_loss: need between 1 and {len(scores)} code tensors (one per view), got {len(codes)}"
        )
    shape = tuple(scores[0].shape)
    if len(shape) != 2:
        raise ValueError(f"swav_loss: scores must be (B, K), got shape {shape}")
    for name, tensors in (("scores", scores), ("codes", codes)):
        for v, tensor in enumerate(tensors):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"swav_loss: {name}[{v}] has shape {tuple(tensor.shape)}, expected {shape}")
    codes = [_upcast(q.detach()) for q in codes]
    for s, q in enumerate(codes):
        if (q < 0).any() or not torch.allclose(q.sum(1), torch.ones_like(q[:, 0]), atol=1e-2):
            raise ValueError(f"swav_loss: codes[{s}] must be non-negative with rows summing to 1")
    log_probs = [F.log_softmax(_upcast(x) / temperature, dim=1) for x in scores]
    total = scores[0].new_zeros((), dtype=log_probs[0].dtype)
    pairs = 0
    for s, q in enumerate(codes):
        for t, log_p in enumerate(log_probs):
            if t != s:
                total = total - (q * log_p).sum(1).mean()
                pairs += 1
    return total / pairs


def deepcluster_loss(
    scores: Sequence[torch.Tensor],
    targets: torch.Tensor,
    temperature: float = 0.1,
    ignore_index: int = -100,
) -> torch.Tensor:
    """DeepCluster-V2's loss: cross entropy of ``scores[h] / T`` against k-means assignments, averaged over heads.

    ``scores[h]`` is (N, K_h) with N = views * batch; ``targets`` is (H, N) cluster indices (``ignore_index`` marks
    samples without an assignment yet). A head whose targets are all ignored contributes nothing; the average runs
    over the heads that have at least one target (zero, still attached to the graph, if none has).
    """
    _check_temperature(temperature, "deepcluster_loss")
    scores = list(scores)
    if not scores:
        raise ValueError("deepcluster_loss: need scores for at least one head")
    if not isinstance(targets, torch.Tensor) or targets.ndim != 2:
        raise ValueError("deepcluster_loss: targets must be a 2-D (heads, N) tensor")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"deepcluster_loss: targets must be an integer tensor, got {targets.dtype}")
    if targets.shape[0] != len(scores):
        raise ValueError(
            f"deepcluster_loss: {len(scores)} heads of scores but {targets.shape[0]} rows of targets"
        )
    for h, x in enumerate(scores):
        if x.ndim != 2 or x.shape[0] != targets.shape[1]:
            raise ValueError(
                f"deepcluster_loss: scores[{h}] must be (N={targets.shape[1]}, K), got shape {tuple(x.shape)}"
            )
    losses = []
    for h, x in enumerate(scores):
        target = targets[h].to(device=x.device, dtype=torch.long)
        valid = target[target != ignore_index]
        if valid.numel() == 0:
            continue
        if int(valid.min()) < 0 or int(valid.max()) >= x.shape[1]:
            raise ValueError(
                f"deepcluster_loss: targets[{h}] must lie in [0, {x.shape[1]}) or equal ignore_index={ignore_index}"
            )
        losses.append(F.cross_entropy(_upcast(x) / temperature, target, ignore_index=ignore_index))
    if not losses:
        return sum(_upcast(x).sum() for x in scores) * 0.0
    return torch.stack(losses).mean()


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row (class dimension last): sum_k p_k (log p_k - log q_k)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_agreement(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    direction: str = "teacher_to_student",
    reduction: str = "batchmean",
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
) -> torch.Tensor:
    """KL divergence between ``p_s = softmax(student_logits / T)`` and ``p_t = softmax(teacher_logits / T)``.

    The class dimension is the last one. ``direction``:

    - ``"teacher_to_student"``: KL(p_t || p_s) = sum_k p_t (log p_t - log p_s), the distillation loss, equal to
      ``F.kl_div(log p_s, p_t)``;
    - ``"student_to_teacher"``: KL(p_s || p_t) = sum_k p_s (log p_s - log p_t);
    - ``"symmetric"``: the mean of the two.

    ``reduction`` (the class dimension is always summed, since a per-class term is not a divergence):
    ``"none"`` gives one value per distribution (shape ``logits.shape[:-1]``); ``"sum"`` the total; ``"batchmean"``
    the total divided by ``logits.shape[0]`` (``"sum"`` and ``"batchmean"`` equal ``F.kl_div``'s); ``"mean"`` the
    average over all distributions (``F.kl_div``'s ``"mean"`` would also divide by the number of classes).

    No input is detached: detach the teacher if it must not receive gradient. With
    ``scale_by_temperature_squared`` the result is multiplied by T^2, which keeps gradient magnitudes comparable
    across temperatures (Hinton et al.'s distillation).
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"kl_agreement: direction must be one of {_DIRECTIONS}, got {direction!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"kl_agreement: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_temperature(temperature, "kl_agreement")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kl_agreement: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if student_logits.ndim < 1 or student_logits.shape[-1] == 0:
        raise ValueError("kl_agreement: logits need a non-empty class dimension (the last one)")
    log_s = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_t = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    if direction == "teacher_to_student":
        per_row = _kl_rows(log_t, log_s)
    elif direction == "student_to_teacher":
        per_row = _kl_rows(log_s, log_t)
    else:
        per_row = 0.5 * (_kl_rows(log_t, log_s) + _kl_rows(log_s, log_t))
    if reduction == "sum":
        out = per_row.sum()
    elif reduction == "batchmean":
        out = per_row.sum() / (student_logits.shape[0] if student_logits.ndim > 1 else 1)
    elif reduction == "mean":
        out = per_row.mean()
    else:
        out = per_row
    return out * temperature**2 if scale_by_temperature_squared else out


def feature_agreement(
    a: torch.Tensor, b: torch.Tensor, kind: str = "mse", reduction: str = "mean"
) -> torch.Tensor:
    """Distance between two feature tensors of the same shape (features in the last dimension).

    ``kind``: ``"l1"`` |a - b| and ``"mse"`` (a - b)^2 are elementwise; ``"l2"`` is the Euclidean distance
    ||a - b||_2 and ``"cosine"`` is 1 - cos(a, b), both per feature vector. ``reduction="none"`` returns those
    values (shape of ``a`` for l1/mse, ``a.shape[:-1]`` for l2/cosine); ``"mean"``/``"sum"`` reduce them.
    """
    kinds = ("l1", "l2", "mse", "cosine")
    if kind not in kinds:
        raise ValueError(f"feature_agreement: kind must be one of {kinds}, got {kind!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"feature_agreement: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if a.shape != b.shape:
        raise ValueError(f"feature_agreement: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    if a.ndim < 1:
        raise ValueError("feature_agreement: inputs need at least one (feature) dimension")
    a, b = _upcast(a), _upcast(b)
    if kind == "l1":
        values = (a - b).abs()
    elif kind == "mse":
        values = (a - b).square()
    elif kind == "l2":
        values = torch.linalg.vector_norm(a - b, dim=-1)
    else:
        values = 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def masked_embedding_regression(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "mse",
    beta: float = 1.0,
) -> torch.Tensor:
    """Regress ``predictions`` (B, N, D) onto ``targets`` (B, N, D) at the positions where ``mask`` (B, N) is True.

    The elementwise loss (``"mse"``, ``"l1"`` or ``"smooth_l1"`` with threshold ``beta``) is averaged over the
    feature dimension and the masked positions only; unmasked positions get no gradient and targets are detached
    (they come from a teacher). With no masked position the loss is zero, still attached to the graph.
    """
    kinds = ("mse", "l1", "smooth_l1")
    if kind not in kinds:
        raise ValueError(f"masked_embedding_regression: kind must be one of {kinds}, got {kind!r}")
    if predictions.ndim != 3:
        raise ValueError(
            f"masked_embedding_regression: predictions must be (B, N, D), got shape {tuple(predictions.shape)}"
        )
    if targets.shape != predictions.shape:
        raise ValueError(
            f"masked_embedding_regression: targets {tuple(targets.shape)} must match predictions "
            f"{tuple(predictions.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape != predictions.shape[:2]:
        raise ValueError(
            f"masked_embedding_regression: mask must be a bool tensor of shape {tuple(predictions.shape[:2])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if kind == "smooth_l1" and not beta > 0:
        raise ValueError(f"masked_embedding_regression: beta must be positive, got {beta!r}")
    mask = mask.to(predictions.device)
    selected = _upcast(predictions[mask])
    if selected.shape[0] == 0:
        return _upcast(predictions).sum() * 0.0
    wanted = _upcast(targets.detach().to(predictions.device)[mask])
    if kind == "mse":
        return F.mse_loss(selected, wanted)
    if kind == "l1":
        return F.l1_loss(selected, wanted)
    return F.smooth_l1_loss(selected, wanted, beta=beta)
