import json

import pytest
import torch

from agreement.inputs import load_state_dict_file
from ssl3d import crosssubject as cs
from ssl3d.evaluate import main as evaluate
from ssl3d.export import load_exported_encoder
from ssl3d.pretrain import main

TINY_ARGS = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=2",
    "--trainer.enable_progress_bar=false",
    "--model.backbone=test_efficientnet",
    "--model.d_model=32",
    "--model.num_layers=1",
    "--model.heads=2",
    "--model.dim_head=8",
    "--model.ffn_hidden=32",
    "--model.projection_hidden=32",
    "--model.projection_dim=16",
    "--model.prototypes_2d=[5]",
    "--model.prototypes_3d=[2]",
    "--data.num_slices=8",
    "--data.size=[32,32]",
    "--data.batch_size_2d=8",
    "--data.samples_per_volume=1",
]


@pytest.mark.slow
def test_demo_pipeline_writes_the_whole_run_folder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    summary = main(
        [*TINY_ARGS, f"--run_dir={run_dir}", f"--data.demo_dir={tmp_path / 'demo'}", "--tissue_probe=true"]
    )
    for name in (
        "config.yaml",
        "metrics.csv",
        "loss_curve.png",
        "cross_subject.json",
        "cross_subject.md",
        "probe.json",
        "summary.json",
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "max_epochs: 2" in (run_dir / "config.yaml").read_text()

    encoder = load_exported_encoder(run_dir / "encoder")
    exported = load_state_dict_file(run_dir / "encoder" / "encoder.safetensors")
    assert set(exported) == set(encoder.state_dict())
    from_run = load_exported_encoder(run_dir)  # the run folder and the weights file name the same encoder
    from_file = load_exported_encoder(run_dir / "encoder" / "encoder.safetensors")
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, from_run.state_dict()[key]) and torch.equal(
            value, from_file.state_dict()[key]
        )
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key, value in exported.items():
        torch.testing.assert_close(value, checkpoint["state_dict"][f"encoder.backbone.{key}"])

    probe = json.loads((run_dir / "probe.json").read_text())
    names = [row["features"] for row in probe["rows"]]
    assert names[-1] == "all levels" and all(name.startswith("level ") for name in names[:-1])
    assert names == list(probe["pretrained"]) and len(probe["random"]) == 3
    for row in probe["rows"]:
        assert 0.0 <= row["pretrained"] <= 1.0 and 0.0 <= row["random mean"] <= 1.0
        seeds = [result[row["features"]]["accuracy"] for result in probe["random"]]
        assert row["random values"] == seeds
        assert row["beats random beyond spread"] == cs.beats_random(
            row["pretrained"], seeds, higher_better=True
        )
    assert 0.0 <= probe["raw intensities"]["accuracy"] <= 1.0
    assert summary["steps"] == 4
    comparison = json.loads((run_dir / "cross_subject.json").read_text())
    metrics = [row["metric"] for row in comparison["rows"]]
    assert any("position" in m for m in metrics) and any("region AUROC" in m for m in metrics)
    for row in comparison["rows"]:
        assert len(row["random values"]) == 3
        # The demo's seed-0 initialisation is random seed 0: the paired difference is against it.
        assert row["initial"] == row["random values"][0]
        assert row["paired difference"] == pytest.approx(row["pretrained"] - row["initial"])
    out = capsys.readouterr().out
    assert "Slice-level probes across subjects" in out and comparison["verdict"] in out
    assert "Tissue kNN probe" in out and str(run_dir) in out

    # The same run through `scripts/evaluate.py cross-subject`: the checkpoint gives the same pretrained
    # results, random seed 0 is its own initialisation again, and the volume probes are added.
    evaluation = evaluate(
        ["cross-subject", f"--runs={run_dir}", "--random_seeds=2", f"--out_dir={tmp_path / 'evaluation'}"]
    )
    again = {row["metric"]: row for row in evaluation["rows"]}
    assert {m.split(" / ")[0] for m in again} == {"embedding", "backbone", "volume"}
    for row in comparison["rows"]:
        assert again[row["metric"]]["pretrained values"] == [pytest.approx(row["pretrained"])]
        assert again[row["metric"]]["random values"] == pytest.approx(row["random values"][:2])
        assert again[row["metric"]]["paired differences"] == [pytest.approx(row["paired difference"])]
    for name in ("cross_subject.md", "cross_subject.json", "cross_subject.png"):
        assert (tmp_path / "evaluation" / name).is_file(), name
    assert evaluation["verdict"] in capsys.readouterr().out


def test_multi_crop_is_set_once_for_data_and_model(tmp_path):
    run_dir = tmp_path / "run"
    summary = main(
        [
            *TINY_ARGS,
            "--data.small_crops_2d=2",
            "--evaluate=false",
            f"--run_dir={run_dir}",
            f"--data.demo_dir={tmp_path / 'demo'}",
        ]
    )
    assert summary["steps"] == 4
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["small_crops"] == 2
    assert checkpoint["datamodule_hyper_parameters"]["small_crops_2d"] == 2


def test_misspelt_config_key_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*TINY_ARGS, "--model.lambda_intar=2", f"--run_dir={tmp_path}"])
    assert "lambda_intar" in capsys.readouterr().err


def test_misspelt_key_in_a_config_file_is_an_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  backbon: resnet18\n")
    with pytest.raises(SystemExit):
        main([f"--config={config}", f"--run_dir={tmp_path}"])
    assert "backbon" in capsys.readouterr().err


def test_more_clusters_than_volumes_fails_before_training(tmp_path):
    args = [a for a in TINY_ARGS if not a.startswith("--model.prototypes_3d")]
    with pytest.raises(ValueError, match="at least as many samples as clusters"):
        main(
            [
                *args,
                "--model.clustering=deepcluster",
                "--model.freeze_prototypes_steps=313",  # the demo config's SwAV setting back to its default
                "--model.prototypes_3d=[500]",
                f"--run_dir={tmp_path / 'run'}",
                f"--data.demo_dir={tmp_path}",
            ]
        )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_datalist_entry_pointing_nowhere_fails_before_training(tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "missing_volume.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match="missing_volume"):
        main([*TINY_ARGS, f"--data.datalist={datalist}", f"--run_dir={tmp_path / 'run'}"])
