"""LightningModules: PromptSRC and its baselines (zero-shot CLIP, CoOp, IVLP, KgCoOp) on open_clip models.

All share the model building, the optimiser (SGD over the prompts only), the per-epoch schedule (one constant
warm-up epoch, then cosine indexed from epoch 1 with T = max_epochs, as in the official Dassl scheduler), the
accuracy metric and the checkpoint contents (prompts and method state only: the frozen CLIP weights are rebuilt from
``model_name``/``pretrained``, so checkpoints stay small and cannot silently carry another backbone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from agreement.clip import build_clip
from agreement.optim import build_optimizer
from agreement.schedules import WarmupCosineSchedule
from prompts.gpa import PromptAggregator, gpa_weights
from prompts.losses import kgcoop_loss, promptsrc_loss
from prompts.model import PromptedCLIP, frozen_text_features
from prompts.templates import PROMPTSRC_TEMPLATES, dataset_template

Precision = Literal["auto", "fp32", "fp16", "bf16"]


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX), not by emulation."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


class PromptCLIPModule(pl.LightningModule):
    """Common base: builds the frozen open_clip model and the prompts, trains with SGD, evaluates top-1 accuracy.

    ``compute_loss`` is the cross-entropy; methods with more terms override it. ``classnames`` may be given here
    or are taken from the datamodule's ``train_classnames`` at ``setup``; ``set_eval_classnames`` switches the
    label space before a test. The defaults are IVLP's and PromptSRC's prompts (4 vectors, depth 9 in both
    towers); subclasses change what differs and forward the rest (``**kwargs``).
    """

    trainable = True

    def __init__(
        self,
        model_name: str = "ViT-B-16-quickgelu",
        pretrained: str | None = None,
        classnames: list[str] | None = None,
        n_ctx: int = 4,
        text_depth: int = 9,
        vision_depth: int = 9,
        ctx_init: str = "a photo of a",
        class_specific: bool = False,
        lr: float = 0.0025,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        bundle = build_clip(model_name, pretrained)
        self.model_name, self.weights = bundle.model_name, bundle.weights
        self.tokenizer = bundle.tokenizer
        self.preprocess_cfg = bundle.preprocess_cfg
        self.model = PromptedCLIP(
            bundle.model,
            None,
            n_ctx=n_ctx,
            depth=0,
            ctx_init=ctx_init,
            text_depth=text_depth,
            vision_depth=vision_depth,
            class_specific=class_specific,
            template=self._template_for(None) if text_depth == 0 else None,
            tokenizer=bundle.tokenizer,
        )
        self.model.clip.eval()
        self.dataset_name: str | None = None
        self.test_accuracy = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.strict_loading = (
            False  # frozen CLIP weights are not in our checkpoints; prompts are checked below
        )
        if classnames:
            self.set_classnames(classnames)

    # ------------------------------------------------------------------ label spaces
    def _template_for(self, dataset: str | None) -> str | None:
        return None

    def set_classnames(self, classnames: Sequence[str], dataset: str | None = None) -> None:
        self.dataset_name = dataset
        self.model.set_classnames(classnames, template=self._template_for(dataset))

    def set_eval_classnames(self, classnames: Sequence[str], dataset: str | None = None) -> None:
        self.set_classnames(classnames, dataset)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and datamodule is not None and getattr(datamodule, "train_classnames", None):
            self.set_classnames(datamodule.train_classnames, getattr(datamodule, "dataset_name", None))

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.clip.eval()  # frozen towers never switch to training behaviour (dropout, patch dropout)
        return self

    # ------------------------------------------------------------------ steps
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the prompted logits (IVLP, CoOp); methods with more terms override it."""
        loss = F.cross_entropy(self(images).float(), labels)
        return {"ce": loss, "loss": loss}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.compute_loss(batch["image"], batch["label"])
        batch_size = batch["label"].shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=batch_size)
        return terms["loss"]

    def _accuracy_step(self, batch: dict[str, Any], metric: MeanMetric, name: str) -> None:
        logits = self(batch["image"])
        correct = (logits.argmax(-1) == batch["label"]).float()
        metric.update(correct)
        self.log(name, metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=correct.shape[0])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._accuracy_step(batch, self.val_accuracy, "val/acc")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._accuracy_step(batch, self.test_accuracy, "test/acc")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.model.prompt_parameters().values() if p.requires_grad]
        if not params:
            return None
        hp = self.hparams
        optimizer = build_optimizer(
            params, "sgd", lr=hp.lr, weight_decay=hp.weight_decay, momentum=hp.momentum
        )
        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        factor = hp.warmup_lr / hp.lr if hp.lr > 0 else 1.0
        # Dassl's recipe: a constant rate during warm-up, then a cosine over max_epochs from the warm-up's end.
        scheduler = WarmupCosineSchedule(
            optimizer,
            hp.warmup_epochs,
            max_epochs,
            warmup="constant",
            constant_factor=factor,
            decay_steps=max_epochs,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ checkpoints
    def _frozen_keys(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        return [k for k in state_dict if k.startswith("model.clip.")]

    def prompt_meta(self) -> dict[str, object]:
        return {"class": type(self).__name__, "model_name": self.model_name, **self.model.describe()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in self._frozen_keys(state):
            del state[key]
        checkpoint["prompts_meta"] = self.prompt_meta()
        checkpoint["classnames"] = list(self.model.classnames)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("prompts_meta")
        if meta is None:
            raise ValueError("checkpoint has no prompt metadata: it was not written by a prompts module")
        mine = self.prompt_meta()
        differ = {k: (meta.get(k), v) for k, v in mine.items() if meta.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"checkpoint was made for another architecture or prompt shape ({detail})")
        if self.model.class_specific and checkpoint.get("classnames") and not self.model.classnames:
            self.model.set_classnames(checkpoint["classnames"])
        expected = {f"model.{k}": v for k, v in self.model.prompt_parameters().items()}
        state = checkpoint["state_dict"]
        for key in self._frozen_keys(state):
            del state[key]  # tolerate full checkpoints; the frozen weights come from the configured model
        for key, value in expected.items():
            if key not in state or tuple(state[key].shape) != tuple(value.shape):
                got = tuple(state[key].shape) if key in state else "missing"
                raise ValueError(
                    f"checkpoint prompt {key} has shape {got}, this model needs {tuple(value.shape)}"
                )


class IVLP(PromptCLIPModule):
    """Independent vision-language prompting: deep prompts in both towers (the base's defaults), CE loss."""


class PromptSRC(IVLP):
    """PromptSRC: IVLP's prompts trained with CE plus the self-regulating constraints, and GPA.

    Loss = CE + text_weight * L1(g_p, g) + image_weight * L1(f_p, f) + logits_weight * KL(z || z_p) / (B*C), with
    ``g`` the 60-template mean of frozen text features (cached per class list) and ``f``/``z`` from the same CLIP
    model without prompts. GPA averages the prompts after each epoch with Gaussian weights over epochs
    1..``gpa_epochs`` (default ``max_epochs``) and loads the aggregate at the end of training.
    ``frozen_precision``: precision of the frozen teacher passes (``"auto"``: bf16 where the GPU or CPU computes
    it natively; see ``frozen_context``).
    Other arguments go to :class:`PromptCLIPModule`.
    """

    def __init__(
        self,
        text_weight: float = 25.0,
        image_weight: float = 10.0,
        logits_weight: float = 1.0,
        gpa: bool = True,
        gpa_mean: float = 15.0,
        gpa_std: float = 1.0,
        gpa_epochs: int | None = None,
        frozen_precision: Precision = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self._teacher_text: dict[tuple, torch.Tensor] = {}
        self.aggregator: PromptAggregator | None = None
        if gpa and gpa_epochs is not None:
            self.aggregator = PromptAggregator(gpa_weights(gpa_epochs, gpa_mean, gpa_std))

    @property
    def regularised(self) -> bool:
        hp = self.hparams
        return bool(hp.text_weight or hp.image_weight or hp.logits_weight)

    def teacher_text_features(self) -> torch.Tensor:
        """Frozen 60-template text features of the current classes, computed once per class list and device."""
        key = (tuple(self.model.classnames), str(self.device))
        if key not in self._teacher_text:
            self._teacher_text[key] = frozen_text_features(
                self.model.clip, self.tokenizer, self.model.classnames, PROMPTSRC_TEMPLATES
            )
        return self._teacher_text[key]

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        image_features = self.model.encode_image(images)
        text_features = self.model.encode_text()
        logits = self.model.logits(image_features, text_features)
        if not self.regularised:
            return promptsrc_loss(logits, labels, text_weight=0, image_weight=0, logits_weight=0)
        frozen_text = self.teacher_text_features() if hp.text_weight or hp.logits_weight else None
        frozen_image = frozen_logits = None
        if hp.image_weight or hp.logits_weight:
            with self.frozen_context():
                frozen_image = self.model.clip.encode_image(images).float()
        if hp.logits_weight:
            frozen_logits = self.model.logits(frozen_image, frozen_text)
        return promptsrc_loss(
            logits,
            labels,
            prompted_text=text_features,
            frozen_text=frozen_text,
            prompted_image=image_features,
            frozen_image=frozen_image,
            frozen_logits=frozen_logits,
            text_weight=hp.text_weight,
            image_weight=hp.image_weight,
            logits_weight=hp.logits_weight,
        )

    # ------------------------------------------------------------------ frozen passes
    def frozen_context(self):
        """No autograd graph, and reduced precision where the hardware computes it natively, for the teacher
        passes: ``"auto"`` is bf16 on GPUs that support it (fp16 otherwise) and on CPUs with bfloat16 matrix
        instructions (AVX512-BF16 or AMX; fp32 otherwise). The teacher features are targets of L1 and KL terms,
        so bf16's 3 significant digits are far below what the terms measure."""
        precision = self.hparams.frozen_precision
        device = self.device.type
        if precision == "auto":
            if device == "cuda":
                precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            else:
                precision = "bf16" if device == "cpu" and native_cpu_bf16() else "fp32"
        if precision == "fp32" or device not in ("cuda", "cpu"):
            return torch.no_grad()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(
            torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        )
        return stack

    # ------------------------------------------------------------------ GPA
    def _ensure_aggregator(self) -> None:
        if not self.hparams.gpa or self.aggregator is not None:
            return
        epochs = self.hparams.gpa_epochs or int(self.trainer.max_epochs or 0)
        if epochs < 1:
            raise ValueError("GPA needs gpa_epochs or a finite trainer.max_epochs")
        self.aggregator = PromptAggregator(gpa_weights(epochs, self.hparams.gpa_mean, self.hparams.gpa_std))

    def on_fit_start(self) -> None:
        self._ensure_aggregator()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # after the last optimiser step of the epoch, as in the official trainer
        if self.aggregator is None or batch_idx + 1 != self.trainer.num_training_batches:
            return
        epoch = self.current_epoch + 1
        if epoch <= self.aggregator.num_epochs:
            self.aggregator.add(epoch, self.model.prompt_parameters())

    def on_fit_end(self) -> None:
        # At the end of fit rather than of training, so that resuming a run whose training had already ended
        # (Lightning then skips the training loop) also ends with the aggregate.
        if self.aggregator is not None and self.aggregator.epochs:
            self.load_aggregated_prompts()

    @torch.no_grad()
    def load_aggregated_prompts(self) -> None:
        if not self.aggregator.complete:
            pl.utilities.rank_zero_warn(
                f"GPA covered epochs {sorted(self.aggregator.epochs)} of 1..{self.aggregator.num_epochs}; "
                "using the renormalised partial aggregate"
            )
        params = self.model.prompt_parameters()
        for name, value in self.aggregator.aggregate().items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.aggregator is not None:
            checkpoint["gpa"] = self.aggregator.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "gpa" in checkpoint and self.hparams.gpa:
            weights = checkpoint["gpa"]["weights"]
            if self.aggregator is None:
                self.aggregator = PromptAggregator(
                    gpa_weights(len(weights), self.hparams.gpa_mean, self.hparams.gpa_std)
                )
            self.aggregator.load_state_dict(checkpoint["gpa"])


class CoOp(PromptCLIPModule):
    """CoOp: learnable text context only (shared or class-specific), CE loss. Other arguments go to
    :class:`PromptCLIPModule`."""

    def __init__(self, n_ctx: int = 16, ctx_init: str = "", lr: float = 0.002, **kwargs: Any) -> None:
        super().__init__(n_ctx=n_ctx, ctx_init=ctx_init, lr=lr, text_depth=1, vision_depth=0, **kwargs)


class KgCoOp(CoOp):
    """KgCoOp: CoOp (4 context vectors from "a photo of a") plus ``weight * (1 - mean cos(g_p, g_hand))`` with
    ``g_hand`` the frozen text features of the dataset's hand-crafted template."""

    def __init__(
        self, n_ctx: int = 4, ctx_init: str = "a photo of a", kg_weight: float = 8.0, **kwargs: Any
    ) -> None:
        super().__init__(n_ctx=n_ctx, ctx_init=ctx_init, **kwargs)
        self.save_hyperparameters()
        self._hand_crafted: dict[tuple, torch.Tensor] = {}

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        text_features = self.model.encode_text()
        logits = self.model.logits(self.model.encode_image(images), text_features)
        key = (tuple(self.model.classnames), self.dataset_name, str(self.device))
        if key not in self._hand_crafted:
            template = dataset_template(self.dataset_name)
            self._hand_crafted[key] = frozen_text_features(
                self.model.clip, self.tokenizer, self.model.classnames, (template,)
            )
        ce = F.cross_entropy(logits, labels)
        kg = kgcoop_loss(text_features, self._hand_crafted[key])
        return {"ce": ce, "kg": kg, "loss": ce + self.hparams.kg_weight * kg}


class ZeroShotCLIP(PromptCLIPModule):
    """Zero-shot CLIP with one hand-crafted template per dataset (``template`` overrides it); nothing trains."""

    trainable = False

    def __init__(
        self,
        model_name: str = "ViT-B-16-quickgelu",
        pretrained: str | None = None,
        classnames: list[str] | None = None,
        template: str | None = None,
    ) -> None:
        self._fixed_template = template
        super().__init__(
            model_name=model_name, pretrained=pretrained, classnames=classnames, text_depth=0, vision_depth=0
        )
        self.save_hyperparameters()

    def _template_for(self, dataset: str | None) -> str:
        return self._fixed_template or dataset_template(dataset)

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise RuntimeError("ZeroShotCLIP has nothing to train")
