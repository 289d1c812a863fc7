import csv
import math

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from agreement.inputs import load_state_dict_file
from ssl3d.finetune.classification import ImageClassifier
from ssl3d.finetune.classification_data import images_from_csv
from ssl3d.finetune.cli import main
from ssl3d.finetune.metrics import classification_metrics
from tests.finetune.helpers import TINY_BACKBONE, make_encoder


def _shape_image(kind: str, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    image = rng.normal(60, 10, (40, 40))
    y, x = np.mgrid[:40, :40]
    cy, cx = rng.integers(12, 28, 2)
    mask = (y - cy) ** 2 + (x - cx) ** 2 < 40 if kind == "round" else (abs(y - cy) < 6) & (abs(x - cx) < 6)
    image[mask] = 200
    return torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8))[None]


def _write_folder(root, count=6):
    for kind in ("round", "square"):
        (root / kind).mkdir(parents=True)
        for i in range(count):
            write_png(_shape_image(kind, i), str(root / kind / f"{i}.png"))


def test_folder_classification_through_the_cli(tmp_path, capsys):
    for split in ("train", "val", "test"):
        _write_folder(tmp_path / split, count=4)
    encoder = make_encoder(tmp_path / "enc")
    summary = main(
        [
            f"--run_dir={tmp_path / 'run'}",
            "--model=ssl3d.finetune.ImageClassifier",
            f"--model.init_args.backbone={TINY_BACKBONE}",
            f"--model.init_args.encoder={encoder}",
            "--data=ssl3d.finetune.ImageClassificationData",
            *(f"--data.init_args.{s}_dir={tmp_path / s}" for s in ("train", "val", "test")),
            "--data.init_args.class_names=[round, square]",
            "--data.init_args.size=[32, 32]",
            "--data.init_args.batch_size=4",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--compare_random=false",
        ]
    )
    (variant,) = summary["variants"]
    assert variant["variant"] == "pretrained"
    assert set(variant["summary"]) == {"auroc", "accuracy", "loss"}
    assert 0.0 <= variant["summary"]["accuracy"] <= 1.0
    assert "| pretrained |" in capsys.readouterr().out


def test_classifier_loads_the_encoder_strictly_and_adds_a_head(tmp_path):
    encoder = make_encoder(tmp_path / "enc", seed=5)
    model = ImageClassifier(backbone=TINY_BACKBONE, encoder=str(encoder), class_names=["a", "b", "c"])
    state = load_state_dict_file(encoder / "encoder.safetensors")
    torch.testing.assert_close(model.model.conv_stem.weight, state["conv_stem.weight"])
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    frozen = ImageClassifier(backbone=TINY_BACKBONE, class_names=["a", "b"], freeze_encoder=True)
    trainable = [n for n, p in frozen.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model.classifier") for n in trainable)


def test_multi_label_csv_and_metrics(tmp_path):
    rows = [{"path": f"{i}.png", "effusion": i % 2, "nodule": int(i < 2)} for i in range(4)]
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "effusion", "nodule"])
        writer.writeheader()
        writer.writerows(rows)
    paths, labels = images_from_csv(tmp_path / "labels.csv", ["effusion", "nodule"], multi_label=True)
    assert paths[3] == tmp_path / "3.png"
    assert labels.tolist() == [[0, 1], [1, 1], [0, 0], [1, 0]]
    with pytest.raises(ValueError, match=r"missing columns \['pleural'\]"):
        images_from_csv(tmp_path / "labels.csv", ["effusion", "pleural"], multi_label=True)

    logits = torch.tensor([[-2.0, 3.0], [2.0, 1.0], [-1.0, -2.0], [3.0, -1.0]])
    metrics = classification_metrics(logits, labels.float(), multi_label=True)
    assert metrics == {"auroc": 1.0, "accuracy": 1.0}
    p = torch.tensor([0.1, 0.8, 0.3, 0.4])  # class-1 probabilities; one of four pos/neg pairs misordered
    logits = torch.stack([torch.zeros(4), torch.log(p / (1 - p))], dim=1)
    single = classification_metrics(logits, torch.tensor([0, 1, 1, 0]), multi_label=False)
    assert math.isclose(single["accuracy"], 0.75) and math.isclose(single["auroc"], 0.75, rel_tol=1e-6)
