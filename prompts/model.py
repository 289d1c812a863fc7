"""Independent vision-language deep prompts on an open_clip CLIP model (the IVLP architecture used by PromptSRC).

The towers are re-run block by block because prompts enter inside them:

- text: layer-0 context vectors sit right after the start token (positions 1..n_ctx) of
  ``"<ctx_init> <class>."``; blocks 1..J-1 overwrite those positions with their own prompts; features are read at
  the end-of-text token.
- vision: layer-0 prompts are appended after the patch tokens, after the positional embedding and before
  ``ln_pre``; blocks 1..J-1 replace the last ``n_ctx`` tokens with their own prompts; features are read at the class
  token.

With depth 0 on both sides the forward is exactly open_clip's ``encode_text`` / ``encode_image``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from prompts.templates import PROMPTSRC_TEMPLATES


def _seq_first(block: nn.Module) -> bool:
    """open_clip < 2.26 ran blocks sequence-first; from 2.26 on they are batch-first (NLD)."""
    attn = getattr(block, "attn", None)
    return isinstance(attn, nn.MultiheadAttention) and not attn.batch_first


def _run_block(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One block on sequence-first tokens ``(L, N, D)``, whichever layout the block runs in."""
    if _seq_first(block):
        return block(x, attn_mask=attn_mask)
    # keyword: a positional second argument would be taken as k_x
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


def run_towers_sequence_first(clip_model: nn.Module) -> bool:
    """Switch both towers of an open_clip CLIP to the sequence-first layout (LND), as the original CLIP code runs.

    In open_clip's batch-first layout ``nn.MultiheadAttention`` transposes its input, and with autograd on CPU the
    input projection of that non-contiguous tensor runs as a batched matmul over a copied weight, a third of a
    prompt-tuning step. Sequence-first blocks get contiguous tokens instead. open_clip's own ``encode_image`` /
    ``encode_text`` give the same results in both layouts (its ``Transformer`` transposes when
    ``batch_first`` is false). Returns False, changing nothing, when a block's attention is not a
    ``nn.MultiheadAttention``.
    """
    towers = (clip_model.transformer, clip_model.visual.transformer)
    blocks = [block for tower in towers for block in tower.resblocks]
    if not all(isinstance(getattr(block, "attn", None), nn.MultiheadAttention) for block in blocks):
        return False
    for tower in towers:
        tower.batch_first = False
    for block in blocks:
        block.attn.batch_first = False
    return True


def check_clip_model(clip_model: nn.Module) -> None:
    """PromptedCLIP needs open_clip's ``CLIP`` class with a ViT image tower pooled at the class token."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "visual")
    if not all(hasattr(clip_model, name) for name in needed):
        raise TypeError(
            "PromptedCLIP needs an open_clip CLIP model with the built-in text transformer "
            f"(got {type(clip_model).__name__}; CustomTextCLIP/CoCa/SigLIP text towers are not supported)"
        )
    visual = clip_model.visual
    if not hasattr(visual, "class_embedding") or not hasattr(visual, "conv1"):
        raise TypeError(
            "vision prompts need a ViT image tower (open_clip VisionTransformer), not a ResNet/timm one"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise TypeError(
            "PromptedCLIP supports ViTs pooled at the class token (pool_type='tok', no attention pool)"
        )
    if getattr(clip_model, "text_pool_type", "argmax") not in ("argmax", "eos"):
        raise TypeError(f"unsupported text pooling {clip_model.text_pool_type!r}")


def _is_causal(mask: torch.Tensor | None) -> bool:
    """An additive mask with -inf exactly above the diagonal and 0 elsewhere (open_clip's text mask)."""
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    above = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[above]).all()) and bool((mask[~above] == 0).all())


