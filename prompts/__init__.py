"""PromptSRC self-regulated prompt tuning of CLIP models (open_clip), with baselines and evaluation protocols."""

from agreement.clip import build_clip
from prompts.checkpoint import load_prompts, save_prompts
from prompts.data import FewShotDataModule
from prompts.gpa import PromptAggregator, gpa_weights
from prompts.losses import promptsrc_loss, scl_feature_loss, scl_logits_loss
from prompts.model import PromptedCLIP, frozen_text_features
from prompts.module import IVLP, CoOp, KgCoOp, PromptCLIPModule, PromptSRC, ZeroShotCLIP
from prompts.splits import generate_fewshot, split_base_novel, subsample_classes

__all__ = [
    "IVLP",
    "CoOp",
    "FewShotDataModule",
    "KgCoOp",
    "PromptAggregator",
    "PromptCLIPModule",
    "PromptSRC",
    "PromptedCLIP",
    "ZeroShotCLIP",
    "build_clip",
    "frozen_text_features",
    "generate_fewshot",
    "gpa_weights",
    "load_prompts",
    "promptsrc_loss",
    "save_prompts",
    "scl_feature_loss",
    "scl_logits_loss",
    "split_base_novel",
    "subsample_classes",
]
