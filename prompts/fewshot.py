"""``scripts/fewshot_eval.py``: LightningCLI over a prompt-learning module and ``FewShotDataModule``; it parses the
configuration and builds each run's objects, and ``prompts.protocol`` runs one evaluation protocol over shots and
seeds and writes Markdown, CSV and JSON results into the run folder.

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

from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl

import prompts.module  # noqa: F401  (registers the module classes for --model)
from agreement.inputs import report_root_cause
from agreement.runs import RunCLI, save_config
from prompts.data import FewShotDataModule
from prompts.module import PromptCLIPModule
from prompts.protocol import pair_config, run_protocol

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "prompts"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
Protocol = Literal["base2novel", "fewshot", "cross_dataset", "domain_generalization"]


class FewShotCLI(RunCLI):
    """Parses the configuration; ``build`` instantiates a fresh model, data module and trainer per (shots, seed),
    and ``prompts.protocol.run_protocol`` runs the protocol."""

    DEFAULT_CONFIG = DEMO_CONFIG
    RUN_DIR_HELP = "output folder (default runs/fewshot/<time>)"
    CKPT_PATH_HELP = (
        "'last': resume the protocol in --run_dir (each (shots, seed) from its own last.ckpt); or the checkpoint "
        "file of a protocol with a single (shots, seed)"
    )

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
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

    def instantiate_classes(self) -> None:
        """Nothing here: every run builds its own objects from the parsed config."""

    def build(self, shots: int, seed: int, folder: Path, resume_step: int | None = None):
        """The model, data module and trainer of one (shots, seed) run, from the parsed configuration."""
        config = pair_config(self.config, shots, seed)
        pl.seed_everything(seed, workers=True)
        self.config_init = self.parser.instantiate_classes(config)
        model: PromptCLIPModule = self.config_init.model
        data: FewShotDataModule = self.config_init.data
        data.preprocess_cfg = model.preprocess_cfg
        trainer = self.instantiate_trainer(**self.run_trainer_kwargs(folder, config, resume_step=resume_step))
        return model, data, trainer


@report_root_cause
def main(args: list[str] | None = None) -> dict[str, Any]:
    cli = FewShotCLI(
        PromptCLIPModule,
        FewShotDataModule,
        subclass_mode_model=True,
        save_config_callback=None,
        auto_configure_optimizers=False,
        load_from_checkpoint_support=False,  # hparams must be the per-run values (shots, seed, subsample)
        seed_everything_default=1,
        args=args,
    )
    return run_protocol(
        cli.config,
        cli.build,
        lambda folder: save_config(cli.parser, cli.config, folder),
    )
