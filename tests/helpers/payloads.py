"""Files that would run code when loaded unsafely: each creates a marker file if, and only if, its code runs."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class Payload:
    """Pickles to a call of ``open(marker, "w")``: the marker file exists if and only if the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payload(path: Path, marker: Path, wrap: Callable[[Any], Any] = lambda p: {"weight": p}) -> Path:
    """A torch file (zip with ``data.pkl``) whose unpickling would create ``marker``."""
    torch.save(wrap(Payload(marker)), path)
    return path


def raw_pickle_payload(path: Path, marker: Path) -> Path:
    """A plain pickle file whose unpickling would create ``marker``."""
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    return path


class _MarkerModule(torch.nn.Module):
    """Its TorchScript ``__setstate__`` creates a file (``torch.from_file(..., shared=True)``) when loaded."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.path = marker

    @torch.jit.export
    def __getstate__(self) -> list[str]:
        return [self.path]

    @torch.jit.export
    def __setstate__(self, state: list[str]) -> None:
        self.path = state[0]
        self.weight = torch.from_file(self.path, True, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def torchscript_payload(path: Path, marker: Path) -> Path:
    """A TorchScript archive whose code, run by ``torch.jit.load``, creates ``marker``."""
    torch.jit.save(torch.jit.script(_MarkerModule(str(marker))), str(path))
    return path


def pickled_torchscript_payload(path: Path, marker: Path, template: Path) -> Path:
    """``template`` (a TorchScript archive) with its ``data.pkl`` replaced by a pickle that would create ``marker``."""
    import zipfile

    with zipfile.ZipFile(template) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps(Payload(marker), protocol=2)
            target.writestr(info, data)
    return path
