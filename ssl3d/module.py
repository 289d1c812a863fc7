"""``JointSSL``: joint 2D/3D contrastive clustering with deformable slice attention (AAAI 2023), one LightningModule.

The objective is ``lambda_intra * L_intra + lambda_inter * L_inter + lambda_mask * L_mask``:

- ``L_intra``: clustering agreement (SwAV or DeepCluster-V2) between two augmented views of 2D slices/images,
  on a projection of the slice encoder's embedding.
- ``L_inter``: the same agreement between two augmented views of a volume, on the L2-normalised mean of the slice
  Transformer's outputs.
- ``L_mask``: masked slice-embedding prediction: masked slice tokens are predicted from the others.

``schedule="curriculum"`` replays the official three stages instead (2D only, then masked prediction with the
encoder frozen, then 3D only), by the epoch boundaries in ``curriculum_epochs``.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from agreement.clustering import ClusteringHead, DeepClusterV2Clustering, SwAVClustering
from agreement.losses import masked_embedding_regression
from agreement.optim import build_optimizer, parameter_groups, scaled_lr
from agreement.prototypes import ProjectionHead
from agreement.schedules import WarmupCosineSchedule, steps_per_epoch
from ssl3d.architecture import SliceModelConfig
from ssl3d.attention import MaskedSliceModel, random_slice_mask
from ssl3d.rng import rng_state, set_rng_state

Clustering = Literal["swav", "deepcluster"]


# The settings only one clustering head uses: setting them for the other head is an error, not a silent no-op.
HEAD_SETTINGS = {
    "swav": (
        "epsilon",
        "sinkhorn_iterations",
        "queue_length",
        "queue_length_3d",
        "queue_start_epoch",
        "freeze_prototypes_steps",
    ),
    "deepcluster": ("kmeans_iterations", "kmeans_backend", "kmeans_precision"),
}


class JointSSL(pl.LightningModule):
    """Joint image-volume self-supervised pretraining.

    The architecture arguments (backbone to offset_kernel_size) are gathered in ``self.architecture``, a
    :class:`ssl3d.architecture.SliceModelConfig`, which volume classification reuses.

    Args:
        backbone: timm 2D backbone of the slice encoder (single-channel input).
        pretrained_backbone: optional local timm state dict to start from (nothing is downloaded).
        multi_level: pool several feature levels of the backbone, as the official code does.
        d_model: slice-token dimension (640).
        num_slices: slices per volume (fixes the attention shape for ``attention_layout="code"``).
        num_layers, heads, dim_head, ffn_hidden, dropout: the slice Transformer (4, 8, 64, 720, 0.1).
        attention_layout: ``"slices"`` (slices are the tokens, the paper's meaning) or ``"code"`` (the official
            code's layout, slices as channels).
        downsample_factor, offset_scale, offset_kernel_size: deformable attention settings (4, 2, 6).
        clustering: ``"swav"`` or ``"deepcluster"`` for both L_intra and L_inter; setting another head's
            settings (``HEAD_SETTINGS``, e.g. ``queue_length`` with DeepCluster-V2) is an error.
        prototypes_2d, prototypes_3d: clusters per head for the 2D and 3D agreement.
        projection_hidden, projection_dim: the 2D projection head (SwAV/DeepCluster-V2 use 2048 and 128).
        small_crops: SwAV / DeepCluster-V2's multi-crop: small 2D views per sample besides the two large ones
            (the slice batches carry them as ``small_views``, (B, small_crops, 1, h, w)). Every view predicts the
            large views' targets; only the large views are assigned (Sinkhorn codes, memory bank, queue).
        temperature, epsilon, sinkhorn_iterations: SwAV/DeepCluster-V2 settings (0.1, 0.05, 3).
        queue_length, queue_length_3d: SwAV queue per view for the 2D and the 3D agreement, 0 for none.
        queue_start_epoch: first epoch that uses a full queue.
        freeze_prototypes_steps: SwAV's frozen-prototype warm-up in optimizer steps.
        kmeans_iterations, kmeans_backend, kmeans_precision: DeepCluster-V2 k-means settings (``"bfloat16"``
            assignment scores are faster on hardware with bfloat16 matrix instructions; see ``agreement.kmeans``).
        mask_ratio: fraction of slices masked for L_mask (0.1).
        mask_trains_encoder: let L_mask's gradient reach the slice encoder (the official stage 2 keeps it frozen).
        lambda_intra, lambda_inter, lambda_mask: loss weights.
        schedule: ``"joint"`` (one objective) or ``"curriculum"`` (the official three stages).
        curriculum_epochs: epochs of stages 1 and 2 for the curriculum; the rest is stage 3.
        optimizer: ``"lars"`` (SGD + LARS, the official recipe), ``"adamw"`` or ``"sgd"``.
        lr, final_lr_ratio, weight_decay, momentum, trust_coefficient, warmup_epochs: the per-step schedule.
        lr_reference_batch: ``lr`` is per this many 2D samples and scales linearly with the global 2D batch
            (batch x processes x accumulation), SwAV/DeepCluster-V2's rule (0.6 per 256, 4.8 at 4096); ``None``
            takes ``lr`` as it is.
        exclude_bias_and_norm: biases and normalisation parameters get no weight decay and no LARS adaptation.
        channels_last: run the 2D backbone in channels-last memory format (faster convolutions on GPU).
        seed: seeds the per-epoch k-means (the run's global seed is ``seed_everything``'s).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained_backbone: str | None = None,
        multi_level: bool = True,
        d_model: int = 640,
        num_slices: int = 64,
        num_layers: int = 4,
        heads: int = 8,
        dim_head: int = 64,
        ffn_hidden: int = 720,
        dropout: float = 0.1,
        attention_layout: Literal["slices", "code"] = "slices",
        downsample_factor: int = 4,
        offset_scale: float = 2.0,
        offset_kernel_size: int = 6,
        clustering: Clustering = "deepcluster",
        prototypes_2d: list[int] = [3000, 3000, 3000],  # noqa: B006 - jsonargparse needs a literal default
        prototypes_3d: list[int] = [4, 4, 4],  # noqa: B006
        projection_hidden: int = 2048,
        projection_dim: int = 128,
        small_crops: int = 0,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue_length: int = 0,
        queue_length_3d: int = 0,
        queue_start_epoch: int = 0,
        freeze_prototypes_steps: int = 313,
        kmeans_iterations: int = 10,
        kmeans_backend: Literal["torch", "faiss"] = "torch",
        kmeans_precision: Literal["float32", "bfloat16"] = "float32",
        mask_ratio: float = 0.1,
        mask_trains_encoder: bool = False,
        lambda_intra: float = 1.0,
        lambda_inter: float = 1.0,
        lambda_mask: float = 1.0,
        schedule: Literal["joint", "curriculum"] = "joint",
        curriculum_epochs: tuple[int, int] = (1, 1),
        optimizer: Literal["lars", "adamw", "sgd"] = "lars",
        lr: float = 0.6,
        lr_reference_batch: int | None = 256,
        final_lr_ratio: float = 0.001,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        warmup_epochs: float = 10.0,
        exclude_bias_and_norm: bool = True,
        channels_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        if small_crops < 0:
            raise ValueError(f"small_crops must be >= 0, got {small_crops}")
        self.architecture = SliceModelConfig.from_mapping(self.hparams)
        self.encoder, self.transformer = self.architecture.build(pretrained_backbone)
        self.masked_model = MaskedSliceModel(self.transformer, d_model)
        self.projection_2d = ProjectionHead(d_model, projection_hidden, projection_dim)
        self._check_head_settings()
        self.clustering_2d = self._make_clustering(
            projection_dim, prototypes_2d, queue_length, num_views=2 + small_crops
        )
        self.clustering_3d = self._make_clustering(d_model, prototypes_3d, queue_length_3d)
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)

    def _check_head_settings(self) -> None:
        """A setting of the other clustering head would be accepted and ignored: refuse it instead."""
        hp = self.hparams
        if hp.clustering not in HEAD_SETTINGS:
            raise ValueError(f"clustering must be 'swav' or 'deepcluster', got {hp.clustering!r}")
        defaults = inspect.signature(JointSSL.__init__).parameters
        other = "deepcluster" if hp.clustering == "swav" else "swav"
        ignored = [name for name in HEAD_SETTINGS[other] if hp[name] != defaults[name].default]
        if ignored:
            given = ", ".join(f"{name}={hp[name]!r}" for name in ignored)
            default = ", ".join(f"{name}={defaults[name].default!r}" for name in ignored)
            raise ValueError(
                f"{given}: {'SwAV' if other == 'swav' else 'DeepCluster-V2'} settings, which "
                f"clustering={hp.clustering!r} does not use; remove them (from the config too) or give their "
                f"defaults ({default}), or set clustering={other!r}"
            )

    def _make_clustering(
        self, dim: int, prototypes: list[int], queue_length: int, num_views: int = 2
    ) -> ClusteringHead:
        """The configured head over ``num_views`` views, of which the first two (the large ones) are assigned."""
        hp = self.hparams
        views = dict(num_views=num_views, assign_views=2)
        if hp.clustering == "swav":
            return SwAVClustering(
                dim,
                prototypes,
                temperature=hp.temperature,
                epsilon=hp.epsilon,
                sinkhorn_iterations=hp.sinkhorn_iterations,
                queue_length=queue_length,
                queue_start_epoch=hp.queue_start_epoch,
                freeze_steps=hp.freeze_prototypes_steps,
                **views,
            )
        if hp.clustering == "deepcluster":
            return DeepClusterV2Clustering(
                dim,
                prototypes,
                temperature=hp.temperature,
                kmeans_iterations=hp.kmeans_iterations,
                backend=hp.kmeans_backend,
                precision=hp.kmeans_precision,
                **views,
            )
        raise ValueError(f"clustering must be 'swav' or 'deepcluster', got {hp.clustering!r}")

    @property
    def heads(self) -> tuple[ClusteringHead, ClusteringHead]:
        """The 2D (slice) and 3D (volume) clustering heads."""
        return self.clustering_2d, self.clustering_3d

    # ----------------------------------------------------------------------------------------------- wiring
    def setup(self, stage: str) -> None:
        if stage == "fit":
            datamodule = self.trainer.datamodule
            sizes = (datamodule.num_slice_samples, datamodule.num_volume_samples)
            for head, size in zip(self.heads, sizes):
                if size:  # a branch without data (e.g. 2D images only) has nothing to remember
                    head.allocate(size)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_state" in checkpoint:
            set_rng_state(checkpoint["rng_state"])

    def stage_weights(self, epoch: int) -> tuple[float, float, float]:
        """(lambda_intra, lambda_inter, lambda_mask) in effect at ``epoch``."""
        hp = self.hparams
        if hp.schedule == "joint":
            return hp.lambda_intra, hp.lambda_inter, hp.lambda_mask
        first, second = hp.curriculum_epochs
        if epoch < first:
            return hp.lambda_intra, 0.0, 0.0
        if epoch < first + second:
            return 0.0, 0.0, hp.lambda_mask
        return 0.0, hp.lambda_inter, 0.0

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def embed_slices(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, d_model) slice embeddings."""
        return self.encoder(self._images(images))

    def extract_features(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` -> ``(pooled backbone features, labels)``, for ``agreement.callbacks.
        KNNProbeCallback`` (an online kNN monitor of the 2D branch)."""
        images, labels = batch
        return self.encoder.pooled_features(self._images(images)), labels

    def slice_tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, H, W) volumes -> (B, S, d_model) slice tokens."""
        batch, _, slices, height, width = volumes.shape
        images = volumes.transpose(1, 2).reshape(batch * slices, 1, height, width)
        return self.embed_slices(images).view(batch, slices, -1)

    def embed_volumes(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, H, W) -> (B, d_model) unit-norm volume embeddings."""
        return self.transformer.volume_embedding(self.slice_tokens(volumes))

    # ---------------------------------------------------------------------------------------------- training
    def on_train_start(self) -> None:
        banks = [head.memory for head in self.heads if head.memory is not None]
        if banks and not any(bank.num_filled for bank in banks):  # a resumed run has its banks already
            self.init_memory()

    @torch.no_grad()
    def init_memory(self) -> None:
        """Fill the DeepCluster-V2 memory banks with one pass over the training data before the first step.

        Without it the first k-means has nothing to cluster, every target is -1 and the whole first epoch
        trains nothing (DeepCluster-V2's ``init_memory``). The pass runs on copies of the training samplers,
        so the training order is the same as without it; the modules keep their training mode, as there.
        """
        loaders = self.trainer.train_dataloader
        loaders = loaders if isinstance(loaders, dict) else {"slices": loaders}
        self.encoder.train(not self.encoder_frozen(self.current_epoch))
        with self.trainer.precision_plugin.forward_context():
            for key, head in zip(("slices", "volumes"), self.heads):
                if head.memory is None or key not in loaders:
                    continue
                for batch in _sampler_copy(loaders[key]):
                    batch = self._on_device(batch)
                    if key == "slices":
                        views = self._slice_views(batch, small=False)
                    else:
                        size = batch["view1"].shape[0]
                        tokens = self.slice_tokens(torch.cat([batch["view1"], batch["view2"]]))
                        views = list(self.transformer.volume_embedding(tokens).split(size))
                    head.memory.update(batch["index"], [v.float() for v in views])

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def on_train_epoch_start(self) -> None:
        seed = self.hparams.seed + 1000 * self.current_epoch
        for head, head_seed in zip(self.heads, (seed, seed + 500)):
            head.on_epoch_start(self.current_epoch, head_seed)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for head in self.heads:
            head.after_backward(self.global_step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        for head in self.heads:
            head.before_step()
        # A frozen encoder (the curriculum's mask stage) must not drift its BatchNorm statistics either.
        self.encoder.train(not self.encoder_frozen(self.current_epoch))

    def encoder_frozen(self, epoch: int) -> bool:
        """Whether no loss in effect at ``epoch`` trains the slice encoder."""
        w_intra, w_inter, w_mask = self.stage_weights(epoch)
        return w_intra == 0 and w_inter == 0 and (w_mask == 0 or not self.hparams.mask_trains_encoder)

    def _slice_views(self, slices: dict[str, torch.Tensor], small: bool = True) -> list[torch.Tensor]:
        """The L2-normalised projections of the 2D views, one (B, projection_dim) tensor per view: the two large
        views, then (with ``small``) the ``small_crops`` small ones."""
        batch = slices["view1"].shape[0]
        groups = [torch.cat([slices["view1"], slices["view2"]])]
        small_views = slices.get("small_views")
        given = 0 if small_views is None else small_views.shape[1]
        if given != self.hparams.small_crops:
            raise ValueError(
                f"the 2D batch has {given} small views per sample but the model was built for small_crops="
                f"{self.hparams.small_crops}; give the data and the model the same number"
            )
        if small and given:
            groups.append(small_views.transpose(0, 1).flatten(0, 1))  # view-major, like the large views
        # One backbone pass per resolution, as SwAV's multi-crop forward does.
        embeddings = torch.cat([self.embed_slices(images) for images in groups])
        z = nn.functional.normalize(self.projection_2d(embeddings), dim=1)
        return list(z.split(batch))

    def _intra_loss(self, slices: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.clustering_2d(self._slice_views(slices), slices["index"])

    def _volume_losses(
        self, volumes: dict[str, torch.Tensor], need_inter: bool, need_mask: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        batch, _, slices = volumes["view1"].shape[:3]
        encoder_grad = need_inter or self.hparams.mask_trains_encoder
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            tokens = self.slice_tokens(torch.cat([volumes["view1"], volumes["view2"]]))
        inter = mask_loss = None
        if need_inter:
            z = self.transformer.volume_embedding(tokens)
            inter = self.clustering_3d(list(z.split(batch)), volumes["index"])
        if need_mask:
            # The same slices are masked in both views of a volume, as in the official code.
            mask = random_slice_mask(batch, slices, self.hparams.mask_ratio, device=tokens.device).repeat(
                2, 1
            )
            inputs = tokens if self.hparams.mask_trains_encoder else tokens.detach()
            predictions = self.masked_model(inputs, mask)
            mask_loss = masked_embedding_regression(predictions, tokens.detach(), mask)
        return inter, mask_loss

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        w_intra, w_inter, w_mask = self.stage_weights(self.current_epoch)
        total = torch.zeros((), device=self.device)
        logs: dict[str, torch.Tensor] = {}
        if w_intra > 0 and batch.get("slices") is not None:
            intra = self._intra_loss(batch["slices"])
            total = total + w_intra * intra
            logs["train/loss_intra"] = intra.detach()
        if (w_inter > 0 or w_mask > 0) and batch.get("volumes") is not None:
            inter, mask_loss = self._volume_losses(batch["volumes"], w_inter > 0, w_mask > 0)
            if inter is not None:
                total = total + w_inter * inter
                logs["train/loss_inter"] = inter.detach()
            if mask_loss is not None:
                total = total + w_mask * mask_loss
                logs["train/loss_mask"] = mask_loss.detach()
        logs["train/loss"] = total.detach()
        batch_size = next(iter(batch.values()))["index"].shape[0]
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=batch_size)
        return total

    def cluster_assignments(self) -> list[torch.Tensor]:
        """Current k-means assignments per head (2D heads first); empty for SwAV."""
        return [assignment for head in self.heads for assignment in head.cluster_assignments()]

    # --------------------------------------------------------------------------------------------- optimiser
    def global_batch_size(self) -> int:
        """2D samples per optimizer step over all processes (volumes when there are no 2D samples)."""
        loaders = self.trainer.train_dataloader
        if isinstance(loaders, dict):
            loaders = loaders.get("slices") or loaders["volumes"]
        return loaders.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))  # also loads the training data
        lr = scaled_lr(hp.lr, self.global_batch_size(), hp.lr_reference_batch)
        optimizer = build_optimizer(
            parameter_groups(self, hp.exclude_bias_and_norm),
            name=hp.optimizer,
            lr=lr,
            weight_decay=hp.weight_decay,
            momentum=hp.momentum,
            trust_coefficient=hp.trust_coefficient,
        )
        warmup_steps = round(hp.warmup_epochs * steps_per_epoch(self.trainer))
        scheduler = WarmupCosineSchedule(optimizer, warmup_steps, total_steps, hp.final_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _sampler_copy(loader: DataLoader) -> DataLoader:
    """A loader over the same data and batches as ``loader`` whose sampler is a copy, so that iterating it leaves
    the training sampler's state (passes, epoch) untouched."""
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=copy.copy(loader.sampler),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        drop_last=loader.drop_last,
    )
