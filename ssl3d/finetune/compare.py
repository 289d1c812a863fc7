"""A fair comparison of segmentation fine-tuning from a pretrained encoder and from random weights.

``scripts/finetune.py --compare_random true`` trains each initialisation once, for a short run (the demo: 40
steps). There the BatchNorm running statistics used at test time are an average over a run whose weights are
still moving fast; the random encoder starts from identity statistics (mean 0, variance 1) while the
pretrained one brings statistics that fit its weights, and that alone made the difference: random weights with
only the pretrained encoder's running statistics copied in scored like the pretrained encoder, and at 200
steps the gap was gone. This comparison removes that artefact and the luck of one seed:

- **Paired seeds.** For each label fraction and seed, both arms run ``ssl3d.finetune.cli.main`` with the same
  arguments, ``--seed_everything`` and data seed, and differ only in ``--model.init_args.encoder`` (the
  exported encoder, or ``null`` for a random initialisation drawn from that seed). The decoder and head
  initialisation, the labelled-slice subset and the order of the training slices are therefore the same in
  both arms; each run records fingerprints of them (:class:`PairedStart`) and the comparison checks them.
- **BatchNorm handled identically.** Before the first step, :class:`PairedStart` replaces the running
  statistics of every encoder BatchNorm, in both arms, by their exact averages over all training slices of the
  band (``ssl3d.probe.recalibrate_batchnorm``; images only, so this uses no labels in the low-label setting
  either). Fine-tuning then updates them with the same momentum (the layers' default, 0.1) in both arms. Both
  arms therefore start with statistics that match their own weights, whatever the exported file carried,
  instead of the random arm starting with the identity statistics of its initialisation.
  Re-estimating (rather than, say, freezing the statistics) keeps the fine-tuning recipe itself unchanged.
- **Trained to convergence.** ``--steps`` optimizer steps (default 300, at least 200 recommended), bounded by
  ``--trainer.max_steps`` with ``max_epochs=-1``, one epoch of warm-up and a cosine decay to zero, so the
  running statistics at test time (refreshed by ``0.9 ** steps``) describe each arm's final weights. The
  final training loss of each run is reported next to its score.
- **Low-label setting.** Each ``--label_fractions`` entry below 1 trains on that share of the training slices
  (``SegmentationData(label_fraction=...)``; a subset drawn per seed, the same in both arms).

The paired difference is ``pretrained - random`` per seed; means are reported with the sample standard
deviation (``ddof=1``) over seeds. Outputs in ``--out_dir``: ``finetune_comparison.md``, ``.json`` and
``.png``, and one ``scripts/finetune.py`` run folder per fraction, seed and arm.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from agreement.inputs import parse_boolean
from agreement.runs import run_folder
from agreement.tables import markdown_table, mean_std
from ssl3d.export import resolve_encoder_file
from ssl3d.probe import recalibrate_batchnorm
from ssl3d.report import read_metrics, save_figure

ARMS = ("random", "pretrained")
FOREGROUND = "mean (foreground)"
METRIC_NAMES = {"dice": "Dice", "iou": "IoU", "dice_3d": "3D Dice", "iou_3d": "3D IoU"}
MIN_CONVERGED_STEPS = 200


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (key order does not matter)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _batchnorms(module: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def match_init_norms(encoder: torch.nn.Module, reference: torch.nn.Module) -> dict[str, float]:
    """Scale each convolution weight of ``encoder`` to the norm of the same layer of ``reference`` (a fresh
    initialisation); returns the factors. Where every convolution feeds a BatchNorm (ResNets) this changes no
    output once the statistics are re-estimated, only the size of a gradient step relative to the weights
    (under BatchNorm, proportional to lr / |w|^2), so a pretrained and a random encoder train at the same pace."""
    if not _batchnorms(encoder):
        raise ValueError("match_init_norms needs an encoder whose convolutions feed BatchNorm layers")
    fresh = dict(reference.named_modules())
    factors = {}
    for name, module in encoder.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            target = fresh[name].weight.norm()
            factors[name] = float(target / module.weight.norm())
            module.weight.mul_(factors[name])
    return factors


class PairedStart(pl.Callback):
    """At the start of a fresh fit: re-estimate the encoder's BatchNorm statistics, record the starting point.

    For :class:`ssl3d.finetune.SegmentationTask` with :class:`ssl3d.finetune.SegmentationData`. With
    ``recalibrate_bn`` every BatchNorm of ``net.encoder`` gets the exact mean and variance over all training
    slices (labelled or not); the encoder's incoming statistics (identity ones for a random initialisation,
    the pretraining data's for an exported encoder) are discarded. The momentum is left as it is. Nothing
    happens when the fit resumes from a checkpoint, whose statistics are restored as saved.

    ``record`` (a JSON path) receives fingerprints of the encoder weights, of the decoder and head, and the
    labelled slices and first-epoch order of the training slices, which the comparison checks for pairing.
    ``match_norms`` first scales every encoder convolution to the norm of a fresh initialisation's
    (:func:`match_init_norms`; a diagnostic of the step size relative to the weights).
    """

    def __init__(
        self,
        record: str | None = None,
        recalibrate_bn: bool = True,
        batch_size: int = 64,
        match_norms: bool = False,
    ) -> None:
        super().__init__()
        self.record = record
        self.recalibrate_bn = recalibrate_bn
        self.batch_size = batch_size
        self.match_norms = match_norms

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = getattr(pl_module, "net", None)
        data = trainer.datamodule
        if net is None or not hasattr(data, "train_cases"):
            raise ValueError("PairedStart needs a SegmentationTask trained on a SegmentationData")
        if trainer.ckpt_path is not None:
            return
        encoder = net.encoder
        norms = _batchnorms(encoder)
        images = torch.cat([case.images for case in data.train_cases])
        before = fingerprint({k: v for k, v in encoder.state_dict().items() if "running" in k})
        factors = {}
        if self.match_norms:
            with torch.random.fork_rng():  # the reference draws no numbers from the run's generator
                torch.manual_seed(0)
                reference = type(encoder)()
            factors = match_init_norms(encoder.model, reference.model)
        if self.recalibrate_bn:
            recalibrate_batchnorm(encoder, images, batch_size=self.batch_size)
        if self.record is None or not trainer.is_global_zero:
            return
        state = net.state_dict()
        _, sampler = data.train_dataset()
        sampler.set_epoch(0)
        entry = {
            "encoder_weights": fingerprint({n: p for n, p in encoder.named_parameters()}),
            "decoder_and_head": fingerprint({k: v for k, v in state.items() if not k.startswith("encoder.")}),
            "labelled_slices": data.labelled_slices().tolist(),
            "train_order_epoch0": list(sampler),
            "training_slices": int(images.shape[0]),
            "norm_factors": factors,
            "bn": {
                "recalibrated": self.recalibrate_bn,
                "layers": len(norms),
                "momenta": sorted({m.momentum for m in _batchnorms(net)}, key=str),
                "batches_tracked": sorted({int(m.num_batches_tracked) for m in norms}),
                "statistics_changed": before
                != fingerprint({k: v for k, v in encoder.state_dict().items() if "running" in k}),
            },
        }
        path = Path(self.record)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entry, indent=1))


# ---------------------------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``scripts/evaluate.py finetune``."""
    parser.add_argument(
        "--encoder",
        default="latest",
        help="pretraining run folder, its encoder/ folder or encoder.safetensors, or 'latest' (newest run "
        "under --pretrain_root; pretrains the demo first if there is none)",
    )
    parser.add_argument("--pretrain_root", default="runs/pretrain", help="where 'latest' looks")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="paired seeds (>= 3 for a std)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=300,
        help=f"optimizer steps per run (>= {MIN_CONVERGED_STEPS} for converged runs)",
    )
    parser.add_argument(
        "--label_fractions",
        type=float,
        nargs="+",
        default=[1.0, 0.1],
        help="shares of the training slices trained with labels (each in (0, 1])",
    )
    parser.add_argument(
        "--metric", choices=sorted(METRIC_NAMES), default="dice", help="foreground-mean score compared"
    )
    parser.add_argument(
        "--bn_recalibration",
        type=parse_boolean,
        default=True,
        help="re-estimate every encoder's BatchNorm statistics on the training slices first (true/false; "
        "false reproduces the artefact of the plain comparison)",
    )
    parser.add_argument(
        "--match_init_norms",
        type=parse_boolean,
        default=False,
        help="diagnostic (true/false): scale every encoder convolution, in both arms, to a fresh "
        "initialisation's norm first; under BatchNorm this changes no output, only the relative step size",
    )
    parser.add_argument("--backbone", default=None, help="timm model (default: from encoder.json)")
    parser.add_argument(
        "--finetune_args",
        default="",
        help="more scripts/finetune.py arguments, one quoted string, e.g. "
        "--finetune_args='--config my.yaml --data.init_args.batch_size=8' (the comparison sets seeds, "
        "steps, encoder, label fraction and callbacks itself)",
    )
    parser.add_argument(
        "--keep_checkpoints",
        action="store_true",
        help="keep each run's checkpoints (large; removed by default)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished runs already in --out_dir with these settings",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="run only these arms (the random arm does not depend on the encoder: run it once, then compare "
        "encoders with --resume); the report needs both",
    )
    parser.add_argument("--out_dir", default=None, help="default runs/evaluate/finetune-<time>")


