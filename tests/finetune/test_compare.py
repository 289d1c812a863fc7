import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssl3d.finetune import compare
from ssl3d.finetune.seg_data import SegmentationData
from ssl3d.finetune.segmentation import SegmentationTask
from tests.finetune.helpers import TINY_BACKBONE, make_encoder, write_datalist

MAP = {0: 0, 1: 1, 2: 2}


def _finetune_args(datalist: Path) -> str:
    return " ".join(
        [
            f"--data.init_args.datalist={datalist}",
            "--data.init_args.class_names=[background,ball,box]",
            "'--data.init_args.label_map={0: 0, 1: 1, 2: 2}'",
            "--data.init_args.size=[32,32]",
            "--data.init_args.batch_size=4",
            "--model.init_args.decoder_channels=[16,8,8,8,8]",
            "--model.init_args.lr=0.01",
            "--model.init_args.hd95=false",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    return parser.parse_args(argv)


def test_arms_are_paired_batchnorm_is_handled_alike_and_the_report_is_written(tmp_path):
    datalist = write_datalist(tmp_path / "data", train=2, val=0, test=1)  # 20 training slices
    encoder = make_encoder(tmp_path / "enc", seed=7)  # seed 0 would equal the random arm of seed 0
    out = tmp_path / "out"
    options = ["--encoder", str(encoder), "--seeds", "0", "1", "--steps", "2", "--label_fractions", "0.5"]
    args = _parse([*options, "--out_dir", str(out), f"--finetune_args={_finetune_args(datalist)}"])
    summary = compare.run(args)

    assert summary["paired"], summary["pairing_problems"]
    assert summary["bn_identical"], summary["bn_problems"]
    records = {(r["seed"], r["arm"]): r["record"] for r in summary["runs"]}
    for seed in (0, 1):
        rnd, pre = records[seed, "random"], records[seed, "pretrained"]
        assert rnd["decoder_and_head"] == pre["decoder_and_head"]  # same decoder/head initialisation
        assert rnd["train_order_epoch0"] == pre["train_order_epoch0"]  # same data order
        assert rnd["labelled_slices"] == pre["labelled_slices"] and len(rnd["labelled_slices"]) == 10
        assert rnd["encoder_weights"] != pre["encoder_weights"]  # only the encoder differs
        assert rnd["bn"] == pre["bn"] and rnd["bn"]["recalibrated"] and rnd["bn"]["statistics_changed"]
        assert rnd["bn"]["momenta"] == [0.1]
    assert records[0, "random"]["decoder_and_head"] != records[1, "random"]["decoder_and_head"]
    assert records[0, "random"]["labelled_slices"] != records[1, "random"]["labelled_slices"]

    entry = summary["fractions"]["0.5"]
    scores = {(r["seed"], r["arm"]): r["scores"]["dice"] for r in summary["runs"]}
    differences = [scores[s, "pretrained"] - scores[s, "random"] for s in (0, 1)]
    assert entry["difference"]["by_seed"] == {"0": differences[0], "1": differences[1]}
    assert entry["difference"]["mean"] == pytest.approx(np.mean(differences))
    assert entry["difference"]["std"] == pytest.approx(np.std(differences, ddof=1))
    assert entry["random"]["mean"] == pytest.approx(np.mean([scores[0, "random"], scores[1, "random"]]))
    assert entry["labelled_slices"] == 10 and entry["training_slices"] == 20
    assert all(r["steps"] == 2 for r in summary["runs"])
    assert all(math.isfinite(r["final_train_loss"]) for r in summary["runs"])

    for suffix in ("md", "json", "png"):
        assert (out / f"finetune_comparison.{suffix}").stat().st_size > 0
    assert json.loads((out / "finetune_comparison.json").read_text())["fractions"]["0.5"]["seeds"] == [0, 1]
    report = (out / "finetune_comparison.md").read_text()
    assert "| 0.5 (10/20) |" in report and "Only 2 steps" in report
    assert not (out / "fraction-0.5" / "seed-0" / "random" / "checkpoints").exists()
    config = (out / "fraction-0.5" / "seed-1" / "pretrained" / "config.yaml").read_text()
    assert "label_fraction: 0.5" in config and "max_steps: 2" in config


def test_re_estimation_makes_the_statistics_independent_of_the_incoming_ones(tmp_path):
    datalist = write_datalist(tmp_path / "data", train=1, val=0, test=0)
    data = SegmentationData(
        datalist=str(datalist), class_names=["bg", "a", "b"], label_map=MAP, size=(32, 32)
    )
    data.setup("fit")
    torch.manual_seed(3)
    model = SegmentationTask(backbone=TINY_BACKBONE, class_names=["bg", "a", "b"], decoder_channels=(8,) * 5)
    skewed = SegmentationTask(backbone=TINY_BACKBONE, class_names=["bg", "a", "b"], decoder_channels=(8,) * 5)
    skewed.load_state_dict(model.state_dict())
    for norm in compare._batchnorms(skewed.net.encoder):  # e.g. statistics of some other pretraining data
        norm.running_mean.fill_(5.0)
        norm.running_var.fill_(30.0)
        norm.momentum = 0.1
    trainer = SimpleNamespace(datamodule=data, ckpt_path=None, is_global_zero=True)
    callback = compare.PairedStart()
    for module in (model, skewed):
        callback.on_fit_start(trainer, module)
    assert torch.equal(  # identical statistics: the incoming ones leave no trace
        torch.cat([n.running_var for n in compare._batchnorms(model.net.encoder)]),
        torch.cat([n.running_var for n in compare._batchnorms(skewed.net.encoder)]),
    )
    assert all(n.momentum == 0.1 for n in compare._batchnorms(skewed.net.encoder))  # momentum kept

    first = compare._batchnorms(skewed.net.encoder)[0]
    first.running_var.fill_(30.0)
    compare.PairedStart().on_fit_start(SimpleNamespace(**{**vars(trainer), "ckpt_path": "last.ckpt"}), skewed)
    assert torch.all(first.running_var == 30.0)  # a resumed fit keeps its restored statistics


def test_arm_arguments_differ_only_in_the_encoder(tmp_path):
    common = dict(fraction=0.1, seed=2, steps=200, run_dir=tmp_path, backbone="resnet18")
    random = compare.arm_arguments("random", tmp_path / "enc", **common)
    pretrained = compare.arm_arguments("pretrained", tmp_path / "enc", **common)
    changed = [(a, b) for a, b in zip(random, pretrained) if a != b]
    assert len(random) == len(pretrained)
    assert {a.split("=")[0] for pair in changed for a in pair} == {
        "--variant",
        "--model.init_args.encoder",
        "--trainer.callbacks",
    }
    assert "--seed_everything=2" in random and "--data.init_args.seed=2" in pretrained
    assert "--data.init_args.label_fraction=0.1" in random and "--trainer.max_steps=200" in random
    with pytest.raises(ValueError, match="needs an encoder"):
        compare.arm_arguments("pretrained", None, **common)


def test_summary_paired_differences_from_per_seed_values():
    def run(seed, arm, dice, loss):
        record = {
            "encoder_weights": arm,
            "decoder_and_head": f"d{seed}",
            "labelled_slices": [1, 2],
            "train_order_epoch0": [2, 1],
            "training_slices": 20,
            "bn": {"recalibrated": True, "layers": 3},
        }
        scores = {name: dice for name in compare.METRIC_NAMES}
        return {"fraction": 1.0, "seed": seed, "arm": arm, "scores": scores, "fit_seconds": 1.0}, record, loss

    values = {(0, "random"): 0.5, (0, "pretrained"): 0.6, (1, "random"): 0.7, (1, "pretrained"): 0.65}
    values |= {(2, "random"): 0.4, (2, "pretrained"): 0.6}
    runs = []
    for (seed, arm), dice in values.items():
        entry, record, loss = run(seed, arm, dice, 0.1)
        runs.append({**entry, "record": record, "final_train_loss": loss})
    result = {"metric": "dice", "label_fractions": [1.0], "seeds": [0, 1, 2], "runs": runs}
    summary = compare.summarise(result)
    entry = summary["fractions"]["1"]
    assert entry["difference"]["by_seed"] == pytest.approx({"0": 0.1, "1": -0.05, "2": 0.2})
    assert entry["difference"]["mean"] == pytest.approx(0.25 / 3)
    assert entry["difference"]["std"] == pytest.approx(np.std([0.1, -0.05, 0.2], ddof=1))
    assert entry["difference"]["pretrained_wins"] == 2
    assert entry["random"]["mean"] == pytest.approx(np.mean([0.5, 0.7, 0.4]))
    assert entry["pretrained"]["std"] == pytest.approx(np.std([0.6, 0.65, 0.6], ddof=1))
    assert summary["paired"] and summary["bn_identical"]

    runs[1]["record"] = {**runs[1]["record"], "train_order_epoch0": [1, 2]}
    runs[3]["record"] = {**runs[3]["record"], "bn": {"recalibrated": True, "layers": 4}}
    broken = compare.summarise(result)
    assert broken["pairing_problems"] == ["fraction 1, seed 0: train_order_epoch0 differs"]
    assert broken["bn_problems"] == ["fraction 1, seed 1: BatchNorm layers differs"]


def test_bad_settings_are_refused(tmp_path):
    for argv, message in [
        (["--steps", "0"], "--steps"),
        (["--seeds", "1", "1"], "--seeds"),
        (["--label_fractions", "0"], "--label_fractions"),
        (["--label_fractions", "1.5"], "--label_fractions"),
    ]:
        with pytest.raises(ValueError, match=message):
            compare.check_arguments(_parse(argv))
    with pytest.raises(ValueError, match="no such pretraining run"):
        compare.resolve_encoder_dir(str(tmp_path / "missing"))
    run = tmp_path / "run"
    make_encoder(run / "encoder")
    assert compare.resolve_encoder_dir(str(run)) == (run / "encoder").resolve()


def test_matching_init_norms_changes_no_output_of_a_batchnorm_resnet():
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    from ssl3d.finetune.compare import match_init_norms
    from ssl3d.finetune.encoders import register_timm_backbone
    from ssl3d.probe import recalibrate_batchnorm

    encoder_class = FLEXUNET_BACKBONE.register_dict[register_timm_backbone("resnet10t")]["type"]
    torch.manual_seed(1)
    encoder, reference = encoder_class(), encoder_class()
    with torch.no_grad():  # grown weights, as after pretraining
        for module in encoder.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(2.5)
    images = torch.rand(16, 1, 32, 32)
    recalibrate_batchnorm(encoder, images)
    encoder.eval()
    before = encoder(images)
    factors = match_init_norms(encoder.model, reference.model)
    recalibrate_batchnorm(encoder, images)
    encoder.eval()
    for old, new in zip(before, encoder(images)):  # equal up to BatchNorm's eps, which the scaling moves
        difference = (new - old).abs()
        assert float(difference.max()) < 0.02 * float(old.abs().max())
        assert float(difference.mean()) < 0.01 * float(old.abs().mean())
    assert len(factors) > 5 and all(0.3 < f < 0.5 for f in factors.values())  # about 1 / 2.5
    for name, module in encoder.model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            target = dict(reference.model.named_modules())[name].weight.norm()
            torch.testing.assert_close(module.weight.norm(), target, rtol=1e-4, atol=0)


def test_training_curve_and_final_loss_read_the_run_log(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text(
        "epoch,step,train/loss,val/auroc\n"
        + "".join(f"0,{step},{10 - step},\n" for step in (3, 1, 2, 0, 4, 5, 6, 7, 8, 9))
        + "0,9,,0.7\n"  # a validation row has no training loss
    )
    assert compare.training_curve(log) == [(step, float(10 - step)) for step in range(10)]
    assert compare.final_training_loss(log) == 1.0  # the last 10% of the steps
    assert compare.final_training_loss(log, share=0.3) == pytest.approx(2.0)
    assert compare.training_curve(tmp_path / "none.csv") == [] and math.isnan(
        compare.final_training_loss(tmp_path / "none.csv")
    )
