"""Bit-exact resume of the pretraining module: a run stopped at any step (mid-epoch too) and resumed ends with the
same weights, optimizer and scheduler state, memory banks, k-means assignments, queues and random generators as an
uninterrupted run."""

import signal

import pytest
import pytorch_lightning as pl
import torch

from agreement.runs import ExactResume, RunCheckpoint, RunInterrupted
from ssl3d.module import JointSSL
from tests.helpers.resume import FinalState, KeepCheckpoints, SignalAt, differences, max_abs_difference
from tests.ssl3d.tiny import TINY_MODEL, TINY_SWAV, TinyDataModule

# 8 volume samples in batches of 2 and 12 slices in batches of 6: an epoch is 4 steps and the 2D loader, 2 batches
# long, is cycled in every epoch (a second pass with another order).
EPOCHS, STEPS_PER_EPOCH = 2, 4


def _fit(folder, config, callbacks=(), ckpt_path=None, every_n_steps=0, seed=0):
    pl.seed_everything(seed)
    final = FinalState()
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=2.0,
        callbacks=[ExactResume(), final, *callbacks, RunCheckpoint(folder, every_n_steps=every_n_steps)],
    )
    trainer.fit(JointSSL(**config), TinyDataModule(volumes=8, slices=12), ckpt_path=ckpt_path)
    return final


@pytest.mark.parametrize(
    ("clustering", "extra"), [("deepcluster", {}), ("swav", {**TINY_SWAV, "queue_length": 12})]
)
def test_stopped_and_resumed_runs_end_exactly_like_an_uninterrupted_one(tmp_path, clustering, extra):
    config = {**TINY_MODEL, **extra, "clustering": clustering}
    straight = _fit(tmp_path / "a", config, [KeepCheckpoints(tmp_path / "a")], every_n_steps=3)
    assert len(straight.losses) == EPOCHS * STEPS_PER_EPOCH
    # Periodic checkpoints after steps 3 (the 2D loader one batch into its second pass) and 6 (the 2D loader
    # just exhausted), and at the epoch ends (4 and 8).
    kept = sorted(p.name for p in (tmp_path / "a").glob("step*.ckpt"))
    assert kept == ["step3.ckpt", "step4.ckpt", "step6.ckpt", "step8.ckpt"]

    # SIGTERM, really sent to this process, after step 3.
    with pytest.raises(RunInterrupted) as stopped:
        _fit(tmp_path / "b", config, [SignalAt(3)])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["global_step"] == 3

    resumed_from = {
        "sigterm_step3": tmp_path / "b" / "last.ckpt",
        "epoch_end_step4": tmp_path / "a" / "step4.ckpt",
        "periodic_step6": tmp_path / "a" / "step6.ckpt",
    }
    for name, checkpoint in resumed_from.items():
        step = torch.load(checkpoint, weights_only=True)["global_step"]
        # A resumed run must not depend on the seed of the new process.
        resumed = _fit(tmp_path / name, config, ckpt_path=str(checkpoint), seed=123)
        assert differences(straight.state, resumed.state) == [], name
        assert max_abs_difference(straight.state["model"], resumed.state["model"]) == 0.0
        assert torch.equal(torch.stack(resumed.losses), torch.stack(straight.losses[step:])), name
    if clustering == "deepcluster":
        assert (resumed.state["model"]["clustering_2d.assignments"] >= 0).all()
    else:
        assert int(resumed.state["model"]["clustering_2d.queue.count"]) == 12