def check_arguments(args: argparse.Namespace) -> None:
    """Clear errors for settings that cannot give a comparison."""
    if args.steps < 1:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")
    bad = [f for f in args.label_fractions if not 0.0 < f <= 1.0]
    if bad or len(set(args.label_fractions)) != len(args.label_fractions):
        raise ValueError(f"--label_fractions must be distinct values in (0, 1], got {args.label_fractions}")


def command_line(args: argparse.Namespace) -> str:
    """The ``scripts/evaluate.py finetune`` command that reproduces ``args``."""
    parts = [
        "python scripts/evaluate.py finetune",
        f"--encoder {shlex.quote(str(args.encoder))}",
        f"--seeds {' '.join(map(str, args.seeds))}",
        f"--steps {args.steps}",
        f"--label_fractions {' '.join(f'{f:g}' for f in args.label_fractions)}",
        f"--metric {args.metric}",
        f"--bn_recalibration {str(args.bn_recalibration).lower()}",
    ]
    if getattr(args, "match_init_norms", False):
        parts.append("--match_init_norms true")
    if args.backbone:
        parts.append(f"--backbone {args.backbone}")
    if args.finetune_args:
        parts.append(f"--finetune_args={shlex.quote(args.finetune_args)}")
    if args.out_dir:
        parts.append(f"--out_dir {shlex.quote(str(args.out_dir))}")
    return " ".join(parts)


