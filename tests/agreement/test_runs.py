import json
import warnings
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from agreement.runs import (
    RunLogger,
    checkpoint_run_dir,
    refuse_to_overwrite,
    run_folder,
    save_config,
    write_summary,
)


def test_a_new_run_logs_into_its_folder_without_a_false_warning(tmp_path):
    (tmp_path / "config.yaml").write_text("seed_everything: 0\n")  # written before the logger starts
    logger = RunLogger(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log_metrics({"loss": 1.0}, step=0)
        logger.save()
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",") == ["loss", "step"]
    with pytest.warns(UserWarning, match="metrics.csv exists and will be replaced"):
        RunLogger(tmp_path).log_metrics({"loss": 0.5}, step=0)


def test_run_folder_is_the_given_one_or_a_new_dated_one(tmp_path, monkeypatch):
    assert run_folder(tmp_path / "mine", "pretrain") == tmp_path / "mine"
    assert run_folder(str(tmp_path), "pretrain") == tmp_path
    monkeypatch.setattr("agreement.runs.time.strftime", lambda _: "20261202-101500")
    assert run_folder(None, "evaluate", "fashion-") == Path("runs/evaluate/fashion-20261202-101500")
    assert run_folder("", "entities") == Path("runs/entities/20261202-101500")


def test_write_summary_writes_what_json_cannot_hold_as_text(tmp_path):
    path = write_summary(tmp_path, {"run_dir": tmp_path, "steps": 3})
    assert path == tmp_path / "summary.json"
    assert json.loads(path.read_text()) == {"run_dir": str(tmp_path), "steps": 3}


def test_save_config_writes_the_resolved_configuration(tmp_path):
    parser = ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run_dir", type=str | None, default=None)
    config = parser.parse_args(["--seed", "4"])
    path = save_config(parser, config, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert parser.parse_path(path).seed == 4
    save_config(parser, parser.parse_args(["--seed", "5"]), tmp_path / "run")  # a repeated run replaces it
    assert parser.parse_path(path).seed == 5


def test_checkpoint_run_dir_finds_the_run_a_checkpoint_belongs_to(tmp_path):
    single = tmp_path / "pretrain" / "checkpoints" / "step=4.ckpt"
    nested = tmp_path / "fewshot" / "shots1_seed1" / "checkpoints" / "last.ckpt"
    for path in (single, nested):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    assert checkpoint_run_dir(single, None) == str(tmp_path / "pretrain")
    assert checkpoint_run_dir(nested, None, levels=1) == str(tmp_path / "fewshot")
    assert checkpoint_run_dir(nested, tmp_path / "elsewhere", levels=1) == str(tmp_path / "elsewhere")
    assert checkpoint_run_dir(None, None) is None and checkpoint_run_dir("last", tmp_path) == str(tmp_path)
    with pytest.raises(ValueError, match="give --run_dir"):
        checkpoint_run_dir("last", None)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        checkpoint_run_dir(tmp_path / "missing.ckpt", None)


def test_refuse_to_overwrite_looks_in_the_run_or_its_sub_runs(tmp_path):
    refuse_to_overwrite(tmp_path / "new")  # nothing there yet
    nested = tmp_path / "run" / "shots1_seed2" / "checkpoints" / "last.ckpt"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(b"")
    refuse_to_overwrite(tmp_path / "run")  # no last.ckpt of the run itself
    refuse_to_overwrite(tmp_path / "run", sub_runs="random")
    with pytest.raises(
        FileExistsError, match=r"shots1_seed2.*--ckpt_path last --run_dir .*run, or give another"
    ):
        refuse_to_overwrite(tmp_path / "run", sub_runs="*")
