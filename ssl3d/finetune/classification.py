"""2D image classification (chest X-ray style, single- or multi-label) with the exported encoder and a timm head.

The images come from ``ssl3d.finetune.classification_data.ImageClassificationData`` (class folders or CSVs).
Metrics: AUROC (MONAI, macro over classes) and accuracy (top-1, or per-label at 0.5 for multi-label).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ssl3d.finetune.encoders import (
    create_timm_encoder,
    load_encoder_weights,
)
from ssl3d.finetune.task import ClassificationTask

log = logging.getLogger(__name__)


class ImageClassifier(ClassificationTask):
    """The exported timm encoder with a fresh timm classifier head (``reset_classifier``).

    Args:
        backbone: timm model name of the encoder.
        encoder: exported encoder folder or file, loaded strictly before the head is added; ``None``: random.
        class_names: one per output (linked from the data).
        multi_label: sigmoid + binary cross-entropy per class instead of softmax + cross-entropy.
        freeze_encoder: train the head only (a linear probe).
        kwargs: the optimizer and schedule settings of :class:`~ssl3d.finetune.task.FinetuneTask`.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        encoder: str | None = None,
        class_names: list[str] | None = None,
        multi_label: bool = False,
        freeze_encoder: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if not class_names or len(class_names) < (1 if multi_label else 2):
            raise ValueError(
                f"class_names needs at least {1 if multi_label else 2} entries, got {class_names}"
            )
        self.class_names = list(class_names)
        self.model = create_timm_encoder(backbone)
        if encoder is not None:
            load_encoder_weights(self.model, encoder, backbone)
            log.info("encoder weights loaded from %s", encoder)
        else:
            log.info("encoder %s is randomly initialised (no encoder file given)", backbone)
        if freeze_encoder:
            self.freeze(self.model)
        self.model.reset_classifier(len(self.class_names))

    def setup(self, stage: str) -> None:
        self.check_data(getattr(self.trainer, "datamodule", None))

    def encoder_backbone(self) -> torch.nn.Module:
        return self.model

    def head_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.get_classifier().parameters())

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.model.get_classifier().train()  # the head trains even inside a frozen encoder

    def split_batch(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        images, targets = batch
        return images, targets, None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)
