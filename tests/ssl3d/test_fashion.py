"""The Fashion-MNIST check of the 2D branch: data reading, batched views and the evaluation command."""

import copy
import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from agreement.knn import knn_accuracy
from ssl3d.evaluate import main as evaluate_main
from ssl3d.fashion import (
    FASHION_MNIST_DIR,
    BatchViews,
    CheckConfig,
    DatasetNotFoundError,
    PrototypePath,
    check_subsets,
    class_balanced_subset,
    load_fashion_mnist,
    pooled_features,
    probe_branch,
    read_idx,
    run_check,
)
from ssl3d.module import JointSSL
from ssl3d.probe import recalibrate_batchnorm


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 255, size=(5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / "a.idx", array, compress)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), array)


def test_bad_idx_files_name_the_file(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="junk: not an idx file"):
        read_idx(tmp_path / "junk")
    array = np.zeros((4, 2, 2), dtype=np.uint8)
    write_idx(tmp_path / "short", array, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="short: idx header says shape"):
        read_idx(tmp_path / "short")


def test_missing_data_says_what_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path, split="test")


def test_image_folders_are_read_by_class(tmp_path):
    for split in ("train", "test"):
        for label, name in enumerate(["bag", "coat"]):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 40 * label + i, dtype=np.uint8)).save(
                    tmp_path / split / name / f"{i}.png"
                )
    images, labels, classes = load_fashion_mnist(tmp_path, "train")
    assert classes == ("bag", "coat") and images.shape == (6, 1, 8, 8)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert images[3, 0, 0, 0] == pytest.approx(40 / 255)


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist (CI installs it)"
)
def test_the_debian_package_is_read():
    images, labels, classes = load_fashion_mnist(split="test")
    assert images.shape == (10000, 1, 28, 28) and classes[9] == "Ankle boot"
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_class_balanced_subset():
    labels = torch.tensor([0] * 10 + [1] * 4)
    picked = class_balanced_subset(labels, 5, seed=0)
    assert torch.bincount(labels[picked]).tolist() == [5, 4]
    assert torch.equal(picked, class_balanced_subset(labels, 5, seed=0))


def test_class_balanced_subset_leaves_out_the_excluded():
    labels = torch.tensor([0] * 10 + [1] * 10)
    picked = class_balanced_subset(labels, 3, seed=0, exclude=torch.arange(0, 20, 2))
    assert torch.bincount(labels[picked]).tolist() == [3, 3]
    assert bool((picked % 2 == 1).all())


def test_tuning_split_shares_no_image_with_the_report_split():
    train_labels, test_labels = torch.arange(600) % 10, torch.arange(300) % 10
    config = CheckConfig(train_images=100, knn_train_images=50, knn_test_images=100)
    report = check_subsets(config, train_labels, test_labels, 10)
    assert torch.equal(report[0], class_balanced_subset(train_labels, 10, seed=1))  # the reported images
    tuning = check_subsets(
        CheckConfig(**{**config.__dict__, "split": "tuning"}), train_labels, test_labels, 10
    )
    assert [len(idx) for idx in tuning] == [100, 50, 100]
    assert not set(torch.cat(tuning[:2]).tolist()) & set(torch.cat(report[:2]).tolist())
    assert not set(tuning[2].tolist()) & set(report[2].tolist())
    with pytest.raises(ValueError, match="too few images left for knn_test_images"):
        check_subsets(
            CheckConfig(**{**config.__dict__, "split": "tuning", "knn_test_images": 200}),
            train_labels,
            test_labels,
            10,
        )


def test_swav_queue_goes_to_swav_only():
    config = CheckConfig(swav_queue_length=256, queue_start_epoch=1)
    assert config.model_kwargs("swav", 0)["queue_length"] == 256
    assert "queue_length" not in config.model_kwargs("deepcluster", 0)
    model = JointSSL(**{**config.model_kwargs("swav", 0), "backbone": "resnet10t", "prototypes_2d": [20]})
    assert model.clustering_2d.queue is not None and model.clustering_2d.queue.length == 256


