"""``scripts/fewshot_eval.py``: LightningCLI over a prompt-learning module and ``FewShotDataModule`` that runs one
evaluation protocol over shots and seeds and writes Markdown, CSV and JSON results into the run folder.

Protocols: ``base2novel`` (train on base classes, test base and novel in their own label spaces), ``fewshot``
(all classes, each of ``shots``), ``cross_dataset`` / ``domain_generalization`` (train on the source dataset with
all classes, test on each of ``targets`` with its own class names). With no arguments it runs the digits demo
(``configs/prompts/demo.yaml``): a small randomly initialised ViT, so its figures are random-weight figures.

Each (shots, seed) pair trains in its own subfolder ``shots<K>_seed<S>/`` with ``checkpoints/last.ckpt`` (written
every ``--checkpoint_every_n_steps`` steps, at every epoch end and on SIGTERM/SIGINT, after which the run exits with
143/130). ``--ckpt_path last --run_dir <run>`` resumes the protocol: every pair with a checkpoint continues from it
bit-exactly (a pair that had finished only re-evaluates), the others start. ``UNFINISHED`` marks the run folder
and each pair's folder until they have completed.
"""

from __future__ import annotations

import copy
import csv
import importlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

import prompts.module  # noqa: F401  (registers the module classes for --model)
from agreement import dist
from agreement.inputs import report_root_cause
from agreement.runs import (
    CHECKPOINT_DIR,
    MAY_DIFFER_ON_RESUME,
    ExactResume,
    MarkUnfinished,
    RunCheckpoint,
    RunInterrupted,
    RunLogger,
    check_budget,
    check_resume_config,
    flatten_config,
    last_checkpoint,
    mark_finished,
    mark_unfinished,
    note_unfinished,
)
from prompts.checkpoint import save_prompts
from prompts.data import FewShotDataModule
from prompts.inputs import check_protocol_inputs
from prompts.module import PromptCLIPModule
from prompts.published import FEW_SHOT_AVERAGE, PAPER_METHOD, paper_base_to_novel, paper_transfer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "prompts"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
Protocol = Literal["base2novel", "fewshot", "cross_dataset", "domain_generalization"]
RANDOM_BANNER = "RANDOM-WEIGHT FIGURES: the CLIP model is randomly initialised; these are not CLIP accuracies"


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


