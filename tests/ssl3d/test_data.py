"""Data layer: listing, loading, validation, view augmentations, datasets and the demo data module."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.io import write_png

from agreement.sampling import SeededSampler
from ssl3d.data import (
    IndexedConcatDataset,
    JointSSLDataModule,
    SliceViewsDataset,
    TwoDifferentVolumeViews,
    TwoViews2D,
    VolumeLoader,
    VolumeSource,
    VolumeViewsDataset,
    check_volumes,
    default_volume_transforms,
    list_images,
    list_volumes,
    load_image,
    view_transform_2d,
)
from ssl3d.data import datamodule as datamodule_module


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: on a shared CPU, syncing two threads costs far more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scan(shape=(20, 18, 12), seed=0) -> np.ndarray:
    """A positive, smooth-ish volume with a dark border, like a head in air."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    return ((radius < 0.9) * (1.0 + rng.random(shape))).astype(np.float32)


def _nifti(path, data, zooms=(1.0, 1.0, 1.0)):
    image = nib.Nifti1Image(np.asarray(data), np.diag([*zooms, 1.0]))
    nib.save(image, path)
    return path


def _loader(**kwargs) -> VolumeLoader:
    options = {"num_slices": 8, "size": (16, 16)}
    options.update(kwargs)
    return VolumeLoader(**options)


# -- listing ---------------------------------------------------------------------------------------------------


def test_datalist_entries_resolve_relative_to_the_json_folder(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    a = _nifti(folder / "a.nii.gz", _scan())
    b = _nifti(folder / "sub" / "b.nii", _scan())
    datalist = folder / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "x"}, "sub/b.nii"]}))
    assert list_volumes(datalist) == [a.resolve(), b.resolve()]


def test_datalist_entries_resolve_relative_to_data_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    a = _nifti(data / "a.nii.gz", _scan())
    datalist = tmp_path / "elsewhere.json"
    datalist.write_text(json.dumps({"validation": [{"scan": "a.nii.gz"}]}))
    assert list_volumes(datalist, data_dir=data, key="scan", split="validation") == [a.resolve()]


def test_missing_datalist_entry_names_datalist_and_entry(tmp_path):
    _nifti(tmp_path / "a.nii.gz", _scan())
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": ["a.nii.gz", {"image": "gone.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match=r"list\.json.*gone\.nii\.gz"):
        list_volumes(datalist)


def test_datalist_without_the_split_is_a_clear_error(tmp_path):
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"test": ["a.nii.gz"]}))
    with pytest.raises(ValueError, match=r"list\.json.*no 'training' list"):
        list_volumes(datalist)


def test_glob_lists_nifti_numpy_and_dicom_series(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "series").mkdir()
    nii = _nifti(tmp_path / "x" / "a.nii.gz", _scan())
    npy = tmp_path / "x" / "y" / "b.npy"
    np.save(npy, _scan())
    for n in range(3):
        (tmp_path / "series" / f"slice{n}.dcm").write_bytes(b"not parsed when listing")
    (tmp_path / "notes.txt").write_text("ignored")
    assert list_volumes(data_dir=tmp_path) == [nii.resolve()]
    everything = list_volumes(data_dir=tmp_path, pattern="**/*")
    assert everything == sorted([nii.resolve(), npy.resolve(), (tmp_path / "series").resolve()])
    assert list_volumes(data_dir=tmp_path, pattern="**/*.dcm") == [(tmp_path / "series").resolve()]


def test_glob_without_matches_names_folder_and_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + r".*\*\*/\*\.nii\*"):
        list_volumes(data_dir=tmp_path)


def test_list_images_and_load_image(tmp_path):
    (tmp_path / "deep").mkdir()
    pixels = torch.arange(24 * 20, dtype=torch.float32).reshape(1, 24, 20)
    write_png((pixels / pixels.max() * 255).to(torch.uint8), str(tmp_path / "deep" / "b.png"))
    write_png(torch.full((1, 8, 8), 7, dtype=torch.uint8), str(tmp_path / "flat.png"))
    (tmp_path / "c.txt").write_text("no")
    found = list_images(tmp_path)
    assert found == sorted([(tmp_path / "deep" / "b.png").resolve(), (tmp_path / "flat.png").resolve()])
    image = load_image(found[0])
    assert image.shape == (1, 24, 20) and image.dtype == torch.float32
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    with pytest.raises(ValueError, match=r"flat\.png.*constant"):
        load_image(tmp_path / "flat.png")


