"""The 2D slice encoder ``f_intra``: a timm backbone on single-channel slices, pooled to one embedding per slice."""

from __future__ import annotations

import timm
import torch
from torch import nn


def create_backbone(name: str, in_chans: int = 1) -> nn.Module:
    """A randomly initialised timm backbone without classifier, residual branches switched on.

    timm zero-initialises the last normalisation of each residual block (``zero_init_last``), which suits
    supervised training with plain SGD; SwAV, DeepCluster-V2 and the official joint-SSL code start from
    ``zero_init_residual=False`` instead. Under LARS (trust 0.001) a zero gamma grows by at most ~0.3% per
    step, so the residual branches would stay off for most of a run.
    """
    try:
        return timm.create_model(
            name, pretrained=False, in_chans=in_chans, num_classes=0, zero_init_last=False
        )
    except TypeError:  # model families without residual blocks do not take the argument
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0)


class SliceEncoder(nn.Module):
    """Embeds single-channel 2D images (or the slices of volumes) into ``d_model``-dimensional vectors.

    Args:
        backbone: any timm model name that supports ``forward_intermediates`` (resnets, convnexts, vits, ...).
        d_model: output dimension (640 in the paper).
        multi_level: pool the last ``num_levels`` feature maps, L2-normalise each and concatenate them before the
            projection, as the official code does (its 5,888-d vector for ResNet-50, which repeats the last
            level; here every level appears once: 3,840-d for ResNet-50). Otherwise only the final features.
        num_levels: feature levels used when ``multi_level`` is set.
        pretrained_path: local timm-format state dict (``.safetensors``, ``.pt``, ``.pth``) loaded with
            ``strict=True``; nothing is downloaded.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        d_model: int = 640,
        multi_level: bool = True,
        num_levels: int = 4,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone = create_backbone(backbone)
        if pretrained_path is not None:
            from agreement.inputs import load_state_dict_file

            self.backbone.load_state_dict(load_state_dict_file(pretrained_path), strict=True)
        channels = [info["num_chs"] for info in self.backbone.feature_info]
        if num_levels < 1 or num_levels > len(channels):
            raise ValueError(
                f"SliceEncoder: num_levels must be in 1..{len(channels)} for {backbone}, got {num_levels}"
            )
        self.multi_level = multi_level
        # Intermediate levels below the last; the last level is the backbone's final feature map, which includes
        # any head convolution (e.g. EfficientNet's conv_head), so that every backbone weight is trained.
        self.level_indices = list(range(len(channels) - num_levels, len(channels) - 1)) if multi_level else []
        self.feature_dim = sum(channels[i] for i in self.level_indices) + self.backbone.num_features
        self.d_model = d_model
        self.projection = nn.Linear(self.feature_dim, d_model)

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps (N, C_i, h_i, w_i) of the pooled levels, finest first, the final features last."""
        if not self.level_indices:
            return [self.backbone.forward_features(images)]
        final, intermediates = self.backbone.forward_intermediates(images, indices=self.level_indices)
        return [*intermediates, final]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) images -> (N, d_model) embeddings."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"SliceEncoder expects (N, 1, H, W) images, got shape {tuple(images.shape)}")
        *intermediates, final = self.feature_maps(images)
        pooled = self.backbone.forward_head(final, pre_logits=True)
        if self.multi_level:
            # sum / area rather than mean: mean's backward writes a full-size quotient per level, which at the
            # paper's sizes cost more than the pooling itself (and 3x more in channels_last)
            levels = [f.sum(dim=(2, 3)) / (f.shape[2] * f.shape[3]) for f in intermediates] + [pooled]
            pooled = torch.cat([nn.functional.normalize(level, dim=1) for level in levels], dim=1)
        return self.projection(pooled)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) images -> (N, num_features) globally pooled final backbone features: what a downstream
        user of the exported backbone takes (no projection)."""
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    def embed_volumes(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, H, W) volumes -> (B, S, d_model) slice tokens."""
        if volumes.ndim != 5 or volumes.shape[1] != 1:
            raise ValueError(
                f"SliceEncoder expects (B, 1, S, H, W) volumes, got shape {tuple(volumes.shape)}"
            )
        batch, _, slices, height, width = volumes.shape
        slices_as_images = volumes.transpose(1, 2).reshape(batch * slices, 1, height, width)
        return self(slices_as_images).view(batch, slices, self.d_model)
