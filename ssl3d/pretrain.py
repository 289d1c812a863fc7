"""The ``scripts/pretrain.py`` entry point: LightningCLI over ``JointSSL`` and ``JointSSLDataModule``.

Every run gets its own folder (``--run_dir``, default ``runs/pretrain/<timestamp>``) holding the resolved
``config.yaml``, ``metrics.csv``, ``checkpoints/``, ``loss_curve.png``, the exported encoder (``encoder/``) and,
with ``--evaluate true``, ``probe.json``: a kNN probe of frozen patch features on held-out MNI152 slices for the
pretrained encoder, a randomly initialised one and raw intensities.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger

from agreement.callbacks import ClusterUsageCallback
from ssl3d.data.datamodule import JointSSLDataModule
from ssl3d.encoder import SliceEncoder
from ssl3d.export import export_encoder
from ssl3d.module import JointSSL
from ssl3d.report import format_table, plot_loss_curves

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "ssl3d"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


class PretrainCLI(LightningCLI):
    """LightningCLI with a run folder, the run's logger and checkpoints, and the evaluation switch."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None, help="output folder of this run")
        parser.add_argument(
            "--evaluate", type=bool, default=True, help="run the MNI152 tissue kNN probe after training"
        )
        parser.link_arguments("data.num_slices", "model.num_slices")
        parser.link_arguments("seed_everything", "data.seed")

    def run_dir(self) -> Path:
        configured = self.config.get("run_dir")
        return Path(configured) if configured else Path("runs") / "pretrain" / time.strftime("%Y%m%d-%H%M%S")

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        run_dir = self.run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.config["run_dir"] = str(run_dir)
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = CSVLogger(str(run_dir), name="", version="")
        kwargs["default_root_dir"] = str(run_dir)
        model = self.model
        clusters = list(model.hparams.prototypes_2d) + list(model.hparams.prototypes_3d)
        kwargs["callbacks"] = [
            *(trainer_config.get("callbacks") or []),
            ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0),
            LearningRateMonitor(logging_interval="step"),
            ClusterUsageCallback(clusters, gather=False),
        ]
        return super().instantiate_trainer(**kwargs)


def evaluate_encoders(model: JointSSL, seed: int) -> list[dict[str, object]]:
    """Tissue kNN probe on held-out MNI152 slices: pretrained encoder, random encoder, raw intensities."""
    from ssl3d.probe import intensity_baseline, make_tissue_probe_data, tissue_knn_probe

    data = make_tissue_probe_data()
    pretrained = model.encoder.cpu().eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_encoder = SliceEncoder(
            model.hparams.backbone, model.hparams.d_model, model.hparams.multi_level
        ).eval()
    rows = []
    for name, result in (
        ("pretrained encoder", tissue_knn_probe(pretrained.feature_maps, data)),
        ("random encoder", tissue_knn_probe(random_encoder.feature_maps, data)),
        ("raw intensities", intensity_baseline(data)),
    ):
        rows.append(
            {
                "features": name,
                "accuracy": float(result["accuracy"]),
                "mean per-class accuracy": float(result["mean_per_class_accuracy"]),
                **{f"{k}": float(v) for k, v in result["per_class"].items()},
            }
        )
    return rows


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse, pretrain, export and evaluate; returns the summary that is also printed and saved."""
    cli = PretrainCLI(
        JointSSL,
        JointSSLDataModule,
        run=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_config_files": [str(DEMO_CONFIG)]},
        args=args,
    )
    run_dir = Path(cli.config["run_dir"])
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    if not cli.trainer.is_global_zero:
        return summary
    model: JointSSL = cli.model
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    encoder_file = export_encoder(
        model.encoder.backbone,
        model.hparams.backbone,
        run_dir / "encoder",
        extra={"d_model": model.hparams.d_model, "multi_level": model.hparams.multi_level},
    )
    curves = plot_loss_curves(run_dir / "metrics.csv", run_dir / "loss_curve.png")
    summary.update(
        {
            "config": str(run_dir / "config.yaml"),
            "checkpoint": str(checkpoint) if checkpoint.is_file() else None,
            "metrics": str(run_dir / "metrics.csv"),
            "loss_curve": str(curves) if curves else None,
            "encoder": str(encoder_file),
            "steps": cli.trainer.global_step,
        }
    )
    if cli.config.get("evaluate"):
        rows = evaluate_encoders(model, seed=cli.config["seed_everything"] or 0)
        summary["probe"] = rows
        (run_dir / "probe.json").write_text(json.dumps(rows, indent=2))
    print_summary(summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\nPretraining finished after {summary['steps']} steps. Run folder: {summary['run_dir']}")
    for key in ("config", "checkpoint", "metrics", "loss_curve", "encoder"):
        if summary.get(key):
            print(f"  {key:<11} {summary[key]}")
    rows = summary.get("probe")
    if rows:
        print("\nTissue kNN probe on held-out MNI152 slices (frozen patch features, k=20):")
        columns = ["features", "accuracy", "mean per-class accuracy", "grey matter", "white matter"]
        print(format_table(rows, columns))