def test_corrupt_png_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(ValueError, match=r"broken\.png.*cannot be read"):
        load_image(path)


# -- loading ---------------------------------------------------------------------------------------------------


def test_nifti_loads_as_one_channel_slab_in_unit_range(tmp_path):
    path = _nifti(tmp_path / "a.nii.gz", _scan((20, 18, 12)))
    volume = _loader()(path)
    assert volume.shape == (1, 8, 16, 16) and volume.dtype == torch.float32
    assert float(volume.min()) >= 0.0 and float(volume.max()) <= 1.0
    assert float(volume.max()) == 1.0  # the 99.5th percentile and above map to 1


def test_npy_loads_like_the_same_data_in_nifti(tmp_path):
    data = _scan((20, 18, 12))
    np.save(tmp_path / "a.npy", data)
    np.save(tmp_path / "b.npy", data[None])  # with a stored channel axis
    nifti = _nifti(tmp_path / "a.nii.gz", data)
    loader = _loader()
    expected = loader(nifti)
    assert torch.allclose(loader(tmp_path / "a.npy"), expected)
    assert torch.allclose(loader(tmp_path / "b.npy"), expected)


def test_fewer_slices_than_configured_are_zero_padded(tmp_path):
    data = np.ones((16, 16, 5), dtype=np.float32)
    data[4:12, 4:12] = 3.0
    volume = _loader(num_slices=8)(_nifti(tmp_path / "thin.nii.gz", data))
    assert volume.shape == (1, 8, 16, 16)
    empty = [s for s in range(8) if float(volume[0, s].abs().max()) == 0.0]
    assert empty == [0, 6, 7]  # symmetric padding: 1 before, 2 after


def test_slice_axis_is_moved_first(tmp_path):
    shape = (6, 10, 14)
    for axis in range(3):
        ramp = np.arange(1, shape[axis] + 1, dtype=np.float32).reshape(
            [-1 if a == axis else 1 for a in range(3)]
        )
        data_axis = np.broadcast_to(ramp, shape).astype(np.float32)
        path = _nifti(tmp_path / f"ramp{axis}.nii.gz", data_axis)
        for slice_axis in range(3):
            loader = _loader(slice_axis=slice_axis, percentiles=(0.0, 100.0))
            loaded = loader.load(path)
            others = [shape[a] for a in range(3) if a != slice_axis]
            assert loaded.shape == (1, shape[slice_axis], *others)
            per_slice = loaded[0].flatten(1)
            constant_slices = bool((per_slice.max(1).values == per_slice.min(1).values).all())
            assert constant_slices == (axis == slice_axis)  # the ramp runs across slices only on its own axis


def test_resize_shows_the_whole_section_while_crop_keeps_the_centre(tmp_path):
    data = np.full((40, 30, 8), 0.5, dtype=np.float32)
    data[:10, :8] = 1.0  # a corner marker outside the central 16 x 16
    data[18:22, 13:17] = 0.0  # a dark centre
    path = _nifti(tmp_path / "wide.nii.gz", data)
    cropped = _loader(percentiles=(0.0, 100.0))(path)
    resized = _loader(percentiles=(0.0, 100.0), resize=True)(path)
    assert cropped.shape == resized.shape == (1, 8, 16, 16)
    assert float(cropped.max()) < 0.9  # the corner marker was cropped away
    assert float(resized[0, :, 1, 1].min()) > 0.9  # and is visible after resizing
    assert torch.equal(cropped[0, 0, 6:10, 6:10], torch.zeros(4, 4))  # the centre is kept at full resolution


