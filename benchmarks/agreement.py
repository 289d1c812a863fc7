"""``scripts/benchmark.py agreement``: k-means (torch fp32 and bf16 assignments, faiss, scikit-learn from the same
initial centroids) and Sinkhorn, timed round-robin in one process with a pause between libraries."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from agreement.kmeans import inertia, kmeans
from agreement.sinkhorn import sinkhorn
from agreement.tables import markdown_table
from benchmarks.common import (
    check_finite_positive,
    environment,
    environment_line,
    interleaved_times,
    load_average,
    matmul_gflops,
    median,
    pause_for_spinning_pools,
    synchronizer,
    thread_pools,
    time_call,
)

# the module, not the function of the same name that agreement/__init__.py exports
kmeans_module = importlib.import_module("agreement.kmeans")

AGREEMENT_SIZES = {
    "full": dict(
        n=200_000, dim=128, k=1000, iterations=10, repeats=3, sinkhorn=(4096, 3000), sinkhorn_repeats=7
    ),
    "quick": dict(n=4000, dim=32, k=40, iterations=10, repeats=2, sinkhorn=(256, 300), sinkhorn_repeats=3),
}


def blob_data(n: int, dim: int, centers: int, seed: int = 0) -> torch.Tensor:
    """Points drawn around ``centers`` Gaussian blobs (unit noise, means spread 2 per coordinate)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, dim, generator=generator) * 2.0
    labels = torch.randint(centers, (n,), generator=generator)
    return means[labels] + torch.randn(n, dim, generator=generator)


@contextlib.contextmanager
def _without_packed_minimum() -> Iterator[None]:
    previous = kmeans_module._PACKED_INDEX_BITS
    kmeans_module._PACKED_INDEX_BITS = 0  # no k above 1 fits in 0 bits
    try:
        yield
    finally:
        kmeans_module._PACKED_INDEX_BITS = previous


def _sklearn_kmeans() -> Any:
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        return None
    return KMeans


def run_agreement(quick: bool, device: torch.device) -> dict[str, Any]:
    size = AGREEMENT_SIZES["quick" if quick else "full"]
    env = environment(device)
    n, dim, k, iterations = size["n"], size["dim"], size["k"], size["iterations"]
    sync = synchronizer(device)
    x_cpu = blob_data(n, dim, k, seed=0)
    generator = torch.Generator().manual_seed(1)
    init_cpu = x_cpu[torch.randperm(n, generator=generator)[:k]].clone()
    x, init = x_cpu.to(device), init_cpu.to(device)

    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def ours(name: str, backend: str, precision: str = "float32") -> Callable[[], None]:
        def call() -> None:
            outputs[name] = kmeans(
                x, k, iterations=iterations, spherical=False, init=init, backend=backend, precision=precision
            )

        return call

    def unpacked_bf16() -> None:
        # The bf16 path as it was before _PackedMin: the row minimum by min(dim=1) with indices.
        with _without_packed_minimum():
            ours("torch bf16, min with indices", "torch", "bfloat16")()

    variants: dict[str, Callable[[], None]] = {
        "torch": ours("torch", "torch"),
        "torch bf16": ours("torch bf16", "torch", "bfloat16"),
        "torch bf16, min with indices": unpacked_bf16,
        "faiss": ours("faiss", "faiss"),
    }
    KMeans = _sklearn_kmeans()
    if KMeans is not None:
        x_numpy, init_numpy = x_cpu.numpy(), init_cpu.numpy()

        def scikit_learn() -> None:
            fitted = KMeans(k, init=init_numpy, n_init=1, max_iter=iterations, algorithm="lloyd", tol=0).fit(
                x_numpy
            )
            outputs["sklearn"] = (
                torch.from_numpy(fitted.cluster_centers_),
                torch.from_numpy(fitted.labels_).long(),
            )

        variants["sklearn"] = scikit_learn

    # The matmul rate is measured in every round, next to the runs it bounds.
    rate_shape = (min(8192, n), dim, k)
    rates: list[float] = []
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(size["repeats"]):
        rates.append(matmul_gflops(*rate_shape, repeats=10, device=device))
        for name, fn in variants.items():
            pause_for_spinning_pools()
            times[name].append(time_call(fn, sync))
    rate = median(rates)
    bound = iterations * 2.0 * n * k * dim / (rate * 1e9)

    inertias = {name: inertia(x_cpu, c.cpu().float(), a.cpu()) for name, (c, a) in outputs.items()}
    reference_time = median(times["sklearn"]) if "sklearn" in times else None
    reference_inertia = inertias.get("sklearn")
    results: dict[str, dict[str, Any]] = {}
    for name in variants:
        seconds = median(times[name])
        results[name] = {
            "seconds": seconds,
            "seconds_all": times[name],
            "time_vs_sklearn": seconds / reference_time if reference_time else None,
            "speedup_vs_sklearn": reference_time / seconds if reference_time else None,
            "inertia": inertias[name],
            "inertia_vs_sklearn": inertias[name] / reference_inertia if reference_inertia else None,
            "time_vs_matmul_bound": seconds / bound,
        }
    target_met = {
        name: results[name]["speedup_vs_sklearn"] is not None
        and results[name]["speedup_vs_sklearn"] >= 2.0
        and results[name]["inertia_vs_sklearn"] <= 1.01
        for name in ("torch", "torch bf16")
    }

    batch, prototypes = size["sinkhorn"]
    generator = torch.Generator().manual_seed(2)
    embeddings = torch.nn.functional.normalize(torch.randn(batch, 128, generator=generator), dim=1)
    centres = torch.nn.functional.normalize(torch.randn(prototypes, 128, generator=generator), dim=1)
    scores = (embeddings @ centres.T).to(device)
    sinkhorn_times = interleaved_times(
        {"sinkhorn": lambda: sinkhorn(scores)}, size["sinkhorn_repeats"], warmup=1, sync=sync
    )["sinkhorn"]

    check_finite_positive(
        {name: r["seconds"] for name, r in results.items()} | {"sinkhorn": median(sinkhorn_times)}
    )
    return {
        "suite": "agreement",
        "quick": quick,
        "device": str(device),
        "environment": env
        | {
            "sklearn_installed": KMeans is not None,
            "thread_pools": thread_pools(),
            "load_average_at_end": load_average(),
        },
        "kmeans": {
            "n": n,
            "dim": dim,
            "k": k,
            "iterations": iterations,
            "data": f"{k} Gaussian blobs, seed 0; initial centroids: {k} random points, seed 1",
            "rounds": size["repeats"],
            "matmul_shape": list(rate_shape),
            "matmul_gflops": rate,
            "matmul_gflops_all": rates,
            "bound_seconds": bound,
            "results": results,
            "target": "torch (fp32 or bf16 assignments) >= 2x faster than scikit-learn with inertia within 1%",
            "target_met": target_met,
        },
        "sinkhorn": {
            "batch": batch,
            "prototypes": prototypes,
            "epsilon": 0.05,
            "iterations": 3,
            "seconds": median(sinkhorn_times),
            "seconds_all": sinkhorn_times,
        },
    }


