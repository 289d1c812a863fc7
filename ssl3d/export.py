"""Export the pretrained slice encoder as a plain timm state dict that loads with ``strict=True``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from agreement.inputs import load_state_dict_file, load_torch_file

NETWORK_PREFIXES = ("encoder.", "transformer.")


def network_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a ``JointSSL`` state dict that are its networks (slice encoder and slice Transformer), not
    the clustering state, whose shapes depend on the data."""
    return {key: value for key, value in state.items() if key.startswith(NETWORK_PREFIXES)}


def load_network_state(encoder: nn.Module, transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the slice encoder and slice Transformer entries of a ``JointSSL`` state dict (``encoder.*``,
    ``transformer.*``; other entries are ignored) into ``encoder`` and ``transformer``, strictly."""
    nn.ModuleDict({"encoder": encoder, "transformer": transformer}).load_state_dict(
        network_state(state), strict=True
    )


def read_pretraining_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The networks' state dict (:func:`network_state`, prefixes kept) and the ``hyper_parameters`` of a
    ``scripts/pretrain.py`` checkpoint, read with ``weights_only=True``."""
    checkpoint = load_torch_file(path, what="pretraining checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    state = network_state(checkpoint["state_dict"])
    if not state:
        raise ValueError(
            f"{path}: the state dict has no encoder.* or transformer.* weights (not a JointSSL run)"
        )
    return state, dict(checkpoint.get("hyper_parameters") or {})


def export_encoder(
    backbone: nn.Module, backbone_name: str, folder: str | Path, extra: dict | None = None
) -> Path:
    """Write ``encoder.safetensors`` and ``encoder.json`` (how to rebuild the timm model) under ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "encoder.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(weights)
    metadata = {
        "timm_model": backbone_name,
        "in_chans": 1,
        "num_classes": 0,
        "weights": weights.name,
        **(extra or {}),
    }
    (folder / "encoder.json").write_text(json.dumps(metadata, indent=2))
    return weights


def resolve_encoder_file(path: str | Path) -> tuple[Path, dict]:
    """The weights file of an exported encoder (its folder, the file, or the run folder that holds ``encoder/``)
    and its ``encoder.json`` metadata.

    A bare state-dict file without ``encoder.json`` is accepted; its metadata is then empty.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    if (
        path.is_dir()
        and not (path / "encoder.json").is_file()
        and (path / "encoder" / "encoder.json").is_file()
    ):
        path = path / "encoder"  # a pretraining or fine-tuning run folder
    folder = path if path.is_dir() else path.parent
    metadata_file = folder / "encoder.json"
    metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    if path.is_dir():
        if not metadata:
            raise FileNotFoundError(f"{path} holds no encoder.json; pass the weights file itself")
        return folder / metadata.get("weights", "encoder.safetensors"), metadata
    return path, metadata


def load_exported_encoder(path: str | Path) -> nn.Module:
    """Rebuild the timm model an exported encoder describes (``path`` as for :func:`resolve_encoder_file`) and
    load its weights strictly."""
    weights, metadata = resolve_encoder_file(path)
    if not metadata:
        raise FileNotFoundError(
            f"{weights}: no encoder.json beside it to say which timm model the weights belong to"
        )
    model = timm.create_model(
        metadata["timm_model"],
        pretrained=False,
        in_chans=metadata["in_chans"],
        num_classes=metadata["num_classes"],
    )
    model.load_state_dict(load_state_dict_file(weights), strict=True)
    return model
