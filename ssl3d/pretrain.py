"""The ``scripts/pretrain.py`` entry point: LightningCLI over ``JointSSL`` and ``JointSSLDataModule``.

Every run gets its own folder (``--run_dir``, default ``runs/pretrain/<timestamp>``) holding the resolved
``config.yaml``, ``metrics.csv``, ``checkpoints/``, ``loss_curve.png``, the exported encoder (``encoder/``) and,
with ``--evaluate true``, ``probe.json``: a kNN probe of frozen patch features on held-out MNI152 slices for the
pretrained encoder, a randomly initialised one and raw intensities.

``checkpoints/last.ckpt`` is written every ``--checkpoint_every_n_steps`` steps, at every epoch end and on
SIGTERM/SIGINT (then the run exits with 143/130); ``--ckpt_path last`` (or a checkpoint file) resumes bit-exactly
in the same folder. ``UNFINISHED`` marks the folder until the run has completed; the encoder is exported only then.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor

from agreement.callbacks import ClusterUsageCallback
from agreement.inputs import report_root_cause
from agreement.runs import (
    RunCLI,
    check_budget,
    check_resume_config,
    fit_run,
    flatten_config,
    mark_finished,
    refuse_to_overwrite,
    resolve_checkpoint,
    run_folder,
    write_summary,
)
from agreement.tables import markdown_table, mean_std
from ssl3d.data.datamodule import JointSSLDataModule
from ssl3d.encoder import SliceEncoder
from ssl3d.export import export_encoder
from ssl3d.module import JointSSL
from ssl3d.report import plot_loss_curves

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "ssl3d"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def resume_command(run_dir: str | Path) -> str:
    return f"python scripts/pretrain.py --config {Path(run_dir) / 'config.yaml'} --ckpt_path last"


class PretrainCLI(RunCLI):
    """LightningCLI with a run folder, the run's logger and checkpoints, resume, and the evaluation switch.

    Everything that can make a run impossible (its budget, the checkpoint to resume, the run folder holding another
    run, a configuration that differs from the checkpoint's) is checked before anything is written.
    """

    DEFAULT_CONFIG = DEMO_CONFIG

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--evaluate",
            type=bool,
            default=True,
            help="after training, probe the encoder across subjects (MNI152 -> Colin27) against random ones",
        )
        parser.add_argument(
            "--colin_dir",
            type=str | None,
            default=None,
            help="folder with Colin27 ch2bet.nii.gz, aal.nii.gz, aal.nii.txt (default: Debian mricron-data's)",
        )
        parser.add_argument(
            "--tissue_probe",
            type=bool,
            default=False,
            help="also run the MNI152 tissue patch kNN probe (a diagnostic beside raw intensities)",
        )
        parser.link_arguments("data.num_slices", "model.num_slices")
        parser.link_arguments("data.small_crops_2d", "model.small_crops")
        parser.link_arguments("seed_everything", "data.seed")
        parser.link_arguments("seed_everything", "model.seed")  # both save it: Lightning wants one value

    def before_instantiate_classes(self) -> None:
        config = self.config
        check_budget(config["trainer"], "pretraining", epochs_required=True)
        self.check_run_arguments(config)
        checkpoint, run_dir = resolve_checkpoint(config.get("ckpt_path"), config.get("run_dir"))
        run_dir = run_folder(run_dir, "pretrain")
        config["run_dir"] = str(run_dir)
        self.checkpoint: Path | None = checkpoint
        self.resume_step: int | None = None
        if checkpoint is None:
            refuse_to_overwrite(run_dir)
        else:
            hint = (
                f"Resume with the configuration the run was started with: {resume_command(run_dir)}; "
                "or start a new run with another --run_dir"
            )
            self.resume_step = check_resume_config(checkpoint, flatten_config(config), hint)["global_step"]

    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        run_dir = self.run_dir()
        clusters = list(self.model.hparams.prototypes_2d) + list(self.model.hparams.prototypes_3d)
        run = self.run_trainer_kwargs(
            run_dir,
            self.config,
            resume_step=self.resume_step,
            resume_hint=resume_command(run_dir),
            after_checkpoint=[
                LearningRateMonitor(logging_interval="step"),
                ClusterUsageCallback(clusters, gather=False),
            ],
        )
        return super().instantiate_trainer(**kwargs | run)


RANDOM_ENCODER_SEEDS = 3


def evaluate_encoders(model: JointSSL, seed: int) -> dict[str, Any]:
    """Tissue kNN probe on held-out MNI152 slices, per feature level and on all levels: the pretrained
    encoder against ``RANDOM_ENCODER_SEEDS`` randomly initialised ones (mean and spread), and raw intensities.
    Every encoder's BatchNorm statistics are first re-estimated on the probe's unlabelled training slices
    (on a copy of the pretrained one), so that the comparison is of learned weights.

    Returns ``rows`` (one per feature level, for the summary table), and the full per-class results under
    ``pretrained``, ``random`` (one dict per seed) and ``raw intensities``.
    """
    from ssl3d.crosssubject import random_comparison
    from ssl3d.probe import (
        intensity_baseline,
        make_tissue_probe_data,
        recalibrate_batchnorm,
        tissue_knn_probe_per_level,
    )

    data = make_tissue_probe_data()

    def probe(encoder: SliceEncoder) -> dict[str, dict]:
        recalibrate_batchnorm(encoder, data.train.images, encoder.feature_maps)
        return tissue_knn_probe_per_level(encoder.eval().feature_maps, data)

    pretrained = probe(copy.deepcopy(model.encoder).cpu())
    randoms = []
    for offset in range(RANDOM_ENCODER_SEEDS):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + offset)
            encoder = SliceEncoder(model.hparams.backbone, model.hparams.d_model, model.hparams.multi_level)
        randoms.append(probe(encoder))
    rows = []
    for name, result in pretrained.items():
        rows.append(
            {
                "features": name,
                **random_comparison(result["accuracy"], [r[name]["accuracy"] for r in randoms]),
                "pretrained mean per-class": result["mean_per_class_accuracy"],
                "random mean per-class": mean_std([r[name]["mean_per_class_accuracy"] for r in randoms])[0],
            }
        )
    return {
        "rows": rows,
        "pretrained": pretrained,
        "random": randoms,
        "raw intensities": intensity_baseline(data),
    }


def evaluate_cross_subject(
    model: JointSSL,
    initial_state: dict[str, torch.Tensor],
    seed: int,
    size: tuple[int, int],
    num_slices: int,
    slice_axis: int,
    colin_dir: str | None = None,
) -> dict[str, Any]:
    """Slice-level probes of the pooled slice embedding across subjects (trained on MNI152, tested on Colin27):
    slice position (mm) and AAL region presence (macro AUROC), for the pretrained encoder, its own
    initialisation (paired) and ``RANDOM_ENCODER_SEEDS`` random initialisations, every one with BatchNorm
    statistics re-estimated on the MNI152 slices (``ssl3d.crosssubject``). Returns the comparison with its
    Markdown ``table`` and one-line ``verdict``."""
    from ssl3d.crosssubject import compare_with_random, cross_subject_data, format_rows, verdict

    data = cross_subject_data(size, num_slices, slice_axis, colin_dir)
    seeds = [seed + offset for offset in range(RANDOM_ENCODER_SEEDS)]
    comparison = compare_with_random(model, initial_state, seeds, data, volume=False)
    comparison["table"] = format_rows(comparison["rows"])
    comparison["verdict"] = verdict(comparison["rows"])
    return comparison


@report_root_cause
def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse, pretrain, export and evaluate; returns the summary that is also printed and saved."""
    cli = PretrainCLI(JointSSL, JointSSLDataModule, seed_everything_default=0, args=args)
    run_dir = Path(cli.config["run_dir"])
    # The seeded initialisation (also on resume: weights are loaded in fit), for the paired comparison.
    initial_state = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
    fit_run(cli.trainer, cli.model, cli.datamodule, cli.checkpoint, [run_dir])
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    if not cli.trainer.is_global_zero:
        return summary
    if cli.trainer.global_step == 0:
        raise RuntimeError(
            f"{run_dir}: training took no optimizer step, so there is no trained encoder to export"
        )
    model: JointSSL = cli.model
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    encoder_file = export_encoder(
        model.encoder.backbone,
        model.hparams.backbone,
        run_dir / "encoder",
        extra={"d_model": model.hparams.d_model, "multi_level": model.hparams.multi_level},
    )
    metrics = run_dir / "metrics.csv"
    curves = plot_loss_curves(metrics, run_dir / "loss_curve.png") if metrics.is_file() else None
    summary.update(
        {
            "config": str(run_dir / "config.yaml"),
            "checkpoint": str(checkpoint) if checkpoint.is_file() else None,
            "metrics": str(metrics) if metrics.is_file() else None,
            "loss_curve": str(curves) if curves else None,
            "encoder": str(encoder_file),
            "steps": cli.trainer.global_step,
        }
    )
    seed = cli.config["seed_everything"] or 0
    if cli.config.get("evaluate"):
        data = cli.datamodule.hparams
        comparison = evaluate_cross_subject(
            model,
            initial_state,
            seed,
            data.size,
            data.num_slices,
            data.slice_axis,
            cli.config.get("colin_dir"),
        )
        summary["cross_subject"] = comparison["rows"]
        summary["cross_subject_verdict"] = comparison["verdict"]
        (run_dir / "cross_subject.json").write_text(json.dumps(comparison, indent=2))
        (run_dir / "cross_subject.md").write_text(comparison["table"] + "\n\n" + comparison["verdict"] + "\n")
    if cli.config.get("tissue_probe"):
        probe = evaluate_encoders(model, seed=seed)
        summary["probe"] = probe["rows"]
        summary["probe_raw_intensities"] = probe["raw intensities"]["accuracy"]
        (run_dir / "probe.json").write_text(json.dumps(probe, indent=2))
    print_summary(summary)
    write_summary(run_dir, summary)
    mark_finished(run_dir)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\nPretraining finished after {summary['steps']} steps. Run folder: {summary['run_dir']}")
    for key in ("config", "checkpoint", "metrics", "loss_curve", "encoder"):
        if summary.get(key):
            print(f"  {key:<11} {summary[key]}")
    if summary.get("cross_subject"):
        print(
            f"\nSlice-level probes across subjects (trained on MNI152, tested on Colin27; frozen features, BatchNorm "
            f"statistics re-estimated on MNI152): the pretrained encoder against {RANDOM_ENCODER_SEEDS} random "
            "initialisations (the first is its own: paired difference)"
        )
        from ssl3d.crosssubject import format_rows

        print(format_rows(summary["cross_subject"]))
        print(summary["cross_subject_verdict"])
    rows = summary.get("probe")
    if rows:  # the tissue diagnostic
        print(
            "\nTissue kNN probe on held-out MNI152 slices (frozen features of 4x4-pixel patches, k=20, BatchNorm "
            "statistics re-estimated on the unlabelled training slices): accuracy of the pretrained encoder and "
            f"of {RANDOM_ENCODER_SEEDS} random initialisations"
        )
        table = [
            {
                "features": row["features"],
                "pretrained": row["pretrained"],
                "random": f"{row['random mean']:.3f} ± {row['random std']:.3f}",
                "gain": f"{row['gain']:+.3f}",
                "beats random beyond spread": "yes" if row["beats random beyond spread"] else "no",
                "mean per-class (pretrained / random)": (
                    f"{row['pretrained mean per-class']:.3f} / {row['random mean per-class']:.3f}"
                ),
            }
            for row in rows
        ]
        print(markdown_table(list(table[0]), table))
        print(f"Raw intensities of each patch: accuracy {summary['probe_raw_intensities']:.3f}.")
        better = [row["features"] for row in rows if row["beats random beyond spread"]]
        worse = [row["features"] for row in rows if not row["beats random beyond spread"]]
        from ssl3d.crosssubject import SPREAD_STDS

        rule = f"(better than every seed and than their mean by more than {SPREAD_STDS:g} sample std)"
        if not worse:
            print(f"Pretraining beats the random initialisations {rule} on every feature set.")
        elif better:
            print(f"Pretraining beats the random initialisations {rule} on: {', '.join(better)}.")
            print(f"It does not on: {', '.join(worse)}.")
        else:
            print("Pretraining does not beat the random initialisations at this budget.")