def test_orientation_and_spacing_are_applied(tmp_path):
    ramp = np.broadcast_to(np.arange(1, 11, dtype=np.float32)[:, None, None], (10, 8, 6)).copy()
    ras = _nifti(tmp_path / "ras.nii.gz", ramp)
    flipped = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(ramp[::-1].copy(), np.diag([-1.0, 1.0, 1.0, 1.0])), flipped)
    loader = _loader(percentiles=(0.0, 100.0))
    assert torch.allclose(loader.read(flipped), loader.read(ras))  # same anatomy once both are in RAS
    coarse = _nifti(tmp_path / "coarse.nii.gz", _scan((10, 8, 6)), zooms=(2.0, 2.0, 2.0))
    assert _loader(spacing=(1.0, 1.0, 1.0)).read(coarse).shape[1:] == (19, 15, 11)


def test_random_crop_depends_on_the_generator_only(tmp_path):
    loader = _loader(num_slices=4)
    volume = loader.load(_nifti(tmp_path / "big.nii.gz", _scan((30, 30, 20))))
    first = loader.fit(volume, np.random.RandomState(1))
    assert torch.equal(first, loader.fit(volume, np.random.RandomState(1)))
    crops = {loader.fit(volume, np.random.RandomState(seed)).sum().item() for seed in range(8)}
    assert len(crops) > 1
    assert torch.equal(loader.fit(volume), loader.fit(volume))


# -- bad input -------------------------------------------------------------------------------------------------


def test_corrupt_nifti_is_named(tmp_path):
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(512))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": cannot be read as a nifti volume"):
        _loader()(path)


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": empty file"):
        _loader()(path)


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 1)])
def test_2d_nifti_where_a_volume_is_expected(tmp_path, shape):
    path = _nifti(tmp_path / "flat.nii.gz", np.random.default_rng(0).random(shape).astype(np.float32))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": .* is 2D"):
        _loader()(path)


def test_nan_voxels_are_named(tmp_path):
    data = _scan()
    data[3, 4, 5] = np.nan
    data[1, 1, 1] = np.inf
    path = _nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": contains 2 NaN or infinite voxels"):
        _loader()(path)


def test_constant_volume_is_named(tmp_path):
    path = _nifti(tmp_path / "const.nii.gz", np.full((10, 10, 10), 3.0, dtype=np.float32))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": constant volume"):
        _loader()(path)


def test_multichannel_nifti_is_rejected(tmp_path):
    path = _nifti(tmp_path / "four.nii.gz", np.random.default_rng(0).random((8, 8, 8, 3)).astype(np.float32))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": has 3 channels"):
        _loader()(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.nii\.gz"):
        _loader()(tmp_path / "nowhere.nii.gz")
    other = tmp_path / "scan.mha"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"scan\.mha: unsupported volume format"):
        _loader()(other)


def test_dicom_series_without_a_reader_says_which_extra_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydicom", None)  # an import of pydicom now fails
    monkeypatch.setitem(sys.modules, "itk", None)
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "0.dcm").write_bytes(b"DICM")
    with pytest.raises(ImportError, match=r"agreement-ssl\[dicom\]"):
        _loader()(tmp_path / "series")


def test_skip_bad_files_keeps_good_ones_and_lists_the_rest(tmp_path):
    good = _nifti(tmp_path / "good.nii.gz", _scan())
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"garbage" * 20)
    nan = _scan()
    nan[0, 0, 0] = np.nan
    with_nan = _nifti(tmp_path / "nan.nii.gz", nan)
    good2 = _nifti(tmp_path / "good2.nii", _scan(seed=1))
    paths = [good, corrupt, with_nan, good2]
    with pytest.raises(ValueError, match=r"corrupt\.nii\.gz"):
        check_volumes(paths, _loader())
    seen = []
    with pytest.warns(UserWarning, match=r"skipped 2 of 4 volumes") as record:
        kept = check_volumes(
            paths, _loader(skip_bad_files=True), on_loaded=lambda i, p, v: seen.append((i, p))
        )
    assert kept == [good, good2]
    assert seen == [(0, good), (3, good2)]
    message = next(str(w.message) for w in record if "skipped 2 of 4 volumes" in str(w.message))
    assert f"{corrupt}: cannot be read" in message and f"{with_nan}: contains 1 NaN" in message


# -- views -----------------------------------------------------------------------------------------------------


