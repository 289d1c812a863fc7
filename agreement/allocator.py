"""Keep freed memory for reuse on CPU: glibc's ``malloc`` gives every block above 32 MB its own ``mmap`` and returns it
to the system when freed, so a training step that allocates and frees the same large activations every time
page-faults all of them again (on the paper configuration's CPU step, 6 million minor faults and a third of its
CPU time in the kernel). Serving large blocks from the heap and not trimming it keeps them mapped; the process then
holds its peak memory instead of returning it between steps, as PyTorch's CUDA caching allocator does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's own environment settings for the same parameters: a user who sets them has chosen
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
_retaining = False


def retain_freed_memory() -> bool:
    """Make glibc serve large blocks from its heap and keep freed memory; True when applied.

    Nothing changes (False) outside Linux with glibc, or when ``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_`` is
    set in the environment (glibc has applied the user's choice; ``MALLOC_MMAP_MAX_=65536`` restores its default).
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _USER_SETTINGS):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # another C library (musl) has no such switches
    global _retaining
    _retaining = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _retaining


def retaining_freed_memory() -> bool:
    """Whether :func:`retain_freed_memory` has been applied in this process."""
    return _retaining
