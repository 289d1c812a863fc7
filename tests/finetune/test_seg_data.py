import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ssl3d.data.volumes import VolumeLoader
from ssl3d.finetune.seg_data import (
    LOBE_CLASSES,
    BalancedSliceSampler,
    SegmentationCase,
    SegmentationData,
    aal_lobe_lookup,
    cases_from_datalist,
    cases_from_folder,
    check_pair,
    label_subset,
    load_case,
    lobe_cases,
)
from tests.finetune.helpers import AFFINE, synthetic_case, write_case, write_datalist

LOADER = VolumeLoader(size=(16, 16), slice_axis=2, orientation=None, resize=True)
MAP = {0: 0, 1: 1, 2: 2}


def _case(paths, band=None):
    return SegmentationCase(Path(paths["image"]), Path(paths["label"]), band)


def test_shape_mismatch_is_reported_before_training(tmp_path):
    image, label = synthetic_case(0)
    paths = write_case(tmp_path, "a", image, label[:, :, :-1])
    with pytest.raises(ValueError, match=r"shape \(20, 24, 10\) but label .* shape \(20, 24, 9\)"):
        load_case(_case(paths), LOADER, MAP, 3)


def test_affine_mismatch_is_reported_before_training(tmp_path):
    image, label = synthetic_case(0)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    paths = write_case(tmp_path, "a", image, label, label_affine=shifted)
    with pytest.raises(ValueError, match="different affines"):
        load_case(_case(paths), LOADER, MAP, 3)


def test_label_values_outside_the_class_map_are_listed(tmp_path):
    image, label = synthetic_case(0)
    label[0, 0, 0], label[1, 0, 0] = 7, 9
    paths = write_case(tmp_path, "a", image, label)
    with pytest.raises(ValueError, match=r"label values \[7, 9\] are not in the class map"):
        load_case(_case(paths), LOADER, MAP, 3)


def test_data_module_checks_every_volume_in_setup(tmp_path):
    datalist = write_datalist(tmp_path, train=1, val=1, test=0)
    entries = json.loads(datalist.read_text())
    label_path = tmp_path / entries["validation"][0]["label"]
    nib.save(nib.Nifti1Image(np.full((20, 24, 10), 205, np.uint8), AFFINE), str(label_path))
    data = SegmentationData(
        datalist=str(datalist), class_names=["bg", "a", "b"], label_map=MAP, size=(16, 16)
    )
    with pytest.raises(ValueError, match=r"label values \[205\]"):
        data.setup("fit")


def test_labels_are_mapped_resized_and_the_band_keeps_world_coordinates(tmp_path):
    image, label = synthetic_case(0)
    raw = np.select([label == 1, label == 2], [420, 205], 0).astype(np.int16)
    paths = write_case(tmp_path, "a", image, raw)
    case = load_case(_case(paths, band=(3, 8)), LOADER, {0: 0, 205: 1, 420: 2}, 3)
    assert case.images.shape == (5, 1, 16, 16) and case.labels.shape == (5, 16, 16)
    assert case.full_labels.shape == (5, 20, 24)
    expected = torch.from_numpy(np.moveaxis(label, 2, 0)[3:8].astype(np.int64))
    assert torch.equal(case.full_labels, torch.where(expected == 1, 2, torch.where(expected == 2, 1, 0)))
    assert set(case.labels.unique().tolist()) == {0, 1, 2}
    np.testing.assert_allclose(case.affine @ [0, 0, 0, 1], AFFINE @ [0, 0, 3, 1])
    assert case.spacing == (3.0, 2.0, 2.0)


def test_balanced_sampler_takes_every_labelled_slice_and_as_many_unlabelled():
    sampler = BalancedSliceSampler(labelled=[0, 1, 2], unlabelled=list(range(10, 30)), ratio=1.0, seed=0)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(drawn) == len(sampler) == 6
        assert {0, 1, 2} <= set(drawn) and len(set(drawn)) == 6
        epochs.append(frozenset(drawn) - {0, 1, 2})
    assert len(set(epochs)) > 1  # the unlabelled slices change between epochs
    assert len(BalancedSliceSampler([0, 1, 2], [9], ratio=1.0)) == 4


def test_datalists_and_folders_list_pairs(tmp_path):
    datalist = write_datalist(tmp_path, train=2, val=0, test=1)
    cases = cases_from_datalist(datalist, "training")
    assert [c.image.name for c in cases] == ["case0_image.nii.gz", "case1_image.nii.gz"]
    assert all(c.label.is_file() for c in cases)
    image, label = synthetic_case(0)
    write_case(tmp_path / "folder" / "images", "x", image, None)
    write_case(tmp_path / "folder" / "labels", "x", label, None)  # same file name as the image
    cases = cases_from_folder(tmp_path / "folder")
    assert len(cases) == 1 and cases[0].label == (tmp_path / "folder" / "labels" / "x_image.nii.gz").resolve()
    write_case(tmp_path / "folder" / "images", "y", image, None)
    with pytest.raises(ValueError, match=r"no label file for y_image\.nii\.gz"):
        cases_from_folder(tmp_path / "folder")


