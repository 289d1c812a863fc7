"""The one warm-up + cosine schedule against the closed forms of the three recipes it stands for."""

import math

import pytest
import torch

from agreement.schedules import WarmupCosineSchedule, warmup_cosine


def pretraining(step, warmup, total, final):
    if step < warmup:
        return step / warmup
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def finetuning(step, warmup, total):
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def dassl(epoch, warmup, max_epochs, factor):
    if epoch < warmup:
        return factor
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max_epochs))


def test_the_three_recipes_are_settings_of_one_schedule():
    for step in range(60):
        assert warmup_cosine(step, 10, 50, 0.001) == pretraining(step, 10, 50, 0.001)
        assert warmup_cosine(step, 10, 50, first_step_trains=True) == finetuning(step, 10, 50)
    for epoch in range(50):  # the epochs of a 50-epoch run
        constant = warmup_cosine(epoch, 1, 50, warmup="constant", constant_factor=0.01, decay_steps=50)
        assert constant == pytest.approx(dassl(epoch, 1, 50, 0.01), rel=1e-15)
    assert warmup_cosine(0, 10, 50) == 0.0 and warmup_cosine(0, 10, 50, first_step_trains=True) == 1 / 11
    assert warmup_cosine(0, 0, 50) == 1.0 and warmup_cosine(50, 0, 50, final_ratio=0.1) == pytest.approx(0.1)
    # Dassl's decay spans the whole run, so the last epoch keeps some of the rate.
    assert warmup_cosine(49, 1, 50, warmup="constant", constant_factor=0.01, decay_steps=50) > 0.001


def test_scheduler_steps_the_optimizer_and_restores_from_its_state():
    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        return optimizer, WarmupCosineSchedule(optimizer, 3, 10, final_ratio=0.1)

    optimizer, scheduler = make()
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2.0 * warmup_cosine(s, 3, 10, 0.1) for s in range(6)])
    again_optimizer, again = make()
    again.load_state_dict(scheduler.state_dict())
    again_optimizer.load_state_dict(optimizer.state_dict())
    again.step()
    scheduler.step()
    assert again_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="warmup must be 'linear' or 'constant'"):
        WarmupCosineSchedule(optimizer, 1, 10, warmup="step")
