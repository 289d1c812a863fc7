import json

import nibabel as nib
import numpy as np
import pytest
import torch

from ssl3d.finetune.classification_data import VolumeClassificationData
from ssl3d.finetune.cli import main
from ssl3d.finetune.volume_classification import CheckpointWeightsError, VolumeClassifier, resolve_checkpoint
from ssl3d.module import JointSSL
from tests.finetune.helpers import AFFINE
from tests.ssl3d.tiny import TINY_MODEL

SHAPE = (24, 24, 10)  # slice axis last


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A JointSSL run folder with checkpoints/last.ckpt saved as Lightning does (state dict + hyper-parameters)."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(3)
    model = JointSSL(**TINY_MODEL)
    with torch.no_grad():  # away from the initialisation, so that loaded weights are not equal by chance
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    return run, model


def _blob_volume(bright: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    centre = np.array(SHAPE) / 2 + rng.uniform(-2, 2, 3)
    blob = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + ((z - centre[2]) * 2) ** 2 < 30
    image = rng.normal(0.5, 0.05, SHAPE).astype(np.float32)
    image[blob] += 0.4 if bright else -0.4
    return image


def _write_datalist(folder, counts=(8, 2, 2), labels=None, extra=None):
    """Bright-blob volumes are class 1, dark-blob volumes class 0; paths relative to the JSON."""
    (folder / "volumes").mkdir(parents=True, exist_ok=True)
    lists, seed = {}, 0
    for key, count in zip(("training", "validation", "test"), counts):
        lists[key] = []
        for i in range(count):
            label = i % 2
            path = folder / "volumes" / f"vol{seed}.nii.gz"
            nib.save(nib.Nifti1Image(_blob_volume(bool(label), seed), AFFINE), str(path))
            lists[key].append({"image": f"volumes/{path.name}", "label": label})
            seed += 1
    for index, label in (labels or {}).items():
        lists["training"][index]["label"] = label
    lists.update(extra or {})
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps(lists))
    return datalist


def _data(datalist, **kwargs):
    return VolumeClassificationData(
        datalist=str(datalist), **{"num_classes": 2, "slices_per_volume": 8, "size": (32, 32), **kwargs}
    )


def test_loads_encoder_and_transformer_strictly_from_the_checkpoint(pretrain_run):
    run, pretrained = pretrain_run
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    model = VolumeClassifier(num_classes=3, encoder=str(run))  # the run folder finds checkpoints/last.ckpt
    assert model.architecture.d_model == TINY_MODEL["d_model"]
    assert model.architecture.backbone == TINY_MODEL["backbone"]
    own = {**{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}}
    own.update({f"transformer.{k}": v for k, v in model.transformer.state_dict().items()})
    saved = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(("encoder.", "transformer."))}
    assert set(own) == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(own[key], value, msg=key)
    # The exported encoder/ folder of the run resolves to the same checkpoint.
    (run / "encoder").mkdir(exist_ok=True)
    assert resolve_checkpoint(run / "encoder") == run / "checkpoints" / "last.ckpt"

    volumes = torch.rand(2, 1, 8, 32, 32)
    pretrained.eval()
    model.eval()  # (training mode would update the batch-norm statistics)
    assert model(volumes).shape == (2, 3)
    torch.testing.assert_close(model.embed(volumes), pretrained.embed_volumes(volumes))


def test_a_different_architecture_is_an_error_listing_keys(pretrain_run, tmp_path):
    run, _ = pretrain_run
    with pytest.raises(
        CheckpointWeightsError, match=r"shape mismatches .*encoder\.projection\.weight"
    ) as error:
        VolumeClassifier(num_classes=2, encoder=str(run), d_model=48)
    assert "d_model=48 (checkpoint: 32)" in str(error.value)

    other = JointSSL(**{**TINY_MODEL, "num_layers": 2})
    path = tmp_path / "mismatched.ckpt"
    hparams = {**dict(other.hparams), "num_layers": 1}  # hyper-parameters that do not describe the weights
    torch.save({"state_dict": other.state_dict(), "hyper_parameters": hparams}, path)
    with pytest.raises(CheckpointWeightsError, match=r"unexpected keys \(\d+\): transformer\.layers\.1\."):
        VolumeClassifier(num_classes=2, encoder=str(path))


