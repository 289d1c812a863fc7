"""PromptSRC's loss terms as pure functions (the paper's self-regulating constraints).

Notation: ``z_p`` prompted logits (B, C), ``z`` frozen logits (B, C), ``g_p``/``g`` prompted/frozen text features
(C, D), ``f_p``/``f`` prompted/frozen image features (B, D). Features are L2-normalised here, as in the official
code; frozen inputs are treated as constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agreement.losses import feature_agreement, kl_agreement


def scl_feature_loss(prompted: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the normalised features: ``mean_{i,d} |norm(a)_id - norm(b)_id|``."""
    return feature_agreement(
        F.normalize(prompted.float(), dim=-1), F.normalize(frozen.detach().float(), dim=-1), kind="l1"
    )


def scl_logits_loss(prompted_logits: torch.Tensor, frozen_logits: torch.Tensor) -> torch.Tensor:
    """KL(frozen || prompted) summed over the batch and classes and divided by B*C (the official scaling,
    not "batchmean")."""
    total = kl_agreement(
        prompted_logits,
        frozen_logits.detach(),
        direction="teacher_to_student",
        reduction="sum",
        temperature=1.0,
    )
    return total / prompted_logits.numel()


def promptsrc_loss(
    prompted_logits: torch.Tensor,
    labels: torch.Tensor,
    prompted_text: torch.Tensor | None = None,
    frozen_text: torch.Tensor | None = None,
    prompted_image: torch.Tensor | None = None,
    frozen_image: torch.Tensor | None = None,
    frozen_logits: torch.Tensor | None = None,
    text_weight: float = 25.0,
    image_weight: float = 10.0,
    logits_weight: float = 1.0,
    ce_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``ce_weight * CE + text_weight * L1(g_p, g) + image_weight * L1(f_p, f) + logits_weight * KL(z || z_p)/(BC)``.

    A term is skipped when its weight is 0 or its inputs are ``None`` (ablations). Returns every computed term
    (unweighted) and ``"loss"``, the weighted total.
    """
    out: dict[str, torch.Tensor] = {}
    total = prompted_logits.new_zeros((), dtype=torch.float32)
    if ce_weight:
        out["ce"] = F.cross_entropy(prompted_logits.float(), labels)
        total = total + ce_weight * out["ce"]
    if text_weight and prompted_text is not None and frozen_text is not None:
        out["scl_text"] = scl_feature_loss(prompted_text, frozen_text)
        total = total + text_weight * out["scl_text"]
    if image_weight and prompted_image is not None and frozen_image is not None:
        out["scl_image"] = scl_feature_loss(prompted_image, frozen_image)
        total = total + image_weight * out["scl_image"]
    if logits_weight and frozen_logits is not None:
        out["scl_logits"] = scl_logits_loss(prompted_logits, frozen_logits)
        total = total + logits_weight * out["scl_logits"]
    out["loss"] = total
    return out


def kgcoop_loss(prompted_text: torch.Tensor, hand_crafted_text: torch.Tensor) -> torch.Tensor:
    """KgCoOp's knowledge-guided term: ``1 - mean_c cos(g_p[c], g_hand[c])``."""
    return feature_agreement(prompted_text, hand_crafted_text.detach(), kind="cosine")
