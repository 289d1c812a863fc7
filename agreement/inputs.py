"""Reading files that users pass, and reporting bad input as one clear last line.

- :func:`load_torch_file` reads a torch file with ``weights_only=True`` (no code from the file can run) and turns
  every failure into one line that names the file, the problem and what to do.
- :func:`report_root_cause` wraps a CLI's ``main``: when jsonargparse wraps the error of a class's ``__init__`` in
  its own message ("Does not validate against any of the Union subtypes ..."), the project's error is raised
  instead, so that its message (file, key, value, what to do) is the last thing printed.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

REFUSED_PICKLE = (
    "only tensors and plain values are read from torch files, because unpickling other objects can run code"
)


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (library messages often add paragraphs of advice)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def torch_load_reason(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in words a user can act on, on one line."""
    text = str(error)
    refused = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if refused:
        return f"it refers to the Python object {refused.group(1)}; {REFUSED_PICKLE}"
    if "TorchScript" in text:
        return "it is a TorchScript archive, not a state dict"
    if isinstance(error, EOFError) or "Ran out of input" in text:
        return "it is empty or truncated"
    if isinstance(error, pickle.UnpicklingError | KeyError | zipfile.BadZipFile | UnicodeDecodeError) or (
        "PytorchStreamReader" in text or "zip archive" in text
    ):
        return (
            "it is not a torch file of tensors (truncated, of another format, or holding objects that are never "
            "unpickled here)"
        )
    return first_line(error)


def load_torch_file(path: str | Path, what: str = "weights") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; errors name ``path`` on one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: {what} file is not readable (permissions)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot read {what}: {torch_load_reason(error)}") from None


# ----------------------------------------------------------------------------------------------- CLI errors
def _raised_in(error: BaseException, package: str) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}{package}{os.sep}" in frames[-1].filename


def root_cause(error: BaseException) -> BaseException:
    """The project's own error under jsonargparse's wrappers (``error`` itself if there is none)."""
    cause: BaseException = error
    while _raised_in(cause, "jsonargparse") and cause.__cause__ is not None:
        cause = cause.__cause__
    return error if _raised_in(cause, "jsonargparse") else cause


def report_root_cause(main: F) -> F:
    """Decorate a CLI ``main``: an error that jsonargparse wrapped is re-raised as the project's own error."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except Exception as error:
            cause = root_cause(error)
            if cause is error:
                raise
            raise cause from None

    return wrapper  # type: ignore[return-value]