def write_tiny_fashion(folder):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 400), ("t10k", 100)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = (rng.random((n, 16, 16)) * 60 + labels[:, None, None] * 19).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress=False)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress=False)


TINY_CHECK = dict(
    backbone="resnet10t",
    train_images=100,
    epochs=2,
    batch_size=20,
    prototypes=10,
    projection_hidden=32,
    projection_dim=16,
    knn_train_images=50,
    knn_test_images=50,
    k=5,
)


def test_tiny_check_runs_end_to_end_with_a_queue(tmp_path):
    write_tiny_fashion(tmp_path)
    config = CheckConfig(
        **TINY_CHECK, swav_queue_length=40, freeze_prototypes_steps=2, methods=["swav"], split="tuning"
    )
    result = run_check(
        config, seeds=[0], random_seeds=2, data_dir=tmp_path, out_dir=tmp_path / "out", progress=False
    )
    run = result["methods"]["swav"]["runs"][0]
    assert run["steps"] == 10 and len(result["random"]["accuracy_by_seed"]) == 2
    assert len(run["online_knn_by_epoch"]) == 2 and all(0 <= a <= 1 for a in run["online_knn_by_epoch"])
    assert 0 <= run["linear_accuracy"] <= 1 and len(result["random"]["linear_by_seed"]) == 2
    assert "| linear probe |" in (tmp_path / "out" / "fashion_check.md").read_text()
    assert result["config"]["split"] == "tuning" and result["config"]["swav_queue_length"] == 40
    assert "split: tuning" in (tmp_path / "out" / "fashion_check.md").read_text()
    assert (tmp_path / "out" / "fashion_check.png").is_file()
    clustering = run["clustering"]
    assert set(clustering) == {
        "kmeans_accuracy",
        "kmeans_nmi",
        "kmeans_ari",
        "prototype_nmi",
        "prototype_purity",
        "prototype_ari",
        "prototype_usage",
    }
    assert all(-1 <= value <= 1 for value in clustering.values())
    assert np.asarray(run["kmeans_contingency"]).sum() == 50  # every test image once
    assert "| swav − own initialisation (paired) |" in (tmp_path / "out" / "fashion_check.md").read_text()


def test_tiny_check_runs_deepcluster_with_small_crops(tmp_path):
    write_tiny_fashion(tmp_path)
    config = CheckConfig(
        **TINY_CHECK, heads_deepcluster=2, small_crops=3, small_size=8, methods=["deepcluster"]
    )
    result = run_check(config, seeds=[0], random_seeds=2, data_dir=tmp_path, progress=False)
    run = result["methods"]["deepcluster"]["runs"][0]
    # DeepCluster-V2 has targets from step 0 (memory of the large views filled first): no zero loss.
    assert run["steps"] == 10 and all(loss > 0 for loss in run["loss_intra"])


def test_batch_views_small_crops_are_smaller_deterministic_views():
    images = torch.rand(8, 1, 28, 28)
    views = BatchViews(images, small_crops=3, small_size=12)
    samples = [{"index": i, "seed": 100 + i} for i in range(8)]
    first, again = views(samples), views(samples)
    assert first["small_views"].shape == (8, 3, 1, 12, 12)
    assert torch.equal(first["small_views"], again["small_views"])
    assert not torch.equal(first["small_views"][:, 0], first["small_views"][:, 1])
    assert "small_views" not in BatchViews(images)(samples)
    with pytest.raises(ValueError, match="small_scale must be"):
        BatchViews(images, small_crops=2, small_scale=(0.3, 0.1))


