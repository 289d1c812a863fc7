import json
import random

import pytest
import torch

from agreement.sampling import SeededSampler
from prompts.data import FewShotDataModule
from prompts.datasets import Item
from prompts.splits import fewshot_split, generate_fewshot, split_base_novel, subsample_classes
from tests.prompts.tiny import NAMES, make_coop_dataset, make_image_folder


def _items(counts):
    items = []
    for i in range(max(counts)):
        for label, count in enumerate(counts):  # interleaved: labels appear in order 0, 1, 2, ...
            if i < count:
                items.append(Item(f"{label}_{i}.png", label, f"c{label}"))
    return items


def test_fewshot_follows_the_official_rule():
    items = _items([10, 3, 7])
    random.seed(5)  # official: global random seeded with the run seed, one random.sample per label
    expected = []
    for label in (0, 1, 2):
        group = [i for i in items if i.label == label]
        expected += random.sample(group, 4) if len(group) >= 4 else group
    assert generate_fewshot(items, 4, random.Random(5)) == expected
    train, val = fewshot_split(items, items, 16, seed=1)
    assert len(train) == 20 and len(val) == 4 + 3 + 4


def test_fewshot_cache_round_trip(tmp_path):
    items = _items([6, 6])
    cache = tmp_path / "split_fewshot" / "shot_2-seed_3.json"
    first = fewshot_split(items, items, 2, 3, cache)
    assert cache.is_file()
    assert fewshot_split(items, items, 2, 3, cache) == first
    assert fewshot_split(items, items, 2, 4) != first


@pytest.mark.parametrize(("n", "base"), [(10, 5), (37, 19), (101, 51), (5, 3)])
def test_base_novel_split_rule(n, base):
    labels = list(range(n))
    random.Random(0).shuffle(labels)
    b, novel = split_base_novel(labels)
    assert b == list(range(base)) and novel == list(range(base, n))


def test_subsample_relabels_each_half():
    splits = {k: _items([2, 2, 2, 2, 2]) for k in ("train", "val", "test")}
    _, base_names = subsample_classes(splits, "base")
    novel, novel_names = subsample_classes(splits, "new")
    assert base_names == ["c0", "c1", "c2"] and novel_names == ["c3", "c4"]
    assert sorted({i.label for i in novel["test"]}) == [0, 1]


def test_datamodule_on_a_coop_split(tmp_path):
    make_coop_dataset(tmp_path)
    dm = FewShotDataModule("OxfordPets", str(tmp_path), num_shots=2, seed=1, subsample="base")
    assert dm.train_classnames == NAMES[:3] and len(dm.train_items) == 6
    base, novel = dm.eval_sets()
    assert (base.classnames, novel.classnames) == (NAMES[:3], NAMES[3:])
    assert {i.label for i in novel.items} == {0, 1} and len(novel.items) == 8
    assert (tmp_path / "oxford_pets" / "split_fewshot" / "shot_2-seed_1.json").is_file()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 224, 224)  # open_clip's default preprocessing without a model


def test_train_loader_draws_from_the_shared_seeded_sampler(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split=(4, 1, 1))
    dm = FewShotDataModule("imagefolder", str(root), num_shots=2, seed=3, subsample="all", batch_size=2)
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, SeededSampler)
    assert (sampler.seed, sampler.num_replicas, sampler.rank) == (3, 1, 0)
    keys = list(sampler)
    assert sorted(index for index, _ in keys) == list(range(len(sampler.dataset)))


# ------------------------------------------------------------------ bad input
def test_classname_list_not_matching_labels(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split=(1, 0, 1))
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"has 2 names but .* 5 class folders"):
        FewShotDataModule("imagefolder", str(root), classnames_file=str(names))


def test_inconsistent_names_in_split_file(tmp_path):
    base = make_coop_dataset(tmp_path)
    split = json.loads((base / "split_zhou_OxfordPets.json").read_text())
    split["test"][0][2] = "not a cat"
    (base / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="does not match the labels"):
        FewShotDataModule("OxfordPets", str(tmp_path))


def test_images_missing_from_split(tmp_path):
    base = make_coop_dataset(tmp_path)
    (base / "images" / "dog_test_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images listed in the split are missing.*dog_test_1"):
        FewShotDataModule("OxfordPets", str(tmp_path))


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        FewShotDataModule("OxfordPetz", "nowhere")


def test_dataset_batch_is_seeded_per_sample(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split=(2, 0, 1))
    dm = FewShotDataModule("imagefolder", str(root), num_shots=2, subsample="all", batch_size=2)
    dataset = dm.train_dataloader().dataset
    a, b = dataset[(0, 11)]["image"], dataset[(0, 11)]["image"]
    assert torch.equal(a, b) and not torch.equal(a, dataset[(0, 12)]["image"])
