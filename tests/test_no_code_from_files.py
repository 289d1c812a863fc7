"""No code runs from any file a user passes: every kind of file each CLI reads gets a payload that would create a
marker file when run, and the marker must not appear. The TorchScript payload is first shown to be live: loading it
with ``torch.jit.load`` does create its marker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agreement.clip import build_clip
from agreement.torchscript import read_torchscript_state_dict
from entities.cli import main as entities_main
from prompts.fewshot import main as fewshot_main
from ssl3d.finetune.cli import main as finetune_main
from ssl3d.pretrain import main as pretrain_main
from tests.finetune.helpers import TINY_BACKBONE, make_encoder, segmentation_args, write_datalist
from tests.helpers.cli import complete_outputs, run_cli
from tests.helpers.payloads import (
    pickle_payload,
    pickled_torchscript_payload,
    raw_pickle_payload,
    torchscript_payload,
)
from tests.prompts.tiny import TINY, make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def fewshot_args(tmp_path: Path, *extra: str) -> list[str]:
    root = make_image_folder(tmp_path / "images", per_split=(2, 1, 1))
    return [
        f"--run_dir={tmp_path / 'run'}",
        "--seeds=[1]",
        "--shots=[1]",
        f"--model.init_args.model_name={TINY}",
        "--model.init_args.text_depth=1",
        "--model.init_args.vision_depth=1",
        "--data.dataset=imagefolder",
        f"--data.root={root}",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def entities_video_args(tmp_path: Path, weights: Path) -> list[str]:
    subtitles = tmp_path / "episode.srt"
    subtitles.write_text("1\n00:00:00,000 --> 00:00:02,000\nAnn: hello Bo\n")
    return [
        f"--run_dir={tmp_path / 'run'}",
        f"--video={tmp_path / 'episode.avi'}",
        f"--subtitles={subtitles}",
        "--names.cast=[Ann, Bo]",
        "--video_options.detector=opencv",
        "--video_options.embedder=open_clip",
        f"--video_options.clip_model={TINY}",
        f"--video_options.clip_weights={weights}",
    ]


# ------------------------------------------------------------------------------------------ TorchScript archives
def test_torchscript_archive_gives_the_tensors_of_jit_load(tmp_path):
    """An OpenAI-style archive (scripted CLIP, fp16, extra int buffers) loads its weights and nothing else."""
    bundle = build_clip(TINY)
    scripted_model = bundle.model.half()
    scripted_model.register_buffer("input_resolution", torch.tensor(32))
    archive = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(scripted_model), str(archive))

    expected = torch.jit.load(str(archive)).state_dict()
    state = read_torchscript_state_dict(archive)
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key

    loaded = build_clip(TINY, pretrained=str(archive))
    assert loaded.weights == str(archive)
    torch.testing.assert_close(loaded.model.visual.conv1.weight, expected["visual.conv1.weight"].float())
    torch.testing.assert_close(loaded.model.text_projection, expected["text_projection"].float())


def test_torchscript_payload_is_live_under_jit_load_and_inert_here(tmp_path):
    control = torchscript_payload(tmp_path / "control.pt", tmp_path / "control-marker")
    with pytest.raises(RuntimeError):  # its __setstate__ ran (and left the module half-built)
        torch.jit.load(str(control))
    assert (tmp_path / "control-marker").exists(), "the payload should be live under torch.jit.load"

    archive = torchscript_payload(tmp_path / "weights.pt", tmp_path / "marker")
    with pytest.raises(ValueError, match=r"weights\.pt"):
        build_clip(TINY, pretrained=str(archive))
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("cli", ["fewshot", "entities"])
def test_torchscript_payload_given_to_a_cli_runs_nothing(tmp_path, cli):
    archive = torchscript_payload(tmp_path / "clip.pt", tmp_path / "marker")
    if cli == "fewshot":
        outcome = run_cli(fewshot_main, fewshot_args(tmp_path, f"--model.init_args.pretrained={archive}"))
    else:
        outcome = run_cli(entities_main, entities_video_args(tmp_path, archive))
    assert not (tmp_path / "marker").exists()
    assert outcome.code == 1 and str(archive) in outcome.last_line, outcome.last_line
    assert complete_outputs(tmp_path / "run") == []


def test_torchscript_archive_with_a_pickled_payload_is_refused(tmp_path):
    template = torchscript_payload(tmp_path / "template.pt", tmp_path / "unused")
    archive = pickled_torchscript_payload(tmp_path / "clip.pt", tmp_path / "marker", template)
    with pytest.raises(ValueError, match=r"clip\.pt: cannot read the TorchScript archive safely: .*io\.open"):
        build_clip(TINY, pretrained=str(archive))
    assert not (tmp_path / "marker").exists()


# ------------------------------------------------------------------------------------------ pickles, every CLI
def _fewshot_weights(tmp_path):
    weights = pickle_payload(tmp_path / "clip.pt", tmp_path / "marker")
    return fewshot_main, fewshot_args(tmp_path, f"--model.init_args.pretrained={weights}"), weights


def _fewshot_raw_pickle(tmp_path):
    weights = raw_pickle_payload(tmp_path / "clip.bin", tmp_path / "marker")
    return fewshot_main, fewshot_args(tmp_path, f"--model.init_args.pretrained={weights}"), weights


def _fewshot_prompts(tmp_path):
    prompts = pickle_payload(tmp_path / "prompts.safetensors.pt", tmp_path / "marker")
    return fewshot_main, fewshot_args(tmp_path, f"--init_prompts={prompts}"), prompts


def _finetune_encoder_file(tmp_path):
    encoder = pickle_payload(tmp_path / "encoder.pt", tmp_path / "marker")
    datalist = write_datalist(tmp_path / "data", train=1, val=0, test=1)
    args = [*segmentation_args(datalist, encoder), f"--run_dir={tmp_path / 'run'}"]
    return finetune_main, args, encoder


def _finetune_encoder_folder(tmp_path):
    folder = make_encoder(tmp_path / "encoder")
    weights = pickle_payload(folder / "weights.pt", tmp_path / "marker")
    metadata = json.loads((folder / "encoder.json").read_text())
    (folder / "encoder.json").write_text(json.dumps({**metadata, "weights": weights.name}))
    datalist = write_datalist(tmp_path / "data", train=1, val=0, test=1)
    args = [*segmentation_args(datalist, folder), f"--run_dir={tmp_path / 'run'}"]
    return finetune_main, args, weights


def _finetune_pretraining_checkpoint(tmp_path):
    checkpoint = pickle_payload(
        tmp_path / "last.ckpt", tmp_path / "marker", wrap=lambda p: {"state_dict": {"encoder.w": p}}
    )
    datalist = write_datalist(tmp_path / "data", train=1, val=0, test=1)
    args = [
        f"--config={ROOT / 'configs' / 'finetune' / 'volume_classification.yaml'}",
        f"--model.init_args.encoder={checkpoint}",
        f"--model.init_args.backbone={TINY_BACKBONE}",
        f"--data.init_args.datalist={datalist}",
        f"--run_dir={tmp_path / 'run'}",
    ]
    return finetune_main, args, checkpoint


def _entities_clip_weights(tmp_path):
    weights = pickle_payload(tmp_path / "clip.pt", tmp_path / "marker")
    return entities_main, entities_video_args(tmp_path, weights), weights


def _entities_parquet_records(tmp_path):
    """A Parquet column typed as pyarrow's old pickled extension type (CVE-2023-47248): never unpickled."""
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers.payloads import Payload

    metadata = {
        b"ARROW:extension:name": b"arrow.py_extension_type",
        b"ARROW:extension:metadata": pickle.dumps(Payload(tmp_path / "marker")),
    }
    schema = pa.schema(
        [
            pa.field("frame", pa.int64()),
            pa.field("names", pa.list_(pa.string())),
            pa.field("junk", pa.binary(), metadata=metadata),
        ]
    )
    table = pa.table({"frame": [0, 1], "names": [["Ann"], ["Bo"]], "junk": [b"x", b"y"]}, schema=schema)
    records = tmp_path / "faces.parquet"
    pq.write_table(table, records)
    return entities_main, [f"--records={records}", f"--run_dir={tmp_path / 'run'}"], records


