"""Slice-wise volume segmentation: MONAI ``FlexibleUNet`` on the pretrained timm encoder, Dice + CE loss.

As in the paper's downstream protocol, each slice of a volume is segmented in 2D; the slice predictions are
stacked back into a volume at the file's resolution (logits upsampled bilinearly, then argmax), scored per
volume, and written as NIfTI with the input's affine.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import FlexibleUNet
from torchmetrics import MeanMetric

from agreement.dist import all_gather_objects
from ssl3d.finetune.encoders import register_timm_backbone
from ssl3d.finetune.metrics import mean_over_classes, volume_metrics
from ssl3d.finetune.seg_data import CaseData
from ssl3d.finetune.task import FinetuneTask

log = logging.getLogger(__name__)


def build_unet(backbone: str, num_classes: int, decoder_channels: tuple[int, ...]) -> FlexibleUNet:
    """A 2D FlexibleUNet whose encoder is the timm model ``backbone`` with one input channel."""
    return FlexibleUNet(
        in_channels=1,
        out_channels=num_classes,
        backbone=register_timm_backbone(backbone),
        pretrained=False,
        decoder_channels=tuple(decoder_channels),
        spatial_dims=2,
    )


def write_prediction(prediction: torch.Tensor, case: CaseData, folder: str | Path) -> Path:
    """Write ``(S, X, Y)`` class indices as ``<folder>/<case>.nii.gz`` in the input's voxel grid and affine."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.moveaxis(prediction.cpu().numpy().astype(np.uint8), 0, case.slice_axis)
    path = folder / f"{case.name}.nii.gz"
    tmp = folder / f".{case.name}.tmp.nii.gz"
    image = nib.Nifti1Image(volume, case.affine)
    image.set_qform(case.affine, code=1)
    image.set_sform(case.affine, code=1)
    nib.save(image, str(tmp))
    tmp.replace(path)
    return path


