"""PromptSRC self-regulated prompt tuning of CLIP models (open_clip), with baselines and evaluation protocols."""
