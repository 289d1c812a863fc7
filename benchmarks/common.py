"""Small helpers for speed and memory benchmarks: interleaved timing, matmul rate, machine description, tables.

Shared machines are noisy, so variants that are compared are timed round-robin in one process and summarised by
their median; a slow spell then hits every variant alike instead of whichever happened to run during it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from agreement.allocator import retaining_freed_memory

# The official implementations' CPU step times (2 threads, fp32), by the machine type they were measured on; a
# ratio against them only means something on that machine type, and from another sitting it carries that
# sitting's noise (up to 25% between runs). Intel: interleaved IVLP/PromptSRC (A3) and the 3D-SwAV steps (B1, B2);
# AMD: the side-by-side sitting.
OFFICIAL_STEP_SECONDS = {
    "Intel(R) Xeon(R) Processor": {
        "IVLP": 2.33,
        "PromptSRC": 3.00,
        "JointSSL paper": 16.09,
        "JointSSL small": 2.97,
    },
    "AMD EPYC": {"IVLP": 2.20, "PromptSRC": 2.94, "JointSSL paper": 9.81, "JointSSL small": 1.81},
}


def official_step_seconds(work: str) -> float | None:
    """The official code's seconds per step of ``work`` on this machine type, or None where not measured."""
    cpu = cpu_model()
    for machine, steps in OFFICIAL_STEP_SECONDS.items():
        if cpu.startswith(machine):
            return steps.get(work)
    return None


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for queued work on ``device`` (CUDA runs asynchronously), a no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Wall-clock seconds of one call, with the device synchronised before and after."""
    sync = sync or (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved_times(
    variants: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 0,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, timed round-robin (``warmup`` untimed rounds first)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(time_call(fn, sync))
    return times


def pause_for_spinning_pools(seconds: float = 0.5) -> None:
    """Sleep so that OpenMP and OpenBLAS worker threads of the library timed last stop spinning (they busy-wait
    for a while after each parallel region) before another library's threads need the same cores."""
    time.sleep(seconds)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def matmul_gflops(
    m: int,
    k: int,
    n: int,
    repeats: int = 20,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> float:
    """Median rate of ``(m, k) @ (k, n)`` products in GFLOP/s (2 m k n flops each)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    times = interleaved_times(
        {"mm": lambda: torch.mm(a, b, out=out)}, repeats, warmup=3, sync=synchronizer(device)
    )
    return 2.0 * m * k * n / median(times["mm"]) / 1e9


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far in MiB (it never decreases)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def cpu_model() -> str:
    """The CPU's marketing name: lscpu's model name, else /proc/cpuinfo, else platform.processor()."""
    if shutil.which("lscpu"):
        try:
            output = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            output = ""
        for line in output.splitlines():
            if line.lower().startswith("model name:"):
                return line.split(":", 1)[1].strip()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers depend on: library versions, thread count, CPU and (for CUDA) GPU."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": _cpu_count(),
        "platform": platform.platform(),
        # Other jobs on the machine: timings are only comparable at similar load.
        "load_average_1_5_15_min": load_average(),
        # Overrides OpenBLAS's kernel choice; faiss's bundled OpenBLAS needs it for its native kernel on some CPUs.
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "malloc_retains_freed_memory": retaining_freed_memory(),
    }
    device = torch.device(device)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


@contextlib.contextmanager
def limit_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads and, through threadpoolctl, as many in every OpenMP/BLAS pool loaded so
    far (scikit-learn's, faiss's), so that compared libraries get the same share; ``None`` changes nothing."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield
        else:
            with threadpool_limits(limits=threads):
                yield
    finally:
        torch.set_num_threads(previous)


def thread_pools() -> list[dict[str, Any]]:
    """The native thread pools loaded in this process (OpenMP, BLAS) and their sizes, where threadpoolctl is
    installed: scikit-learn and faiss do not follow ``torch.set_num_threads``."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [
        {
            "api": pool.get("internal_api"),
            "library": Path(pool["filepath"]).name,
            "threads": pool.get("num_threads"),
            # OpenBLAS's kernel for this CPU (e.g. SkylakeX, or a generic one such as Prescott)
            "kernel": pool.get("architecture"),
        }
        for pool in threadpool_info()
    ]


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable jobs), where the OS reports them."""
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_count() -> int | None:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def require_device(name: str) -> torch.device:
    """``torch.device(name)``, or SystemExit with a clear message when CUDA is asked for but absent."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"--device {name!r} is not a device name: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {name}: CUDA is not available here (torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda}); run on a machine with a GPU or use --device cpu"
        )
    return device


def check_finite_positive(values: Mapping[str, float]) -> None:
    bad = {name: value for name, value in values.items() if not (math.isfinite(value) and value > 0)}
    if bad:
        raise RuntimeError(f"benchmark produced non-positive or non-finite timings: {bad}")


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def environment_line(env: dict[str, Any]) -> str:
    return (
        f"torch {env['torch']}, {env['torch_threads']} threads, CPU: {env['cpu']} ({env['cpu_count']} usable), "
        f"load average at start {env['load_average_1_5_15_min']}, at end {env['load_average_at_end']}, "
        f"malloc {'retaining freed memory' if env.get('malloc_retains_freed_memory') else 'glibc default'}"
    )
