"""Run a CLI's ``main(args)`` in-process and see what a user of ``scripts/*.py`` would see: the exit code and the
last line printed (an uncaught exception's last message line, or the parser's ``error:`` line)."""

from __future__ import annotations

import contextlib
import io
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Files whose presence says that a run, or one of its parts, finished.
COMPLETE_OUTPUTS = (
    "results.json",
    "results.md",
    "results.csv",
    "summary.json",
    "probe.json",
    "names.json",
    "metrics.json",
    "prompts.safetensors",
    "encoder.safetensors",
    "*.ckpt",
)


@dataclass
class Outcome:
    code: int
    last_line: str
    stderr: str
    error: BaseException | None


def run_cli(main: Callable[[list[str]], Any], args: list[str]) -> Outcome:
    """``main(args)`` with the exit code and last line the script would give (1 for an uncaught exception)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            main(args)
    except SystemExit as exit_:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        code = exit_.code if isinstance(exit_.code, int) else 1
        return Outcome(code, lines[-1].strip() if lines else str(exit_.code), stderr.getvalue(), exit_)
    except Exception as error:  # what Python prints last for an uncaught exception
        printed = "".join(traceback.format_exception_only(type(error), error)).strip()
        return Outcome(1, printed.splitlines()[-1].strip(), stderr.getvalue(), error)
    return Outcome(0, "", stderr.getvalue(), None)


def complete_outputs(folder: Path) -> list[str]:
    """Files under ``folder`` that would make a failed run look (partly) finished."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for pattern in COMPLETE_OUTPUTS for p in folder.rglob(pattern))
