"""The evaluation protocols of ``scripts/fewshot_eval.py`` as plain functions of the parsed configuration.

``plan`` checks every (shots, seed) pair before anything is written; ``run_pair`` trains and evaluates one pair in
its own folder with the objects a ``Build`` callable makes (``prompts.fewshot.FewShotCLI.build``);
``run_protocol`` runs them all and writes ``results.md``, ``.csv`` and ``.json``; ``summarise`` turns the runs'
rows into the protocol's table, with the published figures beside it.
"""

from __future__ import annotations

import copy
import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from agreement import dist
from agreement.runs import (
    MAY_DIFFER_ON_RESUME,
    RunCLI,
    check_budget,
    check_resume_config,
    checkpoint_run_dir,
    fit_run,
    flatten_config,
    last_checkpoint,
    mark_finished,
    mark_unfinished,
    refuse_to_overwrite,
    run_folder,
)
from agreement.tables import format_mean_std, markdown_table, mean_std
from prompts.checkpoint import save_prompts
from prompts.data import FewShotDataModule
from prompts.inputs import TRANSFER, check_protocol_inputs, method_trains, protocol_shots, target_dataset
from prompts.module import PromptCLIPModule
from prompts.published import FEW_SHOT_AVERAGE, PAPER_METHOD, paper_base_to_novel, paper_transfer

RANDOM_BANNER = "RANDOM-WEIGHT FIGURES: the CLIP model is randomly initialised; these are not CLIP accuracies"
# (shots, seed, folder, resume step) -> (model, data module, trainer) of one run
Build = Callable[[int, int, Path, int | None], tuple[PromptCLIPModule, FewShotDataModule, pl.Trainer]]


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def pairs(config) -> list[tuple[int, int]]:
    """The (shots, seed) pairs the protocol trains: every shot count for ``fewshot``, the first otherwise."""
    return [(shots, seed) for shots in protocol_shots(config.protocol, config.shots) for seed in config.seeds]


def pair_config(config, shots: int, seed: int):
    """The configuration of one (shots, seed) run."""
    pair = copy.deepcopy(config)
    pair.data.num_shots = shots
    pair.data.seed = seed
    pair.data.subsample = "base" if config.protocol == "base2novel" else "all"
    pair.seed_everything = seed
    return pair


def plan(config, run_dir: Path) -> dict[tuple[int, int], tuple[Path | None, int | None]]:
    """Check everything before anything is written: the budget, ``--ckpt_path`` and, for every pair to
    resume, that its checkpoint was written with the same configuration. Returns ``{pair: (ckpt, step)}``."""
    ckpt_path = config.get("ckpt_path")
    trainable = method_trains(config.model)
    if trainable:
        check_budget(config.trainer, "prompt tuning", epochs_required=True)
    RunCLI.check_run_arguments(config)
    todo = pairs(config)
    single_file = ckpt_path not in (None, "last")
    if single_file and len(todo) != 1:
        raise ValueError(
            f"--ckpt_path {ckpt_path}: this protocol trains {len(todo)} (shots, seed) pairs; resume them "
            f"all with --ckpt_path last --run_dir {run_dir}"
        )
    if ckpt_path == "last" and not run_dir.is_dir():
        raise FileNotFoundError(f"--ckpt_path last: there is no run to resume in {run_dir}")
    if ckpt_path is None and trainable:
        refuse_to_overwrite(run_dir, sub_runs="*")
    result = {}
    for shots, seed in todo:
        folder = run_dir / f"shots{shots}_seed{seed}"
        found = last_checkpoint(folder)
        checkpoint = Path(ckpt_path) if single_file else (found if ckpt_path == "last" else None)
        step = None
        if checkpoint is not None and trainable:
            hint = (
                f"Resume with the configuration the run was started with: python scripts/fewshot_eval.py "
                f"--config {run_dir / 'config.yaml'} --ckpt_path last; or start a new run with another --run_dir"
            )
            current = flatten_config(pair_config(config, shots, seed))
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
        result[(shots, seed)] = (checkpoint if trainable else None, step)
    return result


def accuracy(trainer: pl.Trainer, model: PromptCLIPModule, data: FewShotDataModule, items, names, dataset):
    model.set_eval_classnames(names, dataset)
    trainer.test(model, dataloaders=data.eval_dataloader(items), verbose=False)
    return 100.0 * float(trainer.callback_metrics["test/acc"])


