"""``scripts/finetune.py`` stopped by a signal resumes in its run folder with ``--ckpt_path last``."""

import json

import pytest
import torch

from agreement.runs import UNFINISHED, RunInterrupted
from ssl3d.finetune.cli import main
from tests.finetune.helpers import make_encoder, segmentation_args, write_datalist


def test_stopped_fine_tuning_resumes_with_ckpt_path_last(tmp_path):
    datalist = write_datalist(tmp_path / "data", train=2, val=1, test=1)
    run = tmp_path / "run"
    args = [
        f"--run_dir={run}",
        *segmentation_args(datalist, make_encoder(tmp_path / "enc")),
        "--compare_random=false",
        "--trainer.max_epochs=2",
        "--checkpoint_every_n_steps=1",
    ]
    with pytest.raises(RunInterrupted) as stopped:
        main([*args, "--trainer.callbacks+=tests.helpers.resume.SignalAt", "--trainer.callbacks.step=1"])
    assert stopped.value.code == 143
    folder = run / "pretrained"
    assert "Stopped by SIGTERM in pretrained" in (run / UNFINISHED).read_text()
    assert (folder / UNFINISHED).is_file() and not (folder / "results.json").exists()
    with pytest.raises(FileExistsError, match="already holds a run"):
        main(args)

    summary = main([*args, "--ckpt_path=last"])
    assert not (run / UNFINISHED).exists() and not (folder / UNFINISHED).exists()
    results = json.loads((folder / "results.json").read_text())
    steps = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert steps == summary["variants"][0]["steps"] == results["steps"] > 1
    assert results["best_checkpoint"]  # the best-epoch tracking survived the stop