class SegmentationTask(FinetuneTask):
    """Fine-tunes an exported encoder for slice-wise segmentation of volumes.

    Args:
        backbone: timm model name of the encoder (as in its ``encoder.json``).
        encoder: exported encoder folder or ``encoder.safetensors`` (loaded strictly); ``None`` starts from
            random weights. ``scripts/finetune.py`` also accepts ``latest`` (the newest pretraining run).
        class_names: class per output channel, background first (linked from the data).
        freeze_encoder: train only the decoder and head (encoder batch-norm statistics stay fixed too).
        decoder_channels: FlexibleUNet decoder widths, one per encoder level.
        lambda_dice, lambda_ce: weights of MONAI's ``DiceCELoss`` terms.
        inference_batch_size: slices per forward pass when predicting whole volumes.
        prediction_dir: where test predictions are written as NIfTI (``None``: not written).
        hd95: compute the 95th-percentile Hausdorff distance at test time (slow on large volumes).
        kwargs: the optimizer and schedule settings of :class:`~ssl3d.finetune.task.FinetuneTask`.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        encoder: str | None = None,
        class_names: list[str] = ["background", "grey matter", "white matter"],  # noqa: B006
        freeze_encoder: bool = False,
        decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        inference_batch_size: int = 64,
        prediction_dir: str | None = None,
        hd95: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if len(class_names) < 2:
            raise ValueError(f"class_names needs background and at least one class, got {class_names}")
        self.class_names = list(class_names)
        self.net = build_unet(backbone, len(class_names), decoder_channels)
        if encoder is not None:
            metadata = self.net.encoder.load_pretrained(encoder)
            log.info("encoder weights loaded from %s (%s)", encoder, metadata.get("timm_model", backbone))
        else:
            log.info("encoder %s is randomly initialised (no encoder file given)", backbone)
        if freeze_encoder:
            self.freeze(self.net.encoder)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        # per-volume means over the validation cases of every process (a case without foreground is left out)
        self.val_iou_3d = MeanMetric(nan_strategy="ignore")
        self.val_dice = MeanMetric(nan_strategy="ignore")
        self.test_results: list[dict[str, Any]] = []
        self.test_summary: dict[str, dict[str, float]] = {}

    monitor = ("val/iou_3d", "max")  # the paper keeps the model with the best validation 3D IoU

    def export_encoder(self, folder: str | Path) -> Path:
        """The fine-tuned encoder as an exported ``encoder/`` folder (e.g. the start of another fine-tuning)."""
        return self.net.encoder.export(folder, source=self.hparams.encoder)

    def result_rows(self) -> list[dict[str, object]]:
        """One table row per class (and the foreground mean) of the test summary."""
        names = {"dice": "Dice", "iou": "IoU", "dice_3d": "3D Dice", "iou_3d": "3D IoU", "hd95": "HD95 mm"}
        return [
            {"class": name, **{names[k]: v for k, v in row.items()}}
            for name, row in self.test_summary.items()
        ]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) slices -> (N, classes, H, W) logits."""
        return self.net(images)

    def encoder_backbone(self) -> torch.nn.Module:
        return self.net.encoder.model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = self.loss(self(images), labels[:, None])
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    @torch.no_grad()
    def predict_case(self, case: CaseData) -> torch.Tensor:
        """Class indices ``(S, X, Y)`` at the file's in-plane resolution."""
        chunks = []
        for start in range(0, case.images.shape[0], self.hparams.inference_batch_size):
            images = case.images[start : start + self.hparams.inference_batch_size].to(self.device)
            logits = self(images).float()
            if tuple(logits.shape[-2:]) != case.full_shape:
                logits = F.interpolate(logits, size=case.full_shape, mode="bilinear", align_corners=False)
            chunks.append(logits.argmax(dim=1).cpu())
        return torch.cat(chunks)

    def _score(self, case: CaseData, prediction: torch.Tensor, hd95: bool) -> dict[str, dict[str, float]]:
        return volume_metrics(prediction, case.full_labels, self.class_names, case.spacing, hd95=hd95)

    def validation_step(self, case: CaseData, batch_idx: int) -> None:
        if case.full_labels is None:
            return
        mean = mean_over_classes(self._score(case, self.predict_case(case), hd95=False))
        self.val_iou_3d.update(mean["iou_3d"])
        self.val_dice.update(mean["dice"])
        self.log("val/iou_3d", self.val_iou_3d, prog_bar=True, batch_size=1)
        self.log("val/dice", self.val_dice, batch_size=1)

    def test_step(self, case: CaseData, batch_idx: int) -> None:
        prediction = self.predict_case(case)
        entry: dict[str, Any] = {"case": case.name}
        if self.hparams.prediction_dir is not None:
            entry["prediction"] = str(write_prediction(prediction, case, self.hparams.prediction_dir))
        if case.full_labels is not None:
            entry["metrics"] = self._score(case, prediction, hd95=self.hparams.hd95)
        self.test_results.append(entry)

    def predict_step(self, case: CaseData, batch_idx: int) -> torch.Tensor:
        prediction = self.predict_case(case)
        if self.hparams.prediction_dir is not None:
            write_prediction(prediction, case, self.hparams.prediction_dir)
        return prediction

    def on_test_epoch_start(self) -> None:
        self.test_results = []

    def on_test_epoch_end(self) -> None:
        """Per-class metrics averaged over the test volumes of every process (NaNs, e.g. absent classes, left
        out)."""
        self.test_results = all_gather_objects(self.test_results)
        scored = [r["metrics"] for r in self.test_results if "metrics" in r]
        if not scored:
            return
        summary = {}
        for name in [*self.class_names, "mean (foreground)"]:
            rows = [r[name] if name in r else mean_over_classes(r) for r in scored]
            summary[name] = {
                key: float(np.mean(values))
                if (values := [row[key] for row in rows if not math.isnan(row[key])])
                else math.nan
                for key in rows[0]
            }
        self.test_summary = summary
        for name, row in summary.items():
            for key, value in row.items():
                self.log(f"test/{name}/{key}", value, batch_size=1)
