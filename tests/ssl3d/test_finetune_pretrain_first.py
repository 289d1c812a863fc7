"""``scripts/finetune.py`` with ``--model.init_args.encoder latest``: pretrain first when no run exists, then
reuse the newest exported encoder; at tiny sizes, in a temporary working directory (``runs/`` is relative)."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

import ssl3d.pretrain
from agreement.inputs import load_state_dict_file
from ssl3d.finetune.cli import PRETRAIN_ROOT, latest_encoder, main, resolve_encoder
from tests.finetune.helpers import segmentation_args, write_datalist
from tests.ssl3d.test_pretrain_cli import TINY_ARGS


def _pretrain_args(workdir: Path) -> list[str]:
    steps = [
        a for a in TINY_ARGS if not a.startswith(("--trainer.max_epochs", "--trainer.limit_train_batches"))
    ]
    return [
        *steps,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--evaluate=false",
        f"--data.demo_dir={workdir / 'demo'}",
    ]


def _finetune_args(datalist: Path, pretrain_args: list[str], *extra: str) -> list[str]:
    return [*segmentation_args(datalist, "latest"), f"--pretrain_args={json.dumps(pretrain_args)}", *extra]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Fine-tune with ``latest`` in a working directory whose ``runs/pretrain`` is empty (demo's compare_random)."""
    workdir = tmp_path_factory.mktemp("workdir")
    datalist = write_datalist(workdir / "data", train=2, val=1, test=1)
    (workdir / PRETRAIN_ROOT).mkdir(parents=True)
    pretrain_args = _pretrain_args(workdir)
    calls = []
    real_pretrain = ssl3d.pretrain.main

    def spy(args):
        calls.append(list(args))
        return real_pretrain(args)

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(workdir)
        patch.setattr(ssl3d.pretrain, "main", spy)
        summary = main(_finetune_args(datalist, pretrain_args))
    return {
        "workdir": workdir,
        "datalist": datalist,
        "pretrain_args": pretrain_args,
        "calls": calls,
        "summary": summary,
        "out": out.getvalue(),
    }


