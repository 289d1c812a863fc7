import json

import pytest

from entities.cli import main


def test_default_run_writes_outputs_and_prints_stage_table(tmp_path, capsys):
    run_dir = tmp_path / "run"
    summary = main(["--run_dir", str(run_dir), "--episode.num_scenes", "50", "--self_training.epochs", "5"])
    printed = capsys.readouterr().out
    for stage in (
        "stage 1: random weak label",
        "stage 2: visual entity agreement",
        "stage 3: prototype refinement",
    ):
        assert stage in printed
    assert "held-out: supervised oracle" in printed and "held-out: self-trained head" in printed
    for name in ("names.json", "names.csv", "metrics.json", "metrics.md", "config.yaml", "summary.json"):
        assert (run_dir / name).is_file(), name
    names = json.loads((run_dir / "names.json").read_text())
    assert len(names) == summary["faces"] and {"name", "stage2", "true_name", "weak_names"} <= set(names[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stage 2: visual entity agreement"]["accuracy"] > 0.5
    assert "discovery:" in (run_dir / "config.yaml").read_text()


def test_misspelt_option_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["--run_dir", str(tmp_path), "--discovery.clusters_per_entiti", "3"])


def test_records_without_embeddings_score_stage1_and_published_labels(tmp_path, capsys):
    path = tmp_path / "labels.json"
    rows = [
        {"frame": 0, "names": ["Ann"], "label": "Ann", "stage2_label": "Ann"},
        {"frame": 0, "names": ["Ann"], "label": "Bo", "stage2_label": "Ann"},
        {"frame": 1, "names": [], "label": "Unknown", "stage2_label": "Unknown"},
    ]
    path.write_text(json.dumps(rows))
    summary = main(["--records", str(path), "--names.cast", "[Ann, Bo]", "--run_dir", str(tmp_path / "r")])
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["stage 2: published labels"]["accuracy"] == pytest.approx(2 / 3)
    assert metrics["stage 1: random weak label (expected)"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["faces"] == 3