class FewShotCLI(LightningCLI):
    """Parses the config; ``run_protocol`` instantiates a fresh model, datamodule and trainer per (shots, seed)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_dir", type=str | None, default=None, help="output folder (default runs/fewshot/<time>)"
        )
        parser.add_argument("--protocol", type=Protocol, default="base2novel")
        parser.add_argument("--seeds", type=list[int], default=[1, 2, 3])
        parser.add_argument(
            "--shots", type=list[int], default=[16], help="shots per class (sets data.num_shots per run)"
        )
        parser.add_argument(
            "--targets",
            type=list[str],
            default=[],
            help="target datasets (transfer protocols): names under data.root, or imagefolder:/path, csv:/file.csv",
        )
        parser.add_argument(
            "--init_prompts", type=str | None, default=None, help="prompt checkpoint to start from"
        )
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="'last': resume the protocol in --run_dir (each (shots, seed) from its own last.ckpt); or the "
            "checkpoint file of a protocol with a single (shots, seed)",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=500,
            help="write <pair>/checkpoints/last.ckpt every N optimizer steps too (0: epoch ends and signals only)",
        )

    def instantiate_classes(self) -> None:
        """Nothing here: every run builds its own objects from the parsed config."""

    # ------------------------------------------------------------------ plan
    def _pairs(self) -> list[tuple[int, int]]:
        shots_list = self.config.shots if self.config.protocol == "fewshot" else self.config.shots[:1]
        return [(shots, seed) for shots in shots_list for seed in self.config.seeds]

    def _pair_config(self, shots: int, seed: int):
        config = copy.deepcopy(self.config)
        config.data.num_shots = shots
        config.data.seed = seed
        config.data.subsample = "base" if self.config.protocol == "base2novel" else "all"
        config.seed_everything = seed
        return config

    def _trains(self) -> bool:
        module, _, name = str(self.config.model.class_path).rpartition(".")
        try:
            return bool(getattr(getattr(importlib.import_module(module), name), "trainable", True))
        except (ImportError, AttributeError):
            return True  # the parser has already checked the class; assume it trains

    def _plan(self, run_dir: Path) -> dict[tuple[int, int], tuple[Path | None, int | None]]:
        """Check everything before anything is written: the budget, ``--ckpt_path`` and, for every pair to
        resume, that its checkpoint was written with the same configuration. Returns ``{pair: (ckpt, step)}``."""
        ckpt_path = self.config.get("ckpt_path")
        trains = self._trains()
        if trains:
            check_budget(self.config.trainer, "prompt tuning", epochs_required=True)
        if self.config.checkpoint_every_n_steps < 0:
            raise ValueError(
                f"--checkpoint_every_n_steps must be >= 0, got {self.config.checkpoint_every_n_steps}"
            )
        pairs = self._pairs()
        single_file = ckpt_path not in (None, "last")
        if single_file:
            if len(pairs) != 1:
                raise ValueError(
                    f"--ckpt_path {ckpt_path}: this protocol trains {len(pairs)} (shots, seed) pairs; resume them "
                    f"all with --ckpt_path last --run_dir {run_dir}"
                )
            if not Path(ckpt_path).is_file():
                raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        if ckpt_path == "last" and not run_dir.is_dir():
            raise FileNotFoundError(f"--ckpt_path last: there is no run to resume in {run_dir}")
        plan = {}
        for shots, seed in pairs:
            folder = run_dir / f"shots{shots}_seed{seed}"
            found = last_checkpoint(folder)
            checkpoint = Path(ckpt_path) if single_file else (found if ckpt_path == "last" else None)
            if ckpt_path is None and found is not None and trains:
                raise FileExistsError(
                    f"{run_dir} already holds a run ({found}); resume it with --ckpt_path last --run_dir {run_dir}, "
                    "or give another --run_dir"
                )
            step = None
            if checkpoint is not None and trains:
                hint = (
                    f"Resume with the configuration the run was started with: python scripts/fewshot_eval.py "
                    f"--config {run_dir / 'config.yaml'} --ckpt_path last; or start a new run with another --run_dir"
                )
                current = flatten_config(self._pair_config(shots, seed))
                # The lists of pairs and targets may grow: they choose what runs, not how a pair trains.
                free = (
                    *MAY_DIFFER_ON_RESUME,
                    "seeds",
                    "shots",
                    "targets",
                    "init_prompts",
                    "data.eval_batch_size",
                )
                step = check_resume_config(checkpoint, current, hint, free)["global_step"]
            plan[(shots, seed)] = (checkpoint if trains else None, step)
        return plan

    # ------------------------------------------------------------------ one run
    def _build(self, shots: int, seed: int, folder: Path, resume_step: int | None = None):
        config = self._pair_config(shots, seed)
        pl.seed_everything(seed, workers=True)
        self.config_init = self.parser.instantiate_classes(config)
        model: PromptCLIPModule = self.config_init.model
        data: FewShotDataModule = self.config_init.data
        data.preprocess_cfg = model.preprocess_cfg
        folder.mkdir(parents=True, exist_ok=True)
        trainer = self.instantiate_trainer(
            logger=RunLogger(folder, resume_step=resume_step),
            default_root_dir=str(folder),
            callbacks=[
                ExactResume(),
                MarkUnfinished([folder]),
                *(self._get(self.config_init, "trainer", default={}).get("callbacks") or []),
                RunCheckpoint(
                    folder / CHECKPOINT_DIR,
                    every_n_steps=self.config.checkpoint_every_n_steps,
                    config=flatten_config(config),
                ),
            ],
        )
        return model, data, trainer

    @staticmethod
    def _accuracy(
        trainer: pl.Trainer, model: PromptCLIPModule, data: FewShotDataModule, items, names, dataset
    ):
        model.set_eval_classnames(names, dataset)
        trainer.test(model, dataloaders=data.eval_dataloader(items), verbose=False)
        return 100.0 * float(trainer.callback_metrics["test/acc"])

    def run_one(
        self,
        shots: int,
        seed: int,
        run_dir: Path,
        checkpoint: Path | None = None,
        resume_step: int | None = None,
    ) -> tuple[list[dict[str, Any]], PromptCLIPModule]:
        """Train (or continue from ``checkpoint``) and evaluate one (shots, seed) pair in its own folder."""
        protocol = self.config.protocol
        folder = run_dir / f"shots{shots}_seed{seed}"
        model, data, trainer = self._build(shots, seed, folder, resume_step)
        if self.config.init_prompts:
            from prompts.checkpoint import load_prompts

            load_prompts(model.model, self.config.init_prompts)
        if model.trainable:
            try:
                trainer.fit(model, datamodule=data, ckpt_path=checkpoint, weights_only=True)
            except RunInterrupted as stop:
                if trainer.is_global_zero:
                    line = f"Stopped by {stop.signal_name} in {folder.name} after step {stop.step}"
                    note_unfinished(folder, line)
                    note_unfinished(run_dir, line)
                raise
            if trainer.global_step == 0:
                raise RuntimeError(f"{folder}: training took no optimizer step; nothing to save or evaluate")
            if trainer.is_global_zero:
                save_prompts(
                    model.model, folder / "prompts.safetensors", extra={"model_name": model.model_name}
                )
        method = type(model).__name__
        base = {
            "method": method,
            "dataset": data.display_name,
            "shots": shots,
            "seed": seed,
            "weights": model.weights,
        }
        rows = []
        for eval_set in data.eval_sets():
            acc = self._accuracy(trainer, model, data, eval_set.items, eval_set.classnames, data.dataset_name)
            rows.append({**base, "eval": eval_set.name, "target": data.display_name, "accuracy": acc})
        for target in self.config.targets if protocol in ("cross_dataset", "domain_generalization") else []:
            kind, _, path = target.partition(":")
            custom = kind.lower() in ("imagefolder", "csv") and path
            target_data = FewShotDataModule(
                dataset=kind if custom else target,
                root=path if custom else self.config.data.root,
                num_shots=0,
                subsample="all",
                eval_batch_size=self.config.data.eval_batch_size,
                num_workers=self.config.data.num_workers,
            )
            target_data.preprocess_cfg = model.preprocess_cfg
            test = target_data.full_splits["test"]
            acc = self._accuracy(
                trainer, model, target_data, test, target_data.all_classnames, target_data.dataset_name
            )
            rows.append({**base, "eval": "target", "target": target_data.display_name, "accuracy": acc})
        if model.trainable and trainer.is_global_zero:
            mark_finished(folder)
        return rows, model

    # ------------------------------------------------------------------ whole protocol
    def run_protocol(self) -> dict[str, Any]:
        check_protocol_inputs(self.config)  # before the run folder exists: bad input leaves nothing behind
        configured = self.config.get("run_dir")
        ckpt_path = self.config.get("ckpt_path")
        if configured is None and ckpt_path == "last":
            raise ValueError("--ckpt_path last resumes the run in --run_dir: give --run_dir <run folder>")
        if configured is None and ckpt_path is not None and Path(ckpt_path).parent.name == CHECKPOINT_DIR:
            # <run>/shots<K>_seed<S>/checkpoints/<file>: continue that run
            configured = str(Path(ckpt_path).parents[2])
        run_dir = (
            Path(configured) if configured else Path("runs") / "fewshot" / time.strftime("%Y%m%d-%H%M%S")
        )
        plan = self._plan(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main_process():
            mark_unfinished(
                run_dir,
                f"python scripts/fewshot_eval.py --config {run_dir / 'config.yaml'} --ckpt_path last",
            )
            self.parser.save(self.config, run_dir / "config.yaml", overwrite=True, skip_check=True)
        protocol = self.config.protocol
        rows: list[dict[str, Any]] = []
        start = time.time()
        for (shots, seed), (checkpoint, step) in plan.items():
            run_rows, _ = self.run_one(shots, seed, run_dir, checkpoint, step)
            rows += run_rows
        summary = summarise(protocol, rows)
        summary.update(
            {"run_dir": str(run_dir), "protocol": protocol, "seconds": round(time.time() - start, 1)}
        )
        summary["random_weights"] = any(r["weights"] == "random" for r in rows)
        if dist.is_main_process():
            write_results(run_dir, summary, rows)
            print_results(summary)
            mark_finished(run_dir)
        return summary


def summarise(protocol: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds, HM of the mean base and novel accuracies, and the published figures if known."""
    table: list[dict[str, Any]] = []
    if not rows:
        return {"table": table}
    method, dataset = rows[0]["method"], rows[0]["dataset"]
    if protocol == "base2novel":
        base = [r["accuracy"] for r in rows if r["eval"] == "base"]
        novel = [r["accuracy"] for r in rows if r["eval"] == "novel"]
        per_seed_hm = [harmonic_mean(b, n) for b, n in zip(base, novel)]
        entry = {
            "method": method,
            "dataset": dataset,
            "seeds": len(base),
            "Base": fmt(base),
            "Novel": fmt(novel),
            "HM": f"{harmonic_mean(mean_std(base)[0], mean_std(novel)[0]):.2f}",
            "HM per seed": fmt(per_seed_hm),
            "base_mean": mean_std(base)[0],
            "novel_mean": mean_std(novel)[0],
        }
        paper = paper_base_to_novel(method, dataset)
        entry["paper B / N / HM"] = " / ".join(f"{v:.2f}" for v in paper) if paper else "n/a"
        table.append(entry)
        columns = ["method", "dataset", "seeds", "Base", "Novel", "HM", "HM per seed", "paper B / N / HM"]
    elif protocol == "fewshot":
        for shots in sorted({r["shots"] for r in rows}):
            values = [r["accuracy"] for r in rows if r["shots"] == shots]
            paper = FEW_SHOT_AVERAGE.get(PAPER_METHOD.get(method, method), {}).get(shots)
            table.append(
                {
                    "method": method,
                    "dataset": dataset,
                    "shots": shots,
                    "seeds": len(values),
                    "Accuracy": fmt(values),
                    "paper (11-dataset average)": f"{paper:.2f}" if paper else "n/a",
                }
            )
        columns = ["method", "dataset", "shots", "seeds", "Accuracy", "paper (11-dataset average)"]
    else:
        for target in dict.fromkeys(r["target"] for r in rows):
            values = [r["accuracy"] for r in rows if r["target"] == target]
            paper = paper_transfer(method, target)
            table.append(
                {
                    "method": method,
                    "source": dataset,
                    "target": target + (" (source)" if target == dataset else ""),
                    "seeds": len(values),
                    "Accuracy": fmt(values),
                    "paper": f"{paper:.2f}" if paper and dataset == "ImageNet" else "n/a",
                }
            )
        columns = ["method", "source", "target", "seeds", "Accuracy", "paper"]
    return {"table": table, "columns": columns}


