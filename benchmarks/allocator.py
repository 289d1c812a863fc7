"""``python -m benchmarks.allocator``: the paper-config JointSSL step (fp32, channels-last) with glibc's default
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
import time

import torch

from agreement.tables import markdown_table

MODES = ("glibc", "retain")


def measure(mode: str, quick: bool, steps: int = 3) -> dict[str, float]:
    """One process's figures: median seconds per step after a warm-up step, and the system time and minor page
    faults of the timed steps."""
    from agreement.allocator import retain_freed_memory
    from benchmarks.ssl3d import PAPER_STEP, PAPER_STEP_QUICK, make_batch, training_step_fn

    if mode == "retain" and not retain_freed_memory():
        raise SystemExit("retaining freed memory is not possible here (glibc on Linux, no MALLOC_* settings)")
    model, slices, size = (PAPER_STEP_QUICK, 8, (32, 32)) if quick else (PAPER_STEP, 64, (128, 128))
    device = torch.device("cpu")
    batch = make_batch(1, slices, size, 0, device)
    step = training_step_fn(model | {"num_slices": slices, "channels_last": True}, batch, device)
    step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds_per_step": statistics.median(times),
        "system_seconds": after.ru_stime - before.ru_stime,
        "minor_page_faults": after.ru_minflt - before.ru_minflt,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=3, help="alternating (glibc, retain) process pairs")
    parser.add_argument("--quick", action="store_true", help="a ResNet-18 on 8 slices of 32x32: a smoke test")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)  # the child process's mode
    args = parser.parse_args(argv)
    if args.measure:
        result = measure(args.measure, args.quick)
        print(json.dumps(result))
        return result
    if args.pairs < 1:
        raise SystemExit(f"--pairs must be >= 1, got {args.pairs}")
    # both modes start from glibc's defaults, whatever MALLOC_* settings this shell has
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.pairs):
        for mode in MODES:
            command = [sys.executable, "-m", "benchmarks.allocator", "--measure", mode]
            output = subprocess.run(
                command + (["--quick"] if args.quick else []),
                capture_output=True,
                text=True,
                check=True,
                env=env,
            ).stdout
            runs[mode].append(json.loads(output.strip().splitlines()[-1]))
    ratios = [
        glibc["seconds_per_step"] / kept["seconds_per_step"]
        for glibc, kept in zip(runs["glibc"], runs["retain"])
    ]
    rows = [
        [
            mode,
            ", ".join(f"{run['seconds_per_step']:.2f}" for run in runs[mode]),
            ", ".join(f"{run['system_seconds']:.1f}" for run in runs[mode]),
            ", ".join(str(run["minor_page_faults"]) for run in runs[mode]),
        ]
        for mode in MODES
    ]
    print(markdown_table(["allocator", "s / step (each pair)", "system s", "minor page faults"], rows))
    spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    print(
        f"\nglibc / retain per pair: {', '.join(f'{r:.2f}' for r in ratios)}; mean {statistics.mean(ratios):.2f} "
        f"± {spread:.2f}"
    )
    return {"runs": runs, "ratios": ratios}


if __name__ == "__main__":
    main()
