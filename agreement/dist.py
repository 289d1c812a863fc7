"""The only place where collectives are called.

Every helper is a no-op (or the identity) when ``torch.distributed`` is not initialised, so the maths built on
top of them runs unchanged in one process and on many.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over all processes (``op`` is ``"sum"``, ``"mean"`` or ``"max"``) and return it."""
    if op not in ("sum", "mean", "max"):
        raise ValueError(f"all_reduce: op must be 'sum', 'mean' or 'max', got {op!r}")
    if not is_distributed():
        return tensor
    reduce_op = torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM
    torch_dist.all_reduce(tensor, op=reduce_op)
    if op == "mean":
        tensor /= get_world_size()
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy and return it."""
    if is_distributed():
        torch_dist.broadcast(tensor, src=src)
    return tensor


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (rank order), without gradient.

    Tensors may differ in their first dimension between ranks.
    """
    if not is_distributed():
        return tensor
    world = get_world_size()
    local_size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(local_size) for _ in range(world)]
    torch_dist.all_gather(sizes, local_size)
    sizes_list = [int(s.item()) for s in sizes]
    max_size = max(sizes_list)
    padded = tensor.new_zeros((max_size, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch_dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, sizes_list)], dim=0)


def all_gather_objects(items: list) -> list:
    """Concatenate picklable lists from all ranks (rank order); a copy of ``items`` in one process."""
    if not is_distributed():
        return list(items)
    gathered: list[list | None] = [None] * get_world_size()
    torch_dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part or []]
