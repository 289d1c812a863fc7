"""Data layer: listing, loading and validating volumes and images, view augmentations, datasets, data module."""

from ssl3d.data.datamodule import JointSSLDataModule
from ssl3d.data.datasets import IndexedConcatDataset, SliceViewsDataset, VolumeViewsDataset
from ssl3d.data.images import check_images, load_image
from ssl3d.data.sources import VolumeSource, list_images, list_volumes
from ssl3d.data.transforms import (
    MultiCropViews2D,
    TwoDifferentVolumeViews,
    TwoViews2D,
    default_volume_transforms,
    view_transform_2d,
)
from ssl3d.data.volumes import VolumeLoader, check_volumes

__all__ = [
    "IndexedConcatDataset",
    "JointSSLDataModule",
    "MultiCropViews2D",
    "SliceViewsDataset",
    "TwoDifferentVolumeViews",
    "TwoViews2D",
    "VolumeLoader",
    "VolumeSource",
    "VolumeViewsDataset",
    "check_images",
    "check_volumes",
    "default_volume_transforms",
    "list_images",
    "list_volumes",
    "load_image",
    "view_transform_2d",
]
