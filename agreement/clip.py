"""Build open_clip CLIP models offline: a model name plus a local checkpoint, a tag already in the local cache, or
random weights with a loud warning. Nothing here downloads.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from agreement.inputs import load_state_dict_file, state_mismatches
from agreement.torchscript import is_torchscript_archive, read_torchscript_state_dict

log = logging.getLogger(__name__)

# Small ViT configs for tests and the CPU demo (real BPE tokenizer, 77-token context).
EXTRA_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "prompts-tiny-vit": {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
    },
    "prompts-demo-vit": {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 96, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
    },
}

_registered = False


def register_model_configs() -> None:
    """Make the extra configs known to ``open_clip.create_model`` / ``get_tokenizer`` (once per process)."""
    global _registered
    if _registered:
        return
    folder = Path(tempfile.mkdtemp(prefix="prompts-open-clip-configs-"))
    for name, config in EXTRA_MODEL_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    _registered = True


@dataclass
class ClipBundle:
    """What a run needs from open_clip: the model, its tokenizer and its preprocessing configuration."""

    model: nn.Module
    tokenizer: Any
    preprocess_cfg: dict[str, Any]
    model_name: str
    weights: str  # "random", or the resolved weight file


def check_model_name(model_name: str) -> str:
    """Return the open_clip config name or raise ``ValueError`` listing the close matches."""
    register_model_configs()
    cleaned = model_name.replace("/", "-")
    available = open_clip.list_models()
    if cleaned in available:
        return cleaned
    close = difflib.get_close_matches(cleaned, available, n=6, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "see open_clip.list_models()"
    raise ValueError(f"unknown open_clip model name {model_name!r}; {hint}")


def cached_tag_file(model_name: str, tag: str) -> str | None:
    """Path of the weights of ``(model_name, tag)`` if they are already in the local cache, else ``None``."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        return None
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        parts = cfg["hf_hub"].strip("/").split("/")
        repo_id, names = "/".join(parts[:2]), []
        if len(parts) > 2:
            names.append("/".join(parts[2:]))
        names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.get("url"):
        candidate = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if candidate.is_file():
            return str(candidate)
    return None


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A CLIP state dict from a safetensors file, a plain/nested torch file or an OpenAI TorchScript archive.

    Nothing in the file can run: torch files are read with ``weights_only=True`` and TorchScript archives by
    :func:`agreement.torchscript.read_torchscript_state_dict`, which takes their tensors and never their code.
    """
    if os.access(path, os.R_OK) and is_torchscript_archive(path):
        state = read_torchscript_state_dict(path)
    else:
        state = load_state_dict_file(path, what="CLIP weights")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    return state


def load_clip_weights(model: nn.Module, path: str, model_name: str) -> None:
    """Load ``path`` into ``model`` after checking keys and shapes; one clear error for another architecture."""
    state = _read_state_dict(path)
    expected = model.state_dict()
    # Non-persistent buffers (open_clip's attention mask) are not weights; TorchScript archives list them.
    for name, _ in model.named_buffers():
        if name not in expected:
            state.pop(name, None)
    if "logit_scale" in state and state["logit_scale"].ndim != expected["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    problems = state_mismatches(state, model)
    if problems:  # one line: the last line a user sees
        raise ValueError(
            f"checkpoint {path} does not match the open_clip architecture {model_name!r}: "
            f"{'; '.join(line.strip() for line in problems)}. Pick the model name the weights were trained with."
        )
    model.load_state_dict(state, strict=True)


def resolve_weights_file(model_name: str, pretrained: str | None) -> str | None:
    """The local weights file of ``pretrained`` (a path, or an open_clip tag already cached); ``None`` for none.

    Raises ``FileNotFoundError`` naming the value and what to do; reads nothing but the file system.
    """
    if not pretrained:
        return None
    name = check_model_name(model_name)
    if os.path.isfile(os.path.expanduser(pretrained)):
        return os.path.expanduser(pretrained)
    if open_clip.get_pretrained_cfg(name, pretrained):
        path = cached_tag_file(name, pretrained)
        if path is None:
            raise FileNotFoundError(
                f"open_clip weights {name}/{pretrained} are not in the local cache and nothing is downloaded "
                "here; download them once elsewhere and pass the file path as pretrained=/path/to/file"
            )
        return path
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise FileNotFoundError(
        f"pretrained={pretrained!r} is neither an existing file nor an open_clip tag of {name}"
        + (f" (tags: {', '.join(tags)})" if tags else "")
    )


def build_clip(
    model_name: str = "ViT-B-16-quickgelu",
    pretrained: str | None = None,
    precision: str = "fp32",
    allow_random: bool = True,
) -> ClipBundle:
    """Create an open_clip model without network access.

    ``pretrained`` is a local file (``.safetensors``, ``.pt``/``.bin`` state dict, or an OpenAI archive) or an
    open_clip tag whose weights are already cached. ``None`` gives random weights, with a warning.
    """
    name = check_model_name(model_name)
    weights = "random"
    path = resolve_weights_file(name, pretrained)
    model = open_clip.create_model(name, pretrained=None, precision="fp32", device="cpu")
    if path is not None:
        load_clip_weights(model, path, name)
        weights = path
    else:
        if not allow_random:
            raise ValueError(
                f"no weights given for {name} (pretrained=None) and random weights are not allowed"
            )
        message = f"*** {name} is RANDOMLY INITIALISED (no pretrained weights given): accuracies are not CLIP figures ***"
        warnings.warn(message, stacklevel=2)
        log.warning(message)
    if precision != "fp32":
        open_clip.convert_weights_to_lp(model, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(model, tokenizer, preprocess_cfg, name, weights)
