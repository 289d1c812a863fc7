"""The ``scripts/finetune.py`` entry point: LightningCLI over the fine-tuning tasks and their data modules.

A run folder (``--run_dir``, default ``runs/finetune/<timestamp>``) gets one subfolder per initialisation,
``pretrained/`` and, with ``--compare_random true``, ``random/``; each holds the resolved ``config.yaml``,
``metrics.csv``, ``checkpoints/``, ``results.json`` and, for segmentation, ``predictions/*.nii.gz``. The
table of both initialisations is printed at the end and saved as ``<run_dir>/summary.json``.

``--model.init_args.encoder latest`` uses the newest ``runs/pretrain/*/encoder`` and, if there is none,
pretrains one first with ``ssl3d.pretrain.main(pretrain_args)``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger

from agreement.inputs import report_root_cause
from ssl3d.report import format_table

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "finetune"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
PRETRAIN_ROOT = Path("runs") / "pretrain"
LATEST = "latest"

log = logging.getLogger(__name__)


def latest_encoder(root: str | Path = PRETRAIN_ROOT) -> Path | None:
    """The exported encoder folder of the newest run under ``root`` (run folders are named by timestamp)."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = sorted(p for p in root.iterdir() if (p / "encoder" / "encoder.safetensors").is_file())
    return runs[-1] / "encoder" if runs else None


def resolve_encoder(
    encoder: str | None, pretrain_args: list[str], root: str | Path = PRETRAIN_ROOT
) -> str | None:
    """``latest`` -> the newest exported encoder, pretraining one first when none exists; paths pass through."""
    if encoder != LATEST:
        return encoder
    found = latest_encoder(root)
    if found is None:
        from ssl3d.pretrain import main as pretrain

        print(
            f"No pretraining run under {root}; pretraining one first: {' '.join(pretrain_args) or '(demo)'}"
        )
        summary = pretrain(list(pretrain_args))
        found = Path(summary["encoder"]).parent
    # Absolute, so that the path recorded in the run's config works from any directory.
    found = found.resolve()
    print(f"Encoder: {found}")
    return str(found)


class FinetuneCLI(LightningCLI):
    """LightningCLI with a run folder per initialisation, the encoder resolution and the comparison switch."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None, help="output folder of this run")
        parser.add_argument(
            "--compare_random",
            type=bool,
            default=False,
            help="also fine-tune the same model from random weights and print both results",
        )
        parser.add_argument(
            "--pretrain_args",
            type=list[str],
            default=[],
            help="arguments of scripts/pretrain.py used when encoder is 'latest' and no pretraining run exists",
        )
        parser.add_argument("--variant", type=str | None, default=None, help="subfolder name (set by main)")
        parser.link_arguments("data.init_args.class_names", "model.init_args.class_names")

    def before_instantiate_classes(self) -> None:
        config = self.config
        model_args = config["model"]["init_args"]
        model_args["encoder"] = resolve_encoder(model_args.get("encoder"), config["pretrain_args"])
        variant = config["variant"] or ("pretrained" if model_args["encoder"] else "random")
        parent = (
            Path(config["run_dir"])
            if config["run_dir"]
            else Path("runs/finetune") / time.strftime("%Y%m%d-%H%M%S")
        )
        config["run_dir"] = str(parent)
        config["variant"] = variant
        if "prediction_dir" in model_args and model_args["prediction_dir"] is None:
            model_args["prediction_dir"] = str(parent / variant / "predictions")

    def variant_dir(self) -> Path:
        return Path(self.config["run_dir"]) / self.config["variant"]

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        run_dir = self.variant_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = CSVLogger(str(run_dir), name="", version="")
        kwargs["default_root_dir"] = str(run_dir)
        monitor, mode = getattr(self.model, "monitor", (None, "max"))
        if not getattr(self.datamodule, "has_validation", False):
            monitor = None
        kwargs["callbacks"] = [
            *(trainer_config.get("callbacks") or []),
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                save_last=True,
                monitor=monitor,
                mode=mode,
                save_top_k=1 if monitor else 0,
            ),
            LearningRateMonitor(logging_interval="step"),
        ]
        return super().instantiate_trainer(**kwargs)


def _make_cli(args: list[str]) -> FinetuneCLI:
    return FinetuneCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "default_config_files": [str(DEMO_CONFIG)],
            "exit_on_error": False,
        },  # see report_root_cause
        args=args,
    )


def run_variant(cli: FinetuneCLI) -> dict[str, Any]:
    """Fit, then test (with the best validation checkpoint when there is one); return the variant's results."""
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    started = time.perf_counter()
    trainer.fit(model, data, ckpt_path=cli.config.get("ckpt_path"))
    fit_seconds = time.perf_counter() - started
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    trainer.test(model, data, ckpt_path=best or None, verbose=False)
    results = {
        "variant": cli.config["variant"],
        "encoder": cli.config["model"]["init_args"].get("encoder"),
        "run_dir": str(cli.variant_dir()),
        "fit_seconds": fit_seconds,
        "steps": trainer.global_step,
        "best_checkpoint": best or None,
        "summary": model.test_summary,
        "rows": model.result_rows(),
        "cases": model.test_results,
    }
    if trainer.is_global_zero:
        (cli.variant_dir() / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


@report_root_cause
def main(args: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune (and with ``--compare_random`` also from random weights); print and return the results."""
    import sys

    args = list(sys.argv[1:] if args is None else args)
    cli = _make_cli(args)
    run_dir = Path(cli.config["run_dir"])
    variants = [run_variant(cli)]
    compare = cli.config["compare_random"] and cli.config["model"]["init_args"].get("encoder") is not None
    if compare:
        random_cli = _make_cli(
            [*args, f"--run_dir={run_dir}", "--model.init_args.encoder=null", "--variant=random"]
        )
        variants.insert(0, run_variant(random_cli))
    summary = {"run_dir": str(run_dir), "variants": variants}
    if cli.trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    rows = [{"init": v["variant"], **row} for v in summary["variants"] for row in v["rows"]]
    if not rows:
        return
    columns = list(rows[0].keys())
    print(f"\nFine-tuning finished. Run folder: {summary['run_dir']}")
    for variant in summary["variants"]:
        print(
            f"  {variant['variant']:<10} encoder={variant['encoder']}  ({variant['fit_seconds']:.0f} s training)"
        )
    print()
    print(format_table(rows, columns))
