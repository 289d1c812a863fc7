"""The protocols' sampling rules, as the official code has them: few-shot sampling per label (in order of first
appearance) with ``random.sample`` from a generator seeded with the run seed, train with K shots then val with
min(K, 4), on all classes *before* the base/novel split, and cached per (K, seed). Base = the first ceil(n/2) sorted
train labels, novel = the rest, each relabelled to 0..k-1 and evaluated in its own label space."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from agreement.runs import write_text_atomic
from prompts.datasets import Item, validate_items


def generate_fewshot(items: Sequence[Item], num_shots: int, rng: random.Random) -> list[Item]:
    """K items per label, labels in order of first appearance, ``rng.sample`` per label (all if fewer)."""
    if num_shots < 1:
        return list(items)
    by_label: dict[int, list[Item]] = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    out: list[Item] = []
    for group in by_label.values():
        out.extend(rng.sample(group, num_shots) if len(group) >= num_shots else group)
    return out


def fewshot_split(
    train: Sequence[Item], val: Sequence[Item], num_shots: int, seed: int, cache_file: Path | None = None
) -> tuple[list[Item], list[Item]]:
    """Train with K shots and val with min(K, 4) from one generator seeded with ``seed``; cached as JSON."""
    if cache_file is not None and cache_file.is_file():
        raw = json.loads(cache_file.read_text())
        return [Item(*e) for e in raw["train"]], [Item(*e) for e in raw["val"]]
    rng = random.Random(seed)
    few_train = generate_fewshot(train, num_shots, rng)
    few_val = generate_fewshot(val, min(num_shots, 4), rng)
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            payload = {
                "train": [list(vars(i).values()) for i in few_train],
                "val": [list(vars(i).values()) for i in few_val],
            }
            write_text_atomic(cache_file, json.dumps(payload))
        except OSError:
            pass  # read-only dataset folder: sampling is deterministic, the cache is only a speed-up
    return few_train, few_val


def split_base_novel(labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """Base = the first ceil(n/2) sorted labels, novel = the rest."""
    unique = sorted(set(labels))
    m = math.ceil(len(unique) / 2)
    return unique[:m], unique[m:]


def subsample_classes(
    splits: dict[str, list[Item]], subsample: Literal["all", "base", "new"]
) -> tuple[dict[str, list[Item]], list[str]]:
    """Keep base or novel classes (decided on the train labels) and relabel them 0..k-1."""
    if subsample == "all":
        names = validate_items(splits, "split", check_files=False)
        return splits, names
    base, new = split_base_novel([i.label for i in splits["train"]])
    keep = base if subsample == "base" else new
    relabel = {old: new_label for new_label, old in enumerate(keep)}
    out = {
        k: [Item(i.impath, relabel[i.label], i.classname) for i in v if i.label in relabel]
        for k, v in splits.items()
    }
    names = [""] * len(keep)
    for items in out.values():
        for item in items:
            names[item.label] = item.classname
    return out, names