def test_latest_without_a_pretraining_run_pretrains_one_then_fine_tunes_from_it(first_run):
    workdir, summary = first_run["workdir"], first_run["summary"]
    assert first_run["calls"] == [first_run["pretrain_args"]]
    assert f"No pretraining run under {PRETRAIN_ROOT}; pretraining one first" in first_run["out"]

    (pretrain_run,) = [p for p in (workdir / PRETRAIN_ROOT).iterdir() if p.is_dir()]
    encoder_file = pretrain_run / "encoder" / "encoder.safetensors"
    assert encoder_file.is_file() and (pretrain_run / "encoder" / "encoder.json").is_file()
    for name in ("config.yaml", "metrics.csv", "summary.json"):
        assert (pretrain_run / name).is_file(), name
    assert not (pretrain_run / "probe.json").exists()  # --evaluate=false reached the pretraining run
    assert "max_epochs: 1" in (pretrain_run / "config.yaml").read_text()
    assert json.loads((pretrain_run / "summary.json").read_text())["steps"] == 2
    assert sorted(p.name for p in (workdir / "demo").iterdir())  # demo volumes went to --data.demo_dir
    assert set(load_state_dict_file(encoder_file)) >= {"conv_stem.weight"}

    # The fine-tuning run (default folder runs/finetune/<timestamp>) used exactly that encoder.
    encoder_dir = (workdir / PRETRAIN_ROOT / pretrain_run.name / "encoder").resolve()
    (finetune_run,) = list((workdir / "runs" / "finetune").iterdir())
    assert Path(summary["run_dir"]) == Path("runs") / "finetune" / finetune_run.name
    assert [v["variant"] for v in summary["variants"]] == ["random", "pretrained"]
    random_variant, pretrained = summary["variants"]
    assert Path(pretrained["encoder"]) == encoder_dir and random_variant["encoder"] is None

    folder = finetune_run / "pretrained"
    results = json.loads((folder / "results.json").read_text())
    assert Path(results["encoder"]) == encoder_dir
    assert f"encoder: {encoder_dir}" in (folder / "config.yaml").read_text()
    assert "encoder: null" in (finetune_run / "random" / "config.yaml").read_text()
    for variant in ("random", "pretrained"):
        for name in ("config.yaml", "metrics.csv", "results.json"):
            assert (finetune_run / variant / name).is_file(), (variant, name)
        assert (finetune_run / variant / "checkpoints" / "last.ckpt").is_file()
        assert list((finetune_run / variant / "predictions").glob("*.nii.gz"))
    assert set(results["summary"]) == {"background", "ball", "box", "mean (foreground)"}
    saved = json.loads((finetune_run / "summary.json").read_text())
    assert [Path(v["encoder"]) if v["encoder"] else None for v in saved["variants"]] == [None, encoder_dir]

    # The fine-tuned U-Net encoder is that exported architecture (pruned of the unused head layers).
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    fine_tuned = {
        k.removeprefix("net.encoder.model."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("net.encoder.model.")
    }
    exported = load_state_dict_file(encoder_file)
    assert "conv_stem.weight" in fine_tuned and set(fine_tuned) <= set(exported)
    assert all(value.shape == exported[key].shape for key, value in fine_tuned.items())
    assert f"Encoder: {encoder_dir}" in first_run["out"]


def test_second_latest_run_reuses_the_encoder_without_pretraining(first_run, monkeypatch, capsys):
    workdir = first_run["workdir"]
    monkeypatch.chdir(workdir)
    runs_before = sorted((workdir / PRETRAIN_ROOT).iterdir())

    def must_not_pretrain(args):
        raise AssertionError(f"pretraining ran again with {args}")

    monkeypatch.setattr(ssl3d.pretrain, "main", must_not_pretrain)
    run_dir = workdir / "second"
    summary = main(
        _finetune_args(
            first_run["datalist"],
            first_run["pretrain_args"],
            f"--run_dir={run_dir}",
            "--compare_random=false",
        )
    )

    assert sorted((workdir / PRETRAIN_ROOT).iterdir()) == runs_before
    (variant,) = summary["variants"]
    (pretrain_run,) = runs_before
    assert variant["variant"] == "pretrained"
    assert Path(variant["encoder"]) == (pretrain_run / "encoder").resolve()
    assert (run_dir / "pretrained" / "results.json").is_file() and not (run_dir / "random").exists()
    out = capsys.readouterr().out
    assert "pretraining one first" not in out
    assert f"Encoder: {(pretrain_run / 'encoder').resolve()}" in out


def test_latest_encoder_on_an_empty_or_unfinished_root_is_none(tmp_path):
    assert latest_encoder(tmp_path / "missing") is None
    assert latest_encoder(tmp_path) is None
    (tmp_path / "20250101-000000" / "encoder").mkdir(parents=True)  # interrupted before the export
    assert latest_encoder(tmp_path) is None


def test_encoder_path_that_does_not_exist_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no_such_run" / "encoder"
    # resolve_encoder passes paths through unchanged; the task's strict loading reports the missing path.
    assert resolve_encoder(str(missing), ["--never-used"]) == str(missing)

    def must_not_pretrain(args):
        raise AssertionError("a given encoder path must not trigger pretraining")

    monkeypatch.setattr(ssl3d.pretrain, "main", must_not_pretrain)
    datalist = write_datalist(tmp_path / "data", train=1, val=1, test=1)
    args = _finetune_args(datalist, [], f"--run_dir={tmp_path / 'run'}", "--compare_random=false")
    args = [a for a in args if not a.startswith("--model.init_args.encoder=")]
    # (jsonargparse wraps the task's FileNotFoundError in a ValueError that keeps its message.)
    with pytest.raises(
        (FileNotFoundError, ValueError), match=re.escape(f"encoder weights not found: {missing}")
    ):
        main([*args, f"--model.init_args.encoder={missing}"])
    assert not (tmp_path / PRETRAIN_ROOT).exists()
    assert not (tmp_path / "run" / "pretrained" / "results.json").exists()
