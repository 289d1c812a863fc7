"""The ``scripts/finetune.py`` entry point: LightningCLI over the fine-tuning tasks and their data modules.

A run folder (``--run_dir``, default ``runs/finetune/<timestamp>``) gets one subfolder per initialisation,
``pretrained/`` and, with ``--compare_random true``, ``random/``; each holds the resolved ``config.yaml``,
``metrics.csv``, ``checkpoints/``, ``results.json`` and, for segmentation, ``predictions/*.nii.gz`` and the
fine-tuned ``encoder/`` (exported like ``scripts/pretrain.py``'s, so another run can start from it). The
table of both initialisations is printed at the end and saved as ``<run_dir>/summary.json``.

``--model.init_args.encoder latest`` uses the newest completed ``runs/pretrain/*/encoder`` (runs marked
``UNFINISHED`` are skipped) and, if there is none, pretrains one first with ``ssl3d.pretrain.main(pretrain_args)``.

Each initialisation's ``checkpoints/last.ckpt`` is written every ``--checkpoint_every_n_steps`` steps, at every
epoch end and on SIGTERM/SIGINT (then the run exits with 143/130). ``--ckpt_path last --run_dir <run>`` resumes:
each initialisation with a checkpoint continues from it bit-exactly (one that had finished is only tested again),
with the encoder it started with; a checkpoint file resumes the initialisation whose folder holds it.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from agreement.inputs import report_root_cause
from agreement.runs import (
    CHECKPOINT_DIR,
    MAY_DIFFER_ON_RESUME,
    RunCLI,
    check_budget,
    check_resume_config,
    checkpoint_info,
    checkpoint_run_dir,
    fit_run,
    flatten_config,
    is_unfinished,
    last_checkpoint,
    mark_finished,
    refuse_to_overwrite,
    run_folder,
    write_summary,
)
from agreement.tables import markdown_table

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "finetune"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
PRETRAIN_ROOT = Path("runs") / "pretrain"
LATEST = "latest"

log = logging.getLogger(__name__)


def latest_encoder(root: str | Path = PRETRAIN_ROOT) -> Path | None:
    """The exported encoder folder of the newest completed run under ``root`` (run folders are named by timestamp;
    a run marked ``UNFINISHED`` is still going or was stopped, and is skipped)."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = sorted(
        p
        for p in root.iterdir()
        if (p / "encoder" / "encoder.safetensors").is_file() and not is_unfinished(p)
    )
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


class FinetuneCLI(RunCLI):
    """LightningCLI with a run folder per initialisation, the encoder resolution and the comparison switch."""

    DEFAULT_CONFIG = DEMO_CONFIG

    CKPT_PATH_HELP = (
        "'last': resume the run in --run_dir (each initialisation from its own last.ckpt); or a checkpoint file, "
        "which resumes the initialisation whose folder holds it"
    )

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
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
        """Resolve the run folder, the checkpoint and the encoder; check all before anything is written."""
        config = self.config
        check_budget(config["trainer"], "fine-tuning")  # max_epochs=-1 with a max_steps is a finite budget
        self.check_run_arguments(config)
        model_args = config["model"]["init_args"]
        ckpt_path = config.get("ckpt_path")
        # <run>/<initialisation>/checkpoints/<file>
        parent = run_folder(checkpoint_run_dir(ckpt_path, config["run_dir"], levels=1), "finetune")
        config["run_dir"] = str(parent)
        variant = config["variant"] or ("pretrained" if model_args.get("encoder") else "random")
        # main() runs the random-weights comparison with --variant after the first one has written its folder.
        siblings = config["variant"] is None
        self.checkpoint = self._variant_checkpoint(parent / variant, ckpt_path, siblings)
        if self.checkpoint is not None and model_args.get("encoder") == LATEST:
            # Resume with the encoder the run started with, not whatever is newest now.
            saved = checkpoint_info(self.checkpoint)["config"] or {}
            model_args["encoder"] = saved.get("model.init_args.encoder", LATEST)
        model_args["encoder"] = resolve_encoder(model_args.get("encoder"), config["pretrain_args"])
        variant = config["variant"] or ("pretrained" if model_args["encoder"] else "random")
        config["variant"] = variant
        if "prediction_dir" in model_args and model_args["prediction_dir"] is None:
            model_args["prediction_dir"] = str(parent / variant / "predictions")
        self.resume_step = None
        if self.checkpoint is not None:
            hint = (
                "Resume with the configuration the run was started with: python scripts/finetune.py --config "
                f"{parent / variant / 'config.yaml'} --ckpt_path last; or start a new run with another --run_dir"
            )
            free = ("variant", "pretrain_args", "compare_random", "model.init_args.prediction_dir")
            current = flatten_config(config)
            info = check_resume_config(self.checkpoint, current, hint, (*MAY_DIFFER_ON_RESUME, *free))
            self.resume_step = info["global_step"]

    @staticmethod
    def _variant_checkpoint(folder: Path, ckpt_path: str | None, siblings: bool = True) -> Path | None:
        """The checkpoint one initialisation continues from; a new run may not overwrite an earlier one's (in
        ``folder`` or, with ``siblings``, in any initialisation's folder of the run)."""
        found = last_checkpoint(folder)
        if ckpt_path is None:
            refuse_to_overwrite(folder.parent, sub_runs="*" if siblings else folder.name)
            return None
        if ckpt_path != "last" and Path(ckpt_path).resolve().parent.parent == folder.resolve():
            return Path(ckpt_path)
        return found

    def variant_dir(self) -> Path:
        return Path(self.config["run_dir"]) / self.config["variant"]

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        run_dir = self.variant_dir()
        monitor, mode = getattr(self.model, "monitor", (None, "max"))
        if not getattr(self.datamodule, "has_validation", False):
            monitor = None
        # the best epoch by validation, for testing
        best = [ModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, monitor=monitor, mode=mode, save_top_k=1)]
        run = self.run_trainer_kwargs(
            run_dir,
            self.config,
            resume_step=self.resume_step,
            unfinished=[run_dir.parent, run_dir],
            resume_hint=f"python scripts/finetune.py --config {run_dir / 'config.yaml'} --ckpt_path last",
            before_checkpoint=best if monitor else [],
            after_checkpoint=[LearningRateMonitor(logging_interval="step")],
        )
        return super().instantiate_trainer(**kwargs | run)


def _make_cli(args: list[str]) -> FinetuneCLI:
    with warnings.catch_warnings():
        # ``args`` are the command line's own (plus the random variant's): not the mistake Lightning warns of.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return FinetuneCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            args=args,
        )


def run_variant(cli: FinetuneCLI) -> dict[str, Any]:
    """Fit, then test (with the best validation checkpoint when there is one); return the variant's results."""
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    started = time.perf_counter()
    variant = cli.variant_dir()
    fit_run(trainer, model, data, cli.checkpoint, [variant, variant.parent], where=variant.name)
    if trainer.global_step == 0:
        raise RuntimeError(f"{cli.variant_dir()}: training took no optimizer step; nothing to test")
    fit_seconds = time.perf_counter() - started
    best = next((c.best_model_path for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), "")
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
        if hasattr(model, "export_encoder"):
            model.export_encoder(cli.variant_dir() / "encoder")
        (cli.variant_dir() / "results.json").write_text(json.dumps(results, indent=2, default=str))
        mark_finished(cli.variant_dir())
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
        write_summary(run_dir, summary)
        print_summary(summary)
        mark_finished(run_dir)
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
    print(markdown_table(columns, rows))
