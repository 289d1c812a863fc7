"""View augmentations: two differently transformed copies of a volume (3D) or of a slice/image (2D).

3D views use MONAI's random transforms, each seeded from the wrapper's own ``RandomState`` so that seeding the
wrapper once per sample (the datasets do) fixes everything that happens to that sample. 2D views follow the
DeepCluster-V2/SwAV recipe without the colour-specific parts (grey scale, solarisation): random resized crop,
horizontal flip, brightness/contrast jitter and Gaussian blur, drawn from torch's global generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from monai.transforms import (
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
)
from torchvision.transforms import v2

from agreement.sampling import MAX_SEED, seeded_call
from ssl3d.data.volumes import _plain


def default_volume_transforms(intensity: bool = True) -> list[Callable]:
    """One transform per kind of change, each always applied (``prob=1``) so that the two views differ.

    ``intensity=False`` leaves out the bias-field and gamma transforms (the ones that change tissue contrast).

    Volumes are ``(1, S, H, W)`` with the slice axis first, so rotation about axis 0 is an in-plane rotation
    and the flip is along H (left-right for axial RAS slices).
    """
    geometry_and_noise = [
        RandAffine(
            prob=1.0,
            rotate_range=(math.pi / 12, math.pi / 36, math.pi / 36),
            scale_range=(0.0, 0.1, 0.1),
            translate_range=(0.0, 4.0, 4.0),
            padding_mode="zeros",
        ),
        RandFlip(prob=1.0, spatial_axis=1),
        RandGaussianNoise(prob=1.0, std=0.05),
        RandGaussianSmooth(prob=1.0, sigma_x=(0.0, 0.0), sigma_y=(0.5, 1.5), sigma_z=(0.5, 1.5)),
    ]
    if not intensity:
        return geometry_and_noise
    return [
        *geometry_and_noise[:3],
        RandBiasField(prob=1.0, degree=3, coeff_range=(-0.1, 0.1)),  # smooth gain of about 0.5x to 2x
        RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5)),
        geometry_and_noise[3],
    ]


class TwoDifferentVolumeViews(Randomizable):
    """Pick two *different* transforms from ``transforms`` per call and apply one to each copy of the volume.

    Seed with MONAI's ``set_random_state(seed=...)``; the choice and every chosen transform's randomness then
    follow from that seed. ``last_choice`` keeps the indices of the transforms used by the latest call.
    """

    def __init__(self, transforms: Sequence[Callable] | None = None) -> None:
        self.transforms = list(transforms) if transforms is not None else default_volume_transforms()
        if len(self.transforms) < 2:
            raise ValueError(
                f"TwoDifferentVolumeViews needs at least two transforms, got {len(self.transforms)}"
            )
        self.last_choice: tuple[int, int] = (0, 1)

    def randomize(self, data: object = None) -> None:
        first, second = self.R.choice(len(self.transforms), size=2, replace=False)
        self.last_choice = (int(first), int(second))

    def __call__(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.randomize()
        views = []
        for index in self.last_choice:
            transform = self.transforms[index]
            if isinstance(transform, Randomizable):
                transform.set_random_state(seed=int(self.R.randint(MAX_SEED)))
            views.append(_plain(transform(volume.clone())).contiguous())
        return views[0], views[1]


def view_transform_2d(
    size: Sequence[int] = (64, 64),
    scale: Sequence[float] = (0.3, 1.0),
    flip_p: float = 0.5,
    jitter: float = 0.4,
    jitter_p: float = 0.8,
    blur_p: float = 0.5,
) -> v2.Compose:
    """The augmentation for one 2D view of a ``(1, H, W)`` tensor in 0..1; output ``(1, *size)``."""
    size = (int(size[0]), int(size[1]))
    kernel = max(3, int(0.1 * min(size)) // 2 * 2 + 1)
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
            v2.RandomHorizontalFlip(p=flip_p),
            v2.RandomApply([v2.ColorJitter(brightness=jitter, contrast=jitter)], p=jitter_p),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        ]
    )


class TwoViews2D:
    """Two independent draws of the same 2D augmentation (``view_transform_2d`` unless ``transform`` is given)."""

    def __init__(
        self,
        transform: Callable | None = None,
        size: Sequence[int] = (64, 64),
        scale: Sequence[float] = (0.3, 1.0),
        jitter: float = 0.4,
    ) -> None:
        self.transform = transform if transform is not None else view_transform_2d(size, scale, jitter=jitter)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image).contiguous(), self.transform(image).contiguous()


class MultiCropViews2D(TwoViews2D):
    """SwAV / DeepCluster-V2's multi-crop: the two large views of :class:`TwoViews2D`, then ``small_crops`` small
    ones of ``small_size`` pixels cut from ``small_scale`` of the image (same flip, jitter and blur)."""

    def __init__(
        self,
        small_crops: int,
        small_size: Sequence[int] = (32, 32),
        small_scale: Sequence[float] = (0.05, 0.3),
        size: Sequence[int] = (64, 64),
        scale: Sequence[float] = (0.3, 1.0),
        jitter: float = 0.4,
    ) -> None:
        super().__init__(size=size, scale=scale, jitter=jitter)
        self.small_crops = small_crops
        self.small = view_transform_2d(small_size, small_scale, jitter=jitter)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        small = (self.small(image).contiguous() for _ in range(self.small_crops))
        return (*super().__call__(image), *small)


def seeded_views_2d(views: Callable, image: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Run torch-RNG-based ``views`` under ``seed`` without disturbing the caller's global generator."""
    return seeded_call(views, seed, image)


def seeded_volume_views(
    views: Callable, volume: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed MONAI-style ``views`` via ``set_random_state``; other callables run under a seeded torch generator."""
    if hasattr(views, "set_random_state"):
        views.set_random_state(seed=seed)
        return views(volume)
    return seeded_views_2d(views, volume, seed)
