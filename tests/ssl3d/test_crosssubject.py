"""Cross-subject probes: data and label alignment, the probes on features with known answers, the verdicts,
the comparison with random initialisations, and a positive control (a supervised encoder scores better)."""

import copy

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("nilearn")
pytest.importorskip("sklearn")

from ssl3d import crosssubject as cs
from ssl3d.encoder import SliceEncoder
from ssl3d.fashion import DatasetNotFoundError
from ssl3d.module import JointSSL
from ssl3d.probe import recalibrate_batchnorm
from tests.ssl3d.tiny import TINY_MODEL

SIZE = (32, 32)
NUM_SLICES = 8


@pytest.fixture(scope="module")
def data():
    # Colin27 comes from the Debian package mricron-data, which CI installs: a missing package fails here.
    return cs.cross_subject_data(SIZE, NUM_SLICES, slice_axis=2)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return JointSSL(**TINY_MODEL)


# Data and labels.


def test_missing_colin27_is_one_error_naming_the_package_and_the_option(tmp_path, monkeypatch):
    monkeypatch.setattr(cs, "DEFAULT_COLIN_DIR", tmp_path / "absent")
    with pytest.raises(DatasetNotFoundError) as error:
        cs.colin27_paths()
    message = str(error.value)
    assert "apt-get install mricron-data" in message and "--colin_dir" in message
    assert "ch2bet.nii.gz" in message
    (tmp_path / "ch2bet.nii.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"aal\.nii\.gz.*aal\.nii\.txt.*are missing.*colin_dir"):
        cs.cross_subject_data(SIZE, NUM_SLICES, colin_dir=tmp_path)


def test_sections_positions_and_preprocessing(data):
    for subject in (data.train, data.test):
        assert subject.sections.shape == (95, 1, *SIZE)
        assert float(subject.sections.min()) >= 0.0 and float(subject.sections.max()) <= 1.0
        # MNI152 2 mm grid: z = -72 + 2 k (nilearn's affine), the same world positions for both brains.
        np.testing.assert_allclose(subject.positions, -72.0 + 2.0 * np.arange(95))
        assert subject.presence.shape == (95, len(data.region_names))
    assert data.spacing == 2.0 and len(data.region_names) == 116
    assert data.region_names[0] == "Precentral_L" and data.region_names[-1] == "Vermis_10"
    assert len(data.slab_starts) == 95 - NUM_SLICES + 1
    assert data.slab_centres(data.train)[0] == pytest.approx(-72.0 + (NUM_SLICES - 1))


def test_colin27_is_resampled_onto_the_training_grid_at_the_same_world_positions(data):
    native = nib.as_closest_canonical(nib.load(str(cs.colin27_paths()["t1"])))
    t1 = np.asarray(native.dataobj)
    native_z = native.affine[2, 3] + native.affine[2, 2] * np.arange(t1.shape[2])
    native_area = (t1 > 0).sum(axis=(0, 1)).astype(float)  # mm² per 1 mm section
    resampled = cs._load_volumes(None).colin_t1
    area = (resampled > 0.5 * t1[t1 > 0].min()).sum(axis=(0, 1)) * 4.0  # 2 mm x 2 mm pixels
    expected = np.interp(data.test.positions, native_z, native_area, left=0.0, right=0.0)
    assert np.corrcoef(area, expected)[0, 1] > 0.99
    assert np.abs(area - expected).max() < 0.1 * expected.max()
    # The sections the probes use are those preprocessed volumes, brain where the native brain is.
    section_mean = data.test.sections.mean(dim=(1, 2, 3)).numpy()
    assert np.corrcoef(section_mean, expected)[0, 1] > 0.95


def test_aal_presence_agrees_between_the_brains_at_the_same_position(data):
    agreement = (data.train.presence == data.test.presence).mean(axis=0)
    assert np.mean(agreement >= 0.95) >= 0.9
    assert np.array_equal(data.train.brain, data.test.brain) or (
        len(np.setxor1d(data.train.brain, data.test.brain)) <= 2
    )
    names = list(data.region_names)
    positions = data.train.positions
    cerebellum = data.train.presence[:, names.index("Cerebelum_9_L")]
    motor = data.train.presence[:, names.index("Supp_Motor_Area_L")]
    assert positions[cerebellum].max() < 0 < positions[motor].min()


def test_region_presence_counts_area_at_the_nearest_section():
    atlas = np.zeros((4, 4, 3), dtype=np.uint8)
    atlas[:2, :2, 1] = 5  # 4 voxels of label 5 in section 1
    atlas[0, 0, 2] = 7  # 1 voxel of label 7 in section 2
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[2, 3] = 10.0  # sections at z = 10, 13, 16
    presence = cs.region_presence(atlas, affine, 2, np.array([13.0, 14.4, 16.0, 30.0]), [5, 7], 16.0)
    assert presence.tolist() == [[True, False], [True, False], [False, False], [False, False]]
    assert cs.region_presence(atlas, affine, 2, np.array([16.0]), [5, 7], 4.0).tolist() == [[False, True]]


def test_resample_to_grid_matches_world_coordinates():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(
        cs.resample_to_grid(data, affine, data.shape, affine, order=3), data, atol=1e-4
    )
    target = np.diag([2.0, 2.0, 2.0, 1.0])
    target[:3, 3] = 1.0  # voxel (i, j, k) of the target sits at source voxel (1 + 2i, 1 + 2j, 1 + 2k)
    labels = cs.resample_to_grid(data.astype(np.int64), affine, (2, 2, 3), target, order=0)
    assert labels[1, 0, 2] == data[3, 1, 5] and labels[0, 1, 0] == data[1, 3, 1]


# Probes on features with known answers.


def test_ridge_recovers_an_informative_feature_and_not_noise(data):
    rng = np.random.default_rng(0)
    train_y, test_y = data.train.positions, data.test.positions
    informative = cs.ridge_mae(train_y[:, None], train_y, test_y[:, None] + 0.1, test_y)
    assert informative < 1.0
    noise = cs.ridge_mae(rng.normal(size=(95, 16)), train_y, rng.normal(size=(95, 16)), test_y)
    assert noise > 0.8 * np.mean(np.abs(test_y - train_y.mean()))


def test_presence_auroc_is_one_for_the_labels_and_about_half_for_noise(data):
    brain_train, brain_test = data.train.brain, data.test.brain
    train_p, test_p = data.train.presence[brain_train], data.test.presence[brain_test]
    macro, per_region = cs.presence_auroc(train_p.astype(float), train_p, test_p.astype(float), test_p)
    assert macro == pytest.approx(1.0, abs=1e-3) and len(per_region) > 80
    assert all(0 < test_p[:, int(k)].mean() < 1 for k in per_region)
    rng = np.random.default_rng(0)
    noise, _ = cs.presence_auroc(
        rng.normal(size=(len(train_p), 32)), train_p, rng.normal(size=(len(test_p), 32)), test_p
    )
    assert abs(noise - 0.5) < 0.1
    with pytest.raises(ValueError, match="both classes"):
        cs.presence_auroc(np.zeros((4, 2)), np.ones((4, 3), bool), np.zeros((4, 2)), np.ones((4, 3), bool))


def test_directions_and_the_verdict_rule():
    assert not cs.higher_is_better("embedding / position MAE (mm)")
    assert cs.higher_is_better("backbone / region AUROC") and cs.higher_is_better(
        "volume / slab retrieval top-1"
    )
    with pytest.raises(ValueError, match="unknown probe"):
        cs.higher_is_better("embedding / accuracy")
    assert cs.beats_random(0.9, [0.70, 0.72, 0.71], higher_better=True)
    assert not cs.beats_random(0.9, [0.70, 0.72, 0.71], higher_better=False)
    assert cs.beats_random(5.0, [10.0, 11.0, 10.5], higher_better=False)
    assert not cs.beats_random(0.75, [0.70, 0.80, 0.71], higher_better=True)  # not better than every seed
    assert not cs.beats_random(0.73, [0.70, 0.72, 0.60], higher_better=True)  # better than all, within 2 std
    assert not cs.beats_random(0.9, [0.7], higher_better=True)  # one seed has no spread


def _row(metric, pretrained, values, initial=None):
    higher = cs.higher_is_better(metric)
    return {
        "metric": metric,
        "higher is better": higher,
        "pretrained": pretrained,
        "random mean": float(np.mean(values)),
        "random std": float(np.std(values, ddof=1)),
        "random values": values,
        "initial": initial,
        "paired difference": None if initial is None else pretrained - initial,
        "beats random beyond spread": cs.beats_random(pretrained, values, higher),
        "baselines": {"pixels 16x16": 20.0},
    }


def test_format_rows_and_verdict_lines():
    rows = [
        _row("embedding / position MAE (mm)", 5.0, [10.0, 11.0, 10.5], initial=10.0),
        _row("embedding / region AUROC", 0.9, [0.89, 0.91, 0.90]),
    ]
    table = cs.format_rows(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| metric | pretrained | random (n=3)")
    assert "embedding / position MAE (mm) ↓" in table and "10.500 ± 0.500" in table and "-5.000" in table
    assert "| yes |" in lines[2] and "| no |" in lines[3] and "pixels 16x16 20.000" in table
    line = cs.verdict(rows)
    assert "\n" not in line and "1 of 2" in line and "region AUROC" in line.split("not on")[1]
    assert "every metric" in cs.verdict(rows[:1]) and "any metric" in cs.verdict(rows[1:])


def test_the_several_runs_rule_needs_every_run_above_every_seed_and_its_own_init():
    assert cs.separates_from_random([0.9, 0.85, 0.88], [0.7, 0.8, 0.75], [0.1, 0.05, 0.1], higher_better=True)
    # One run below the best random seed.
    assert not cs.separates_from_random([0.9, 0.79, 0.88], [0.7, 0.8, 0.75], [0.1, 0.05, 0.1], True)
    # Every run above every seed, but one run worse than its own initialisation.
    assert not cs.separates_from_random([0.9, 0.85, 0.88], [0.7, 0.8, 0.75], [0.1, -0.01, 0.1], True)
    assert cs.separates_from_random([5.0, 6.0], [10.0, 11.0], [-5.0, -4.0], higher_better=False)
    assert not cs.separates_from_random([5.0, 6.0], [10.0, 11.0], [-5.0, -4.0], higher_better=True)


# Networks.


def test_one_pass_gives_the_embedding_and_the_backbone_features(tiny_model):
    images = torch.rand(3, 1, *SIZE)
    encoder = tiny_model.encoder.eval()
    with torch.no_grad():
        embedding, pooled = cs._embed_and_pool(encoder, images)
        torch.testing.assert_close(embedding, encoder(images))
        torch.testing.assert_close(pooled, encoder.backbone(images))
    assert "forward_head" not in vars(encoder.backbone)


def test_volume_embeddings_equal_embed_volumes_on_each_slab(data, tiny_model):
    model = copy.deepcopy(tiny_model).eval()
    with torch.no_grad():
        tokens = model.embed_slices(data.test.sections)
        slabs = cs._volume_embeddings(model, tokens, data)
        for start in (0, 40, len(data.slab_starts) - 1):
            volume = data.test.sections[start : start + NUM_SLICES].transpose(0, 1)[None]
            torch.testing.assert_close(slabs[start], model.embed_volumes(volume)[0], atol=1e-5, rtol=1e-5)


def test_compare_with_random_rows_pairing_and_baselines(data, tiny_model):
    initial = copy.deepcopy(tiny_model.state_dict())
    result = cs.compare_with_random(tiny_model, initial, [0, 1, 2], data)
    rows = {row["metric"]: row for row in result["rows"]}
    expected = {
        cs.metric_name(features, probe)
        for features in ("embedding", "backbone")
        for probe in (cs.POSITION, cs.REGIONS)
    } | {cs.metric_name("volume", p) for p in (cs.SLAB_CENTRE, cs.RETRIEVAL_ERROR, cs.RETRIEVAL_TOP1)}
    assert set(rows) == expected
    for row in rows.values():
        # The model is seed 0's initialisation, unchanged: the paired difference is 0 and it cannot win.
        assert row["pretrained"] == pytest.approx(row["random values"][0])
        assert row["paired difference"] == pytest.approx(0.0)
        assert not row["beats random beyond spread"] and len(row["random values"]) == 3
        assert np.isfinite(row["pretrained"]) and row["random std"] >= 0
    position = rows["embedding / position MAE (mm)"]
    assert set(position["baselines"]) == {"pixels 16x16", "mean pixel", "constant"}
    assert 0 < position["pretrained"] < position["baselines"]["constant"] * 1.5
    assert 0.5 < rows["embedding / region AUROC"]["pretrained"] <= 1.0
    assert set(rows["volume / slab retrieval top-1"]["baselines"]) == {"slab pixels 8x8"}
    assert len(result["per-region AUROC"]) > 80 and result["seconds"] > 0
    # The model itself is untouched (its BatchNorm statistics were re-estimated on a copy).
    assert all(torch.equal(v, initial[k]) for k, v in tiny_model.state_dict().items())
    slice_only = cs.compare_with_random(tiny_model, None, [0, 1], data, volume=False)
    assert {row["metric"].split(" / ")[0] for row in slice_only["rows"]} == {"embedding", "backbone"}
    assert all(row["paired difference"] is None for row in slice_only["rows"])


def test_checkpoint_networks_load_strictly_without_clustering_state(tmp_path, tiny_model):
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in tiny_model.state_dict().items()}
    state["clustering_2d.memory.bank"] = torch.zeros(7, 3)  # shapes that depend on the data are ignored
    path = tmp_path / "last.ckpt"
    hparams = {**tiny_model.hparams, "_instantiator": "pytorch_lightning.cli.instantiate_module"}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    loaded = cs.load_checkpoint_model(path)
    for key, value in loaded.state_dict().items():
        if key.startswith(("encoder.", "transformer.")):
            assert torch.equal(value, state[key])


# Positive control: an encoder trained with the labels on MNI152 must score clearly better on Colin27.


def _probe(encoder, data):
    encoder = copy.deepcopy(encoder)
    recalibrate_batchnorm(encoder, data.train.images)
    return cs.slice_probes(encoder, data)


def test_positive_control_supervised_encoder_beats_random_ones(data):
    def make(seed):
        torch.manual_seed(seed)
        return SliceEncoder("test_resnet", d_model=16, multi_level=False)

    randoms = [_probe(make(seed), data) for seed in (1, 2, 3)]
    encoder = make(0)
    images = data.train.images
    positions = torch.tensor(data.train.positions[data.train.brain], dtype=torch.float32)
    targets = (positions - positions.mean()) / positions.std()
    presence = torch.tensor(data.train.presence[data.train.brain], dtype=torch.float32)
    head = torch.nn.Linear(16, 1 + presence.shape[1])
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    encoder.train()
    for _ in range(60):
        index = torch.randint(0, images.shape[0], (16,), generator=generator)
        gamma = torch.exp(0.3 * torch.randn(16, 1, 1, 1, generator=generator))  # appearance changes
        batch = images[index] ** gamma + 0.03 * torch.randn(16, 1, *SIZE, generator=generator)
        out = head(encoder(batch))
        loss = F.mse_loss(out[:, 0], targets[index]) + F.binary_cross_entropy_with_logits(
            out[:, 1:], presence[index]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    supervised = _probe(encoder, data)
    position, regions = "embedding / position MAE (mm)", "embedding / region AUROC"
    assert supervised[position] < 0.6 * min(r[position] for r in randoms)
    assert supervised[regions] > max(r[regions] for r in randoms)


def test_features_constant_on_the_training_subject_are_dropped():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(40, 3)), rng.normal(size=(30, 3))
    train[:, 1] = 0.2  # a background pixel on the training brain...
    train[0, 1] += 1e-12  # ...with rounding noise
    test[:, 1] = 0.9  # that the test brain reaches
    y_train, y_test = train[:, 0] * 10, test[:, 0] * 10
    assert cs.ridge_mae(train, y_train, test, y_test) < 0.5
    constant = np.ones((40, 2))
    assert cs.ridge_mae(constant, y_train, test[:, :2], y_test) == pytest.approx(
        np.mean(np.abs(y_test - y_train.mean())), rel=1e-3
    )


def test_compare_runs_pairs_each_run_with_its_own_initialisation(data, tiny_model):
    """Runs that are their own initialisations: paired differences of exactly 0, equal to those seeds' random
    results, no verdict; a third random seed is added; a run of another architecture is refused."""
    runs = [cs.PretrainedRun(f"run{seed}", cs._fresh_model(tiny_model, seed), seed) for seed in (1, 0)]
    result = cs.compare_runs(runs, 3, data, volume=True)
    assert result["random seeds"] == [1, 0, 2]
    assert {row["metric"].split(" / ")[0] for row in result["rows"]} == {"embedding", "backbone", "volume"}
    for row in result["rows"]:
        assert row["pretrained values"] == row["random values"][:2]
        assert row["paired differences"] == [0.0, 0.0] and not row["separates from random"]
        assert row["pretrained std"] == pytest.approx(np.std(row["pretrained values"], ddof=1))
    table = cs.format_run_rows(result["rows"])
    assert "pretrained (n=2)" in table and "random (n=3)" in table and "+0.000 ± 0.000" in table
    assert "any metric" in cs.run_verdict(result["rows"])
    other = JointSSL(**{**TINY_MODEL, "d_model": 48})
    with pytest.raises(ValueError, match="run9: its networks do not fit the architecture of run1"):
        cs.compare_runs([runs[0], cs.PretrainedRun("run9", other, 9)], 2, data, volume=False)


def test_presence_auroc_is_scikit_learns_on_the_same_fits():
    """The fitted scores scored exactly (float64), one region as several."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    train, test = rng.normal(size=(80, 6)), rng.normal(size=(50, 6))
    train_p, test_p = train[:, :3] + rng.normal(size=(80, 3)) > 0, test[:, :3] + rng.normal(size=(50, 3)) > 0
    macro, per_region = cs.presence_auroc(train, train_p, test, test_p)
    train_s, test_s = cs._standardise(train, test)
    _, _, basis = np.linalg.svd(train_s, full_matrices=False)
    for column in range(3):
        model = linear_model.LogisticRegression(C=cs.LOGISTIC_C, solver="liblinear", intercept_scaling=100.0)
        scores = model.fit(train_s @ basis.T, train_p[:, column]).decision_function(test_s @ basis.T)
        expected = metrics.roc_auc_score(test_p[:, column], scores)
        assert per_region[str(column)] == pytest.approx(expected, abs=1e-12)
    assert macro == pytest.approx(np.mean(list(per_region.values())), abs=1e-12)
    single, one = cs.presence_auroc(train, train_p[:, :1], test, test_p[:, :1])
    assert list(one) == ["0"] and single == pytest.approx(per_region["0"], abs=1e-12)