PICKLE_CASES = {
    "fewshot CLIP weights (.pt)": _fewshot_weights,
    "fewshot CLIP weights (plain pickle)": _fewshot_raw_pickle,
    "fewshot prompt checkpoint": _fewshot_prompts,
    "finetune encoder file": _finetune_encoder_file,
    "finetune encoder folder": _finetune_encoder_folder,
    "finetune pretraining checkpoint": _finetune_pretraining_checkpoint,
    "entities CLIP weights": _entities_clip_weights,
    "entities Parquet records": _entities_parquet_records,
}


@pytest.mark.parametrize("case", list(PICKLE_CASES))
def test_pickle_payloads_run_nothing(tmp_path, case):
    main, args, planted = PICKLE_CASES[case](tmp_path)
    outcome = run_cli(main, args)
    assert not (tmp_path / "marker").exists(), f"{case}: the payload ran"
    assert outcome.code == 1 and str(planted) in outcome.last_line, outcome.last_line
    assert "Union" not in outcome.last_line
    assert complete_outputs(tmp_path / "run") == []


@pytest.mark.parametrize("cli", ["pretrain", "finetune", "fewshot", "entities"])
def test_python_tags_in_config_files_run_nothing(tmp_path, cli):
    marker = tmp_path / "marker"
    config = tmp_path / "config.yaml"
    config.write_text(f"seed_everything: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    main = {"pretrain": pretrain_main, "finetune": finetune_main, "fewshot": fewshot_main}.get(
        cli, entities_main
    )
    outcome = run_cli(main, [f"--config={config}", f"--run_dir={tmp_path / 'run'}"])
    assert not marker.exists()
    assert outcome.code == 2 and "config.yaml" in outcome.stderr, outcome.stderr[-500:]
    assert complete_outputs(tmp_path / "run") == []


# ------------------------------------------------------------------------------------------ a real process
@pytest.mark.slow
def test_fewshot_script_refuses_a_torchscript_payload_with_one_last_line(tmp_path):
    archive = torchscript_payload(tmp_path / "clip.pt", tmp_path / "marker")
    script = ROOT / "scripts" / "fewshot_eval.py"
    result = subprocess.run(
        [sys.executable, str(script), *fewshot_args(tmp_path, f"--model.init_args.pretrained={archive}")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("agreement.torchscript.TorchScriptArchiveError: "), last
    assert str(archive) in last
    assert not (tmp_path / "marker").exists()
    assert complete_outputs(tmp_path / "run") == []