def test_batch_views_without_jitter_or_blur_are_the_image_or_its_mirror():
    images = torch.rand(32, 1, 12, 12)
    views = BatchViews(images, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, blur_p=0.0)
    out = views.view(images, torch.Generator().manual_seed(0))
    mirrored = [not torch.allclose(v, im, atol=1e-5) for v, im in zip(out, images)]
    for image, view, flip in zip(images, out, mirrored):
        torch.testing.assert_close(view, image.flip(-1) if flip else image, atol=1e-5, rtol=0)
    assert 4 < sum(mirrored) < 28  # flips with probability 1/2


def test_batch_views_are_deterministic_and_differ_between_views():
    images = torch.rand(8, 1, 28, 28)
    views = BatchViews(images)
    samples = [{"index": i, "seed": 100 + i} for i in range(8)]
    first, again = views(samples), views(samples)
    assert torch.equal(first["view1"], again["view1"]) and torch.equal(first["view2"], again["view2"])
    assert first["view1"].shape == (8, 1, 28, 28) and not torch.equal(first["view1"], first["view2"])
    assert float(first["view1"].min()) >= 0.0 and float(first["view1"].max()) <= 1.0 + 1e-6
    other = views([{"index": i, "seed": 7 + i} for i in range(8)])
    assert not torch.equal(first["view1"], other["view1"])


def test_evaluate_reports_missing_data_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(
            ["fashion", "--data_dir", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "out")]
        )
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nowhere" in last and "dataset-fashion-mnist" in last
    assert not (tmp_path / "out").exists()


def test_evaluate_rejects_impossible_sizes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["fashion", "--batch_size", "0", "--out_dir", str(tmp_path / "out")])
    assert "--batch_size must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(["fashion", "--swav_queue_length", "64", "--out_dir", str(tmp_path / "out")])
    assert (
        "--swav_queue_length 64 must be 0 (no queue) or at least --batch_size 128" in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        evaluate_main(["fashion", "--small_crop_scale", "0.5", "0.1", "--out_dir", str(tmp_path / "out")])
    assert "--small_crop_scale must be LOW HIGH" in capsys.readouterr().err


def tiny_model(seed: int = 0) -> JointSSL:
    torch.manual_seed(seed)
    kwargs = CheckConfig(**TINY_CHECK).model_kwargs("swav", seed)
    return JointSSL(**kwargs)


def test_prototype_path_scores_are_the_training_scores():
    model = tiny_model().eval()
    images = torch.rand(6, 1, 16, 16)
    z = torch.nn.functional.normalize(model.projection_2d(model.embed_slices(images)))
    torch.testing.assert_close(PrototypePath(model)(images), model.clustering_2d.prototypes(z)[0])


def test_probe_branch_leaves_the_model_alone_and_keeps_the_knn_protocol():
    """Re-estimating BatchNorm through the whole branch gives the backbone the same statistics as re-estimating
    the backbone alone (the protocol of the README's kNN figures)."""
    model = tiny_model()
    torch.manual_seed(1)
    labels = torch.arange(60) % 10
    images = torch.rand(60, 1, 16, 16) * 0.5 + labels.view(-1, 1, 1, 1) / 20
    data = {
        "recalibrate": torch.rand(40, 1, 16, 16),
        "train_images": images[:40],
        "train_labels": labels[:40],
        "test_images": images[40:],
        "test_labels": labels[40:],
        "num_classes": 10,
    }
    before = {key: value.clone() for key, value in model.state_dict().items()}
    readout = probe_branch(PrototypePath(model), data, k=5)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())

    encoder = recalibrate_batchnorm(copy.deepcopy(model.encoder).backbone, data["recalibrate"])
    reference = copy.deepcopy(model.encoder)
    reference.backbone = encoder
    expected = knn_accuracy(
        pooled_features(reference, data["train_images"]),
        data["train_labels"],
        pooled_features(reference, data["test_images"]),
        data["test_labels"],
        10,
        k=5,
    )
    assert readout["knn"] == expected
    assert readout["prototypes"]["usage"] <= 1 and set(readout["kmeans"]) == {
        "accuracy",
        "nmi",
        "ari",
        "contingency",
    }