def test_random_init_uses_the_given_architecture_and_freezing(pretrain_run):
    model = VolumeClassifier(
        num_classes=2, **{k: TINY_MODEL[k] for k in ("backbone", "d_model", "num_layers")}
    )
    assert model.architecture.num_layers == 1 and model.architecture.heads == 8  # JointSSL's default
    frozen = VolumeClassifier(num_classes=2, encoder=str(pretrain_run[0]), freeze_encoder=True)
    trainable = {n.split(".")[0] for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {"transformer", "head"}


def test_training_separates_bright_from_dark_volumes(pretrain_run, tmp_path):
    data = _data(_write_datalist(tmp_path, counts=(6, 0, 0)), slices_per_volume=4)
    data.setup("fit")
    batch = next(iter(torch.utils.data.DataLoader(data.splits["train"], batch_size=6)))
    assert batch["volume"].shape == (6, 1, 4, 32, 32)
    assert batch["label"].tolist() == [0, 1] * 3
    torch.manual_seed(0)
    model = VolumeClassifier(num_classes=2, encoder=str(pretrain_run[0]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = model.loss(model(batch["volume"]), batch["label"])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(batch["volume"]).argmax(dim=1) == batch["label"]).float().mean()
    assert np.mean(losses[-3:]) < 0.5 * losses[0]
    assert accuracy == 1.0


def test_bad_labels_are_listed_before_loading(tmp_path):
    datalist = _write_datalist(tmp_path, counts=(4, 0, 0), labels={1: 2, 3: "yes"})
    with pytest.raises(ValueError, match=r"2 'training' entries .* range\(2\)") as error:
        _data(datalist).setup("fit")
    assert "entry 1 (volumes/vol1.nii.gz): 2" in str(error.value)
    assert "entry 3 (volumes/vol3.nii.gz): 'yes'" in str(error.value)
    multi = _write_datalist(tmp_path / "multi", counts=(2, 0, 0), labels={0: [0, 1], 1: [5]})
    with pytest.raises(ValueError, match=r"entry 1 \(volumes/vol1.nii.gz\): \[5\]"):
        _data(multi, multi_label=True).setup("fit")


def test_multi_label_targets_and_bad_volume_files(tmp_path):
    datalist = _write_datalist(tmp_path, counts=(2, 0, 0), labels={0: [0, 1], 1: []})
    data = _data(datalist, multi_label=True)
    data.setup("fit")
    assert data.splits["train"].targets.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    constant = tmp_path / "volumes" / "constant.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE), str(constant))
    broken = _write_datalist(
        tmp_path / "b", counts=(2, 0, 0), extra={"validation": [{"image": str(constant), "label": 0}]}
    )
    with pytest.raises(ValueError, match="constant volume"):
        _data(broken).setup("fit")


def test_cli_fine_tunes_volume_classification_from_both_initialisations(pretrain_run, tmp_path, capsys):
    datalist = _write_datalist(tmp_path / "data", counts=(4, 2, 2))
    arch = {k: TINY_MODEL[k] for k in ("backbone", "d_model", "num_layers", "heads", "dim_head")}
    summary = main(
        [
            f"--run_dir={tmp_path / 'run'}",
            "--model=ssl3d.finetune.VolumeClassifier",
            f"--model.init_args.encoder={pretrain_run[0] / 'checkpoints' / 'last.ckpt'}",
            *(f"--model.init_args.{k}={v}" for k, v in arch.items()),
            "--data=ssl3d.finetune.VolumeClassificationData",
            f"--data.init_args.datalist={datalist}",
            "--data.init_args.class_names=[dark, bright]",
            "--data.init_args.slices_per_volume=4",
            "--data.init_args.size=[32, 32]",
            "--data.init_args.batch_size=2",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--compare_random=true",
        ]
    )
    assert [v["variant"] for v in summary["variants"]] == ["random", "pretrained"]
    for variant in summary["variants"]:
        assert set(variant["summary"]) == {"auroc", "accuracy", "loss"}
        assert variant["best_checkpoint"]  # chosen by validation AUROC
        assert [case["label"] for case in variant["cases"]] == [0, 1]
        results = json.loads((tmp_path / "run" / variant["variant"] / "results.json").read_text())
        assert results["cases"][0]["case"] == "vol6"
    out = capsys.readouterr().out
    assert "| pretrained |" in out and "| random" in out
