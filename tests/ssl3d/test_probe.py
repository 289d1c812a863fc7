import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("nilearn")
timm = pytest.importorskip("timm")

from ssl3d.data.mni import MNI152, TISSUE_NAMES, load_mni152  # noqa: E402
from ssl3d.probe import (  # noqa: E402
    intensity_baseline,
    intensity_patch_features,
    make_tissue_probe_data,
    patch_features,
    patch_label_grid,
    recalibrate_batchnorm,
    slice_bands,
    tissue_knn_probe,
    tissue_knn_probe_per_level,
)


@pytest.fixture(scope="module")
def mni():
    return load_mni152(2)


@pytest.fixture(scope="module")
def data(mni):
    return make_tissue_probe_data(mni=mni)


def _lookup_fn(data, per_image):
    """A feature_fn that recognises each probe image and returns ``per_image(index)`` for it."""
    images = torch.cat([data.train.images, data.test.images])

    def feature_fn(batch):
        indices = [int((images == image).flatten(1).all(1).nonzero()[0, 0]) for image in batch]
        return [torch.stack([per_image(index) for index in indices])]

    return feature_fn


# Bands and labels.


def test_default_bands_are_disjoint_with_a_gap(data):
    train, test = set(data.train.slices), set(data.test.slices)
    assert train and test and not train & test
    assert min(test) - max(train) >= 2
    assert data.train.images.shape[0] == len(train) and data.test.images.shape[0] == len(test)


def test_slice_bands_either_order_and_fraction_bounds():
    train, test = slice_bands(20, (0.6, 1.0), (0.0, 0.5))
    assert train == list(range(12, 20)) and test == list(range(0, 10))


@pytest.mark.parametrize(
    ("train_range", "test_range"),
    [
        ((0.3, 0.3), (0.6, 0.8)),  # empty
        ((0.31, 0.34), (0.6, 0.8)),  # no slice of a 20-slice axis
        ((0.2, 0.6), (0.5, 0.8)),  # overlapping
        ((0.2, 0.5), (0.5, 0.8)),  # touching, no gap
        ((0.2, 0.46), (0.48, 0.8)),  # disjoint fractions but neighbouring slices 9 and 10
        ((-0.1, 0.4), (0.6, 0.8)),
        ((0.2, 0.4, 0.5), (0.6, 0.8)),
    ],
)
def test_bad_bands_raise(train_range, test_range):
    with pytest.raises(ValueError):
        slice_bands(20, train_range, test_range)


def test_make_data_rejects_bad_ranges_and_sizes(mni):
    with pytest.raises(ValueError, match="overlap"):
        make_tissue_probe_data(mni=mni, train_range=(0.25, 0.6), test_range=(0.55, 0.8))
    with pytest.raises(ValueError):
        make_tissue_probe_data(mni=mni, train_range=(0.5, 0.25))
    with pytest.raises(ValueError, match="patch"):
        make_tissue_probe_data(mni=mni, size=(64, 64), patch=5)
    with pytest.raises(ValueError, match="slice_axis"):
        make_tissue_probe_data(mni=mni, slice_axis=3)


def test_patch_label_grid_majority_on_hand_made_map():
    labels = torch.tensor(
        [
            [0, 0, 1, 1, 2, 2],
            [0, 1, 1, 1, 2, 2],
            [0, 0, 2, 3, 3, 2],
            [3, 3, 0, 2, 2, 2],
            [3, 3, 0, 2, 2, 2],
            [3, 1, 1, 2, 2, 2],
        ]
    )[None]
    # 3x3 cells of the 6x6 map.
    expected = torch.tensor([[[0, 2], [3, 2]]])
    assert torch.equal(patch_label_grid(labels, (2, 2), 4), expected)
    # 2x2 cells; the cell at (1, 0) is a 2-2 tie of 0 and 3 and goes to the lower class.
    expected_3x3 = torch.tensor([[[0, 1, 2], [0, 2, 2], [3, 2, 2]]])
    assert torch.equal(patch_label_grid(labels, (3, 3), 4), expected_3x3)
    with pytest.raises(ValueError):
        patch_label_grid(labels, (2, 2), 3)
    with pytest.raises(ValueError):
        patch_label_grid(labels[0], (2, 2), 4)