def test_label_subset_takes_the_fraction_of_slices_per_seed():
    assert label_subset(32, 0.1, seed=0).tolist() == sorted(label_subset(32, 0.1, seed=0).tolist())
    assert len(label_subset(32, 0.1, seed=0)) == 3  # round(3.2)
    assert len(label_subset(5, 0.01, seed=0)) == 1  # at least one slice
    assert label_subset(7, 1.0, seed=3).tolist() == list(range(7))
    assert torch.equal(label_subset(100, 0.2, seed=1), label_subset(100, 0.2, seed=1))
    assert not torch.equal(label_subset(100, 0.2, seed=1), label_subset(100, 0.2, seed=2))
    assert len(set(label_subset(100, 0.2, seed=1).tolist())) == 20
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="label_fraction must be in"):
            label_subset(10, bad)


def test_low_label_data_module_trains_only_on_the_chosen_slices(tmp_path):
    datalist = write_datalist(tmp_path, train=2, val=0, test=1)  # 2 cases x 10 slices
    kwargs = dict(datalist=str(datalist), class_names=["bg", "a", "b"], label_map=MAP, size=(16, 16))
    with pytest.raises(ValueError, match="label_fraction must be in"):
        SegmentationData(**kwargs, label_fraction=0.0)
    data = SegmentationData(**kwargs, label_fraction=0.25, unlabelled_ratio=10.0, seed=4)
    data.setup("fit")
    kept = data.labelled_slices()
    assert kept.tolist() == label_subset(20, 0.25, seed=4).tolist() and len(kept) == 5
    _, sampler = data.train_dataset()
    drawn = list(sampler)
    assert sorted(drawn) == kept.tolist()  # every kept slice once (the ratio takes all unlabelled ones)
    full = SegmentationData(**kwargs, unlabelled_ratio=10.0)
    full.setup("fit")
    assert sorted(full.train_dataset()[1]) == list(range(20))


# -- the built-in lobe task ------------------------------------------------------------------------------------


def _fake_colin(folder: Path) -> np.ndarray:
    """A 1 mm 'Colin27' of 8^3 voxels whose AAL atlas has three regions, and its label file."""
    folder.mkdir()
    atlas = np.zeros((8, 8, 8), dtype=np.uint8)
    atlas[:4, :, 2:] = 1  # Precentral (frontal)
    atlas[4:, :, 2:] = 2  # Insula
    atlas[:, :, :2] = 5  # Vermis (cerebellum)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    image = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32) + (atlas > 0)
    nib.save(nib.Nifti1Image(image, affine), folder / "ch2bet.nii.gz")
    nib.save(nib.Nifti1Image(atlas, affine), folder / "aal.nii.gz")
    (folder / "aal.nii.txt").write_text("1 Precentral_L 2001\n2 Insula_L 3001\n5 Vermis_3 9120\n")
    return atlas


def test_aal_regions_are_grouped_into_lobes_by_their_code(tmp_path):
    _fake_colin(tmp_path / "colin")
    lookup = aal_lobe_lookup(tmp_path / "colin" / "aal.nii.txt")
    assert lookup.tolist() == [0, 1, 2, 0, 0, 7]
    assert [LOBE_CLASSES[i] for i in lookup[[1, 2, 5]]] == ["frontal", "insula and limbic", "cerebellum"]
    bad = tmp_path / "bad.txt"
    bad.write_text("1 Precentral_L 2001\n2 Insula_L\n")
    with pytest.raises(ValueError, match=r"bad.txt: region 2 \(Insula_L\) has no AAL region code"):
        aal_lobe_lookup(bad)


def test_lobe_task_puts_the_atlas_on_each_brain_by_world_coordinates(tmp_path):
    atlas = _fake_colin(tmp_path / "colin")
    demo = tmp_path / "demo"
    demo.mkdir()
    # A 2 mm 'MNI152' of 4^3 voxels whose voxel centres fall on every other 1 mm voxel of the atlas.
    for name in ("mni152_t1_2mm.nii.gz", "mni152_tissue_2mm.nii.gz"):
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), demo / name)
    train, test = lobe_cases(demo, tmp_path / "colin")
    lookup = np.array([0, 1, 2, 0, 0, 7])
    mni_labels = np.asarray(nib.load(str(train[0].label)).dataobj)
    np.testing.assert_array_equal(mni_labels, lookup[atlas[::2, ::2, ::2]])
    np.testing.assert_array_equal(np.asarray(nib.load(str(test[0].label)).dataobj), lookup[atlas])
    assert test[0].image == tmp_path / "colin" / "ch2bet.nii.gz"
    for case in (*train, *test):
        check_pair(case.image, case.label)


def test_lobe_task_needs_its_classes_and_says_where_colin27_comes_from(tmp_path):
    with pytest.raises(ValueError, match="demo='lobes' has the classes"):
        SegmentationData(demo="lobes")
    with pytest.raises(ValueError, match="demo must be one of"):
        SegmentationData(demo="organs")
    data = SegmentationData(
        demo="lobes",
        class_names=LOBE_CLASSES,
        label_map=None,
        colin_dir=str(tmp_path / "nowhere"),
        demo_dir=str(tmp_path),
    )
    with pytest.raises(FileNotFoundError, match="mricron-data"):
        data.setup("fit")


def test_lobe_task_on_the_real_brains_has_every_lobe_in_both():
    data = SegmentationData(demo="lobes", class_names=LOBE_CLASSES, label_map=None, size=(32, 32))
    data.setup("fit")
    (train,), (test,) = data.train_cases, data.test_cases
    assert train.images.shape[1:] == test.images.shape[1:] == (1, 32, 32)
    assert train.full_labels.shape[1:] == (99, 117) and test.full_labels.shape[1:] == (181, 217)
    for case in (train, test):
        assert set(case.labels.unique().tolist()) == set(range(len(LOBE_CLASSES)))
