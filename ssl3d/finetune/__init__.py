"""Fine-tuning exported encoders on medical downstream tasks (``scripts/finetune.py``)."""

from ssl3d.finetune.classification import ImageClassifier
from ssl3d.finetune.classification_data import ImageClassificationData, VolumeClassificationData
from ssl3d.finetune.encoders import EncoderWeightsError, load_encoder_weights, register_timm_backbone
from ssl3d.finetune.seg_data import SegmentationData
from ssl3d.finetune.segmentation import SegmentationTask
from ssl3d.finetune.volume_classification import VolumeClassifier

__all__ = [
    "EncoderWeightsError",
    "ImageClassificationData",
    "ImageClassifier",
    "SegmentationData",
    "SegmentationTask",
    "VolumeClassificationData",
    "VolumeClassifier",
    "load_encoder_weights",
    "register_timm_backbone",
]
