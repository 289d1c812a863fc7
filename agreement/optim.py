"""The optimizer factory of every trainer: SGD + LARS (the pretraining recipe), SGD and AdamW, with parameter groups
that exempt biases and normalisation parameters (schedules are ``agreement.schedules``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from timm.optim import Lars


def parameter_groups(module: torch.nn.Module, exclude_bias_and_norm: bool = True) -> list[dict[str, Any]]:
    """The trainable parameters of ``module`` as optimizer groups.

    With ``exclude_bias_and_norm``, biases and normalisation parameters (every parameter with at most one
    dimension) go into a second group without weight decay and without LARS adaptation (``always_adapt`` off
    with zero decay makes timm's ``Lars`` skip the trust ratio), as solo-learn and BYOL do: their norms carry
    no scale information, and a LARS step proportional to a gamma near zero would leave it there.
    """
    weights, exempt = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (exempt if exclude_bias_and_norm and parameter.ndim <= 1 else weights).append(parameter)
    groups: list[dict[str, Any]] = [{"params": weights}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0, "always_adapt": False})
    return groups


def scaled_lr(lr: float, batch_size: int, reference_batch_size: int | None) -> float:
    """``lr`` per ``reference_batch_size`` samples scaled linearly to ``batch_size`` (SwAV/DeepCluster-V2's rule:
    base lr 0.6 per 256 images, 4.8 at 4096); ``lr`` itself when ``reference_batch_size`` is ``None``."""
    if reference_batch_size is None:
        return lr
    if reference_batch_size < 1 or batch_size < 1:
        raise ValueError(
            f"batch sizes must be positive, got batch {batch_size} and reference {reference_batch_size}"
        )
    return lr * batch_size / reference_batch_size


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    name: Literal["lars", "adamw", "sgd"] = "lars",
    lr: float = 0.01,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """SGD with LARS as in the official recipe (apex LARC without clipping, through timm's ``Lars``), or AdamW.

    Groups from :func:`parameter_groups` keep their own weight decay (and, for LARS, ``always_adapt``)."""
    if name == "lars":
        return Lars(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coeff=trust_coefficient,
            trust_clip=False,
            always_adapt=True,
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'lars', 'adamw' or 'sgd'")
