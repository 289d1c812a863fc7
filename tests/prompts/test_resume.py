"""Bit-exact resume of prompt tuning (PromptSRC with GPA) from a checkpoint written mid-epoch, and the few-shot
CLI's ``--ckpt_path last``."""

import signal

import pytest
import pytorch_lightning as pl
import torch

from agreement.runs import UNFINISHED, ExactResume, RunCheckpoint, RunInterrupted
from prompts.data import FewShotDataModule
from prompts.fewshot import main
from prompts.module import PromptSRC
from tests.helpers.resume import FinalState, SignalAt, differences
from tests.prompts.test_cli import _args
from tests.prompts.tiny import TINY, make_image_folder


def _fit(root, folder, callbacks=(), ckpt_path=None, seed=0):
    # The frozen CLIP weights are not in checkpoints (they come from the model's weights file; here a random
    # initialisation), so every run builds the model from the same seed; ``seed`` then seeds the training.
    pl.seed_everything(0)
    model = PromptSRC(model_name=TINY, text_depth=2, vision_depth=2, gpa_mean=2.5, gpa_std=1.0, lr=0.05)
    # 3 classes x 2 shots in batches of 2: 3 steps per epoch, 3 epochs.
    data = FewShotDataModule("imagefolder", str(root), num_shots=2, seed=1, subsample="all", batch_size=2)
    final = FinalState()
    pl.seed_everything(seed)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ExactResume(), final, *callbacks, RunCheckpoint(folder, every_n_steps=0)],
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    final.state["gpa"] = model.aggregator.state_dict()
    final.state["prompts"] = {k: v.detach().clone() for k, v in model.model.prompt_parameters().items()}
    return final


def test_prompt_tuning_stopped_mid_epoch_resumes_exactly(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=["cat", "dog", "tree"], per_split=(2, 1, 1))
    straight = _fit(root, tmp_path / "a")
    assert len(straight.losses) == 9 and straight.state["gpa"]["epochs"] == [1, 2, 3]

    with pytest.raises(RunInterrupted) as stopped:  # after step 4: epoch 2, batch 1 of 3
        _fit(root, tmp_path / "b", [SignalAt(4, signal.SIGINT)])
    assert stopped.value.code == 128 + signal.SIGINT
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4 and saved["gpa"]["epochs"] == [1]

    resumed = _fit(root, tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"), seed=7)
    assert differences(straight.state, resumed.state) == []
    assert torch.equal(torch.stack(resumed.losses), torch.stack(straight.losses[4:]))


def test_fewshot_cli_resumes_with_ckpt_path_last(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split=(2, 1, 2))
    # One step per epoch, 3 epochs; SIGTERM during the first epoch's last step: the checkpoint is the epoch end's.
    args = _args(tmp_path, root, "--seeds=[1]", "--trainer.max_epochs=3", "--checkpoint_every_n_steps=1")
    with pytest.raises(RunInterrupted):
        main([*args, "--trainer.callbacks+=tests.helpers.resume.SignalAt", "--trainer.callbacks.step=1"])
    run, pair = tmp_path / "run", tmp_path / "run" / "shots2_seed1"
    assert "Stopped by SIGTERM in shots2_seed1 after step 1" in (run / UNFINISHED).read_text()
    assert (pair / UNFINISHED).is_file() and not (pair / "prompts.safetensors").exists()
    assert not (run / "results.json").exists()

    with pytest.raises(FileExistsError, match="already holds a run"):
        main(args)  # a new run must not overwrite the stopped one
    with pytest.raises(ValueError, match=r"trainer\.max_epochs: checkpoint 3, now 4"):
        main([*args, "--ckpt_path=last", "--trainer.max_epochs=4"])

    summary = main([*args, "--ckpt_path=last"])
    assert not (run / UNFINISHED).exists() and not (pair / UNFINISHED).exists()
    assert (pair / "prompts.safetensors").is_file() and (run / "results.json").is_file()
    assert torch.load(pair / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    steps = [line.split(",") for line in (pair / "metrics.csv").read_text().splitlines()]
    assert summary["table"][0]["seeds"] == 1 and len(steps) > 1
