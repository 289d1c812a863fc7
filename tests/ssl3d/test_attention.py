import importlib.metadata
import math

import pytest
import torch
import torch.nn.functional as F

from agreement.losses import masked_embedding_regression
from ssl3d.attention import (
    ContinuousPositionBias,
    DeformableSliceAttention,
    MaskedSliceModel,
    SliceTransformer,
    SliceTransformerLayer,
    load_from_deformable_attention1d,
    random_slice_mask,
)

da = pytest.importorskip("deformable_attention")
_PKG_VERSION = tuple(int(p) for p in importlib.metadata.version("deformable-attention").split(".")[:3])
# 0.0.18 sampled only the centre column; the oracle needs the fixed sampling.
needs_fixed_package = pytest.mark.skipif(_PKG_VERSION < (0, 0, 19), reason="deformable-attention < 0.0.19")


def _package_key(name):
    table = {
        "offset_conv.": "to_offsets.0.",
        "offset_proj.": "to_offsets.2.",
        "rel_pos_bias.fc1.": "rel_pos_bias.mlp.0.0.",
        "rel_pos_bias.fc2.": "rel_pos_bias.mlp.1.0.",
        "rel_pos_bias.fc3.": "rel_pos_bias.mlp.2.",
    }
    for ours, theirs in table.items():
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return name


def _randomise(module, generator):
    # Default init keeps offsets and the position bias small; larger weights there exercise fractional and
    # out-of-range sampling and many bias pieces, while the projections keep outputs of order one.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(("to_offsets", "rel_pos_bias")):
                p.copy_(torch.randn(p.shape, generator=generator))


def _pair(batch, slices, dim, layout, **kwargs):
    kwargs = {"offset_scale": 2.0, **kwargs}  # the package defaults offset_scale to downsample_factor
    channels = slices if layout == "code" else dim
    pkg = da.DeformableAttention1D(dim=channels, **kwargs)
    _randomise(pkg, torch.Generator().manual_seed(1))
    ours = DeformableSliceAttention(
        dim, layout=layout, num_slices=slices if layout == "code" else None, **kwargs
    )
    load_from_deformable_attention1d(ours, pkg)
    return pkg, ours


def _run_package(pkg, x, layout):
    return pkg(x) if layout == "code" else pkg(x.transpose(1, 2)).transpose(1, 2)


CASES = [
    (2, 32, 64, "slices", {}),
    (2, 32, 64, "code", {}),
    (
        3,
        12,
        48,
        "slices",
        dict(heads=4, dim_head=16, downsample_factor=2, offset_kernel_size=4, offset_scale=1.5),
    ),
    (1, 8, 40, "code", dict(heads=2, dim_head=8)),
    (2, 4, 32, "slices", dict(heads=4, dim_head=8)),  # a single sampled key (N' = 1)
    (2, 16, 32, "slices", dict(heads=4, dim_head=8, cpb_log_distance=False)),
]


@needs_fixed_package
@pytest.mark.parametrize(("batch", "slices", "dim", "layout", "kwargs"), CASES)
def test_matches_package_outputs_and_gradients(batch, slices, dim, layout, kwargs):
    torch.manual_seed(0)
    pkg, ours = _pair(batch, slices, dim, layout, **kwargs)
    x = torch.randn(batch, slices, dim)
    x_ours, x_pkg = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_pkg = ours(x_ours), _run_package(pkg, x_pkg, layout)
    assert y_ours.shape == (batch, slices, dim)
    torch.testing.assert_close(y_ours, y_pkg, atol=1e-5, rtol=1e-5)

    weight = torch.randn_like(y_pkg)
    (y_ours * weight).sum().backward()
    (y_pkg * weight).sum().backward()
    _assert_grad_close(x_ours.grad, x_pkg.grad, "input")
    theirs = dict(pkg.named_parameters())
    for name, p in ours.named_parameters():
        _assert_grad_close(p.grad, theirs[_package_key(name)].grad, name)


def _assert_grad_close(ours, theirs, name):
    # Gradients sum many fp32 terms; both implementations sit ~1e-5 (relative to the largest entry) from an
    # fp64 evaluation, so compare on that scale.
    scale = max(1.0, theirs.abs().max().item())
    torch.testing.assert_close(ours, theirs, atol=5e-5 * scale, rtol=0, msg=lambda m: f"{name}: {m}")


