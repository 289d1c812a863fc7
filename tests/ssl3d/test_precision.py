"""`--model.channels_last` and `--trainer.precision bf16-mixed` are options of the training recipe, not of its
results: over a few steps the losses and weights follow the fp32, contiguous run (exactly up to convolution
rounding for channels-last, within bf16's rounding for autocast), and each option is really in effect."""

import pytest
import pytorch_lightning as pl
import torch

from ssl3d.module import JointSSL
from tests.ssl3d.test_module import StepLosses, make_trainer
from tests.ssl3d.tiny import TINY_MODEL, TINY_SWAV, TinyDataModule


class InputLayouts(pl.Callback):
    """Records the memory format and dtype of the encoder's stem convolution output (its 1-channel input
    is contiguous in both formats)."""

    def __init__(self) -> None:
        self.channels_last: list[bool] = []
        self.dtypes: list[torch.dtype] = []

    def on_fit_start(self, trainer, pl_module):
        stem = next(m for m in pl_module.encoder.modules() if isinstance(m, torch.nn.Conv2d))

        def record(module, inputs, output):
            self.channels_last.append(output.is_contiguous(memory_format=torch.channels_last))
            self.dtypes.append(output.dtype)

        stem.register_forward_hook(record)


def train(tmp_path, steps=3, precision="32-true", **options):
    pl.seed_everything(0)
    model = JointSSL(clustering="swav", **(TINY_MODEL | TINY_SWAV | options))
    initial = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    losses, layouts = StepLosses(), InputLayouts()
    trainer = make_trainer(
        tmp_path, 1, [losses, layouts], enable_checkpointing=False, max_steps=steps, precision=precision
    )
    trainer.fit(model, TinyDataModule())
    updates = {
        k: v.detach().float() - initial[k].float()
        for k, v in model.encoder.state_dict().items()
        if v.is_floating_point() and "running" not in k
    }
    return losses.losses, updates, layouts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(tmp_path_factory.mktemp("fp32"))


def test_channels_last_gives_the_fp32_losses_and_weight_updates(tmp_path, reference):
    losses, updates, layouts = train(tmp_path, channels_last=True)
    ref_losses, ref_updates, ref_layouts = reference
    assert all(layouts.channels_last) and not any(ref_layouts.channels_last)
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    for key, value in ref_updates.items():
        torch.testing.assert_close(updates[key].contiguous(), value, rtol=1e-3, atol=1e-6, msg=key)


def test_bf16_autocast_follows_the_fp32_run_within_bf16_rounding(tmp_path, reference):
    losses, updates, layouts = train(tmp_path, precision="bf16-mixed")
    ref_losses, ref_updates, ref_layouts = reference
    assert set(layouts.dtypes) == {torch.bfloat16} and set(ref_layouts.dtypes) == {torch.float32}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses != ref_losses  # autocast really ran in bf16
    # bf16 keeps 8 significant bits (relative rounding 2**-8 ~ 0.4%): losses agree to about 2%.
    assert losses == pytest.approx(ref_losses, rel=0.02)

    # The weights made the same moves: the update of the whole encoder, and of every weight matrix or
    # convolution, points the fp32 update's way (biases and norms, with tiny updates, only in the whole).
    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    everything = [torch.cat([u[k].flatten() for k in ref_updates]) for u in (updates, ref_updates)]
    assert cosine(*everything) > 0.99
    weights = [key for key, value in ref_updates.items() if value.ndim >= 2]
    assert len(weights) > 10
    for key in weights:
        assert cosine(updates[key], ref_updates[key]) > 0.9, key
