"""A linear head on frozen face embeddings, trained with Lightning on agreed names or on the ground truth.

Self-training fits the head to the stage-3 names (no manual labels); the supervised oracle fits the same head to
the true names of a training split, as the paper's upper bound. Both are scored on the same held-out faces.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from agreement.optim import build_optimizer


class LinearEntityHead(pl.LightningModule):
    """Linear classifier over frozen embeddings, cross-entropy, AdamW."""

    def __init__(self, dim: int, num_classes: int, lr: float = 0.01, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(
            self.parameters(), "adamw", lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )


def fit_head(
    embeddings: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    epochs: int = 30,
    batch_size: int = 1024,
    lr: float = 0.01,
    seed: int = 0,
) -> LinearEntityHead:
    """Train a ``LinearEntityHead`` on CPU (embeddings are small; no checkpoints or logs are written)."""
    pl.seed_everything(seed, verbose=False)
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    model = LinearEntityHead(x.shape[1], num_classes, lr=lr)
    # The head trains in a second or two; Lightning's start-up banners would drown the stage table.
    quiet = logging.getLogger("pytorch_lightning")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, loader)
    finally:
        quiet.setLevel(level)
    return model.eval()


@torch.no_grad()
def predict(model: LinearEntityHead, embeddings: np.ndarray) -> np.ndarray:
    return model(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)).argmax(1).numpy()


def frame_split(frame_ids: np.ndarray, held_out: float = 0.3, seed: int = 0) -> np.ndarray:
    """Boolean mask of training faces; whole frames go to one side so that no frame leaks."""
    frames = np.unique(frame_ids)
    rng = np.random.default_rng(seed)
    test = rng.choice(frames, size=max(1, round(held_out * len(frames))), replace=False)
    return ~np.isin(frame_ids, test)


def self_training_comparison(
    embeddings: np.ndarray,
    agreed: np.ndarray,
    truth: np.ndarray | None,
    frame_ids: np.ndarray,
    num_classes: int,
    epochs: int = 30,
    lr: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Predictions of the self-trained head (all faces) and, with ground truth, the held-out comparison.

    Returns ``{"self_training": predictions}`` and, when ``truth`` is given, ``train_mask`` and
    ``oracle``: the held-out predictions of the head trained on the true names of the training frames, next to
    ``self_training_held_out`` (the self-trained head refitted on the same training frames' agreed names).
    """
    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    out: dict[str, Any] = {
        "self_training": predict(fit_head(x, agreed, num_classes, epochs, lr=lr, seed=seed), x)
    }
    if truth is not None:
        train = frame_split(frame_ids, seed=seed)
        out["train_mask"] = train
        oracle = fit_head(x[train], truth[train], num_classes, epochs, lr=lr, seed=seed)
        out["oracle"] = predict(oracle, x[~train])
        selftrained = fit_head(x[train], agreed[train], num_classes, epochs, lr=lr, seed=seed)
        out["self_training_held_out"] = predict(selftrained, x[~train])
    return out
