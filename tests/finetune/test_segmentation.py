import json
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ssl3d.export import load_exported_encoder
from ssl3d.finetune.cli import latest_encoder, main, resolve_encoder
from tests.finetune.helpers import AFFINE, make_encoder, segmentation_args, write_datalist


def _args(tmp_path, datalist, encoder):
    return [f"--run_dir={tmp_path / 'run'}", *segmentation_args(datalist, encoder)]


def test_cli_fine_tunes_from_both_initialisations_and_writes_predictions(tmp_path, capsys):
    datalist = write_datalist(tmp_path / "data", train=2, val=1, test=1)
    encoder = make_encoder(tmp_path / "enc")
    summary = main(_args(tmp_path, datalist, encoder))

    assert [v["variant"] for v in summary["variants"]] == ["random", "pretrained"]
    run = tmp_path / "run"
    for variant in ("random", "pretrained"):
        folder = run / variant
        config = (folder / "config.yaml").read_text()
        assert "max_epochs: 1" in config and "class_path: ssl3d.finetune.SegmentationTask" in config
        results = json.loads((folder / "results.json").read_text())
        assert results["best_checkpoint"]  # chosen by validation 3D IoU
        scores = results["summary"]
        assert set(scores) == {"background", "ball", "box", "mean (foreground)"}
        assert 0.0 <= scores["ball"]["iou_3d"] <= 1.0 and 0.0 <= scores["background"]["dice"] <= 1.0
        written = nib.load(str(folder / "predictions" / "case3_image.nii.gz"))
        assert written.shape == (20, 24, 10)
        np.testing.assert_allclose(written.affine, AFFINE)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
    assert summary["variants"][1]["encoder"] == str(encoder)
    out = capsys.readouterr().out
    assert "| init | class | Dice | IoU | 3D Dice | 3D IoU | HD95 mm |" in out
    assert "| pretrained | ball |" in out and "| random | box |" in out
    assert json.loads((run / "summary.json").read_text())["variants"][0]["variant"] == "random"

    # the fine-tuned encoder is exported like a pretraining run's: the best checkpoint's weights, loadable strictly
    best = torch.load(summary["variants"][1]["best_checkpoint"], map_location="cpu", weights_only=True)
    prefix = "net.encoder.model."
    trained = {k[len(prefix) :]: v for k, v in best["state_dict"].items() if k.startswith(prefix)}
    exported = load_file(str(run / "pretrained" / "encoder" / "encoder.safetensors"))
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    metadata = json.loads((run / "pretrained" / "encoder" / "encoder.json").read_text())
    assert metadata["finetuned_from"] == str(encoder)
    untouched = load_file(str(encoder / "encoder.safetensors"))  # layers the U-Net prunes stay as they came
    assert (
        set(metadata["not_finetuned"])
        == set(exported) - set(trained)
        == {k for k in untouched if k not in trained}
    )
    assert all(torch.equal(exported[k], untouched[k]) for k in metadata["not_finetuned"])
    assert set(load_exported_encoder(run / "random" / "encoder").state_dict()) == set(exported)


def test_misspelt_config_key_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([f"--run_dir={tmp_path}", "--model.init_args.learning_rate=0.1"])
    assert "learning_rate" in capsys.readouterr().err


def test_latest_encoder_is_the_newest_pretraining_run(tmp_path):
    assert latest_encoder(tmp_path / "none") is None
    for name in ("20240101-000000", "20250101-000000"):
        make_encoder(tmp_path / name / "encoder")
    (tmp_path / "20260101-000000").mkdir()  # an unfinished run without an encoder
    assert latest_encoder(tmp_path) == tmp_path / "20250101-000000" / "encoder"
    assert resolve_encoder("latest", [], root=tmp_path) == str(tmp_path / "20250101-000000" / "encoder")
    assert resolve_encoder(None, [], root=tmp_path) is None


def test_the_lobe_config_trains_on_mni152_and_tests_on_colin27(tmp_path):
    from ssl3d.finetune.cli import CONFIG_DIR
    from ssl3d.finetune.seg_data import LOBE_CLASSES

    summary = main(
        [
            f"--config={CONFIG_DIR / 'lobes.yaml'}",
            f"--run_dir={tmp_path / 'run'}",
            "--compare_random=false",
            "--model.init_args.encoder=null",
            "--model.init_args.backbone=resnet10t",
            "--model.init_args.decoder_channels=[32,16,16,8,8]",
            "--model.init_args.hd95=false",
            "--data.init_args.size=[32,32]",
            "--trainer.max_epochs=-1",
            "--trainer.max_steps=2",
        ]
    )
    (variant,) = summary["variants"]
    assert set(variant["summary"]) == {*LOBE_CLASSES, "mean (foreground)"}
    written = nib.load(str(tmp_path / "run" / "random" / "predictions" / "ch2bet.nii.gz"))
    assert written.shape == (181, 217, 181)  # Colin27's own grid


def test_a_command_line_run_gets_no_warning_about_its_own_arguments(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--print_config"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        main()
    assert not [w for w in caught if "args parameter" in str(w.message)]
    assert "model:" in capsys.readouterr().out