def test_sampled_key_count():
    attn = DeformableSliceAttention(64)
    assert attn.num_sampled(32) == 8
    assert attn.num_sampled(64) == 16
    assert attn.num_sampled(4) == 1
    assert attn.num_sampled(3) == 0


def _package_cpb(hidden, log_distance):
    from deformable_attention.deformable_attention_1d import CPB

    return CPB(hidden, heads=1, offset_groups=1, depth=2, log_distance=log_distance)


@pytest.mark.parametrize("log_distance", [True, False])
def test_position_bias_matches_mlp_on_degenerate_weights(log_distance):
    hidden = 12
    ours = ContinuousPositionBias(hidden, log_distance=log_distance)
    ref = _package_cpb(hidden, log_distance)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape))
        w1, b1 = ref.mlp[0][0].weight, ref.mlp[0][0].bias
        w1[0] = 0.0  # constant unit, no kink
        w1[1], b1[1] = w1[2], b1[2]  # coinciding kinks
        w1[3], b1[3] = 0.0, 0.0
        ref.mlp[1][0].weight[4] = 0.0  # second-layer unit constant in the input
    theirs = {
        "fc1.weight": ref.mlp[0][0].weight,
        "fc1.bias": ref.mlp[0][0].bias,
        "fc2.weight": ref.mlp[1][0].weight,
        "fc2.bias": ref.mlp[1][0].bias,
        "fc3.weight": ref.mlp[2].weight,
        "fc3.bias": ref.mlp[2].bias,
    }
    ours.load_state_dict({k: v.detach() for k, v in theirs.items()})
    query = torch.linspace(-1, 1, 33)
    keys = torch.randn(3, 40) * 3  # spans every piece, both tails included
    k_ours, k_ref = keys.clone().requires_grad_(), keys.clone().requires_grad_()
    out = ours(query, k_ours)
    expected = ref(query, k_ref)[:, 0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    _assert_grad_close(k_ours.grad, k_ref.grad, "key positions")
    for name, p in ours.named_parameters():
        _assert_grad_close(p.grad, theirs[name].grad, name)


def test_slices_layout_mixes_information_across_slices():
    attn = DeformableSliceAttention(32, heads=4, dim_head=8).eval()
    x = torch.randn(2, 16, 32)
    x2 = x.clone()
    x2[:, 0] += 1.0
    diff = (attn(x2) - attn(x)).abs().amax(dim=(0, 2))
    assert (diff[1:] > 1e-4).all()


def test_code_layout_needs_matching_num_slices():
    with pytest.raises(ValueError, match="num_slices"):
        DeformableSliceAttention(64, layout="code")
    attn = DeformableSliceAttention(64, layout="code", num_slices=16, heads=4, dim_head=8)
    assert attn(torch.randn(2, 16, 64)).shape == (2, 16, 64)
    with pytest.raises(ValueError, match="16 slices"):
        attn(torch.randn(2, 8, 64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dim=30, heads=4), "divisible"),
        (dict(dim=32, layout="rows"), "layout"),
        (dict(dim=32, downsample_factor=4, offset_kernel_size=5), "even"),
        (dict(dim=32, downsample_factor=4, offset_kernel_size=2), "downsample_factor"),
        (dict(dim=2, heads=1), ">= 4"),
    ],
)
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeformableSliceAttention(**kwargs)


def test_bad_inputs_raise():
    attn = DeformableSliceAttention(32, heads=4, dim_head=8, downsample_factor=4, offset_kernel_size=8)
    with pytest.raises(ValueError, match=r"\(batch, slices, dim\)"):
        attn(torch.randn(16, 32))
    with pytest.raises(ValueError, match="last dim 32"):
        attn(torch.randn(2, 16, 31))
    with pytest.raises(ValueError, match="too short"):
        attn(torch.randn(2, 1, 32))
    model = SliceTransformer(d_model=32, num_layers=1, heads=4, dim_head=8, ffn_hidden=16)
    with pytest.raises(ValueError, match="batch, slices"):
        model(torch.randn(2, 3, 4, 32))
    with pytest.raises(ValueError, match="d_model=32"):
        model(torch.randn(2, 8, 16))


def test_loading_from_mismatched_package_module_raises():
    ours = DeformableSliceAttention(64)
    with pytest.raises(ValueError, match="shapes"):
        load_from_deformable_attention1d(ours, da.DeformableAttention1D(dim=64, heads=8, dim_head=32))