def _normal(shape: Sequence[int], std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


class PromptedCLIP(nn.Module):
    """A frozen open_clip CLIP model with learnable deep text and vision prompts.

    ``text_prompts[i]`` / ``vision_prompts[i]`` hold the prompts of layer ``i``; ``text_prompts[0]`` are the context
    vectors after the start token, shape ``(n_ctx, width)`` or ``(classes, n_ctx, width)`` when
    ``class_specific``. ``depth`` sets both depths; ``text_depth`` / ``vision_depth`` override it (0 = no prompts on
    that side). With ``text_depth == 0`` the class prompts are ``template.format(class)``. ``sequence_first``
    switches the CLIP towers to the sequence-first layout (:func:`run_towers_sequence_first`; same results,
    faster on CPU); false keeps open_clip's layout.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        classnames: Sequence[str] | None = None,
        n_ctx: int = 4,
        depth: int = 9,
        ctx_init: str = "a photo of a",
        *,
        text_depth: int | None = None,
        vision_depth: int | None = None,
        vision_n_ctx: int | None = None,
        class_specific: bool = False,
        template: str | None = None,
        tokenizer=None,
        prompt_std: float = 0.02,
        sequence_first: bool = True,
    ) -> None:
        super().__init__()
        check_clip_model(clip_model)
        self.clip = clip_model
        self.sequence_first = sequence_first and run_towers_sequence_first(clip_model)
        for parameter in self.clip.parameters():
            parameter.requires_grad_(False)
        self.text_depth = depth if text_depth is None else text_depth
        self.vision_depth = depth if vision_depth is None else vision_depth
        self.n_ctx = n_ctx
        self.vision_n_ctx = n_ctx if vision_n_ctx is None else vision_n_ctx
        self.class_specific = class_specific
        self.ctx_init = (ctx_init or "").replace("_", " ").strip()
        self.prompt_std = prompt_std
        text_layers = len(clip_model.transformer.resblocks)
        vision_layers = len(clip_model.visual.transformer.resblocks)
        for side, value, layers in (
            ("text", self.text_depth, text_layers),
            ("vision", self.vision_depth, vision_layers),
        ):
            if not 0 <= value <= layers:
                raise ValueError(f"{side} prompt depth must lie in [0, {layers}] for this model, got {value}")
        if (self.text_depth and n_ctx < 1) or (self.vision_depth and self.vision_n_ctx < 1):
            raise ValueError("n_ctx must be at least 1 when prompts are used")
        context_length = clip_model.positional_embedding.shape[0]
        self.tokenizer = tokenizer or SimpleTokenizer(context_length=context_length)
        self.text_width = clip_model.transformer.width
        self.vision_width = clip_model.visual.transformer.width

        ctx_vectors, self.prompt_prefix = self._initial_context()
        self.text_prompts = nn.ParameterList()
        if self.text_depth > 0 and not class_specific:
            self.text_prompts.append(nn.Parameter(ctx_vectors))
        self._ctx_init_vectors = (
            ctx_vectors  # kept to initialise class-specific contexts once classes are known
        )
        self._text_deep = [_normal((n_ctx, self.text_width), prompt_std) for _ in range(1, self.text_depth)]
        if not class_specific:
            self.text_prompts.extend(self._text_deep)
        self.vision_prompts = nn.ParameterList(
            [_normal((self.vision_n_ctx, self.vision_width), prompt_std) for _ in range(self.vision_depth)]
        )
        self.template = template or (f"{self.prompt_prefix} {{}}." if self.text_depth else "a photo of a {}.")
        self.classnames: list[str] = []
        self.text_length = context_length  # tokens the text tower runs on (set with the class names)
        self.register_buffer("tokens", torch.zeros(0, context_length, dtype=torch.long), persistent=False)
        self.register_buffer(
            "token_embeds", torch.zeros(0, context_length, self.text_width), persistent=False
        )
        if classnames is not None:
            self.set_classnames(classnames)

    # ------------------------------------------------------------------ text side
    def _initial_context(self) -> tuple[torch.Tensor, str]:
        """Layer-0 context: token embeddings of ``ctx_init`` if it has at least ``n_ctx`` tokens, else random."""
        if self.text_depth == 0:
            return torch.zeros(0), self.ctx_init or "a photo of a"
        if self.ctx_init:
            tokens = self.tokenizer([self.ctx_init])
            length = int(tokens.argmax(-1)[0]) - 1  # BPE tokens between start and end token
            if length >= self.n_ctx:
                with torch.no_grad():
                    embedding = self.clip.token_embedding(tokens.to(self.clip.token_embedding.weight.device))
                return embedding[0, 1 : 1 + self.n_ctx].detach().float().cpu().clone(), self.ctx_init
        return torch.randn(self.n_ctx, self.text_width) * self.prompt_std, " ".join(["X"] * self.n_ctx)

    def set_classnames(self, classnames: Sequence[str], template: str | None = None) -> None:
        """Tokenise the class prompts of a label space (train, base, novel or a target dataset)."""
        names = [str(name).replace("_", " ") for name in classnames]
        if not names:
            raise ValueError("PromptedCLIP.set_classnames: empty class-name list")
        if self.class_specific and self.text_depth > 0:
            if len(self.text_prompts) == 0:
                ctx = self._ctx_init_vectors.unsqueeze(0).repeat(len(names), 1, 1)
                self.text_prompts.append(nn.Parameter(ctx.to(self.clip.token_embedding.weight.device)))
                self.text_prompts.extend(self._text_deep)
            elif self.text_prompts[0].shape[0] != len(names):
                raise ValueError(
                    f"class-specific contexts were learnt for {self.text_prompts[0].shape[0]} classes and cannot "
                    f"describe {len(names)} other classes (use a shared context for base-to-novel transfer)"
                )
        if template is not None:
            self.template = template
        device = self.clip.token_embedding.weight.device
        tokens = self.tokenizer([self.template.format(name) for name in names]).to(device)
        with torch.no_grad():
            embeds = self.clip.token_embedding(tokens).float()
        self.classnames = names
        self.tokens = tokens
        self.token_embeds = embeds
        # Under a causal mask no token after the end-of-text token reaches the features read there, so the text
        # tower runs on the tokens up to the last class prompt's end (about 10 of 77 for short prompts).
        causal = _is_causal(getattr(self.clip, "attn_mask", None))
        self.text_length = int(self._eot_index().max()) + 1 if causal else tokens.shape[1]

    def _eot_index(self) -> torch.Tensor:
        if getattr(self.clip, "text_pool_type", "argmax") == "eos":
            return (self.tokens == self.clip.text_eos_id).int().argmax(-1)
        return self.tokens.argmax(-1)

    def encode_text(self, normalize: bool = False) -> torch.Tensor:
        """Prompted text features of the current classes, ``(C, embed_dim)``."""
        if not self.classnames:
            raise RuntimeError("PromptedCLIP: call set_classnames(...) before encoding text")
        clip = self.clip
        dtype = clip.transformer.get_cast_dtype()
        length = self.text_length
        x = self.token_embeds[:, :length].to(dtype)
        num_classes, n = x.shape[0], self.n_ctx
        if self.text_depth > 0:
            ctx = self.text_prompts[0].to(dtype)
            if ctx.ndim == 2:
                ctx = ctx.unsqueeze(0).expand(num_classes, -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1 + n :]], dim=1)
        x = (x + clip.positional_embedding[:length].to(dtype)).transpose(0, 1).contiguous()  # (L, C, D)
        attn_mask = None if clip.attn_mask is None else clip.attn_mask[:length, :length]
        for i, block in enumerate(clip.transformer.resblocks):
            if 1 <= i < self.text_depth:
                deep = self.text_prompts[i].to(x.dtype).unsqueeze(1).expand(-1, num_classes, -1)
                x = torch.cat([x[:1], deep, x[1 + n :]], dim=0)
            x = _run_block(block, x, attn_mask=attn_mask)
        x = clip.ln_final(x.transpose(0, 1))
        x = x[torch.arange(num_classes, device=x.device), self._eot_index()]
        projection = clip.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ vision side
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Prompted image features, ``(B, embed_dim)``."""
        visual = self.clip.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)
        batch, n = x.shape[0], self.vision_n_ctx
        if self.vision_depth > 0:  # no positional embedding on prompts; they do pass through ln_pre
            x = torch.cat([x, self.vision_prompts[0].to(x.dtype).unsqueeze(0).expand(batch, -1, -1)], dim=1)
        x = visual.ln_pre(x).transpose(0, 1).contiguous()  # (L, B, D)
        for i, block in enumerate(visual.transformer.resblocks):
            if 1 <= i < self.vision_depth:
                deep = self.vision_prompts[i].to(x.dtype).unsqueeze(1).expand(-1, batch, -1)
                x = torch.cat([x[:-n], deep], dim=0)
            x = _run_block(block, x)
        pooled = visual.ln_post(x[0])
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    # ------------------------------------------------------------------ both
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """``exp(logit_scale) * cos(image, text)``, inputs normalised here."""
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        return self.logit_scale.float() * image_features @ text_features.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_image(images), self.encode_text())

    def prompt_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors, by name (``text_prompts.i`` / ``vision_prompts.i``)."""
        named = {f"text_prompts.{i}": p for i, p in enumerate(self.text_prompts)}
        named.update({f"vision_prompts.{i}": p for i, p in enumerate(self.vision_prompts)})
        return named

    def num_prompt_parameters(self) -> int:
        return sum(p.numel() for p in self.prompt_parameters().values())

    def describe(self) -> dict[str, object]:
        """Shape metadata stored with checkpoints so that a mismatched prompt file is refused clearly."""
        return {
            "n_ctx": self.n_ctx,
            "vision_n_ctx": self.vision_n_ctx,
            "text_depth": self.text_depth,
            "vision_depth": self.vision_depth,
            "text_width": self.text_width,
            "vision_width": self.vision_width,
            "class_specific": self.class_specific,
        }


@torch.no_grad()
def frozen_text_features(
    clip_model: nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str] = PROMPTSRC_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """PromptSRC's textually diverse teacher: for each class the mean of the *unnormalised* frozen text features
    over ``templates`` (normalised only at use), ``(C, embed_dim)`` in float32."""
    device = clip_model.token_embedding.weight.device
    texts = [t.format(str(name).replace("_", " ")) for name in classnames for t in templates]
    features = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size]).to(device)
        features.append(clip_model.encode_text(tokens).float())
    stacked = torch.cat(features).view(len(classnames), len(templates), -1)
    return stacked.mean(dim=1)
