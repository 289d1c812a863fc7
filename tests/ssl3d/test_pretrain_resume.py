"""``scripts/pretrain.py`` stopped by a real SIGTERM resumes with ``--ckpt_path last`` and ends exactly like an
uninterrupted run; the run folder says it is unfinished until then, and impossible budgets fail before anything is
written."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agreement.inputs import load_state_dict_file
from agreement.runs import UNFINISHED
from ssl3d.finetune.cli import latest_encoder
from ssl3d.pretrain import main
from tests.ssl3d.test_pretrain_cli import TINY_ARGS

REPO = Path(__file__).resolve().parents[2]
PACE = ["--trainer.callbacks+=tests.helpers.resume.Pace", "--trainer.callbacks.seconds=2"]


def _args(tmp_path, run_dir):
    # 2 epochs of 2 steps; a checkpoint after every step.
    return [
        *TINY_ARGS,
        "--evaluate=false",
        "--checkpoint_every_n_steps=1",
        f"--run_dir={run_dir}",
        f"--data.demo_dir={tmp_path / 'demo'}",
    ]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("--trainer.max_epochs=0", "max_epochs must be at least 1, got 0"),
        ("--trainer.max_epochs=-1", "max_epochs must be at least 1"),
        ("--trainer.max_steps=0", "max_steps must be at least 1"),
        ("--trainer.limit_train_batches=0", "limit_train_batches=0.0 leaves no training batch"),
    ],
)
def test_impossible_budget_is_one_error_before_anything_is_written(tmp_path, setting, message):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="impossible pretraining budget") as error:
        main([*_args(tmp_path, run_dir), setting])
    assert message in str(error.value)
    assert not run_dir.exists() and not (tmp_path / "demo").exists()


def test_resume_arguments_that_cannot_work_are_errors(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        main([*_args(tmp_path, run_dir), "--ckpt_path=last"])
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        main([*_args(tmp_path, run_dir), f"--ckpt_path={tmp_path / 'missing.ckpt'}"])
    assert not run_dir.exists()


@pytest.mark.slow
def test_sigterm_stops_a_run_that_resumes_exactly(tmp_path):
    # Run folders are named by time: an older uninterrupted run, and a newer one that is stopped and resumed.
    runs = tmp_path / "runs"
    reference = runs / "20000101-000000"
    assert main(_args(tmp_path, reference))["steps"] == 4

    run_dir = runs / "20990101-000000"
    args = _args(tmp_path, run_dir)
    log = open(tmp_path / "stopped.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "pretrain.py"), *args, *PACE],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "last.ckpt").is_file() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    log.close()
    output = (tmp_path / "stopped.log").read_text()
    assert "SIGTERM received" in output, output[-3000:]

    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 1 <= stopped_at < 4
    assert f"Stopped by SIGTERM after step {stopped_at}" in (run_dir / UNFINISHED).read_text()
    assert not (run_dir / "encoder").exists()
    assert latest_encoder(runs) == reference / "encoder"  # the newest run is skipped until it has completed

    config = (run_dir / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"trainer\.max_epochs: checkpoint 2, now 3"):
        main([*args, "--ckpt_path=last", "--trainer.max_epochs=3"])
    with pytest.raises(FileExistsError, match="already holds a run"):
        main(args)
    assert (run_dir / "config.yaml").read_text() == config  # nothing was overwritten

    resumed = main([*args, "--ckpt_path=last"])
    assert resumed["steps"] == 4 and not (run_dir / UNFINISHED).exists()
    assert latest_encoder(runs) == run_dir / "encoder"
    exported = load_state_dict_file(run_dir / "encoder" / "encoder.safetensors")
    uninterrupted = load_state_dict_file(reference / "encoder" / "encoder.safetensors")
    assert [k for k in uninterrupted if not torch.equal(exported[k], uninterrupted[k])] == []
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert [k for k in expected if not torch.equal(final[k], expected[k])] == []

    with open(run_dir / "metrics.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss_step")]
    assert steps == [0, 1, 2, 3]  # the stopped run's rows, then the resumed run's, once each