def markdown_table(table: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in table]
    return "\n".join(lines)


def write_results(run_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``results.md`` (summary table), ``results.csv`` (one row per run and evaluation) and ``results.json``."""
    title = f"# {summary['protocol']} results\n\n"
    if summary.get("random_weights"):
        title += f"**{RANDOM_BANNER}**\n\n"
    (run_dir / "results.md").write_text(title + markdown_table(summary["table"], summary["columns"]) + "\n")
    with open(run_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    clean = {k: v for k, v in summary.items() if k != "columns"}
    (run_dir / "results.json").write_text(json.dumps({"summary": clean, "runs": rows}, indent=2))


def print_results(summary: dict[str, Any]) -> None:
    print()
    if summary.get("random_weights"):
        print(f"*** {RANDOM_BANNER} ***")
    print(markdown_table(summary["table"], summary["columns"]))
    print(
        f"\nResults (results.md, results.csv, results.json) in {summary['run_dir']} ({summary['seconds']} s)"
    )


@report_root_cause
def main(args: list[str] | None = None) -> dict[str, Any]:
    cli = FewShotCLI(
        PromptCLIPModule,
        FewShotDataModule,
        subclass_mode_model=True,
        run=False,
        save_config_callback=None,
        auto_configure_optimizers=False,
        load_from_checkpoint_support=False,  # hparams must be the per-run values (shots, seed, subsample)
        seed_everything_default=1,
        parser_kwargs={
            "default_config_files": [str(DEMO_CONFIG)],
            "exit_on_error": False,
        },  # see report_root_cause
        args=args,
    )
    return cli.run_protocol()