def resolve_encoder_dir(encoder: str, pretrain_root: str | Path = "runs/pretrain") -> Path:
    """A pretraining run folder, encoder folder or weights file, or ``latest``, as the path to load."""
    from ssl3d.finetune.cli import LATEST, resolve_encoder

    if encoder == LATEST:
        return Path(resolve_encoder(LATEST, [], root=pretrain_root))
    path = Path(encoder)
    if not path.exists():
        raise ValueError(f"--encoder {encoder}: no such pretraining run, encoder folder or weights file")
    weights, _ = resolve_encoder_file(path)
    return (weights.parent if path.is_dir() else weights).resolve()


def _backbone_of(encoder: Path) -> str | None:
    return resolve_encoder_file(encoder)[1].get("timm_model")


def arm_arguments(
    arm: str,
    encoder: Path | None,
    fraction: float,
    seed: int,
    steps: int,
    run_dir: Path,
    backbone: str,
    bn_recalibration: bool = True,
    extra: list[str] = (),
    match_norms: bool = False,
) -> list[str]:
    """``scripts/finetune.py`` arguments of one arm; the two arms of a seed differ only in the encoder."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    if arm == "pretrained" and encoder is None:
        raise ValueError("the pretrained arm needs an encoder")
    callback = {
        "class_path": f"{__name__}.PairedStart",
        "init_args": {
            "record": str(run_dir / arm / "paired_start.json"),
            "recalibrate_bn": bn_recalibration,
            "match_norms": match_norms,
        },
    }
    return [
        *extra,
        f"--run_dir={run_dir}",
        f"--variant={arm}",
        "--compare_random=false",
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--data.init_args.label_fraction={fraction}",
        f"--model.init_args.backbone={backbone}",
        f"--model.init_args.encoder={encoder if arm == 'pretrained' else 'null'}",
        "--trainer.max_epochs=-1",
        f"--trainer.max_steps={steps}",
        f"--trainer.callbacks={json.dumps([callback])}",
    ]


# ---------------------------------------------------------------------------------------------- running


def training_curve(metrics_csv: Path) -> list[tuple[int, float]]:
    """``(step, train/loss)`` of a fine-tuning run's ``metrics.csv``, in step order (empty without a log)."""
    if not metrics_csv.is_file():
        return []
    return sorted(read_metrics(metrics_csv).get("train/loss", []))


