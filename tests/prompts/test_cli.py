import json

import pytest

from prompts.fewshot import main
from tests.prompts.tiny import make_image_folder


def _args(tmp_path, root, *extra):
    return [
        f"--run_dir={tmp_path / 'run'}",
        "--seeds=[1, 2]",
        "--model.init_args.model_name=prompts-tiny-vit",
        "--model.init_args.text_depth=2",
        "--model.init_args.vision_depth=2",
        "--model.init_args.gpa_mean=1.5",
        "--data.dataset=imagefolder",
        f"--data.root={root}",
        "--shots=[2]",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def test_base2novel_protocol_writes_results(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split=(2, 1, 2))
    summary = main(_args(tmp_path, root))
    run = tmp_path / "run"
    row = summary["table"][0]
    assert summary["random_weights"] and row["seeds"] == 2 and row["method"] == "PromptSRC"
    assert "RANDOM-WEIGHT" in (run / "results.md").read_text()
    runs = json.loads((run / "results.json").read_text())["runs"]
    assert {(r["seed"], r["eval"]) for r in runs} == {(1, "base"), (1, "novel"), (2, "base"), (2, "novel")}
    assert all(0 <= r["accuracy"] <= 100 for r in runs)
    assert (run / "results.csv").read_text().count("\n") == 5
    assert (run / "shots2_seed1" / "prompts.safetensors").is_file() and (run / "config.yaml").is_file()
    assert (
        root / "split_fewshot" / "shot_2-seed_2.json"
    ).is_file()  # the per-run shots and seed, not the defaults


def test_cross_dataset_with_zero_shot_baseline(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split=(1, 0, 2))
    other = make_image_folder(tmp_path / "other", classes=["sun", "moon", "star"], per_split=(1, 0, 2))
    args = [
        f"--run_dir={tmp_path / 'run'}",
        "--seeds=[1]",
        "--protocol=cross_dataset",
        f"--targets=[imagefolder:{other}]",
        "--model=prompts.ZeroShotCLIP",
        "--model.init_args.model_name=prompts-tiny-vit",
        "--data.dataset=imagefolder",
        f"--data.root={root}",
        "--trainer.enable_progress_bar=false",
    ]
    summary = main(args)
    targets = [row["target"] for row in summary["table"]]
    assert targets == ["data (source)", "other"], summary["table"]
    assert all(r["seeds"] == 1 for r in summary["table"]), summary["table"]
    runs = json.loads((tmp_path / "run" / "results.json").read_text())["runs"]
    assert [r["eval"] for r in runs] == ["all", "target"] and runs[0]["method"] == "ZeroShotCLIP"
    assert not (tmp_path / "run" / "shots16_seed1" / "prompts.safetensors").exists()  # nothing trained


def test_misspelt_key_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["--model.init_args.n_ctxx=3"])
