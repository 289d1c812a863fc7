"""One seeded, sharded sampler for every training loader: the order and each sample's augmentation seed follow
from ``(seed, stream, epoch, pass)`` alone, whatever the number of DataLoader workers, and a resumed run
continues the stream through ``state_dict``. Datasets read its ``(index, seed)`` keys with :func:`split_key` and
draw a sample's augmentation under its seed with :func:`seeded_call`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

# Seeds are drawn below this bound: torch, NumPy and Python generators all accept them.
MAX_SEED = 2**31 - 1


class SeededSampler(DistributedSampler):
    """Yields ``(index, seed)`` keys: a shuffled order and per-sample seeds fixed by ``(seed, stream, epoch)``.

    It is a ``DistributedSampler`` so that Lightning keeps it instead of injecting its own under DDP; with
    ``num_replicas``/``rank`` it shards like one. ``set_epoch`` (called by Lightning every epoch) changes the
    order and seeds; each further pass within an epoch (a shorter loader cycled by ``CombinedLoader``) does too.
    ``stream`` separates loaders that share a seed, e.g. ranks that hold different pre-sharded datasets.
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int = 0,
        stream: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.stream = int(stream)
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._passes = 0

    def state_dict(self) -> dict[str, int]:
        """The epoch and the number of passes started in it: what the next pass's order and seeds follow from."""
        return {"epoch": int(self.epoch), "passes": self._passes}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._passes = int(state["passes"])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        key = [self.seed, self.stream, self.epoch, self._passes]
        self._passes += 1
        size = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
            order = torch.randperm(size, generator=generator).tolist()
        else:
            order = list(range(size))
        while len(order) < self.total_size:  # repeat a few so every rank gets the same count
            order += order[: self.total_size - len(order)]
        mine = order[self.rank : self.total_size : self.num_replicas]
        seeds = np.random.SeedSequence([*key, self.rank]).generate_state(len(mine)) % MAX_SEED
        return iter(zip(mine, (int(s) for s in seeds)))


def split_key(key: int | tuple[int, int] | Sequence[int], length: int) -> tuple[int, int]:
    """``(index, seed)`` from a :class:`SeededSampler` key; a plain index gets a seed from torch's global
    generator."""
    if isinstance(key, (tuple, list)):
        index, seed = int(key[0]), int(key[1])
    else:
        index, seed = int(key), int(torch.randint(0, MAX_SEED, ()).item())
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} samples")
    return index, seed


def seeded_call(fn: Callable[..., Any], seed: int, *args: Any) -> Any:
    """``fn(*args)`` with torch's global generator seeded by ``seed``, leaving the caller's generator as it was
    (a sample's augmentation, fixed by its key whatever the worker)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)
