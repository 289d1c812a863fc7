"""Reading files that users pass, and reporting bad input as one clear last line.

- :func:`load_torch_file` reads a torch file with ``weights_only=True`` (no code from the file can run) and turns
  every failure into one line that names the file, the problem and what to do.
- :func:`report_root_cause` wraps a CLI's ``main``: when jsonargparse wraps the error of a class's ``__init__`` in
  its own message ("Does not validate against any of the Union subtypes ..."), the project's error is raised
  instead, so that its message (file, key, value, what to do) is the last thing printed.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import re
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

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


def check_files(
    paths: Sequence[str | Path],
    read: Callable[[Path], Any],
    what: str = "files",
    skip_bad_files: bool = False,
    on_loaded: Callable[[int, Path, Any], None] | None = None,
) -> list[Path]:
    """Read every file up front (``read(path)``, which raises ``ValueError`` or ``FileNotFoundError`` for a bad
    one) and return the good paths in order: the first bad file raises, or with ``skip_bad_files`` bad files
    are left out and one warning lists them with their reasons. ``on_loaded(position, path, value)`` receives
    what ``read`` returned for each good file, so that callers need not read it twice."""
    good: list[Path] = []
    skipped: list[str] = []
    for position, path in enumerate(tqdm(list(paths), desc=f"checking {what}", unit="file", leave=False)):
        path = Path(path)
        try:
            value = read(path)
        except (ValueError, FileNotFoundError) as error:
            if not skip_bad_files:
                raise
            skipped.append(str(error))
            continue
        good.append(path)
        if on_loaded is not None:
            on_loaded(position, path, value)
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} of {len(paths)} {what}:\n  " + "\n  ".join(skipped),
            UserWarning,
            stacklevel=3,
        )
    return good


def parse_boolean(text: str) -> bool:
    """An ``argparse`` type for true/false options: ``true``/``1``/``yes`` or ``false``/``0``/``no`` (any case);
    anything else is an error, not a silent ``False``."""
    lowered = str(text).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


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
def load_state_dict_file(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (a ``state_dict`` entry is unwrapped), never
    running code from the file; errors name ``path`` and ``what`` on one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: {what} file is not readable (permissions)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as error:
            raise ValueError(
                f"{path}: cannot read {what}: not a valid safetensors file ({first_line(error)})"
            ) from None
    else:
        state = load_torch_file(path, what=what)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ValueError(f"{path}: does not hold {what} (a mapping of parameter names to tensors)")
    return state


def report_keys(keys: Iterable[str], limit: int = 12) -> str:
    """Up to ``limit`` of ``keys``, sorted, and how many more."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def state_mismatches(state: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """Report lines for the missing, unexpected and mis-shaped keys of ``state`` against ``model`` (empty if it fits)."""
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    mis_shaped = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    lines = []
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {report_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {report_keys(unexpected)}")
    if mis_shaped:
        lines.append(f"  shape mismatches ({len(mis_shaped)}): {report_keys(mis_shaped)}")
    return lines


def _raised_in(error: BaseException, package: str) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}{package}{os.sep}" in frames[-1].filename


def root_cause(error: BaseException) -> BaseException:
    """The project's own error under jsonargparse's wrappers (``error`` itself if there is none)."""
    cause: BaseException = error
    while _raised_in(cause, "jsonargparse") and cause.__cause__ is not None:
        cause = cause.__cause__
    return error if _raised_in(cause, "jsonargparse") else cause


UNION_WRAPPER = "Does not validate against any of the Union subtypes"


def _union_errors(lines: list[str]) -> tuple[list[str], str]:
    """The per-subtype errors of jsonargparse's Union message (each joined into one line) and the given value."""
    errors: list[list[str]] = []
    given, inside = "", False
    for line in lines:
        text = line.strip()
        if text.startswith("Errors:"):
            inside = True
        elif text.startswith("Given value type:"):
            inside = False
        elif text.startswith("Given value:"):
            given = text.removeprefix("Given value:").strip()
        elif inside and text.startswith("- "):
            errors.append([text[2:].strip()])
        elif inside and text and errors:
            errors[-1].append(text)
    return [" ".join(e) for e in errors], given


def parser_message(message: str) -> str:
    """jsonargparse's error message on one line, with its Union wrapper replaced by the cause it wraps."""
    lines = [line for line in message.splitlines() if line.strip()]
    if not lines:
        return message
    if not any(UNION_WRAPPER in line for line in lines):
        return " ".join(line.strip() for line in lines)
    head = lines[0].strip() if UNION_WRAPPER not in lines[0] else ""
    errors, given = _union_errors(lines)
    causes = [e for e in errors if e != "Expected a <class 'NoneType'>"]
    if causes and all(e.startswith("Expected a ") for e in causes):
        expected = " or ".join(
            re.sub(r"<class '([\w.]+)'>", r"\1", e.removeprefix("Expected a ")) for e in causes
        )
        cause = (
            f"expected {expected}" + (" or null" if len(causes) < len(errors) else "") + f", got {given!r}"
        )
    elif causes:
        cause = causes[0]
    else:
        return " ".join(line.strip() for line in lines)
    return f"{head} {cause}".strip()


def _config_files(args: list[str] | None) -> list[str]:
    import sys

    args = list(sys.argv[1:] if args is None else args)
    files = []
    for position, arg in enumerate(args):
        if arg == "--config" and position + 1 < len(args):
            files.append(args[position + 1])
        elif arg.startswith("--config="):
            files.append(arg.removeprefix("--config="))
    return files


def check_config_files(args: list[str] | None) -> None:
    """``--config`` files that exist must be plain YAML (read with ``yaml.safe_load``, which builds no objects)."""
    import yaml

    for name in _config_files(args):
        path = Path(name)
        if not path.is_file():
            continue  # jsonargparse reports a missing file, and a YAML string given inline is not a file
        try:
            yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(error, "problem", None) or first_line(error)
            raise _ParserError(f"--config {path}: not a valid config file: {problem}{where}") from None


class _ParserError(Exception):
    """A command-line or config-file error: printed as ``error: ...`` and exit code 2, like argparse's own."""


def report_root_cause(main: F) -> F:
    """Decorate a CLI ``main`` so that the cause of a bad input is the last line printed.

    - An error of a class's ``__init__`` that jsonargparse wrapped is re-raised as the project's own error.
    - A parser error (the parser must be built with ``exit_on_error=False``) is printed as one ``error:`` line with
      jsonargparse's Union wrapper replaced by the cause, and exits with code 2 (argparse's code for usage errors).
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            check_config_files(args[0] if args else kwargs.get("args"))
            return main(*args, **kwargs)
        except (argparse.ArgumentError, _ParserError) as error:
            import sys

            print(f"error: {parser_message(str(error))}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as error:
            cause = root_cause(error)
            if cause is error:
                raise
            raise cause from None

    return wrapper  # type: ignore[return-value]
