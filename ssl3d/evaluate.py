"""The ``scripts/evaluate.py`` entry point: checks that pretraining beats random initialisations.

Sub-commands:

- ``fashion``: the 2D implementation check on Fashion-MNIST (``ssl3d.fashion``), SwAV and DeepCluster-V2.
- ``finetune``: fine-tuning from the pretrained encoder against random weights, seed-paired, with BatchNorm
  statistics handled alike, at several label fractions (``ssl3d.finetune.compare``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ssl3d.fashion import CheckConfig, DatasetNotFoundError, report_table, run_check


def _fashion(args: argparse.Namespace) -> dict[str, Any]:
    config = CheckConfig(
        backbone=args.backbone,
        train_images=args.train_images,
        epochs=args.epochs,
        batch_size=args.batch_size,
        prototypes=args.prototypes,
        knn_train_images=args.knn_train_images,
        knn_test_images=args.knn_test_images,
        methods=args.methods,
    )
    for name in ("train_images", "epochs", "batch_size", "prototypes", "knn_train_images", "knn_test_images"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(config, name)}")
    if config.batch_size > config.train_images:
        raise ValueError(f"--batch_size {config.batch_size} exceeds --train_images {config.train_images}")
    out_dir = Path(args.out_dir or Path("runs") / "evaluate" / f"fashion-{time.strftime('%Y%m%d-%H%M%S')}")
    result = run_check(config, args.seeds, args.random_seeds, args.data_dir, out_dir)
    print(f"\nFashion-MNIST check ({result['seconds'] / 60:.1f} min); report in {out_dir}/fashion_check.md")
    print(report_table(result))
    for method, outcome in result["methods"].items():
        verdict = "beats" if outcome["passes"] else "does not beat"
        print(
            f"{method}: pretraining {verdict} random initialisation by the bar (>= 0.03 and > 3 random std): "
            f"{outcome['gain_over_random_mean']:+.4f}, {outcome['gain_in_random_stds']:.1f} std."
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fashion = commands.add_parser("fashion", help="2D branch on Fashion-MNIST against random, kNN (k=20)")
    defaults = CheckConfig()
    fashion.add_argument("--data_dir", default=None, help="idx files or train/ test/ class folders")
    fashion.add_argument("--seeds", type=int, nargs="+", default=[0], help="pretraining seeds")
    fashion.add_argument("--random_seeds", type=int, default=3, help="random initialisations (at least)")
    fashion.add_argument("--methods", nargs="+", choices=["swav", "deepcluster"], default=defaults.methods)
    fashion.add_argument("--backbone", default=defaults.backbone, help="timm backbone")
    fashion.add_argument("--train_images", type=int, default=defaults.train_images, help="unlabelled images")
    fashion.add_argument("--epochs", type=int, default=defaults.epochs)
    fashion.add_argument("--batch_size", type=int, default=defaults.batch_size)
    fashion.add_argument("--prototypes", type=int, default=defaults.prototypes)
    fashion.add_argument("--knn_train_images", type=int, default=defaults.knn_train_images)
    fashion.add_argument("--knn_test_images", type=int, default=defaults.knn_test_images)
    fashion.add_argument("--out_dir", default=None, help="default runs/evaluate/fashion-<time>")
    fashion.set_defaults(run=_fashion)
    finetune = commands.add_parser(
        "finetune", help="fine-tuning from the pretrained encoder against random weights, seed-paired"
    )
    from ssl3d.finetune import compare

    compare.add_arguments(finetune)
    finetune.set_defaults(run=compare.run)
    return parser


def main(args: list[str] | None = None) -> dict[str, Any]:
    parsed = build_parser().parse_args(args)
    try:
        return parsed.run(parsed)
    except (DatasetNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
