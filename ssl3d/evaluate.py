"""The ``scripts/evaluate.py`` entry point: checks that pretraining beats random initialisations.

Sub-commands:

- ``fashion``: the 2D implementation check on Fashion-MNIST (``ssl3d.fashion``), SwAV and DeepCluster-V2.
- ``cross-subject``: finished ``scripts/pretrain.py`` runs (e.g. three seeds) against random initialisations on
  the slice- and volume-level probes trained on MNI152 and tested on Colin27 (``ssl3d.crosssubject``).
- ``finetune``: fine-tuning from the pretrained encoder against random weights, seed-paired, with BatchNorm
  statistics handled alike, at several label fractions (``ssl3d.finetune.compare``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from agreement.allocator import retain_freed_memory
from agreement.inputs import parse_boolean
from agreement.runs import UNFINISHED, last_checkpoint, run_folder
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
        swav_queue_length=args.swav_queue_length,
        small_crops=args.small_crops,
        small_size=args.small_size,
        small_crop_scale=tuple(args.small_crop_scale),
        split=args.split,
        methods=args.methods,
    )
    for name in ("train_images", "epochs", "batch_size", "prototypes", "knn_train_images", "knn_test_images"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(config, name)}")
    if config.batch_size > config.train_images:
        raise ValueError(f"--batch_size {config.batch_size} exceeds --train_images {config.train_images}")
    if config.small_crops < 0 or config.small_size < 4:
        raise ValueError(
            f"--small_crops must be >= 0 and --small_size >= 4, got {config.small_crops} and {config.small_size}"
        )
    low, high = config.small_crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"--small_crop_scale must be LOW HIGH with 0 < LOW <= HIGH <= 1, got {low} {high}")
    if config.swav_queue_length and not config.batch_size <= config.swav_queue_length:
        raise ValueError(
            f"--swav_queue_length {config.swav_queue_length} must be 0 (no queue) or at least --batch_size "
            f"{config.batch_size}"
        )
    out_dir = run_folder(args.out_dir, "evaluate", "fashion-")
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


def load_pretraining_run(run_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """A finished ``scripts/pretrain.py`` run folder: its model (``ssl3d.crosssubject.PretrainedRun``) and the
    data settings the probes need (``size``, ``num_slices``, ``slice_axis``)."""
    from ssl3d.crosssubject import PretrainedRun, load_checkpoint_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run folder")
    if (run_dir / UNFINISHED).is_file():
        raise ValueError(
            f"{run_dir}: the run has not completed ({UNFINISHED} is there); finish or resume it first"
        )
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{run_dir}: no config.yaml; is this a scripts/pretrain.py run folder?")
    try:
        config = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{config_file}: not valid YAML ({str(error).splitlines()[0]})") from None
    data = (config or {}).get("data") or {}
    missing = [key for key in ("size", "num_slices", "slice_axis") if key not in data]
    if missing or not isinstance(config.get("seed_everything"), int):
        raise ValueError(
            f"{config_file}: lacks data.size, data.num_slices, data.slice_axis or seed_everything"
        )
    checkpoint = last_checkpoint(run_dir)
    if checkpoint is None:
        raise ValueError(f"{run_dir}: no checkpoints/last.ckpt")
    model = load_checkpoint_model(checkpoint)
    settings = {
        "size": tuple(data["size"]),
        "num_slices": data["num_slices"],
        "slice_axis": data["slice_axis"],
    }
    return PretrainedRun(str(run_dir), model, config["seed_everything"]), settings


def _cross_subject(args: argparse.Namespace) -> dict[str, Any]:
    from ssl3d.crosssubject import compare_runs, cross_subject_data, format_run_rows, plot_runs, run_verdict

    if args.random_seeds < 2:
        raise ValueError(f"--random_seeds must be at least 2 for a spread, got {args.random_seeds}")
    loaded = [load_pretraining_run(run) for run in args.runs]
    settings = loaded[0][1]
    for (_, other), name in zip(loaded[1:], args.runs[1:]):
        if other != settings:
            raise ValueError(f"{name}: data settings {other} differ from {args.runs[0]}'s {settings}")
    data = cross_subject_data(colin_dir=args.colin_dir, **settings)
    result = compare_runs([run for run, _ in loaded], args.random_seeds, data, volume=args.volume)
    result["table"] = format_run_rows(result["rows"])
    result["verdict"] = run_verdict(result["rows"])
    out_dir = run_folder(args.out_dir, "evaluate", "cross-subject-")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = ", ".join(f"{run['name']} (seed {run['seed']})" for run in result["runs"])
    (out_dir / "cross_subject.md").write_text(
        f"# Cross-subject probes: pretraining runs against random initialisations\n\nRuns: {runs}. Random "
        f"seeds: {result['random seeds']}. Trained on MNI152, tested on Colin27 ({result['axis']} slices).\n\n"
        f"{result['table']}\n\n{result['verdict']}\n"
    )
    (out_dir / "cross_subject.json").write_text(json.dumps(result, indent=2))
    plot_runs(result["rows"], out_dir / "cross_subject.png")
    print(f"\nCross-subject probes ({result['seconds'] / 60:.1f} min); report in {out_dir}/cross_subject.md")
    print(result["table"])
    print(result["verdict"])
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
    fashion.add_argument(
        "--swav_queue_length",
        type=int,
        default=defaults.swav_queue_length,
        help="SwAV queue per view (0: none)",
    )
    fashion.add_argument(
        "--small_crops",
        type=int,
        default=defaults.small_crops,
        help="multi-crop: small views per image besides the two large ones (0: none)",
    )
    fashion.add_argument("--small_size", type=int, default=defaults.small_size, help="small views' size (px)")
    fashion.add_argument(
        "--small_crop_scale",
        type=float,
        nargs=2,
        default=list(defaults.small_crop_scale),
        metavar=("LOW", "HIGH"),
        help="fraction of the image area a small view cuts",
    )
    fashion.add_argument(
        "--split",
        choices=["report", "tuning"],
        default=defaults.split,
        help="'tuning': images disjoint from the reported ones, for choosing settings",
    )
    fashion.add_argument("--out_dir", default=None, help="default runs/evaluate/fashion-<time>")
    fashion.set_defaults(run=_fashion)
    cross = commands.add_parser(
        "cross-subject",
        help="finished pretraining runs against random initialisations, MNI152 -> Colin27 probes",
    )
    cross.add_argument(
        "--runs", nargs="+", required=True, help="scripts/pretrain.py run folders (one config)"
    )
    cross.add_argument(
        "--random_seeds", type=int, default=3, help="random initialisations (the runs' own first)"
    )
    cross.add_argument(
        "--volume",
        type=parse_boolean,
        default=True,
        help="also probe the 3D branch's volume embedding (true/false, default true)",
    )
    cross.add_argument("--colin_dir", default=None, help="folder with ch2bet.nii.gz, aal.nii.gz, aal.nii.txt")
    cross.add_argument("--out_dir", default=None, help="default runs/evaluate/cross-subject-<time>")
    cross.set_defaults(run=_cross_subject)
    finetune = commands.add_parser(
        "finetune", help="fine-tuning from the pretrained encoder against random weights, seed-paired"
    )
    from ssl3d.finetune import compare

    compare.add_arguments(finetune)
    finetune.set_defaults(run=compare.run)
    return parser


def main(args: list[str] | None = None) -> dict[str, Any]:
    parsed = build_parser().parse_args(args)
    retain_freed_memory()  # the checks train in this process
    try:
        return parsed.run(parsed)
    except (DatasetNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