def test_data_shapes_ranges_and_patch_labels(data, mni):
    for split in (data.train, data.test):
        n = len(split.slices)
        assert split.images.shape == (n, 1, 64, 64) and split.images.dtype == torch.float32
        assert split.pixel_labels.shape == (n, 64, 64)
        assert split.patch_labels.shape == split.keep.shape == (n, 16, 16)
        assert float(split.images.min()) >= 0.0 and float(split.images.max()) <= 1.0
        full = torch.from_numpy(mni.tissue[:, :, list(split.slices)]).permute(2, 0, 1)
        assert torch.equal(split.patch_labels, patch_label_grid(full, (16, 16), 4))
    assert data.grid == (16, 16) and data.num_classes == len(TISSUE_NAMES)


def test_images_match_the_pretraining_loader_on_the_template_file(data, mni, tmp_path):
    nib = pytest.importorskip("nibabel")
    from ssl3d.data.volumes import VolumeLoader

    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(mni.t1, mni.affine), path)
    sections = VolumeLoader(size=(64, 64), slice_axis=2, resize=True).load(path)[0]
    for split in (data.train, data.test):
        assert torch.allclose(split.images[:, 0], sections[list(split.slices)], atol=1e-5)


def test_background_is_subsampled_to_the_largest_tissue_class(data, mni):
    for split in (data.train, data.test):
        labels = split.patch_labels[split.keep]
        counts = torch.bincount(labels, minlength=4)
        assert 0 < counts[0] <= counts[1:].max()
        # Every tissue patch is kept, only background is dropped.
        assert bool(split.keep[split.patch_labels != 0].all())
        assert int((split.patch_labels == 0).sum()) > counts[0]
    again = make_tissue_probe_data(mni=mni, seed=0)
    other = make_tissue_probe_data(mni=mni, seed=1)
    assert torch.equal(again.train.keep, data.train.keep) and torch.equal(again.test.keep, data.test.keep)
    assert not torch.equal(other.train.keep, data.train.keep)


def test_slice_axis_and_percentile_normalisation_on_a_synthetic_volume():
    # Intensity grows along axis 0 from 10 to 109; the tissue is grey in one half of axis 1.
    t1 = np.broadcast_to((10.0 + np.arange(100.0))[:, None, None], (100, 12, 8)).astype(np.float32)
    tissue = np.zeros(t1.shape, dtype=np.int64)
    tissue[:, 6:, :] = 1
    volume = MNI152(t1=np.ascontiguousarray(t1), tissue=tissue, affine=np.eye(4))
    data = make_tissue_probe_data(
        slice_axis=0, train_range=(0.0, 0.4), test_range=(0.6, 1.0), size=(8, 8), patch=2, mni=volume
    )
    lo, hi = np.percentile(t1, [0.5, 99.5])
    for split in (data.train, data.test):
        expected = np.clip((10.0 + np.array(split.slices) - lo) / (hi - lo), 0, 1)
        # The loader's anti-aliasing pads with zeros, which darkens the rows it shrinks; skip those.
        values = split.images[:, 0, 1:-1].flatten(1)
        assert torch.allclose(values, values[:, :1].expand_as(values))
        np.testing.assert_allclose(values[:, 0].numpy(), expected, atol=1e-5)
        assert torch.equal(split.patch_labels[:, :2], torch.zeros_like(split.patch_labels[:, :2]))
        assert torch.equal(split.patch_labels[:, 2:], torch.ones_like(split.patch_labels[:, 2:]))
    assert float(data.train.images.min()) == 0.0 and float(data.test.images[:, :, 1:-1].max()) == 1.0


# Patch features.


