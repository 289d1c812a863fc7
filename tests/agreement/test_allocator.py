"""retain_freed_memory: after it, a large tensor freed and allocated again is not page-faulted again."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from agreement.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
for _ in range(2):  # 256 MB blocks, faulted in either way while the heap grows to hold them
    torch.empty(64 * 2**20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    torch.empty(64 * 2**20).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env: dict[str, str]) -> tuple[str, int]:
    output = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return output[0], int(output[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_are_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    applied, retained = _faults("retain", env)
    _, default = _faults("default", env)
    assert applied == "True"
    pages = 6 * 256 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert default > 0.9 * pages  # glibc's default: every allocation is faulted in again
    assert retained < 0.25 * pages  # at most one of the six while the heap settles, then none


def test_a_users_malloc_setting_is_left_alone():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | {"MALLOC_MMAP_MAX_": "65536"}
    applied, _ = _faults("retain", env)
    assert applied == "False"