def final_training_loss(metrics_csv: Path, share: float = 0.1) -> float:
    """Mean ``train/loss`` over the last ``share`` of the logged steps (NaN without a log)."""
    values = training_curve(metrics_csv)
    if not values:
        return math.nan
    tail = values[-max(1, math.ceil(share * len(values))) :]
    return float(np.mean([v for _, v in tail]))


def _run_arm(cli_args: list[str], arm_dir: Path, resume: bool) -> dict[str, Any]:
    """One ``scripts/finetune.py`` run; with ``resume``, a finished run with the same arguments is reused."""
    from ssl3d.finetune.cli import main as finetune

    results_file, args_file = arm_dir / "results.json", arm_dir / "compare_args.json"
    if (
        resume
        and results_file.is_file()
        and (arm_dir / "paired_start.json").is_file()
        and args_file.is_file()
        and json.loads(args_file.read_text()) == cli_args
    ):
        return {**json.loads(results_file.read_text()), "reused": True}
    for stale in (args_file, arm_dir / "paired_start.json"):
        stale.unlink(missing_ok=True)
    # A rerun replaces the arm: its old checkpoints would otherwise be refused as another run's.
    shutil.rmtree(arm_dir / "checkpoints", ignore_errors=True)
    results = finetune(cli_args)["variants"][0]
    args_file.write_text(json.dumps(cli_args, indent=1))
    return results


