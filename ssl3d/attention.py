"""Deformable self-attention over the slices of a volume, and the slice Transformer built on it.

A volume is a stack of per-slice 2D embeddings ``(batch, slices, dim)``. The slice Transformer mixes them
with deformable 1D self-attention (every query attends to a few keys sampled at learned, offset positions,
plus a continuous position bias) and pools them into a unit-norm volume embedding.

The maths is written by hand because no library provides deformable attention over slices (the
``deformable-attention`` package has a generic channel-first 1D module; the tests use it only as an oracle).
The published model applied that module to ``(batch, slices, dim)`` unchanged, so it treated slices as
channels and attended along the embedding coordinates. ``layout="slices"`` attends over slices (the intended
model); ``layout="code"`` reproduces the published behaviour. Both match the package (0.0.19+) to float
rounding once its weights are loaded with :func:`load_from_deformable_attention1d`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "ContinuousPositionBias",
    "DeformableSliceAttention",
    "MaskedSliceModel",
    "SliceTransformer",
    "SliceTransformerLayer",
    "load_from_deformable_attention1d",
    "random_slice_mask",
]

Layout = Literal["slices", "code"]
_LAYOUTS = ("slices", "code")

# Our parameter names for the package's state-dict keys (shapes are identical).
_PACKAGE_KEY_MAP = {
    "to_offsets.0.": "offset_conv.",
    "to_offsets.2.": "offset_proj.",
    "rel_pos_bias.mlp.0.0.": "rel_pos_bias.fc1.",
    "rel_pos_bias.mlp.1.0.": "rel_pos_bias.fc2.",
    "rel_pos_bias.mlp.2.": "rel_pos_bias.fc3.",
}


def _check_tokens(x: Tensor, name: str = "tokens") -> None:
    if not isinstance(x, Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (batch, slices, dim) tensor, got {shape}")


def _normalize_positions(pos: Tensor, n: int) -> Tensor:
    # Map positions 0..n-1 to [-1, 1]; a single position maps to -1 rather than dividing by zero.
    return 2.0 * pos / max(n - 1, 1) - 1.0


def _interval_points(bounds: Tensor) -> Tensor:
    """One point strictly inside each of the ``len(bounds) + 1`` intervals cut by sorted ``bounds``."""
    if bounds.numel() == 0:
        return bounds.new_zeros(1)
    mids = 0.5 * (bounds[:-1] + bounds[1:])
    return torch.cat([bounds[:1] - 1.0, mids, bounds[-1:] + 1.0])


class ContinuousPositionBias(nn.Module):
    """Scalar MLP ``Linear(1, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, 1)`` (SwinV2-style bias).

    It is applied to every (query, key) pair, which is where a direct evaluation spends nearly all of the
    attention's time (an ``H x H`` matmul per pair). A ReLU MLP of one scalar is piecewise linear with at most
    ``H + H (H + 1)`` kinks, so we find the kinks from the weights, tabulate slope and intercept per piece and
    evaluate each pair with a binary search and one multiply-add. This is the same function (not an
    approximation); gradients reach the weights through the tables.
    """

    def __init__(self, hidden: int, *, log_distance: bool = True):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.log_distance = log_distance
        self.fc1 = nn.Linear(1, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 1)

    def _pieces(self) -> tuple[Tensor, Tensor, Tensor]:
        """Sorted kinks and per-piece (slope, intercept); piece ``i`` lies left of ``kinks[i]``."""
        w1, b1 = self.fc1.weight[:, 0], self.fc1.bias
        w3, b3 = self.fc3.weight[0], self.fc3.bias
        with torch.no_grad():
            kinks1 = -b1 / w1
            kinks1 = kinks1[torch.isfinite(kinks1)].sort().values
            on1 = (torch.outer(_interval_points(kinks1), w1) + b1 > 0).to(w1.dtype)
        # Inside first-layer piece r the second layer is affine in the input: z2 = a[r] * t + c[r].
        a = (on1 * w1) @ self.fc2.weight.t()
        c = (on1 * b1) @ self.fc2.weight.t() + self.fc2.bias
        with torch.no_grad():
            inf = kinks1.new_full((1,), math.inf)
            lo, hi = torch.cat([-inf, kinks1]), torch.cat([kinks1, inf])
            roots = -c / a
            inside = torch.isfinite(roots) & (roots > lo[:, None]) & (roots < hi[:, None])
            kinks = torch.cat([kinks1, roots[inside]]).sort().values
            points = _interval_points(kinks)
            piece1 = torch.searchsorted(kinks1, points)
        a, c = a[piece1], c[piece1]
        with torch.no_grad():
            on2 = (a * points[:, None] + c > 0).to(a.dtype)
        slope = (on2 * a) @ w3
        intercept = (on2 * c) @ w3 + b3
        return kinks, slope, intercept

    def forward(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        """Bias ``f(query_pos[i] - key_pos[b, j])``, shape ``(B, n, m)``; ``query_pos`` (n,) gets no gradient."""
        # Kinks and tables need full precision: under autocast the matmuls would round them to half.
        with torch.autocast(key_pos.device.type, enabled=False):
            kinks, slope, intercept = self._pieces()
            query_pos, key_pos = query_pos.to(slope.dtype), key_pos.to(slope.dtype)
            return _PiecewiseBias.apply(query_pos, key_pos, kinks, slope, intercept, self.log_distance)


class _PiecewiseBias(torch.autograd.Function):
    """Evaluate the tabulated piecewise-linear bias on all (query, key) pairs with a hand-written backward.

    Autograd over the same few elementwise ops keeps many pair-sized temporaries and scatters table gradients
    slowly; here the forward saves just the derivative, the (log) distance and the piece index.
    """

    @staticmethod
    def forward(ctx, query_pos, key_pos, kinks, slope, intercept, log_distance):
        rel = query_pos[:, None] - key_pos.unsqueeze(1)
        if log_distance:
            # sign(r) log(1 + |r|); its derivative is 1 / (1 + |r|).
            mag = rel.abs()
            t = torch.log1p(mag).copysign_(rel)
        else:
            t = rel
        piece = torch.searchsorted(kinks, t).view(-1)
        slope_at = slope.index_select(0, piece).view_as(t)
        out = torch.addcmul(intercept.index_select(0, piece).view_as(t), slope_at, t)
        deriv = slope_at.div_(mag.add_(1.0)) if log_distance else slope_at
        ctx.save_for_backward(deriv, t, piece)
        ctx.num_pieces = slope.numel()
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        deriv, t, piece = ctx.saved_tensors
        grad_key = grad_slope = grad_intercept = None
        if ctx.needs_input_grad[1]:
            grad_key = -(grad * deriv).sum(1)
        if ctx.needs_input_grad[3]:
            grad_slope = grad.new_zeros(ctx.num_pieces).index_add_(0, piece, (grad * t).view(-1))
        if ctx.needs_input_grad[4]:
            grad_intercept = grad.new_zeros(ctx.num_pieces).index_add_(0, piece, grad.reshape(-1))
        return None, grad_key, None, grad_slope, grad_intercept, None


class DeformableSliceAttention(nn.Module):
    """Deformable 1D self-attention; maps ``(batch, slices, dim)`` to the same shape.

    Per head ``h`` (heads = offset groups): ``q = Wq x``; offsets ``s * tanh(w^T GELU(DWConv(q_h)))`` on a grid
    downsampled by ``downsample_factor``; keys/values from ``x`` linearly sampled (zero padded) at the
    offset positions; logits ``q.k / sqrt(dim_head)`` plus a continuous position bias of the (log) distance
    between query and sampled key positions; output ``Wo concat_h(softmax . v) + bo``.

    ``layout="slices"``: slices are the tokens and ``dim`` the channels. ``layout="code"``: the published
    layout, ``(batch, slices, dim)`` read as channel-first, so the channels are the ``num_slices`` slices
    (required) and attention runs along the ``dim`` embedding coordinates; ``dim`` is then only checked.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        downsample_factor: int = 4,
        offset_scale: float = 2.0,
        offset_kernel_size: int = 6,
        cpb_log_distance: bool = True,
        dropout: float = 0.0,
        layout: Layout = "slices",
        num_slices: int | None = None,
    ):
        super().__init__()
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        if layout == "code" and num_slices is None:
            raise ValueError('layout="code" uses the slices as channels, so num_slices must be given')
        if num_slices is not None and num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        channels = num_slices if layout == "code" else dim
        if dim < 1 or heads < 1 or dim_head < 1:
            raise ValueError(f"dim, heads and dim_head must be >= 1, got {dim}, {heads}, {dim_head}")
        if channels % heads:
            what = "num_slices" if layout == "code" else "dim"
            raise ValueError(f"{what}={channels} (the channel count) must be divisible by heads={heads}")
        if channels < 4:
            raise ValueError(
                f"the channel count must be >= 4 (position-bias width is channels // 4), got {channels}"
            )
        if downsample_factor < 1 or offset_kernel_size < downsample_factor:
            raise ValueError(
                f"need 1 <= downsample_factor <= offset_kernel_size, got {downsample_factor}, {offset_kernel_size}"
            )
        if (offset_kernel_size - downsample_factor) % 2:
            raise ValueError("offset_kernel_size - downsample_factor must be even (symmetric padding)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        self.dim, self.channels, self.layout, self.num_slices = dim, channels, layout, num_slices
        self.heads, self.dim_head = heads, dim_head
        self.downsample_factor, self.offset_scale = downsample_factor, float(offset_scale)
        self.offset_kernel_size = offset_kernel_size
        self.padding = (offset_kernel_size - downsample_factor) // 2
        self.scale = dim_head**-0.5
        inner = heads * dim_head

        # Modules mirror the package's parameter shapes and default init; forward reshapes their weights.
        self.to_q = nn.Conv1d(channels, inner, 1, groups=heads, bias=False)
        self.to_k = nn.Conv1d(channels, inner, 1, groups=heads, bias=False)
        self.to_v = nn.Conv1d(channels, inner, 1, groups=heads, bias=False)
        self.to_out = nn.Conv1d(inner, channels, 1)
        self.offset_conv = nn.Conv1d(
            dim_head,
            dim_head,
            offset_kernel_size,
            groups=dim_head,
            stride=downsample_factor,
            padding=self.padding,
        )
        self.offset_proj = nn.Conv1d(dim_head, 1, 1, bias=False)
        self.rel_pos_bias = ContinuousPositionBias(channels // 4, log_distance=cpb_log_distance)
        self.attn_dropout = nn.Dropout(dropout)

    def num_sampled(self, length: int) -> int:
        """Number of sampled key positions for a sequence of ``length`` tokens."""
        return (length + 2 * self.padding - self.offset_kernel_size) // self.downsample_factor + 1

    def _check(self, x: Tensor) -> None:
        _check_tokens(x, "x")
        _, n, d = x.shape
        if d != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got {d}")
        if self.num_slices is not None and n != self.num_slices:
            raise ValueError(f"expected {self.num_slices} slices, got {n}")
        length = d if self.layout == "code" else n
        if self.num_sampled(length) < 1:
            raise ValueError(
                f"sequence of {length} is too short for offset_kernel_size={self.offset_kernel_size} "
                f"with downsample_factor={self.downsample_factor}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        # Work channel-first like the package: (batch, channels, length). For "code" the slices are the channels.
        xc = x if self.layout == "code" else x.transpose(1, 2)
        b, _, n = xc.shape
        h, dh, c = self.heads, self.dim_head, self.channels // self.heads

        q = F.conv1d(xc, self.to_q.weight, groups=h).view(b * h, dh, n)
        off = F.gelu(self.offset_conv(q))
        off = torch.tanh(F.conv1d(off, self.offset_proj.weight)) * self.offset_scale
        m = off.shape[-1]
        pos = _normalize_positions(torch.arange(m, device=x.device, dtype=off.dtype) + off.view(b * h, m), m)

        # Linear sampling along the sequence at pos (grid_sample convention, align_corners=False, zero padding).
        src = ((pos + 1.0) * n - 1.0) / 2.0
        i0 = src.detach().floor()
        w_hi = (src - i0).unsqueeze(1)
        w_lo = ((i0 + 1.0) - src).unsqueeze(1)
        xp = F.pad(xc.reshape(b * h, c, n), (1, 1))  # zero column at each end absorbs out-of-range taps
        lo = (i0.clamp(-1, n) + 1).long().unsqueeze(1).expand(b * h, c, m)
        hi = ((i0 + 1.0).clamp(-1, n) + 1).long().unsqueeze(1).expand(b * h, c, m)
        sampled = (w_lo * xp.gather(2, lo) + w_hi * xp.gather(2, hi)).view(b, self.channels, m)

        # Keys and values in one grouped conv: per head, dh key rows then dh value rows.
        w_kv = torch.stack([self.to_k.weight.view(h, dh, c), self.to_v.weight.view(h, dh, c)], dim=1)
        kv = F.conv1d(sampled, w_kv.view(2 * h * dh, c, 1), groups=h).view(b * h, 2, dh, m)
        k, v = kv[:, 0], kv[:, 1]

        grid_q = _normalize_positions(torch.arange(n, device=x.device, dtype=pos.dtype), n)
        bias = self.rel_pos_bias(grid_q, pos)  # (b * h, n, m)
        sim = torch.baddbmm(bias, q.transpose(1, 2), k, alpha=self.scale)
        attn = sim.softmax(dim=-1)
        if self.training and self.attn_dropout.p > 0:
            attn = self.attn_dropout(attn)
        out = torch.bmm(attn, v.transpose(1, 2))  # (b * h, n, dh)
        out = out.view(b, h, n, dh).permute(0, 2, 1, 3).reshape(b, n, h * dh)
        out = F.linear(out, self.to_out.weight.view(self.channels, h * dh), self.to_out.bias)
        return out.transpose(1, 2) if self.layout == "code" else out


def load_from_deformable_attention1d(module: DeformableSliceAttention, package_module: nn.Module) -> None:
    """Copy weights from ``deformable_attention.DeformableAttention1D`` (heads == offset groups, grouped q/kv).

    The package module must have been built with ``dim`` equal to ``module.channels`` and the same heads,
    dim_head and offset kernel; parameter shapes are identical, only some names differ.
    """
    state = {}
    for key, value in package_module.state_dict().items():
        for old, new in _PACKAGE_KEY_MAP.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        state[key] = value
    ours = module.state_dict()
    if state.keys() != ours.keys():
        raise ValueError(
            "package module does not match: unexpected "
            f"{sorted(state.keys() - ours.keys())}, missing {sorted(ours.keys() - state.keys())}"
        )
    bad = [k for k in ours if ours[k].shape != state[k].shape]
    if bad:
        raise ValueError(
            f"package module has different shapes for {bad} (check dim, heads, dim_head, kernel)"
        )
    module.load_state_dict(state)


class SliceTransformerLayer(nn.Module):
    """Post-norm layer as in the published code: ``Y = Drop(LN(X + DA(X)))``, ``Drop(LN(Y + FFN(Y)))``.

    ``dropout`` is the residual/FFN dropout; attention-weight dropout is an attention kwarg (default 0, as
    in the published code).
    """

    def __init__(
        self,
        d_model: int = 640,
        heads: int = 8,
        dim_head: int = 64,
        ffn_hidden: int = 720,
        dropout: float = 0.1,
        **attention_kwargs,
    ):
        super().__init__()
        self.attn = DeformableSliceAttention(d_model, heads=heads, dim_head=dim_head, **attention_kwargs)
        self.norm1 = nn.LayerNorm(d_model)
        self.drop1 = nn.Dropout(dropout)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_hidden, d_model),
        )
        self.norm2 = nn.LayerNorm(d_model)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.drop1(self.norm1(x + self.attn(x)))
        return self.drop2(self.norm2(y + self.ffn(y)))


class SliceTransformer(nn.Module):
    """Stack of :class:`SliceTransformerLayer` over per-slice embeddings ``(batch, slices, d_model)``."""

    def __init__(
        self,
        d_model: int = 640,
        num_layers: int = 4,
        heads: int = 8,
        dim_head: int = 64,
        ffn_hidden: int = 720,
        dropout: float = 0.1,
        layout: Layout = "slices",
        num_slices: int | None = None,
        downsample_factor: int = 4,
        offset_scale: float = 2.0,
        offset_kernel_size: int = 6,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.d_model = d_model
        self.layers = nn.ModuleList(
            SliceTransformerLayer(
                d_model,
                heads=heads,
                dim_head=dim_head,
                ffn_hidden=ffn_hidden,
                dropout=dropout,
                layout=layout,
                num_slices=num_slices,
                downsample_factor=downsample_factor,
                offset_scale=offset_scale,
                offset_kernel_size=offset_kernel_size,
            )
            for _ in range(num_layers)
        )

    def forward(self, tokens: Tensor) -> Tensor:
        _check_tokens(tokens)
        if tokens.shape[-1] != self.d_model:
            raise ValueError(f"expected tokens with d_model={self.d_model} features, got {tokens.shape[-1]}")
        for layer in self.layers:
            tokens = layer(tokens)
        return tokens

    @staticmethod
    def pool(outputs: Tensor) -> Tensor:
        """Volume embedding from transformed slice tokens: L2-normalised mean over slices."""
        _check_tokens(outputs, "outputs")
        return F.normalize(outputs.mean(dim=1), dim=-1)

    def volume_embedding(self, tokens: Tensor) -> Tensor:
        """Run the transformer on slice tokens ``(B, N, d)`` and pool to unit-norm ``(B, d)``."""
        return self.pool(self(tokens))


def random_slice_mask(
    batch: int,
    num_slices: int,
    ratio: float = 0.1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean ``(batch, num_slices)`` mask with exactly ``max(1, ceil(num_slices * ratio))`` True per row.

    The product is rounded to 9 decimals before the ceiling so that e.g. ``10 * 0.3`` masks 3, not 4.
    Slices are chosen uniformly at random (random permutation per row).
    """
    if batch < 1 or num_slices < 1:
        raise ValueError(f"batch and num_slices must be >= 1, got {batch}, {num_slices}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    count = max(1, math.ceil(round(num_slices * ratio, 9)))
    gen_device = generator.device if generator is not None else device
    order = torch.rand(batch, num_slices, generator=generator, device=gen_device).argsort(dim=1)
    mask = torch.zeros(batch, num_slices, dtype=torch.bool, device=gen_device)
    mask.scatter_(1, order[:, :count], True)
    return mask.to(device) if device is not None else mask


class MaskedSliceModel(nn.Module):
    """Masked slice-embedding prediction: masked slices are replaced by a learned token, then predicted.

    The mask token starts at N(0, 0.02), the BERT/MAE convention: near the origin it carries no slice
    content and does not dominate the attention logits at initialisation, and it is learned anyway.
    """

    random_slice_mask = staticmethod(random_slice_mask)

    def __init__(self, transformer: SliceTransformer, d_model: int):
        super().__init__()
        if transformer.d_model != d_model:
            raise ValueError(f"d_model={d_model} does not match the transformer's {transformer.d_model}")
        self.transformer = transformer
        self.d_model = d_model
        self.mask_token = nn.Parameter(torch.randn(d_model) * 0.02)
        self.decoder = nn.Linear(d_model, d_model)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        _check_tokens(tokens)
        if tokens.shape[-1] != self.d_model:
            raise ValueError(f"expected last dim {self.d_model}, got {tokens.shape[-1]}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be bool of shape {tuple(tokens.shape[:2])}, got {got}")
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        return self.decoder(self.transformer(x))