def test_patch_features_shapes_order_and_per_level_normalisation():
    def feature_fn(images):
        n = images.shape[0]
        ids = images[:, 0, :4, :4] * 100  # the pixel value codes the (image, row, col) position
        angle = ids * (np.pi / 2) / 1000
        exact = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)  # already at grid size
        coarse = torch.randn(n, 3, 2, 2) * 5
        return [exact, coarse]

    n = 5
    images = torch.zeros(n, 1, 4, 4)
    ids = torch.arange(n * 16, dtype=torch.float32).reshape(n, 4, 4)
    images[:, 0] = ids / 100
    features = patch_features(feature_fn, images, (4, 4), batch_size=2)
    assert features.shape == (n * 16, 5)
    np.testing.assert_allclose(
        features[:, 0].numpy(), np.cos(np.arange(n * 16) * np.pi / 2 / 1000), atol=1e-5
    )
    assert torch.allclose(features[:, :2].norm(dim=1), torch.ones(n * 16), atol=1e-5)
    assert torch.allclose(features[:, 2:].norm(dim=1), torch.ones(n * 16), atol=1e-5)


def test_patch_features_shrinks_by_area_and_batches_consistently():
    torch.manual_seed(0)
    images = torch.rand(7, 1, 16, 16)

    def feature_fn(batch):
        return [torch.cat([batch, 1 - batch], dim=1)]

    full = patch_features(feature_fn, images, (4, 4), batch_size=64)
    assert torch.allclose(full, patch_features(feature_fn, images, (4, 4), batch_size=3))
    pooled = F.avg_pool2d(torch.cat([images, 1 - images], dim=1), 4)
    expected = F.normalize(pooled, dim=1).permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.allclose(full, expected, atol=1e-6)


class _ModeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.seen_training = []

    def forward(self, images):
        self.seen_training.append(self.training)
        return [self.conv(images)]


def test_patch_features_runs_modules_in_eval_without_grad_and_restores_mode():
    module = _ModeRecorder().train()
    features = patch_features(module, torch.rand(3, 1, 8, 8), (2, 2))
    assert module.seen_training == [False] and module.training
    assert not features.requires_grad and features.shape == (12, 4)


@pytest.mark.parametrize(
    "bad_fn",
    [
        lambda images: [torch.zeros(images.shape[0] + 1, 2, 4, 4)],
        lambda images: [torch.zeros(images.shape[0], 2, 4)],
        lambda images: [torch.zeros(images.shape[0], 2, 4, 4), torch.zeros(images.shape[0], 8)],
        lambda images: [],
    ],
    ids=["batch-size", "3d", "second-level-2d", "empty"],
)
def test_bad_feature_fn_raises(bad_fn):
    with pytest.raises(ValueError):
        patch_features(bad_fn, torch.zeros(2, 1, 8, 8), (4, 4))


def test_bad_images_raise():
    with pytest.raises(ValueError):
        patch_features(lambda images: [images], torch.zeros(2, 8, 8), (4, 4))
    with pytest.raises(ValueError):
        patch_features(lambda images: [images], torch.zeros(0, 1, 8, 8), (4, 4))


# The probe end to end.


def test_probe_with_true_labels_as_features_succeeds(data):
    # The true patch labels, one-hot and upsampled to image size, must come back through resizing and kNN.
    patch_labels = torch.cat([data.train.patch_labels, data.test.patch_labels])
    exact = _lookup_fn(
        data,
        lambda i: F.interpolate(F.one_hot(patch_labels[i], 4).permute(2, 0, 1)[None].float(), size=data.size)[
            0
        ],
    )
    result = tissue_knn_probe(exact, data)
    assert result["accuracy"] == 1.0 and result["mean_per_class_accuracy"] == 1.0
    assert result["num_train"] == data.train.num_patches and result["num_test"] == data.test.num_patches
    assert set(result["per_class"]) == {TISSUE_NAMES[c] for c in data.test.kept_labels().unique().tolist()}
    # The labels resized with the image give each patch its class fractions: close, not exact, since
    # patches mix tissues at this resolution.
    pixel_labels = torch.cat([data.train.pixel_labels, data.test.pixel_labels])
    fractions = _lookup_fn(data, lambda i: F.one_hot(pixel_labels[i], 4).permute(2, 0, 1).float())
    assert tissue_knn_probe(fractions, data)["accuracy"] >= 0.9


