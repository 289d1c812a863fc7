"""Prompt-only checkpoints: the learnt prompt tensors plus the shape metadata, in safetensors (a few hundred KB
for ViT-B/16 instead of the whole CLIP model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from agreement.inputs import first_line
from prompts.model import PromptedCLIP


def save_prompts(model: PromptedCLIP, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``text_prompts.i`` / ``vision_prompts.i`` and metadata; atomic (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.prompt_parameters().items()}
    meta = {
        **model.describe(),
        "classnames": model.classnames if model.class_specific else None,
        **(extra or {}),
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"prompts": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_prompt_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as error:  # safetensors' own error type differs between versions
        raise ValueError(
            f"{path} is not a prompt checkpoint: not a safetensors file ({first_line(error)}); "
            "prompt checkpoints are the prompts.safetensors files of earlier runs"
        ) from None
    if "prompts" not in meta:
        raise ValueError(f"{path} is not a prompt checkpoint (no prompt metadata)")
    return json.loads(meta["prompts"])


@torch.no_grad()
def load_prompts(model: PromptedCLIP, path: str | Path) -> dict:
    """Copy the prompts of ``path`` into ``model``; one clear error if the architecture or prompt shape differs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt checkpoint {path} not found")
    meta = read_prompt_metadata(path)
    mine = model.describe()
    differ = [f"{k}: file {meta.get(k)!r} vs model {v!r}" for k, v in mine.items() if meta.get(k) != v]
    if differ:
        raise ValueError(
            f"prompt checkpoint {path} was made for another architecture or prompt shape ({'; '.join(differ)})"
        )
    if model.class_specific and meta.get("classnames") and not model.classnames:
        model.set_classnames(meta["classnames"])
    tensors = load_file(str(path))
    params = model.prompt_parameters()
    if set(tensors) != set(params):
        raise ValueError(
            f"prompt checkpoint {path} holds {sorted(tensors)}, the model expects {sorted(params)}"
        )
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(
                f"prompt checkpoint {path}: {name} has shape {tuple(value.shape)}, model needs {tuple(params[name].shape)}"
            )
        params[name].copy_(value.to(params[name].device, params[name].dtype))
    return meta