class _AddConstant:
    """A marker transform: which one ran can be read off the output."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        return volume + self.value


def test_two_views_always_use_two_different_transforms():
    views = TwoDifferentVolumeViews([_AddConstant(v) for v in (1.0, 2.0, 3.0, 4.0)])
    volume = torch.zeros(1, 4, 8, 8)
    pairs = set()
    for seed in range(40):
        views.set_random_state(seed=seed)
        first, second = views(volume)
        a, b = float(first.mean()), float(second.mean())
        assert a != b and {a, b} <= {1.0, 2.0, 3.0, 4.0}
        assert (a - 1, b - 1) == views.last_choice
        pairs.add((a, b))
    assert len(pairs) > 6  # many ordered pairs occur, not one fixed choice


def test_two_views_need_two_transforms():
    with pytest.raises(ValueError, match="at least two"):
        TwoDifferentVolumeViews([_AddConstant(1.0)])


def _volume_files(tmp_path, count=3):
    return [_nifti(tmp_path / f"v{n}.nii.gz", _scan((20, 18, 12), seed=n)) for n in range(count)]


def test_volume_views_are_reproducible_and_differ_between_views(tmp_path):
    dataset = VolumeViewsDataset(_volume_files(tmp_path), _loader(), samples_per_volume=2)
    item = dataset[(3, 1234)]
    assert item["index"] == 3
    assert item["view1"].shape == item["view2"].shape == (1, 8, 16, 16)
    assert not torch.equal(item["view1"], item["view2"])
    again = dataset[(3, 1234)]
    assert torch.equal(item["view1"], again["view1"]) and torch.equal(item["view2"], again["view2"])
    assert not torch.equal(item["view1"], dataset[(3, 99)]["view1"])
    torch.manual_seed(5)
    plain = dataset[3]
    torch.manual_seed(5)
    assert torch.equal(plain["view1"], dataset[3]["view1"])  # a plain index draws from torch's generator


def test_slice_views_are_reproducible(tmp_path):
    dataset = SliceViewsDataset(_volume_files(tmp_path, 1), loader=_loader())
    first, again = dataset[(2, 7)], dataset[(2, 7)]
    assert first["view1"].shape == (1, 16, 16)
    assert torch.equal(first["view1"], again["view1"]) and torch.equal(first["view2"], again["view2"])
    assert not torch.equal(first["view1"], first["view2"])


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    dataset = VolumeViewsDataset(_volume_files(tmp_path, 2), _loader(), samples_per_volume=2)

    def batches(workers):
        sampler = SeededSampler(dataset, seed=11)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers, drop_last=True)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["view1"], b["view1"])


# -- datasets --------------------------------------------------------------------------------------------------


def test_indexed_concat_gives_globally_unique_indices(tmp_path):
    files = _volume_files(tmp_path, 2)
    loader = _loader()
    volumes = VolumeViewsDataset(files, loader, samples_per_volume=3)
    slices = SliceViewsDataset(files[:1], loader=loader, slices_per_volume=4)
    assert [volumes[(i, 0)]["index"] for i in range(len(volumes))] == list(range(6))
    assert [slices[(i, 0)]["index"] for i in range(len(slices))] == list(
        range(4)
    )  # parts collide on their own
    joined = IndexedConcatDataset([volumes, slices, slices])
    indices = [joined[(i, 0)]["index"] for i in range(len(joined))]
    assert indices == list(range(14)) and joined.num_indices == 14


def test_indexed_concat_offsets_a_shard_by_its_whole_index_space(tmp_path):
    files = _volume_files(tmp_path, 2)
    shard = VolumeViewsDataset(files[1:], _loader(), volume_ids=[1], total_volumes=2)
    other = VolumeViewsDataset(files[:1], _loader())
    joined = IndexedConcatDataset([shard, other])
    assert [joined[i]["index"] for i in range(len(joined))] == [1, 2]


def test_slices_skip_background_and_include_images(tmp_path):
    data = np.zeros((16, 16, 10), dtype=np.float32)
    data[2:14, 2:14, 3:7] = 1.0 + np.random.default_rng(0).random((12, 12, 4))
    path = _nifti(tmp_path / "a.nii.gz", data)
    png = tmp_path / "img.png"
    write_png(torch.randint(0, 255, (1, 20, 20), dtype=torch.uint8), str(png))
    dataset = SliceViewsDataset([path], images=[png], loader=_loader(slice_axis=2))
    assert dataset.num_slices == 4 and len(dataset) == 5
    assert dataset[(0, 1)]["view1"].shape == (1, 16, 16)  # the image
    fewer = SliceViewsDataset([VolumeSource(path, 2)], loader=_loader(), slices_per_volume=2)
    assert fewer.num_slices == 2
    with pytest.raises(ValueError, match="no 2D samples"):
        SliceViewsDataset([path], loader=_loader(), min_foreground=0.9)


def test_disk_cache_stores_the_unaugmented_volume(tmp_path):
    files = _volume_files(tmp_path, 1)
    loader = _loader()
    cache = tmp_path / "cache"
    dataset = VolumeViewsDataset(files, loader, cache="disk", cache_dir=cache)
    expected = loader.load(files[0])
    assert torch.equal(dataset.volume(0), expected)
    entries = list(cache.glob("*.pt"))
    assert len(entries) == 1 and torch.equal(torch.load(entries[0]), expected)
    with pytest.raises(ValueError, match="cache_dir"):
        VolumeViewsDataset(files, loader, cache="disk")


# -- data module -----------------------------------------------------------------------------------------------


def _small_module(**kwargs) -> JointSSLDataModule:
    options = {
        "num_slices": 8,
        "size": (16, 16),
        "batch_size_3d": 2,
        "batch_size_2d": 4,
        "samples_per_volume": 2,
        "slices_per_volume": 4,
    }
    options.update(kwargs)
    return JointSSLDataModule(**options)


def test_demo_datamodule_yields_joint_batches(tmp_path):
    pytest.importorskip("nilearn")
    from pytorch_lightning.utilities import CombinedLoader

    module = _small_module(demo_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="setup"):
        module.num_volume_samples
    module.prepare_data()
    module.setup("fit")
    scans = 1 + (datamodule_module.nibabel_test_scan() is not None)
    assert module.num_volume_samples == scans * 3 * 2  # each scan sliced along three axes, two samples each
    assert module.num_slice_samples == scans * 3 * 4
    loaders = module.train_dataloader()
    assert set(loaders) == {"volumes", "slices"}
    batch, _, _ = next(iter(CombinedLoader(loaders, "max_size_cycle")))
    assert set(batch) == {"volumes", "slices"}
    assert set(batch["volumes"]) == set(batch["slices"]) == {"index", "view1", "view2"}
    assert batch["volumes"]["view1"].shape == batch["volumes"]["view2"].shape == (2, 1, 8, 16, 16)
    assert batch["slices"]["view1"].shape == batch["slices"]["view2"].shape == (4, 1, 16, 16)
    assert batch["volumes"]["index"].dtype == torch.int64
    assert int(batch["volumes"]["index"].max()) < module.num_volume_samples
    assert torch.isfinite(batch["volumes"]["view1"]).all() and float(batch["slices"]["view1"].max()) <= 1.0


def test_multi_crop_datamodule_adds_small_views_to_the_slices(tmp_path):
    _volume_files(tmp_path, 2)
    module = _small_module(data_dir=str(tmp_path), small_crops_2d=3)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()["slices"]))
    assert batch["view1"].shape == (4, 1, 16, 16)
    assert batch["small_views"].shape == (4, 3, 1, 8, 8)  # half the size by default
    assert not torch.equal(batch["small_views"][:, 0], batch["small_views"][:, 1])
    again = next(iter(module.train_dataloader()["slices"]))
    assert torch.equal(batch["small_views"], again["small_views"])
    plain = _small_module(data_dir=str(tmp_path))
    plain.setup("fit")
    assert "small_views" not in next(iter(plain.train_dataloader()["slices"]))
    with pytest.raises(ValueError, match="small_crop_scale_2d"):
        JointSSLDataModule(small_crop_scale_2d=(0.5, 0.1))
    with pytest.raises(ValueError, match="small_size_2d"):
        JointSSLDataModule(small_crops_2d=2, small_size_2d=(2, 2))


def test_datamodule_rejects_a_bad_file_before_training(tmp_path):
    _volume_files(tmp_path, 2)
    bad = tmp_path / "zz_bad.nii.gz"
    bad.write_bytes(b"\x00" * 64)
    module = _small_module(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(str(bad.resolve()))):
        module.setup("fit")
    skipping = _small_module(data_dir=str(tmp_path), skip_bad_files=True)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 volumes:\n.*zz_bad\.nii\.gz"):
        skipping.setup("fit")
    assert skipping.num_volume_samples == 2 * 2  # two good files, one axis, two samples each
    assert len(skipping.train_dataloader()["volumes"]) == 2


def test_datamodule_checks_batch_sizes_and_arguments(tmp_path):
    _volume_files(tmp_path, 1)
    with pytest.raises(ValueError, match="batch_size_3d=4"):
        _small_module(data_dir=str(tmp_path), batch_size_3d=4).setup("fit")
    with pytest.raises(ValueError, match="cache"):
        JointSSLDataModule(cache="ram")
    with pytest.raises(ValueError, match="slice_axes"):
        JointSSLDataModule(slice_axes=[3])
    with pytest.raises(ValueError, match="jitter_2d"):
        JointSSLDataModule(jitter_2d=1.5)


def test_2d_views_without_intensity_jitter_keep_intensities():
    image = torch.rand(1, 32, 32)
    flat = torch.full((1, 32, 32), 0.7)
    views = TwoViews2D(view_transform_2d((32, 32), (1.0, 1.0), flip_p=0.0, jitter=0.0, blur_p=0.0))
    first, second = views(flat)
    assert torch.allclose(first, flat) and torch.allclose(second, flat)
    jittered = TwoViews2D(
        view_transform_2d((32, 32), (1.0, 1.0), flip_p=0.0, jitter=0.4, jitter_p=1.0, blur_p=0.0)
    )
    torch.manual_seed(0)
    assert not torch.allclose(jittered(image)[0], image)
    assert TwoViews2D(size=(32, 32), jitter=0.0).transform.transforms[2].transforms[0].brightness is None


def test_volume_views_without_intensity_transforms(tmp_path):
    kinds = [type(t).__name__ for t in default_volume_transforms()]
    assert kinds == [  # the order fixes which transforms a seed picks: unchanged by the option
        "RandAffine",
        "RandFlip",
        "RandGaussianNoise",
        "RandBiasField",
        "RandAdjustContrast",
        "RandGaussianSmooth",
    ]
    without = [type(t).__name__ for t in default_volume_transforms(intensity=False)]
    assert without == ["RandAffine", "RandFlip", "RandGaussianNoise", "RandGaussianSmooth"]
    _volume_files(tmp_path, 2)
    module = _small_module(data_dir=str(tmp_path), intensity_views_3d=False)
    module.setup("fit")
    used = [type(t).__name__ for t in module.volume_dataset.views.transforms]
    assert used == without


def test_each_rank_caches_only_its_shard(tmp_path, monkeypatch):
    _volume_files(tmp_path, 3)
    shards = []
    for rank in range(2):
        monkeypatch.setattr(datamodule_module.dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(datamodule_module.dist, "get_world_size", lambda: 2)
        module = _small_module(data_dir=str(tmp_path), samples_per_volume=1, batch_size_3d=1)
        module.setup("fit")
        dataset = module.volume_dataset
        assert module.num_volume_samples == 3 and len(dataset._memory) == len(dataset) == 2
        shards.append({dataset[(i, 0)]["index"] for i in range(len(dataset))})
        sampler = module.train_dataloader()["slices"].sampler
        assert (sampler.num_replicas, sampler.rank) == (2, rank)
    assert shards[0] | shards[1] == {0, 1, 2}


def test_dicom_series_folder_loads_as_a_volume(tmp_path):
    pydicom = pytest.importorskip("pydicom")  # part of the dev extra, so this runs in CI
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = tmp_path / "patient" / "series"
    series.mkdir(parents=True)
    series_uid = generate_uid()
    for i in range(10):
        ds = template.copy()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * i]
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.PixelData = (ds.pixel_array.astype(np.int16) + 10 * i).tobytes()
        ds.save_as(series / f"{i}.dcm")
    assert list_volumes(data_dir=str(tmp_path), pattern="**/*") == [series.resolve()]
    volume = _loader()(series)
    assert volume.shape == (1, 8, 16, 16)
    assert float(volume.min()) >= 0.0 and float(volume.max()) <= 1.0