@pytest.mark.parametrize("layout", ["slices", "code"])
def test_gradients_reach_every_parameter(layout):
    attn = DeformableSliceAttention(32, heads=4, dim_head=8, layout=layout, num_slices=16)
    attn(torch.randn(2, 16, 32)).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name == "rel_pos_bias.fc3.bias":
            # A constant added to every logit cancels in the softmax: the true gradient is zero.
            assert p.grad.abs().max() < 1e-4
        else:
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("layout", ["slices", "code"])
def test_bfloat16_autocast_stays_close_to_fp32(layout):
    attn = DeformableSliceAttention(64, heads=4, dim_head=16, layout=layout, num_slices=32)
    x = torch.randn(2, 32, 64, requires_grad=True)
    reference = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x)
    low.float().square().sum().backward()
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.1
    assert torch.isfinite(x.grad).all()


def test_layer_is_post_norm():
    layer = SliceTransformerLayer(32, heads=4, dim_head=8, ffn_hidden=24, dropout=0.1).eval()
    x = torch.randn(2, 12, 32)
    y = layer.norm1(x + layer.attn(x))
    expected = layer.norm2(y + layer.ffn(y))
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("layout", ["slices", "code"])
def test_transformer_shapes_and_unit_volume_embedding(layout):
    model = SliceTransformer(
        d_model=32, num_layers=2, heads=4, dim_head=8, ffn_hidden=24, layout=layout, num_slices=16
    )
    tokens = torch.randn(3, 16, 32)
    assert model(tokens).shape == (3, 16, 32)
    emb = model.eval().volume_embedding(tokens)
    assert emb.shape == (3, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb, F.normalize(model(tokens).mean(1), dim=-1))


def _masked_model():
    transformer = SliceTransformer(d_model=32, num_layers=1, heads=4, dim_head=8, ffn_hidden=24, dropout=0.0)
    return MaskedSliceModel(transformer, 32).eval()


def test_masked_model_replaces_exactly_the_masked_slices():
    model = _masked_model()
    tokens = torch.randn(2, 16, 32)
    mask = random_slice_mask(2, 16, ratio=0.25, generator=torch.Generator().manual_seed(0))
    pred = model(tokens, mask)
    assert pred.shape == tokens.shape

    changed = tokens.clone()
    changed[mask] = torch.randn(int(mask.sum()), 32) * 10
    torch.testing.assert_close(model(changed, mask), pred)  # masked inputs are never seen

    changed = tokens.clone()
    changed[~mask] += 1.0
    assert not torch.allclose(model(changed, mask), pred)

    manual = torch.where(mask[..., None], model.mask_token, tokens)
    torch.testing.assert_close(pred, model.decoder(model.transformer(manual)))


def test_masked_model_trains_mask_token_and_checks_inputs():
    model = _masked_model().train()
    tokens = torch.randn(2, 16, 32)
    mask = random_slice_mask(2, 16)
    masked_embedding_regression(model(tokens, mask), tokens, mask).backward()
    assert model.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mask"):
        model(tokens, mask[:, :8])
    with pytest.raises(ValueError, match="mask"):
        model(tokens, mask.float())
    with pytest.raises(ValueError, match="d_model"):
        MaskedSliceModel(model.transformer, 16)


@pytest.mark.parametrize(("num_slices", "ratio"), [(64, 0.1), (10, 0.3), (32, 0.5), (7, 0.01), (5, 1.0)])
def test_mask_has_ceil_ratio_slices_per_volume(num_slices, ratio):
    mask = random_slice_mask(6, num_slices, ratio=ratio)
    expected = max(1, math.ceil(round(num_slices * ratio, 9)))
    assert mask.dtype == torch.bool and mask.shape == (6, num_slices)
    assert (mask.sum(dim=1) == expected).all()


def test_mask_is_uniform_and_reproducible():
    gen = torch.Generator().manual_seed(3)
    mask = random_slice_mask(4000, 8, ratio=0.25, generator=gen)
    freq = mask.float().mean(dim=0)
    assert (freq - 0.25).abs().max() < 0.03
    again = random_slice_mask(4000, 8, ratio=0.25, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask, again)
    assert torch.equal(
        MaskedSliceModel.random_slice_mask(2, 8, 0.25, torch.Generator().manual_seed(3)), again[:2]
    )
    with pytest.raises(ValueError, match="ratio"):
        random_slice_mask(2, 8, ratio=0.0)