def agreement_tables(result: dict[str, Any]) -> str:
    km = result["kmeans"]
    rows = [
        [
            name,
            r["seconds"],
            r["time_vs_sklearn"],
            r["speedup_vs_sklearn"],
            r["inertia"],
            r["inertia_vs_sklearn"],
            r["time_vs_matmul_bound"],
        ]
        for name, r in km["results"].items()
    ]
    env = result["environment"]
    lines = [
        f"### k-means: N={km['n']:,}, D={km['dim']}, K={km['k']:,}, {km['iterations']} iterations "
        f"(median of {km['rounds']} interleaved rounds, {result['device']})",
        "",
        markdown_table(
            [
                "method",
                "seconds",
                "time / sklearn",
                "speed-up vs sklearn",
                "inertia",
                "inertia / sklearn",
                "time / matmul bound",
            ],
            rows,
        ),
        "",
        f"matmul rate {km['matmul_gflops']:.1f} GFLOP/s on {tuple(km['matmul_shape'])} products "
        f"(rounds: {', '.join(f'{r:.1f}' for r in km['matmul_gflops_all'])}); bound = {km['iterations']} x "
        f"2NKD / rate = {km['bound_seconds']:.2f} s. Target (>= 2x sklearn, inertia within 1%): "
        + ", ".join(f"{name} {'met' if met else 'not met'}" for name, met in km["target_met"].items())
        + ".",
        "",
        f"### Sinkhorn: {result['sinkhorn']['batch']:,} x {result['sinkhorn']['prototypes']:,} scores, "
        f"3 iterations: {result['sinkhorn']['seconds'] * 1e3:.1f} ms (median of "
        f"{len(result['sinkhorn']['seconds_all'])})",
        "",
        environment_line(env),
        f"OPENBLAS_CORETYPE={env.get('openblas_coretype') or 'unset'}; native thread pools: "
        + (
            ", ".join(
                f"{p['library']} ({p['api']}{', ' + p['kernel'] + ' kernel' if p.get('kernel') else ''}) "
                f"{p['threads']} threads"
                for p in env["thread_pools"]
            )
            or "unknown"
        ),
    ]
    return "\n".join(lines)
