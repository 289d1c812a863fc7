"""``scripts/benchmark.py allocator``: the paper-config JointSSL step (fp32, channels-last) with glibc's default
allocator and with freed memory retained (``agreement.allocator``), in alternating fresh processes, since the
allocator setting is per process: median step time, system time and minor page faults of each, and the paired
ratios."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from typing import Any

import torch

from agreement.tables import format_mean_std, markdown_table

MODES = ("glibc", "retain")


def measure(mode: str, quick: bool, steps: int = 3) -> dict[str, float]:
    """One process's figures: median seconds per step after a warm-up step, and the system time and minor page
    faults of the timed steps."""
    from agreement.allocator import retain_freed_memory
    from benchmarks.common import time_call
    from benchmarks.ssl3d import PAPER_STEP, PAPER_STEP_QUICK, make_batch, training_step_fn

    if mode == "retain" and not retain_freed_memory():
        raise SystemExit("retaining freed memory is not possible here (glibc on Linux, no MALLOC_* settings)")
    model, slices, size = (PAPER_STEP_QUICK, 8, (32, 32)) if quick else (PAPER_STEP, 64, (128, 128))
    device = torch.device("cpu")
    batch = make_batch(1, slices, size, 0, device)
    step = training_step_fn(model | {"num_slices": slices, "channels_last": True}, batch, device)
    step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = [time_call(step) for _ in range(steps)]
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds_per_step": statistics.median(times),
        "system_seconds": after.ru_stime - before.ru_stime,
        "minor_page_faults": after.ru_minflt - before.ru_minflt,
    }


def run_allocator_benchmark(pairs: int = 3, quick: bool = False) -> dict[str, Any]:
    """``scripts/benchmark.py allocator``: ``pairs`` alternating (glibc, retain) fresh processes; the figures of
    each, the paired ratios, and ``rows`` and ``markdown`` for the report."""
    if pairs < 1:
        raise SystemExit(f"--pairs must be >= 1, got {pairs}")
    # both modes start from glibc's defaults, whatever MALLOC_* settings this shell has
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(pairs):
        for mode in MODES:
            command = [sys.executable, "-m", "benchmarks.allocator", mode]
            output = subprocess.run(
                command + (["--quick"] if quick else []), capture_output=True, text=True, check=True, env=env
            ).stdout
            runs[mode].append(json.loads(output.strip().splitlines()[-1]))
    ratios = [
        glibc["seconds_per_step"] / kept["seconds_per_step"]
        for glibc, kept in zip(runs["glibc"], runs["retain"])
    ]
    rows = [
        {
            "allocator": mode,
            "s / step (each pair)": ", ".join(f"{run['seconds_per_step']:.2f}" for run in runs[mode]),
            "system s": ", ".join(f"{run['system_seconds']:.1f}" for run in runs[mode]),
            "minor page faults": ", ".join(str(run["minor_page_faults"]) for run in runs[mode]),
        }
        for mode in MODES
    ]
    summary = (
        f"glibc / retain per pair: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"mean {format_mean_std(ratios, digits=2)}"
    )
    return {
        "runs": runs,
        "ratios": ratios,
        "rows": rows,
        "markdown": markdown_table(list(rows[0]), rows) + "\n\n" + summary,
    }


# One child process of run_allocator_benchmark: python -m benchmarks.allocator MODE
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--quick", action="store_true", help="a ResNet-18 on 8 slices of 32x32: a smoke test")
    arguments = parser.parse_args()
    print(json.dumps(measure(arguments.mode, arguments.quick)))
