"""Checks of a few-shot protocol's inputs before anything is trained or written.

``scripts/fewshot_eval.py`` calls :func:`check_protocol_inputs` first: a bad value (seeds, shots, targets), a missing
weights or prompt file, a class with fewer training images than ``--shots`` or an unreadable image raises one error
naming the file or option and what to do, before the run folder is made.
"""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path
from typing import Any

from prompts.datasets import check_images, check_shots, load_dataset
from prompts.splits import fewshot_split

TRANSFER = ("cross_dataset", "domain_generalization")


def _repeated(values: list[Any]) -> list[Any]:
    return [value for value, count in Counter(values).items() if count > 1]


def _model_class(model: Any) -> type | None:
    class_path = getattr(model, "class_path", None) if model is not None else None
    if not class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None  # the parser has already checked the class


def method_trains(model: Any) -> bool:
    """Whether the configured method (``--model``) trains anything; zero-shot CLIP does not."""
    return bool(getattr(_model_class(model), "trainable", True))


def protocol_shots(protocol: str, shots: list[int]) -> list[int]:
    """The shot counts a protocol runs: every one for ``fewshot``, the first otherwise."""
    return list(shots) if protocol == "fewshot" else list(shots[:1])


def target_dataset(target: str, root: str) -> tuple[str, str]:
    """``(dataset, root)`` of a ``--targets`` entry: a registered name under ``root``, or ``imagefolder:``/``csv:``."""
    kind, _, path = target.partition(":")
    if kind.lower() in ("imagefolder", "csv") and path:
        return kind, path
    return target, root


def check_run_options(protocol: str, seeds: list[int], shots: list[int], targets: list[str]) -> list[int]:
    """The shot counts the protocol runs; ``ValueError`` for options it would silently ignore or misread."""
    if not seeds:
        raise ValueError("--seeds is empty; give at least one seed, e.g. --seeds [1]")
    if _repeated(seeds):
        raise ValueError(f"--seeds {seeds} repeats {_repeated(seeds)}; each seed is one run")
    if not shots:
        raise ValueError("--shots is empty; give at least one shot count, e.g. --shots [16]")
    if _repeated(shots):
        raise ValueError(f"--shots {shots} repeats {_repeated(shots)}")
    negative = [k for k in shots if k < 0]
    if negative:
        raise ValueError(f"--shots {shots}: shot counts must be >= 0 (0 uses every training image)")
    if protocol != "fewshot" and len(shots) > 1:
        raise ValueError(
            f"--protocol {protocol} runs one shot count but --shots is {shots}; give one value, or use "
            "--protocol fewshot to compare shot counts"
        )
    if targets and protocol not in TRANSFER:
        raise ValueError(
            f"--targets is used by --protocol cross_dataset or domain_generalization only, not by {protocol}"
        )
    if protocol in TRANSFER and not targets:
        raise ValueError(
            f"--protocol {protocol} needs target datasets: --targets [name, imagefolder:/path, ...]"
        )
    return protocol_shots(protocol, shots)


def check_protocol_inputs(config: Any) -> None:
    """Validate everything a protocol reads before it trains: options, weights, prompts and every image it uses."""
    from agreement.clip import resolve_weights_file
    from prompts.checkpoint import read_prompt_metadata

    protocol = config.protocol
    shots_list = check_run_options(
        protocol, list(config.seeds), list(config.shots), list(config.targets or [])
    )
    init_args = config.model.get("init_args") if config.get("model") is not None else None
    if init_args is not None and init_args.get("model_name") is not None:
        resolve_weights_file(init_args.model_name, init_args.get("pretrained"))
    if config.get("init_prompts"):
        path = Path(config.init_prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--init_prompts: prompt checkpoint {path} not found")
        read_prompt_metadata(path)

    data = config.data
    _, splits, classnames = load_dataset(
        data.dataset, data.root, data.get("classnames_file"), data.check_files
    )
    source = str(Path(data.root).expanduser())
    if protocol == "base2novel" and len(classnames) < 2:
        raise ValueError(f"{source}: base-to-novel needs at least 2 classes, found {len(classnames)}")
    if not splits["test"]:
        raise ValueError(f"{source}: no test images")
    used = []
    if method_trains(config.get("model")):
        for shots in shots_list:
            check_shots(splits["train"], classnames, shots, source)
            for seed in config.seeds:
                train, val = fewshot_split(splits["train"], splits["val"], shots, seed)
                used += train + val
    targets = []
    for target in config.targets if protocol in TRANSFER else []:
        dataset, root = target_dataset(target, data.root)
        _, target_splits, _ = load_dataset(dataset, root, check_files=data.check_files)
        if not target_splits["test"]:
            raise ValueError(f"--targets {target}: no test images under {root}")
        targets.append((f"--targets {target}", target_splits["test"]))
    if data.check_files:
        check_images(used, source, decode=True)
        check_images(splits["test"], source, decode=False)
        for name, items in targets:
            check_images(items, name, decode=False)