def run_comparison(args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
    """Fine-tune both arms for every label fraction and seed; return the per-run results (no summary)."""
    from ssl3d.finetune.encoders import register_timm_backbone

    check_arguments(args)
    arms = [arm for arm in ARMS if arm in getattr(args, "arms", ARMS)]
    if "pretrained" in arms:
        encoder = resolve_encoder_dir(args.encoder, args.pretrain_root)
        backbone = args.backbone or _backbone_of(encoder) or "resnet18"
    else:  # the random arm alone needs no encoder
        encoder, backbone = None, args.backbone or "resnet18"
    # Registering draws a model (random numbers) the first time only: do it before any seeded run.
    register_timm_backbone(backbone)
    out_dir = Path(args.out_dir)
    extra = shlex.split(args.finetune_args or "")
    if not any(a.startswith("--data.init_args.demo_dir") for a in extra):
        extra.append(f"--data.init_args.demo_dir={out_dir / 'demo_data'}")
    started = time.perf_counter()
    runs = []
    for fraction in args.label_fractions:
        for seed in args.seeds:
            run_dir = out_dir / f"fraction-{fraction:g}" / f"seed-{seed}"
            for arm in arms:
                cli_args = arm_arguments(
                    arm,
                    encoder,
                    fraction,
                    seed,
                    args.steps,
                    run_dir,
                    backbone,
                    args.bn_recalibration,
                    extra,
                    getattr(args, "match_init_norms", False),
                )
                arm_dir = run_dir / arm
                results = _run_arm(cli_args, arm_dir, args.resume)
                if not args.keep_checkpoints:
                    shutil.rmtree(arm_dir / "checkpoints", ignore_errors=True)
                record_file = arm_dir / "paired_start.json"
                if not record_file.is_file():
                    raise RuntimeError(
                        f"{arm_dir}: the run left no paired_start.json; --finetune_args must not replace "
                        "--trainer.callbacks"
                    )
                foreground = results["summary"].get(FOREGROUND, {})
                runs.append(
                    {
                        "fraction": fraction,
                        "seed": seed,
                        "arm": arm,
                        "scores": {k: foreground.get(k, math.nan) for k in METRIC_NAMES},
                        "per_class": results["summary"],
                        "steps": results["steps"],
                        "fit_seconds": results["fit_seconds"],
                        "reused": bool(results.get("reused", False)),
                        "final_train_loss": final_training_loss(arm_dir / "metrics.csv"),
                        "curve": training_curve(arm_dir / "metrics.csv"),
                        "record": json.loads(record_file.read_text()),
                        "run_dir": str(arm_dir),
                    }
                )
                if progress:
                    print(
                        f"[{time.perf_counter() - started:6.0f} s] fraction {fraction:g}, seed {seed}, {arm}: "
                        f"{METRIC_NAMES[args.metric]} {runs[-1]['scores'][args.metric]:.4f}, final training "
                        f"loss {runs[-1]['final_train_loss']:.4f} ({results['steps']} steps)",
                        flush=True,
                    )
    return {
        "command": command_line(args),
        "encoder": str(encoder) if encoder is not None else None,
        "backbone": backbone,
        "arms": arms,
        "steps": args.steps,
        "seeds": list(args.seeds),
        "label_fractions": list(args.label_fractions),
        "metric": args.metric,
        "bn_recalibration": bool(args.bn_recalibration),
        "match_init_norms": bool(getattr(args, "match_init_norms", False)),
        "finetune_args": args.finetune_args,
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }


def pairing_problems(random: dict[str, Any], pretrained: dict[str, Any]) -> list[str]:
    """What differs between two arms' starting records other than the encoder (empty when paired)."""
    problems = [
        f"{key} differs"
        for key in ("decoder_and_head", "labelled_slices", "train_order_epoch0", "training_slices")
        if random.get(key) != pretrained.get(key)
    ]
    if random.get("encoder_weights") == pretrained.get("encoder_weights"):
        problems.append("the encoder weights are the same in both arms")
    return problems


def batchnorm_problems(random: dict[str, Any], pretrained: dict[str, Any]) -> list[str]:
    """How the arms' encoder BatchNorm handling differs (empty when identical: same layers, re-estimation on
    the same number of batches, same momenta)."""
    rnd, pre = random.get("bn", {}), pretrained.get("bn", {})
    problems = [
        f"BatchNorm {key} differs" for key in sorted(set(rnd) | set(pre)) if rnd.get(key) != pre.get(key)
    ]
    if not rnd.get("recalibrated", False):
        problems.append("BatchNorm statistics not re-estimated")
    return problems


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std per arm, paired difference (pretrained - random) mean ± std, per-seed values, per fraction."""
    metric = result["metric"]
    fractions = {}
    problems: list[str] = []
    bn_problems: list[str] = []
    for fraction in result["label_fractions"]:
        by_seed: dict[int, dict[str, dict[str, Any]]] = {}
        for run in result["runs"]:
            if run["fraction"] == fraction:
                by_seed.setdefault(run["seed"], {})[run["arm"]] = run
        seeds = [s for s in result["seeds"] if set(by_seed.get(s, {})) == set(ARMS)]
        entry: dict[str, Any] = {"seeds": seeds}
        for seed in seeds:
            records = by_seed[seed]["random"]["record"], by_seed[seed]["pretrained"]["record"]
            where = f"fraction {fraction:g}, seed {seed}"
            problems += [f"{where}: {p}" for p in pairing_problems(*records)]
            bn_problems += [f"{where}: {p}" for p in batchnorm_problems(*records)]
        for arm in ARMS:
            values = [by_seed[s][arm]["scores"][metric] for s in seeds]
            losses = [by_seed[s][arm]["final_train_loss"] for s in seeds]
            mean, std = mean_std(values)
            entry[arm] = {
                "by_seed": dict(zip(map(str, seeds), values)),
                "mean": mean,
                "std": std,
                "final_train_loss_mean": mean_std(losses)[0],
                "other_metrics": {
                    name: mean_std([by_seed[s][arm]["scores"][name] for s in seeds])
                    for name in METRIC_NAMES
                    if name != metric
                },
            }
        differences = [
            entry["pretrained"]["by_seed"][str(s)] - entry["random"]["by_seed"][str(s)] for s in seeds
        ]
        mean, std = mean_std(differences)
        entry["difference"] = {
            "by_seed": dict(zip(map(str, seeds), differences)),
            "mean": mean,
            "std": std,
            "pretrained_wins": int(sum(d > 0 for d in differences)),
        }
        if seeds:
            record = by_seed[seeds[0]]["random"]["record"]
            entry["labelled_slices"] = len(record["labelled_slices"])
            entry["training_slices"] = record["training_slices"]
        fractions[f"{fraction:g}"] = entry
    return {
        **{k: v for k, v in result.items() if k != "runs"},
        "fractions": fractions,
        "fit_seconds_total": float(sum(run["fit_seconds"] for run in result["runs"])),
        "paired": not problems,
        "pairing_problems": problems,
        "bn_identical": not bn_problems,
        "bn_problems": bn_problems,
        "runs": [{k: v for k, v in run.items() if k != "curve"} for run in result["runs"]],
    }


# ---------------------------------------------------------------------------------------------- reporting


def report_table(summary: dict[str, Any]) -> str:
    name = METRIC_NAMES[summary["metric"]]
    columns = [
        "label fraction (slices)",
        f"random {name}",
        f"pretrained {name}",
        "paired difference (pretrained - random)",
        "pretrained better",
        "final training loss (random / pretrained)",
    ]
    rows = []
    for fraction, entry in summary["fractions"].items():
        rnd, pre, diff = entry["random"], entry["pretrained"], entry["difference"]
        slices = f"{entry.get('labelled_slices', '?')}/{entry.get('training_slices', '?')}"
        rows.append(
            [
                f"{fraction} ({slices})",
                f"{rnd['mean']:.4f} ± {rnd['std']:.4f}",
                f"{pre['mean']:.4f} ± {pre['std']:.4f}",
                f"{diff['mean']:+.4f} ± {diff['std']:.4f}",
                f"{diff['pretrained_wins']}/{len(entry['seeds'])}",
                f"{rnd['final_train_loss_mean']:.4f} / {pre['final_train_loss_mean']:.4f}",
            ]
        )
    return markdown_table(columns, rows)


def per_seed_table(summary: dict[str, Any]) -> str:
    rows = [
        [
            fraction,
            seed,
            f"{entry['random']['by_seed'][str(seed)]:.4f}",
            f"{entry['pretrained']['by_seed'][str(seed)]:.4f}",
            f"{entry['difference']['by_seed'][str(seed)]:+.4f}",
        ]
        for fraction, entry in summary["fractions"].items()
        for seed in entry["seeds"]
    ]
    return markdown_table(["label fraction", "seed", "random", "pretrained", "difference"], rows)


def write_report(summary: dict[str, Any], curves: dict[tuple[str, str], list], out_dir: Path) -> None:
    """``finetune_comparison.md``, ``.json`` and ``.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "finetune_comparison.json").write_text(json.dumps(summary, indent=2, default=str))
    name = METRIC_NAMES[summary["metric"]]
    bn = (
        "every encoder's BatchNorm running statistics re-estimated on all training slices (images only) "
        "before the first step, in both arms; the same momentum (0.1) during fine-tuning"
        if summary["bn_recalibration"]
        else "not re-estimated (each encoder keeps the statistics it came with: the artefact being checked)"
    )
    pairing = (
        "checked: in every seed the decoder and head initialisation, the labelled slices and the order of "
        "the training slices are the same in both arms, and only the encoder weights differ"
        if summary["paired"]
        else "**broken**: " + "; ".join(summary["pairing_problems"])
    )
    reused = sum(run.get("reused", False) for run in summary["runs"])
    reused = f" for this invocation, which reused {reused} finished runs (--resume)" if reused else ""
    if summary["bn_recalibration"] and not summary["bn_identical"]:
        bn += " -- **but not identical**: " + "; ".join(summary["bn_problems"])
    text = [
        "# Fine-tuning: pretrained encoder vs random initialisation",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"- encoder: `{summary['encoder']}` ({summary['backbone']}), test score: foreground-mean {name} on the "
        "test volumes",
        f"- {summary['steps']} optimizer steps per run, seeds {summary['seeds']}, wall time "
        f"{summary['wall_seconds'] / 60:.1f} min{reused} (training alone, summed over the "
        f"{len(summary['runs'])} runs: {summary['fit_seconds_total'] / 60:.1f} min)",
        f"- BatchNorm: {bn}",
        *(
            [
                "- every encoder convolution scaled to a fresh initialisation's norm first, in both arms (--match_init_norms)"
            ]
            if summary.get("match_init_norms")
            else []
        ),
        f"- pairing: {pairing}",
        "- mean ± sample standard deviation over seeds; the difference is paired by seed",
        "",
        report_table(summary),
        "",
        "Per seed:",
        "",
        per_seed_table(summary),
        "",
    ]
    if summary["steps"] < MIN_CONVERGED_STEPS:
        text.insert(3, f"**Only {summary['steps']} steps: not a converged comparison.**\n")
    (out_dir / "finetune_comparison.md").write_text("\n".join(text))

    fractions = list(summary["fractions"])
    figure, (score_ax, diff_ax, loss_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {"random": "tab:grey", "pretrained": "tab:blue"}
    width = 0.38
    for i, fraction in enumerate(fractions):
        entry = summary["fractions"][fraction]
        for j, arm in enumerate(ARMS):
            x = i + (j - 0.5) * width
            score_ax.bar(
                x, entry[arm]["mean"], width, yerr=entry[arm]["std"], capsize=4, color=colours[arm],
                alpha=0.6, label=arm if i == 0 else None,
            )  # fmt: skip
            score_ax.scatter(
                [x] * len(entry["seeds"]), list(entry[arm]["by_seed"].values()), color="black", s=10
            )
        for seed in entry["seeds"]:
            score_ax.plot(
                [i - width / 2, i + width / 2],
                [entry["random"]["by_seed"][str(seed)], entry["pretrained"]["by_seed"][str(seed)]],
                color="black",
                linewidth=0.6,
                alpha=0.5,
            )
        diffs = list(entry["difference"]["by_seed"].values())
        diff_ax.errorbar(
            i,
            entry["difference"]["mean"],
            yerr=entry["difference"]["std"],
            fmt="o",
            capsize=5,
            color="tab:red",
        )
        diff_ax.scatter([i + 0.1] * len(diffs), diffs, color="black", s=10)
    for axis in (score_ax, diff_ax):
        axis.set_xticks(range(len(fractions)), [f"{float(f):.0%} of slices labelled" for f in fractions])
    score_ax.set_ylabel(f"test {name} (foreground mean)")
    score_ax.set_title("per arm (bars: mean ± std; lines: paired seeds)")
    score_ax.legend()
    diff_ax.axhline(0.0, color="black", linewidth=0.8)
    diff_ax.set_ylabel(f"{name}: pretrained - random")
    diff_ax.set_title("paired difference (mean ± std, dots: seeds)")
    for (fraction, arm), curve in curves.items():
        if curve:
            steps, losses = zip(*curve)
            loss_ax.plot(
                steps, losses, color=colours[arm], linestyle="-" if fraction == fractions[0] else "--",
                label=f"{arm}, {float(fraction):.0%} labelled",
            )  # fmt: skip
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss (mean over seeds)")
    loss_ax.set_title("convergence")
    if any(curves.values()):
        loss_ax.legend(fontsize=8)
    for axis in (score_ax, diff_ax, loss_ax):
        axis.grid(alpha=0.3)
    save_figure(figure, out_dir / "finetune_comparison.png")


def mean_curves(result: dict[str, Any]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Training loss per logged step, averaged over seeds, per (fraction, arm)."""
    grouped: dict[tuple[str, str], dict[int, list[float]]] = {}
    for run in result["runs"]:
        points = grouped.setdefault((f"{run['fraction']:g}", run["arm"]), {})
        for step, loss in run.get("curve", []):
            points.setdefault(step, []).append(loss)
    return {
        key: [(s, float(np.mean(v))) for s, v in sorted(points.items())] for key, points in grouped.items()
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison of ``args`` (see :func:`add_arguments`), write the report, return the summary."""
    args.out_dir = str(run_folder(args.out_dir, "evaluate", "finetune-"))
    result = run_comparison(args)
    if result["arms"] != list(ARMS):
        print(f"Ran only {result['arms']}; rerun with both arms and --resume for the report.")
        return result
    summary = summarise(result)
    out_dir = Path(args.out_dir)
    write_report(summary, mean_curves(result), out_dir)
    print(
        f"\nFine-tuning comparison ({summary['wall_seconds'] / 60:.1f} min); report in {out_dir}/finetune_comparison.md"
    )
    print(report_table(summary))
    if not summary["paired"]:
        print("WARNING: the arms are not paired: " + "; ".join(summary["pairing_problems"]))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m ssl3d.finetune.compare`` (the same options as ``scripts/evaluate.py finetune``)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
