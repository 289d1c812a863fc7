"""Runs that survive stops: checkpoints, exact resume and the state of a run folder, for every training CLI.

- :class:`RunCheckpoint` keeps ``<run>/checkpoints/last.ckpt`` the newest complete state of a run: it writes it
  every ``every_n_steps`` optimizer steps and at every epoch end (to a temporary file, then an atomic rename), and
  on SIGTERM or SIGINT it writes it once every process has seen the signal and exits with ``128 + signal``.
- :class:`ExactResume` and :class:`ResumableDataLoader` make a resumed run bit-exact: the checkpoint carries the
  random-number generators and each training loader's position (its generator, its sampler's epoch and pass, the
  batches already served), and a resumed run continues from that very batch, in the middle of an epoch too.
- :class:`RunLogger` is a ``CSVLogger`` that, when a run resumes, keeps the rows of ``metrics.csv`` written before
  the checkpoint and appends to them.
- A run folder holds ``UNFINISHED`` from its start until it completes (:func:`mark_unfinished`,
  :func:`mark_finished`, :func:`is_unfinished`), so "newest run" lookups can skip runs that are still going or
  were stopped.
- :class:`RunCLI` is the ``LightningCLI`` base of the training CLIs: the run-folder arguments and a trainer with
  all of the above.
- :func:`check_budget`, :func:`checkpoint_run_dir`, :func:`resolve_checkpoint`, :func:`refuse_to_overwrite`,
  :func:`checkpoint_info` and :func:`config_differences` are the checks a CLI runs before it writes anything: an
  impossible training budget, a checkpoint that does not exist, a run folder that already holds another run, a
  configuration that differs from the checkpoint's.
- :func:`run_folder`, :func:`save_config`, :func:`write_summary` and :func:`write_text_atomic` are what every CLI,
  Lightning or not, writes its run folder with.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from torch.utils.data import BatchSampler, DataLoader

from agreement import dist
from agreement.allocator import retain_freed_memory
from agreement.rng import rng_state, set_rng_state

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
UNFINISHED = "UNFINISHED"
CONFIG_KEY = "run_config"
POSITION_KEY = "resume_position"

# Settings that may change between a run and its resumption: where things go and how they are shown, not what is
# trained (callbacks are taken to watch, not to train). Every other setting must be the checkpoint's.
MAY_DIFFER_ON_RESUME = (
    "ckpt_path",
    "run_dir",
    "config",
    "print_config",
    "evaluate",
    "checkpoint_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.callbacks",
    "trainer.logger",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
    "data.num_workers",
    "data.demo_dir",
    "data.cache",
    "data.cache_dir",
)


# ----------------------------------------------------------------------------------------- run folder state
def mark_unfinished(run_dir: str | Path, resume_hint: str = "") -> None:
    """Write ``<run_dir>/UNFINISHED``: the run has not completed (it is running, or it stopped before the end)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = (
        "This run has not completed: it is still running, or it stopped before the end.\n"
        f"Started or resumed: {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    if resume_hint:
        text += f"Resume it with: {resume_hint}\n"
    write_text_atomic(run_dir / UNFINISHED, text)


def note_unfinished(run_dir: str | Path, line: str) -> None:
    """Append a line (e.g. why and where the run stopped) to ``<run_dir>/UNFINISHED``."""
    marker = Path(run_dir) / UNFINISHED
    if marker.is_file():
        with open(marker, "a") as handle:
            handle.write(line.rstrip("\n") + "\n")


def mark_finished(run_dir: str | Path) -> None:
    """Remove ``<run_dir>/UNFINISHED``: everything the run writes is there."""
    (Path(run_dir) / UNFINISHED).unlink(missing_ok=True)


def is_unfinished(run_dir: str | Path) -> bool:
    """True while a run has not completed (running, stopped, crashed)."""
    return (Path(run_dir) / UNFINISHED).is_file()


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """``<run_dir>/checkpoints/last.ckpt`` if it exists."""
    path = Path(run_dir) / CHECKPOINT_DIR / LAST
    return path if path.is_file() else None


class MarkUnfinished(pl.Callback):
    """Writes ``UNFINISHED`` into each of ``folders`` when a fit starts: after the data and the model are set up,
    so that bad input (found there) leaves no marker behind, and before the first step."""

    def __init__(self, folders: Iterable[str | Path], resume_hint: str = "") -> None:
        self.folders = [Path(f) for f in folders]
        self.resume_hint = resume_hint

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for folder in self.folders:
                mark_unfinished(folder, self.resume_hint)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` next to ``path`` (a name of this process's own) and rename it into place, so that a stopped
    run or a concurrent reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------- checks before a run
def check_budget(trainer: Mapping[str, Any], what: str = "training", epochs_required: bool = False) -> None:
    """Raise one ``ValueError`` listing every impossible setting of the training length.

    ``trainer`` is the ``trainer`` section of a configuration. A budget is impossible when it is zero or negative
    (``max_epochs`` other than -1, ``max_steps`` other than -1, ``limit_train_batches``), infinite (``max_epochs=-1``
    without a ``max_steps``), or below its own minimum. With ``epochs_required`` (schedules defined in epochs),
    ``max_epochs`` must be a positive number.
    """
    max_epochs = trainer.get("max_epochs")
    max_steps = trainer.get("max_steps")
    max_steps = -1 if max_steps is None else max_steps
    problems = []
    if max_epochs is not None and max_epochs != -1 and max_epochs < 1:
        problems.append(f"--trainer.max_epochs must be at least 1, got {max_epochs}")
    if max_steps != -1 and max_steps < 1:
        problems.append(f"--trainer.max_steps must be at least 1 (or -1 for no step limit), got {max_steps}")
    if epochs_required and (max_epochs is None or max_epochs < 1) and not problems:
        problems.append(
            f"{what} defines its learning-rate schedule over epochs, so --trainer.max_epochs must be at least 1 "
            f"(-1, no epoch limit, is not possible), got {max_epochs}"
        )
    elif max_epochs == -1 and max_steps == -1:
        problems.append(
            f"--trainer.max_epochs=-1 with no --trainer.max_steps trains forever; {what} needs a finite length"
        )
    limit = trainer.get("limit_train_batches")
    if limit is not None and not isinstance(limit, bool) and limit <= 0:
        problems.append(f"--trainer.limit_train_batches={limit} leaves no training batch")
    min_epochs, min_steps = trainer.get("min_epochs"), trainer.get("min_steps")
    if min_epochs is not None and max_epochs is not None and max_epochs >= 1 and min_epochs > max_epochs:
        problems.append(f"--trainer.min_epochs={min_epochs} is more than --trainer.max_epochs={max_epochs}")
    if min_steps is not None and max_steps >= 1 and min_steps > max_steps:
        problems.append(f"--trainer.min_steps={min_steps} is more than --trainer.max_steps={max_steps}")
    if problems:
        raise ValueError(f"impossible {what} budget: " + "; ".join(problems))


def checkpoint_run_dir(
    ckpt_path: str | Path | None, run_dir: str | Path | None, levels: int = 0
) -> str | None:
    """The run folder that ``--ckpt_path`` and ``--run_dir`` name, checked: ``last`` needs ``run_dir``, a file must
    exist, and a file in ``<run>/<levels sub-folders>/checkpoints/`` continues that run unless ``run_dir`` names
    another one (``levels``: 0 for a run with one training, 1 for a run of several, e.g. one per seed)."""
    if ckpt_path is None or str(ckpt_path) == "":
        return None if run_dir is None else str(run_dir)
    if str(ckpt_path) == "last":
        if run_dir is None:
            raise ValueError("--ckpt_path last resumes the run in --run_dir: give --run_dir <run folder>")
        return str(run_dir)
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such checkpoint file")
    if run_dir is None and path.parent.name == CHECKPOINT_DIR:
        return str(path.parents[1 + levels])
    return None if run_dir is None else str(run_dir)


def resolve_checkpoint(
    ckpt_path: str | Path | None, run_dir: str | Path | None
) -> tuple[Path | None, Path | None]:
    """Return ``(checkpoint, run_dir)`` for ``--ckpt_path`` and ``--run_dir`` of a run with one training
    (:func:`checkpoint_run_dir`): ``last`` is ``<run_dir>/checkpoints/last.ckpt``, which must exist."""
    found = checkpoint_run_dir(ckpt_path, run_dir)
    run_dir = None if found is None else Path(found)
    if ckpt_path is None or str(ckpt_path) == "":
        return None, run_dir
    if str(ckpt_path) == "last":
        path = run_dir / CHECKPOINT_DIR / LAST
        if not path.is_file():
            raise FileNotFoundError(
                f"--ckpt_path last: {path} does not exist, so there is nothing to resume in {run_dir}; "
                "drop --ckpt_path to start a new run"
            )
        return path, run_dir
    return Path(ckpt_path), run_dir


def refuse_to_overwrite(run_dir: str | Path, sub_runs: str | None = None) -> None:
    """A new run must not overwrite the checkpoints of another one in the same folder: ``last.ckpt`` of the run, or
    with ``sub_runs`` (a pattern such as ``"*"``) of its sub-run folders that match (e.g. one per seed)."""
    pattern = f"{CHECKPOINT_DIR}/{LAST}" if sub_runs is None else f"{sub_runs}/{CHECKPOINT_DIR}/{LAST}"
    found = sorted(Path(run_dir).glob(pattern))
    if found:
        raise FileExistsError(
            f"{run_dir} already holds a run ({found[0]}); resume it with --ckpt_path last --run_dir {run_dir}, or "
            "give another --run_dir"
        )


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """``global_step``, ``epoch`` and the run configuration (or ``None``) stored in a checkpoint, read lazily."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot read the checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning training checkpoint")
    config = checkpoint.get(CONFIG_KEY)
    return {
        "global_step": int(checkpoint["global_step"]),
        "epoch": int(checkpoint.get("epoch", 0)),
        "config": json.loads(config) if isinstance(config, str) else None,
    }


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested configuration (dict or jsonargparse ``Namespace``) as ``{"a.b.c": value}`` with JSON values."""
    if hasattr(config, "as_dict"):
        config = config.as_dict()
    flat: dict[str, Any] = {}
    if isinstance(config, Mapping):
        for key, value in config.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping) or hasattr(value, "as_dict"):
                flat.update(flatten_config(value, name))
            else:
                flat[name] = json.loads(json.dumps(value, default=str))
    return flat


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], may_differ: Iterable[str] = MAY_DIFFER_ON_RESUME
) -> list[str]:
    """Lines ``key: checkpoint X, now Y`` for the settings both flat configurations have and that differ."""
    allowed = tuple(may_differ)

    def free(key: str) -> bool:
        return any(key == a or key.startswith(a + ".") for a in allowed)

    lines = []
    for key in sorted(set(saved) & set(current)):
        if not free(key) and json.dumps(saved[key], sort_keys=True) != json.dumps(
            current[key], sort_keys=True
        ):
            lines.append(f"{key}: checkpoint {saved[key]!r}, now {current[key]!r}")
    return lines


def check_resume_config(
    checkpoint: Path,
    current: Mapping[str, Any],
    hint: str,
    may_differ: Iterable[str] = MAY_DIFFER_ON_RESUME,
) -> dict[str, Any]:
    """Raise a ``ValueError`` listing the differences between ``current`` and the checkpoint's configuration;
    return :func:`checkpoint_info` of the checkpoint."""
    info = checkpoint_info(checkpoint)
    if info["config"] is not None:
        differences = config_differences(info["config"], current, may_differ)
        if differences:
            raise ValueError(
                f"cannot resume from {checkpoint}: the configuration differs from the one it was written with:\n  "
                + "\n  ".join(differences)
                + f"\n{hint}"
            )
    return info


# ------------------------------------------------------------------------------------------- data position
def _sampler_state(sampler: Any) -> dict[str, Any]:
    if sampler is None:
        return {}
    if callable(getattr(sampler, "state_dict", None)) and callable(getattr(sampler, "load_state_dict", None)):
        return {"state": sampler.state_dict()}
    if callable(getattr(sampler, "set_epoch", None)) and isinstance(getattr(sampler, "epoch", None), int):
        return {"epoch": sampler.epoch}
    return {}


def _load_sampler_state(sampler: Any, state: Mapping[str, Any]) -> None:
    if "state" in state:
        sampler.load_state_dict(state["state"])
    elif "epoch" in state:
        sampler.set_epoch(state["epoch"])


class _Skipping:
    """An index sampler that starts after its first ``skip`` items (batches of indices)."""

    def __init__(self, sampler: Iterable, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator:
        # A generator: nothing is drawn before the first ``next``, in the order an unskipped pass draws.
        iterator = iter(self.sampler)
        for _ in range(self.skip):
            if next(iterator, _Skipping) is _Skipping:
                return
        yield from iterator

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)  # type: ignore[arg-type]


class _LazyIterator:
    """Starts the loader's iterator at the first ``next``, i.e. after Lightning has set the sampler's epoch."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator | None = None

    def __iter__(self) -> _LazyIterator:
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._start()
        batch = next(self.iterator)
        self.loader._served += 1
        return batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that can continue from any batch of an epoch, exactly.

    Its random numbers come from its own ``generator`` (seeded from ``torch.initial_seed()`` when none is given), so
    loading data never draws from the global generators the model uses. :meth:`position` is its place: the state
    of the generator and of the sampler (``state_dict``, or the ``epoch`` of a ``set_epoch`` sampler) before the
    current pass started, the batches that pass has served, and the state now. :meth:`resume` makes the next pass
    start from a position: in the middle of an epoch it replays the pass from its start and skips the served
    batches at the index level (no sample is loaded for them); at an epoch boundary it only restores the state.
    Lightning saves and loads positions through ``state_dict``/``load_state_dict`` (when it restarts mid-epoch);
    :class:`ExactResume` sets them at the right moment in both cases (without it, a run resumed at an epoch boundary
    draws its order from the new process's seed).
    """

    def __init__(
        self, dataset: Any, *args: Any, generator: torch.Generator | None = None, **kwargs: Any
    ) -> None:
        if generator is None:
            generator = torch.Generator().manual_seed(torch.initial_seed() % (2**63))
        super().__init__(dataset, *args, generator=generator, **kwargs)
        self._skip = 0
        self._served = 0
        self._pass_start: dict[str, Any] | None = None
        self._pending: Mapping[str, Any] | None = None

    @property
    def _index_sampler(self):  # type: ignore[override]
        sampler = super()._index_sampler
        return _Skipping(sampler, self._skip) if self._skip else sampler

    def __iter__(self) -> Iterator:  # type: ignore[override]
        return _LazyIterator(self)

    def _samplers(self) -> dict[str, Any]:
        samplers = {"sampler": self.sampler}
        if self.batch_sampler is not None and type(self.batch_sampler) is not BatchSampler:
            samplers["batch_sampler"] = self.batch_sampler
        return samplers

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "generator": self.generator.get_state() if self.generator is not None else None
        }
        for name, sampler in self._samplers().items():
            state[name] = _sampler_state(sampler)
            own = getattr(sampler, "generator", None)
            if isinstance(own, torch.Generator) and own is not self.generator:
                state[f"{name}_generator"] = own.get_state()
        return state

    def _load_state(self, state: Mapping[str, Any]) -> None:
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        for name, sampler in self._samplers().items():
            _load_sampler_state(sampler, state.get(name, {}))
            if f"{name}_generator" in state:
                sampler.generator.set_state(state[f"{name}_generator"])

    def _start(self) -> Iterator:
        pending, self._pending = self._pending, None
        skip = 0
        if pending is not None and pending.get("start") is not None:
            self._load_state(pending["start"])
            skip = int(pending.get("served", 0))
        self._pass_start = self._state()
        self._served = skip
        self._skip = skip
        try:
            return DataLoader.__iter__(self)
        finally:
            self._skip = 0

    def position(self) -> dict[str, Any]:
        """Where the loader is: ``start`` (state before the current pass), ``served`` (its batches so far), ``now``."""
        return {"start": self._pass_start, "served": self._served, "now": self._state()}

    def resume(self, position: Mapping[str, Any], mid_epoch: bool) -> None:
        """Continue from ``position``: the same pass and batch (``mid_epoch``), or the next epoch's first pass."""
        if mid_epoch:
            self._pending = position
        else:
            self._pending = None
            self._load_state(position["now"])

    # Lightning's interface for loaders that can resume (saved with the fit loop, loaded when restarting).
    def state_dict(self) -> dict[str, Any]:
        return self.position()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pending = state


def training_loaders(trainer: pl.Trainer) -> list[Any]:
    """The training loaders of a fit, in a fixed order (a dict or list of loaders is flattened)."""
    loaders = trainer.train_dataloader
    found: list[Any] = []

    def walk(item: Any) -> None:
        if isinstance(item, Mapping):
            for value in item.values():
                walk(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                walk(value)
        elif item is not None:
            found.append(item)

    walk(getattr(loaders, "iterables", loaders))
    return found


class ExactResume(pl.Callback):
    """Puts into every checkpoint what a bit-exact resume needs beyond Lightning's state, and restores it.

    Saved (``checkpoint["resume_position"]``): where the checkpoint was taken (``batch``: after an optimizer
    step in the middle of an epoch; ``epoch``: at an epoch end), the Python, NumPy, torch and CUDA generators, and
    the position of every :class:`ResumableDataLoader`. On resume the loaders are positioned before the first
    batch is drawn, and the generators are restored at the start of the first batch (``batch``) or epoch
    (``epoch``), after Lightning's own restart work (sanity checks, loader set-up), so nothing in between can
    shift them. Put it first among the callbacks.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._rng: dict[str, Any] | None = None

    @staticmethod
    def _kind(trainer: pl.Trainer) -> str:
        epochs = trainer.fit_loop.epoch_progress.total
        if epochs.processed > epochs.completed:
            return "epoch"
        batches = trainer.fit_loop.epoch_loop.batch_progress
        if batches.total.processed > batches.total.completed:
            return "last batch" if batches.is_last_batch else "batch"
        return "other"

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        loaders = training_loaders(trainer)
        checkpoint[POSITION_KEY] = {
            "kind": self._kind(trainer),
            "rng": rng_state(),
            "loaders": [
                loader.position() if isinstance(loader, ResumableDataLoader) else None for loader in loaders
            ],
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        self._pending = checkpoint.get(POSITION_KEY)
        if self._pending is None:
            warnings.warn(
                "the checkpoint has no resume position (it was not written with ExactResume): the resumed run "
                "continues with new random numbers and data order",
                stacklevel=2,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        position, self._pending = self._pending, None
        if position is None:
            return
        kind = position["kind"]
        if kind not in ("batch", "epoch"):
            warnings.warn(
                f"the checkpoint was written at the {kind} of an epoch, where Lightning does not resume exactly; "
                "use checkpoints written by RunCheckpoint",
                stacklevel=2,
            )
        loaders = training_loaders(trainer)
        saved = position["loaders"]
        if saved and len(saved) != len(loaders):
            raise ValueError(
                f"the checkpoint was written with {len(saved)} training loaders, this run has {len(loaders)}"
            )
        for loader, where in zip(loaders, saved):
            if where is not None and isinstance(loader, ResumableDataLoader):
                loader.resume(where, mid_epoch=kind == "batch")
        self._rng = position["rng"]

    def _restore_rng(self) -> None:
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_rng()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        self._restore_rng()


# ------------------------------------------------------------------------------------------- checkpoints
class RunInterrupted(SystemExit):
    """Raised after a signal's checkpoint is written; exits with ``128 + signal number`` like a shell does."""

    def __init__(self, signum: int, checkpoint: Path | None, step: int) -> None:
        super().__init__(128 + signum)
        self.signum, self.checkpoint, self.step = signum, checkpoint, step

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def fit_run(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    ckpt_path: str | Path | None,
    folders: Iterable[str | Path],
    where: str = "",
) -> None:
    """``trainer.fit`` (resuming from ``ckpt_path``) that, when a signal stops the run, adds where it stopped to the
    ``UNFINISHED`` file of each of ``folders`` before the exit propagates."""
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except RunInterrupted as stop:
        if trainer.is_global_zero:
            place = f" in {where}" if where else ""
            line = f"Stopped by {stop.signal_name}{place} after step {stop.step}: {stop.checkpoint}"
            for folder in folders:
                note_unfinished(folder, line)
        raise


class RunCheckpoint(Checkpoint):
    """Keeps ``<dirpath>/last.ckpt`` the newest complete state of the run, and stops cleanly on SIGTERM/SIGINT.

    It writes the checkpoint after every ``every_n_steps``-th optimizer step (0: never mid-epoch) and at every epoch
    end, to a temporary file that then replaces ``last.ckpt`` (so a kill at any moment leaves the previous complete
    one). Mid-epoch checkpoints are written only after an optimizer step that no validation follows, the points
    Lightning resumes from exactly.

    During training it handles SIGTERM (what a cluster scheduler sends before it pre-empts a job) and SIGINT
    (Ctrl-C): at the next such point, once every process has seen the signal (an all-reduce of the flag), it writes
    the checkpoint (rank 0 writes, every rank waits) and the run exits with ``RunInterrupted`` (exit code 143 for
    SIGTERM, 130 for SIGINT) before anything else changes. A second Ctrl-C interrupts at once. ``config`` (a flat
    mapping) is stored in every checkpoint, so that a resume can check it runs the same configuration.
    """

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int = 500,
        config: Mapping[str, Any] | None = None,
        handle_signals: bool = True,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(
                f"checkpoint_every_n_steps must be a non-negative integer, got {every_n_steps!r}"
            )
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.config_json = (
            json.dumps(dict(config), sort_keys=True, default=str) if config is not None else None
        )
        self.handle_signals = handle_signals
        self.last_saved_step: int | None = None
        self._signal = 0
        self._stopping = 0
        self._announced = False
        self._previous: dict[int, Any] = {}
        self._trainer: pl.Trainer | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal and signum == signal.SIGINT:
            self._restore_handlers()
            raise KeyboardInterrupt
        first = not self._signal
        self._signal = (
            signum  # acted on at the next step end (no I/O here: the handler may interrupt a write)
        )
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if first and launcher is not None and callable(getattr(launcher, "kill", None)):
            launcher.kill(signum)  # processes this one started get the signal too, as Lightning does

    def _install_handlers(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Act as if ``signum`` had been received (for code that learns of a pre-emption another way)."""
        self._signal = signum

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        """The signal any process received (0: none); every process must call this at the same point."""
        signum = self._signal
        if trainer.world_size > 1:
            flag = torch.tensor([signum], device=trainer.strategy.root_device)
            signum = int(dist.all_reduce(flag, op="max").item())
        if signum and not self._announced and trainer.is_global_zero:
            self._announced = True
            print(
                f"\n{signal.Signals(signum).name} received: writing a checkpoint, then stopping "
                "(press Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
        return signum

    def _stop_now(self, trainer: pl.Trainer) -> None:
        if self._stopping:
            signum, self._stopping = self._stopping, 0
            self._restore_handlers()
            saved = self.last_path if self.last_path.is_file() else None
            if trainer.is_global_zero:
                print(
                    f"Stopped by {signal.Signals(signum).name} after step {trainer.global_step}; "
                    f"checkpoint: {saved}",
                    file=sys.stderr,
                    flush=True,
                )
            raise RunInterrupted(signum, saved, trainer.global_step)

    # ------------------------------------------------------------------ saving
    def save(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` through a temporary file (all processes call this; rank 0 writes)."""
        tmp = self.dirpath / f".{LAST}.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.last_path)
        trainer.strategy.barrier("RunCheckpoint.save")
        self.last_saved_step = trainer.global_step

    @staticmethod
    def _validation_follows(trainer: pl.Trainer) -> bool:
        loop = trainer.fit_loop.epoch_loop
        if loop.batch_progress.is_last_batch:
            return True  # the epoch end comes next (and its validation); its checkpoint is the one to resume from
        check = getattr(loop, "_should_check_val_fx", None)  # Lightning's own test; absent -> assume none
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        try:
            return bool(check(fetcher)) if check is not None and fetcher is not None else False
        except Exception:
            return False

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if self.config_json is not None:
            checkpoint[CONFIG_KEY] = self.config_json

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._signal = self._stopping = 0
        self._announced = False
        self._install_handlers()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        self._stop_now(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_now(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ):
        signum = self._agreed_signal(trainer)
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not stepped or self._validation_follows(trainer):
            return
        step = trainer.global_step
        due = self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self.last_saved_step
        if signum or due:
            self.save(trainer)
        self._stopping = signum

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        signum = self._agreed_signal(trainer)
        self.save(trainer)
        self._stopping = signum

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._stop_now(trainer)
        finally:
            self._restore_handlers()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()
        self._trainer = None


# ------------------------------------------------------------------------------------------------ metrics
class _ResumedWriter(ExperimentWriter):
    """Keeps the rows of an existing ``metrics.csv`` logged before ``resume_step`` and appends after them."""

    def __init__(self, log_dir: str, resume_step: int) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            rows = [row for row in reader if _step_of(row) < self._resume_step]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(path, out.getvalue())
        self.metrics_keys = fields


class _NewWriter(ExperimentWriter):
    """Starts ``metrics.csv`` in a run folder that already holds the run's other files (``config.yaml``): only an
    existing ``metrics.csv`` is worth a warning, not the folder's other files."""

    def _check_log_dir_exists(self) -> None:
        if Path(self.metrics_file_path).is_file():
            warnings.warn(f"{self.metrics_file_path} exists and will be replaced", stacklevel=2)


def _step_of(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class RunLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/metrics.csv``; with ``resume_step`` it keeps the earlier rows (those
    logged before that optimizer step, i.e. before the checkpoint) and appends, instead of starting a new file."""

    def __init__(self, save_dir: str | Path, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(str(save_dir), name="", version="", **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            if self.resume_step is None:
                self._experiment = _NewWriter(log_dir=self.log_dir)
            else:
                self._experiment = _ResumedWriter(self.log_dir, self.resume_step)
        return self._experiment


def run_folder(given: str | Path | None, kind: str, prefix: str = "") -> Path:
    """The run folder: ``given`` when there is one, else ``runs/<kind>/<prefix><date-time>``."""
    if given:
        return Path(given)
    return Path("runs") / kind / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"


def save_config(parser: Any, config: Any, folder: Path) -> Path:
    """``<folder>/config.yaml`` (folder made here): the resolved configuration of a jsonargparse CLI that is not a
    ``RunCLI`` (those save theirs through Lightning), the file a run is repeated from."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    parser.save(config, path, overwrite=True, skip_check=True)
    return path


def write_summary(folder: Path, summary: Mapping[str, Any]) -> Path:
    """``<folder>/summary.json``: what a finished run reports (values JSON cannot hold are written as text)."""
    path = folder / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path


class RunCLI(LightningCLI):
    """A ``LightningCLI`` whose runs survive stops, the base of the training CLIs.

    It adds ``--run_dir``, ``--ckpt_path`` and ``--checkpoint_every_n_steps`` (subclasses word their help through
    ``RUN_DIR_HELP`` and ``CKPT_PATH_HELP``), checks them with :meth:`check_run_arguments`, and
    :meth:`run_trainer_kwargs` gives a trainer what every run folder needs: its logger (unless the configuration
    names one), exact resume, the ``UNFINISHED`` marks, the configuration's callbacks and ``RunCheckpoint``.
    Freed memory is kept for reuse (:func:`agreement.allocator.retain_freed_memory`) before anything is built.
    """

    RUN_DIR_HELP = "output folder of this run"
    CKPT_PATH_HELP = (
        "resume from this checkpoint, or 'last' for <run_dir>/checkpoints/last.ckpt (same configuration)"
    )

    DEFAULT_CONFIG: Path | None = None  # the configuration a run starts from (a subclass's demo)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """``LightningCLI``'s arguments; by default the CLI does not run a subcommand (the entry point drives
        the run), overwrites the run's ``config.yaml`` on resume, starts from ``DEFAULT_CONFIG`` and raises parse
        errors (``agreement.inputs.report_root_cause`` prints them as one last line)."""
        retain_freed_memory()
        kwargs.setdefault("run", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs: dict[str, Any] = {"exit_on_error": False}
        if self.DEFAULT_CONFIG is not None:
            parser_kwargs["default_config_files"] = [str(self.DEFAULT_CONFIG)]
        kwargs["parser_kwargs"] = parser_kwargs | kwargs.get("parser_kwargs", {})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None, help=self.RUN_DIR_HELP)
        parser.add_argument("--ckpt_path", type=str | None, default=None, help=self.CKPT_PATH_HELP)
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=500,
            help="write checkpoints/last.ckpt every N optimizer steps too (0: only at epoch ends and on signals)",
        )

    @staticmethod
    def check_run_arguments(config: Mapping[str, Any]) -> None:
        if config["checkpoint_every_n_steps"] < 0:
            raise ValueError(
                f"--checkpoint_every_n_steps must be >= 0, got {config['checkpoint_every_n_steps']}"
            )

    def run_trainer_kwargs(
        self,
        folder: Path,
        config: Any,
        resume_step: int | None = None,
        unfinished: Iterable[Path] | None = None,
        resume_hint: str = "",
        before_checkpoint: Iterable[pl.Callback] = (),
        after_checkpoint: Iterable[pl.Callback] = (),
    ) -> dict[str, Any]:
        """Trainer arguments of a run written into ``folder`` (made here); ``config`` is stored in the checkpoints
        and ``unfinished`` (default: ``folder``) get ``UNFINISHED`` when the fit starts. Callbacks that save state
        go in ``before_checkpoint``, so that ``RunCheckpoint`` writes their state too."""
        folder.mkdir(parents=True, exist_ok=True)
        trainer_config = self._get(self.config_init, "trainer", default={})
        kwargs: dict[str, Any] = {"default_root_dir": str(folder)}
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = RunLogger(folder, resume_step=resume_step)
        kwargs["callbacks"] = [
            ExactResume(),
            MarkUnfinished([folder] if unfinished is None else unfinished, resume_hint),
            *(trainer_config.get("callbacks") or []),
            *before_checkpoint,
            RunCheckpoint(
                folder / CHECKPOINT_DIR,
                every_n_steps=self._get(self.config, "checkpoint_every_n_steps"),
                config=flatten_config(config),
            ),
            *after_checkpoint,
        ]
        return kwargs