def test_per_level_probe_scores_each_level_alone_and_all_together(data):
    patch_labels = torch.cat([data.train.patch_labels, data.test.patch_labels])
    exact = _lookup_fn(
        data, lambda i: F.one_hot(patch_labels[i], 4).permute(2, 0, 1).float()
    )  # at the patch grid: stride 4

    def two_levels(images):
        return [exact(images)[0], torch.ones(images.shape[0], 8, 2, 2)]

    results = tissue_knn_probe_per_level(two_levels, data)
    assert list(results) == ["level 1 (stride 4, 4 ch)", "level 2 (stride 32, 8 ch)", "all levels"]
    assert results["level 1 (stride 4, 4 ch)"]["accuracy"] == 1.0
    assert results["level 2 (stride 32, 8 ch)"] == tissue_knn_probe(lambda x: [two_levels(x)[1]], data)
    assert results["all levels"] == tissue_knn_probe(two_levels, data)
    frequencies = torch.bincount(data.test.kept_labels()).float() / data.test.num_patches
    assert results["level 2 (stride 32, 8 ch)"]["accuracy"] <= float(frequencies.max()) + 1e-6
    assert list(tissue_knn_probe_per_level(lambda x: [two_levels(x)[1]], data)) == [
        "level 1 (stride 32, 8 ch)"
    ]


def test_probe_with_constant_features_is_at_chance(data):
    result = tissue_knn_probe(lambda images: [torch.ones(images.shape[0], 8, 4, 4)], data)
    frequencies = torch.bincount(data.test.kept_labels()).float() / data.test.num_patches
    assert result["accuracy"] <= float(frequencies.max()) + 1e-6
    assert result["mean_per_class_accuracy"] <= 1 / len(result["per_class"]) + 1e-6


def test_probe_rejects_bad_knn_arguments(data):
    with pytest.raises(ValueError, match="k must"):
        tissue_knn_probe(lambda images: [images], data, k=0)
    with pytest.raises(ValueError, match="temperature"):
        intensity_baseline(data, temperature=0.0)


def _random_resnet18(seed):
    torch.manual_seed(seed)
    return timm.create_model(
        "resnet18", in_chans=1, features_only=True, out_indices=(1, 2, 3), pretrained=False
    )


def test_random_resnet18_probe_is_bounded_and_deterministic(data):
    first = tissue_knn_probe(_random_resnet18(0), data)
    second = tissue_knn_probe(_random_resnet18(0), data)
    assert first == second
    for key in ("accuracy", "mean_per_class_accuracy"):
        assert 0.0 <= first[key] <= 1.0
    assert all(0.0 <= value <= 1.0 for value in first["per_class"].values())


def test_intensity_baseline_beats_chance_and_encodes_level(data):
    result = intensity_baseline(data)
    frequencies = torch.bincount(data.test.kept_labels()).float() / data.test.num_patches
    assert float(frequencies.max()) < result["accuracy"] <= 1.0
    assert result["num_train"] == data.train.num_patches and result["num_test"] == data.test.num_patches
    # Uniform patches of different intensity must not look identical to a cosine kNN.
    grey, white = torch.full((1, 1, 4, 4), 0.3), torch.full((1, 1, 4, 4), 0.8)
    a, b = intensity_patch_features(grey, 4), intensity_patch_features(white, 4)
    assert float(F.cosine_similarity(a, b)) < 0.99
    assert torch.allclose(a.norm(dim=1), b.norm(dim=1))


def test_recalibrate_batchnorm_uses_the_exact_statistics_of_the_images():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 3)
    norm = nn.BatchNorm2d(3, momentum=0.3)
    module = nn.Sequential(conv, norm, nn.ReLU()).eval()
    weights = {
        k: v.clone() for k, v in module.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    images = torch.rand(10, 1, 8, 8) * 3 + 1
    recalibrate_batchnorm(module, images, batch_size=5)  # two batches of equal size: the mean of means
    with torch.no_grad():
        activations = conv(images)
    batch_vars = [activations[i : i + 5].var(dim=(0, 2, 3), unbiased=True) for i in (0, 5)]
    torch.testing.assert_close(norm.running_mean, activations.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.running_var, torch.stack(batch_vars).mean(0), rtol=1e-5, atol=1e-5)
    assert not module.training and norm.momentum == 0.3
    assert all(torch.equal(module.state_dict()[k], v) for k, v in weights.items())
    bare = nn.Conv2d(1, 2, 3)
    assert recalibrate_batchnorm(bare, images) is bare
