import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from prompts.data import FewShotDataModule
from prompts.gpa import PromptAggregator, gpa_weights
from prompts.module import PromptSRC
from tests.prompts.tiny import TINY, make_image_folder


def test_weights_match_closed_form_and_reference_values():
    for n, mu, sigma in [(20, 15, 1), (20, 6, 10), (50, 30, 30), (50, 45, 5), (3, 1, 0.5)]:
        w = gpa_weights(n, mu, sigma)
        dens = [
            math.exp(-0.5 * ((e - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
            for e in range(1, n + 1)
        ]
        expected = [d / sum(dens) for d in dens]
        assert len(w) == n and math.isclose(sum(w), 1.0, rel_tol=1e-12)
        assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(w, expected))
    w = gpa_weights(20, 15, 1)
    assert w[14] == pytest.approx(0.3989, abs=1e-4) and w[13] == pytest.approx(0.2420, abs=1e-4)
    assert w[19] == pytest.approx(1.49e-6, rel=0.01)
    flat = gpa_weights(20, 6, 10)
    assert flat[0] == pytest.approx(0.0554, abs=1e-4) and flat[19] == pytest.approx(0.0236, abs=1e-4)
    with pytest.raises(ValueError):
        gpa_weights(0, 1, 1)


def test_aggregator_sums_in_float32_and_counts_each_epoch_once():
    agg = PromptAggregator(gpa_weights(3, 2, 1))
    tensors = [torch.full((2, 2), float(e), dtype=torch.float16) for e in (1, 2, 3)]
    for e, t in enumerate(tensors, start=1):
        agg.add(e, {"p": t})
        agg.add(e, {"p": t * 100})  # a second call for the same epoch is ignored
    expected = sum(w * e for w, e in zip(agg.weights, (1, 2, 3)))
    out = agg.aggregate()["p"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((2, 2), expected))
    copy = PromptAggregator(gpa_weights(3, 2, 1))
    copy.load_state_dict(agg.state_dict())
    torch.testing.assert_close(copy.aggregate()["p"], out)
    with pytest.raises(ValueError, match="other weights"):
        PromptAggregator(gpa_weights(4, 2, 1)).load_state_dict(agg.state_dict())


class _StopAfter(Callback):
    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _fit(data_root, ckpt_dir, max_epochs, stop_after=None, ckpt_path=None):
    pl.seed_everything(0)
    model = PromptSRC(model_name=TINY, text_depth=2, vision_depth=2, gpa_mean=2.5, gpa_std=1.0, lr=0.05)
    data = FewShotDataModule(
        "imagefolder", str(data_root), num_shots=2, seed=1, subsample="all", batch_size=2
    )
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)]
    if stop_after:
        callbacks.append(_StopAfter(stop_after))
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


def test_gpa_resume_is_exact(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=["cat", "dog", "tree"], per_split=(2, 1, 1))
    full = _fit(root, tmp_path / "a", max_epochs=4)
    assert full.aggregator.complete and full.aggregator.epochs == [1, 2, 3, 4]
    first = _fit(root, tmp_path / "b", max_epochs=4, stop_after=2)
    assert first.aggregator.epochs == [1, 2]
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert saved["gpa"]["epochs"] == [1, 2]
    assert not any(k.startswith("model.clip.") for k in saved["state_dict"])  # prompts only
    resumed = _fit(root, tmp_path / "c", max_epochs=4, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert resumed.aggregator.epochs == [1, 2, 3, 4]
    for name, value in full.model.prompt_parameters().items():
        torch.testing.assert_close(resumed.model.prompt_parameters()[name], value, rtol=0, atol=1e-6)
    # and the final prompts are the Gaussian-weighted aggregate, not the last epoch's prompts
    for name, value in full.aggregator.aggregate().items():
        torch.testing.assert_close(full.model.prompt_parameters()[name].detach(), value)
