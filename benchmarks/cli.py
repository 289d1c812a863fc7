"""``scripts/benchmark.py``: speed and memory benchmarks; prints Markdown tables and writes JSON (default runs/benchmark/<suite>.json).

python scripts/benchmark.py agreement            # k-means (torch, faiss, scikit-learn) and Sinkhorn, a few minutes
python scripts/benchmark.py ssl3d                # deformable slice attention and JointSSL training steps
python scripts/benchmark.py all --quick          # small sizes: a smoke test in seconds
python scripts/benchmark.py ssl3d --device cuda  # adds the bf16 paper-config step and GPU utilisation
python scripts/benchmark.py prompts              # PromptSRC against IVLP training steps
python scripts/benchmark.py entities             # stages 2+3 on 300,000 faces against scikit-learn; video fps
python scripts/benchmark.py entities-eval        # entity discovery vs the official algorithm, held-out episodes
python scripts/benchmark.py entities-eval --split tuning --tune   # the grid the entity defaults were chosen from
python scripts/benchmark.py finetune             # fine-tuning steps and inference volumes/s
python scripts/benchmark.py allocator            # the paper step with glibc's allocator and with retained memory

Compared variants are timed round-robin in one process and summarised by their median, so that load from other
jobs on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from agreement.allocator import retain_freed_memory
from agreement.tables import markdown_table
from benchmarks.agreement import _sklearn_kmeans, agreement_tables, run_agreement
from benchmarks.common import (
    limit_threads,
    require_device,
    write_json,
)
from benchmarks.ssl3d import run_ssl3d, ssl3d_tables

PACKAGE_SUITES = ("prompts", "entities", "entities-eval", "finetune")
SUITES = ("agreement", "ssl3d", *PACKAGE_SUITES, "allocator", "all")  # "all": every suite but the allocator's


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test that runs in seconds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda adds the bf16 GPU measurements)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default runs/benchmark/<suite>.json)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and, through threadpoolctl, for scikit-learn's and faiss's pools (default: each "
        "library's own choice); on a CPU shared with other jobs, 1 thread avoids waiting on descheduled worker "
        "threads at every parallel op",
    )
    parser.add_argument(
        "--malloc",
        choices=["retain", "glibc"],
        default="retain",
        help="retain: keep freed memory for reuse, as the training CLIs do (agreement.allocator); glibc: its "
        "default, which unmaps large blocks when freed",
    )
    parser.add_argument(
        "--split",
        choices=["held-out", "tuning"],
        default="held-out",
        help="entities-eval: the half of the evaluation family to run on",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="entities-eval: score the tuning grid and print the chosen defaults",
    )
    parser.add_argument(
        "--pairs", type=int, default=3, help="allocator: alternating (glibc, retain) pairs of fresh processes"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = require_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    out = args.out if args.out is not None else Path("runs") / "benchmark" / f"{args.suite}.json"
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.malloc == "retain":
        retain_freed_memory()
    if args.suite in ("agreement", "all"):
        _load_compared_libraries()
    with limit_threads(args.threads):
        return _run(args, device, out)


def _load_compared_libraries() -> None:
    """Import faiss and scikit-learn's k-means up front, so that --threads also limits their thread pools."""
    import faiss  # noqa: F401

    _sklearn_kmeans()


def _run(args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if args.suite in ("agreement", "all"):
        result["agreement"] = run_agreement(args.quick, device)
        print(agreement_tables(result["agreement"]), flush=True)
    if args.suite in ("ssl3d", "all"):
        result["ssl3d"] = run_ssl3d(args.quick, device)
        if "agreement" in result:
            print()
        print(ssl3d_tables(result["ssl3d"]), flush=True)
    for suite in PACKAGE_SUITES:
        if args.suite in (suite, "all"):
            result[suite] = run_package_suite(suite, args, device)
            print(f"\n### {suite}\n\n{rows_table(result[suite]['rows'])}", flush=True)
    if args.suite == "allocator":
        from benchmarks.allocator import run_allocator_benchmark

        result["allocator"] = run_allocator_benchmark(args.pairs, args.quick)
        print(result["allocator"]["markdown"], flush=True)
    data = result if args.suite == "all" else result[args.suite]
    path = write_json(out, _finite_or_none(data))
    print(f"\nwrote {path}")
    if args.suite == "entities-eval":
        report = path.with_suffix(".md")
        report.write_text(data["markdown"] + "\n")
        print(f"\n{data['markdown']}\n\nwrote {report}")
    return data


def run_package_suite(suite: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The suites with a single table of rows."""
    quick = args.quick
    if suite == "prompts":
        from benchmarks.prompts import run_prompts_benchmark

        return run_prompts_benchmark(quick=quick, device=device.type)
    if suite == "entities":
        from benchmarks.entities import run_entities_benchmark

        return run_entities_benchmark(quick=quick)
    if suite == "entities-eval":
        from benchmarks.entities import run_entities_evaluation

        return run_entities_evaluation(quick=quick, split=args.split, tune_defaults=args.tune)
    from benchmarks.finetune import run_finetune_benchmark

    return run_finetune_benchmark(quick=quick, device=device.type)


def rows_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of a list of flat dicts, columns in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return markdown_table(columns, [[row.get(column, "") for column in columns] for row in rows])


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value


if __name__ == "__main__":
    main()
