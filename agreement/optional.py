"""Import optional dependencies lazily, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def optional_import(module: str, extra: str | None = None, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        hint = f"pip install 'agreement-ssl[{extra}]'" if extra else f"pip install {module}"
        what = f" for {purpose}" if purpose else ""
        raise ImportError(
            f"{module!r} is needed{what} but is not installed; install it with: {hint}"
        ) from error