def run_pair(
    config,
    build: Build,
    shots: int,
    seed: int,
    run_dir: Path,
    checkpoint: Path | None = None,
    resume_step: int | None = None,
) -> tuple[list[dict[str, Any]], PromptCLIPModule]:
    """Train (or continue from ``checkpoint``) and evaluate one (shots, seed) pair in its own folder; ``build``
    makes its model, data module and trainer."""
    protocol = config.protocol
    folder = run_dir / f"shots{shots}_seed{seed}"
    model, data, trainer = build(shots, seed, folder, resume_step)
    if config.init_prompts:
        from prompts.checkpoint import load_prompts

        load_prompts(model.model, config.init_prompts)
    if model.trainable:
        fit_run(trainer, model, data, checkpoint, [folder, run_dir], where=folder.name)
        if trainer.global_step == 0:
            raise RuntimeError(f"{folder}: training took no optimizer step; nothing to save or evaluate")
        if trainer.is_global_zero:
            save_prompts(model.model, folder / "prompts.safetensors", extra={"model_name": model.model_name})
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
        acc = accuracy(trainer, model, data, eval_set.items, eval_set.classnames, data.dataset_name)
        rows.append({**base, "eval": eval_set.name, "target": data.display_name, "accuracy": acc})
    for target in config.targets if protocol in TRANSFER else []:
        dataset, root = target_dataset(target, config.data.root)
        target_data = FewShotDataModule(
            dataset=dataset,
            root=root,
            num_shots=0,
            subsample="all",
            eval_batch_size=config.data.eval_batch_size,
            num_workers=config.data.num_workers,
        )
        target_data.preprocess_cfg = model.preprocess_cfg
        test = target_data.full_splits["test"]
        acc = accuracy(
            trainer, model, target_data, test, target_data.all_classnames, target_data.dataset_name
        )
        rows.append({**base, "eval": "target", "target": target_data.display_name, "accuracy": acc})
    if model.trainable and trainer.is_global_zero:
        mark_finished(folder)
    return rows, model


def run_protocol(config, build: Build, save_config: Callable[[Path], None]) -> dict[str, Any]:
    """Check the inputs and the plan, then train and evaluate every pair and write the results; ``save_config``
    writes the resolved configuration into the run folder it is given."""
    check_protocol_inputs(config)  # before the run folder exists: bad input leaves nothing behind
    # <run>/shots<K>_seed<S>/checkpoints/<file>
    run_dir = run_folder(
        checkpoint_run_dir(config.get("ckpt_path"), config.get("run_dir"), levels=1), "fewshot"
    )
    planned = plan(config, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main_process():
        mark_unfinished(
            run_dir,
            f"python scripts/fewshot_eval.py --config {run_dir / 'config.yaml'} --ckpt_path last",
        )
        save_config(run_dir)
    protocol = config.protocol
    rows: list[dict[str, Any]] = []
    start = time.time()
    for (shots, seed), (checkpoint, step) in planned.items():
        run_rows, _ = run_pair(config, build, shots, seed, run_dir, checkpoint, step)
        rows += run_rows
    summary = summarise(protocol, rows)
    summary.update({"run_dir": str(run_dir), "protocol": protocol, "seconds": round(time.time() - start, 1)})
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
            "Base": format_mean_std(base, 2),
            "Novel": format_mean_std(novel, 2),
            "HM": f"{harmonic_mean(mean_std(base)[0], mean_std(novel)[0]):.2f}",
            "HM per seed": format_mean_std(per_seed_hm, 2),
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
                    "Accuracy": format_mean_std(values, 2),
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
                    "Accuracy": format_mean_std(values, 2),
                    "paper": f"{paper:.2f}" if paper and dataset == "ImageNet" else "n/a",
                }
            )
        columns = ["method", "source", "target", "seeds", "Accuracy", "paper"]
    return {"table": table, "columns": columns}


def write_results(run_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``results.md`` (summary table), ``results.csv`` (one row per run and evaluation) and ``results.json``."""
    title = f"# {summary['protocol']} results\n\n"
    if summary.get("random_weights"):
        title += f"**{RANDOM_BANNER}**\n\n"
    (run_dir / "results.md").write_text(title + markdown_table(summary["columns"], summary["table"]) + "\n")
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
    print(markdown_table(summary["columns"], summary["table"]))
    print(
        f"\nResults (results.md, results.csv, results.json) in {summary['run_dir']} ({summary['seconds']} s)"
    )
