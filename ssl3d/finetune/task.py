"""What the fine-tuning tasks share: ``FinetuneTask`` (optimizer, schedule, frozen parts) and
``ClassificationTask`` (logits gathered over an evaluation epoch and every process, then AUROC, accuracy and
loss).

``SegmentationTask``, ``ImageClassifier`` and ``VolumeClassifier`` keep only their model, loss and data handling.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from agreement.dist import all_gather_objects
from agreement.schedules import steps_per_epoch
from ssl3d.finetune.encoders import encoder_param_groups, set_trainable
from ssl3d.finetune.metrics import EpochOutputs, classification_metrics
from ssl3d.finetune.optim import Optimizer, build_optimizer, scheduler_config


class FinetuneTask(pl.LightningModule):
    """A pretrained timm encoder fine-tuned under a task head.

    The optimizer puts the encoder's parameters in layer-decayed groups (``layer_decay``; timm's BEiT/MAE recipe)
    and every other trainable parameter at the base ``lr``; the schedule is a warm-up of ``warmup_epochs`` then
    a cosine decay over the run. Subclasses give ``encoder_backbone()`` (the timm model), may name
    ``head_parameters()`` inside it that train at the base rate, and :meth:`freeze` the parts that do not train.
    Subclasses forward these settings as ``**kwargs``.

    Args:
        layer_decay: layer-wise learning-rate decay of the encoder (e.g. 0.75); ``None`` for none.
        optimizer, lr, weight_decay, momentum: ``adamw`` or ``sgd`` (the paper: SGD, momentum 0.9).
        warmup_epochs: linear warm-up before the cosine decay.
    """

    def __init__(
        self,
        layer_decay: float | None = None,
        optimizer: Optimizer = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._frozen: list[nn.Module] = []  # a plain list: the modules stay registered where they live

    def freeze(self, *modules: nn.Module) -> None:
        """Train without ``modules``: no gradients, and eval mode in every training epoch (no BatchNorm drift)."""
        for module in modules:
            set_trainable(module, False)
            self._frozen.append(module)

    def encoder_backbone(self) -> nn.Module:
        raise NotImplementedError

    def head_parameters(self) -> list[nn.Parameter]:
        return []

    def on_train_epoch_start(self) -> None:
        for module in self._frozen:
            module.eval()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        backbone = self.encoder_backbone()
        head_ids = {id(p) for p in self.head_parameters()}
        backbone_ids = {id(p) for p in backbone.parameters()} - head_ids
        groups = encoder_param_groups(backbone, hp.lr, hp.weight_decay, hp.layer_decay)
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) in backbone_ids]
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups.append({"params": rest, "lr": hp.lr, "weight_decay": hp.weight_decay})
        optimizer = build_optimizer(groups, hp.optimizer, hp.lr, hp.weight_decay, hp.momentum)
        total = self.trainer.estimated_stepping_batches
        warmup = round(hp.warmup_epochs * steps_per_epoch(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config(optimizer, total, warmup)}


class ClassificationTask(FinetuneTask):
    """Single- or multi-label classification (``multi_label`` hyperparameter): softmax + cross-entropy or sigmoid
    + binary cross-entropy; logits are gathered over each validation and test epoch and scored at its end
    (``val/auroc``, ``val/accuracy``, ``val/loss``...). Subclasses give ``split_batch(batch)``: the inputs, the
    targets and the case names (``None`` when the batch has none); named test cases get a row each in
    ``test_results``."""

    monitor = ("val/auroc", "max")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_outputs = EpochOutputs()
        self.test_outputs = EpochOutputs()
        self._case_names: dict[str, list[str]] = {"val": [], "test": []}
        self.test_summary: dict[str, float] = {}
        self.test_results: list[dict[str, Any]] = []

    def split_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
        raise NotImplementedError

    def check_data(self, data: Any) -> None:
        """The data's ``multi_label`` must be the model's."""
        multi_label = getattr(getattr(data, "hparams", None), "multi_label", None)
        if multi_label is not None and multi_label != self.hparams.multi_label:
            raise ValueError(
                f"model multi_label={self.hparams.multi_label} but data multi_label={multi_label}"
            )

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.hparams.multi_label:
            return F.binary_cross_entropy_with_logits(logits, targets.float())
        return F.cross_entropy(logits, targets.long())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets, _ = self.split_batch(batch)
        logits = self(inputs)
        loss = self.loss(logits, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=inputs.shape[0])
        if not self.hparams.multi_label:
            accuracy = (logits.argmax(dim=1) == targets).float().mean()
            self.log("train/accuracy", accuracy, batch_size=inputs.shape[0])
        return loss

    def _epoch_outputs(self, split: str) -> EpochOutputs:
        return self.val_outputs if split == "val" else self.test_outputs

    def _collect(self, split: str, batch: Any) -> None:
        inputs, targets, names = self.split_batch(batch)
        self._epoch_outputs(split).update(self(inputs), targets)
        if names is not None:
            self._case_names[split].extend(names)

    def _finish(self, split: str) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, list[str] | None]:
        """Score the epoch's outputs, gathered from every process (names too, in the same rank order)."""
        outputs, names = self._epoch_outputs(split), self._case_names[split]
        self._case_names[split] = []
        if not outputs.update_called:
            return {}, torch.empty(0), torch.empty(0), None
        logits, targets = (tensor.cpu() for tensor in outputs.compute())
        outputs.reset()
        names = all_gather_objects(names) if names else None
        metrics = classification_metrics(logits, targets, self.hparams.multi_label)
        metrics["loss"] = float(self.loss(logits, targets))
        for key, value in metrics.items():
            self.log(f"{split}/{key}", value, prog_bar=key == "auroc")
        return metrics, logits, targets, names

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._collect("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._collect("test", batch)

    def on_test_epoch_start(self) -> None:
        self.test_results = []

    def on_test_epoch_end(self) -> None:
        self.test_summary, logits, targets, names = self._finish("test")
        if not names:
            return
        if self.hparams.multi_label:
            probabilities = torch.sigmoid(logits)
            predictions = [[i for i, p in enumerate(row) if p > 0.5] for row in probabilities.tolist()]
            labels = [[i for i, t in enumerate(row) if t > 0.5] for row in targets.tolist()]
        else:
            probabilities = torch.softmax(logits, dim=1)
            predictions = probabilities.argmax(dim=1).tolist()
            labels = targets.tolist()
        self.test_results = [
            {"case": name, "label": label, "prediction": prediction, "probabilities": row}
            for name, label, prediction, row in zip(names, labels, predictions, probabilities.tolist())
        ]

    def result_rows(self) -> list[dict[str, object]]:
        return [{"AUROC": self.test_summary.get("auroc"), "accuracy": self.test_summary.get("accuracy")}]
