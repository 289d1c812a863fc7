import math

import pytest
import torch
import torch.nn.functional as F

from prompts.losses import kgcoop_loss, promptsrc_loss, scl_feature_loss, scl_logits_loss


def _inputs(b=4, c=3, d=8):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        prompted_logits=r(b, c) * 3,
        labels=torch.tensor([0, 2, 1, 2])[:b],
        prompted_text=r(c, d),
        frozen_text=r(c, d),
        prompted_image=r(b, d),
        frozen_image=r(b, d),
        frozen_logits=r(b, c) * 3,
    )


def test_terms_match_formulas():
    x = _inputs()
    out = promptsrc_loss(**x)
    n = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
    ce = -torch.log_softmax(x["prompted_logits"], 1)[torch.arange(4), x["labels"]].mean()
    text = (n(x["prompted_text"]) - n(x["frozen_text"])).abs().mean()
    image = (n(x["prompted_image"]) - n(x["frozen_image"])).abs().mean()
    p = torch.softmax(x["frozen_logits"], 1)
    q = torch.softmax(x["prompted_logits"], 1)
    kl = (p * (p.log() - q.log())).sum() / (4 * 3)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["scl_text"], text)
    torch.testing.assert_close(out["scl_image"], image)
    torch.testing.assert_close(out["scl_logits"], kl)
    torch.testing.assert_close(out["loss"], ce + 25 * text + 10 * image + kl)


def test_kl_direction_and_scaling_match_the_official_statement():
    x = _inputs()
    official = (
        F.kl_div(
            F.log_softmax(x["prompted_logits"], 1),
            F.log_softmax(x["frozen_logits"], 1),
            reduction="sum",
            log_target=True,
        )
        / x["prompted_logits"].numel()
    )
    torch.testing.assert_close(scl_logits_loss(x["prompted_logits"], x["frozen_logits"]), official)
    reverse = scl_logits_loss(x["frozen_logits"], x["prompted_logits"])
    assert not math.isclose(
        float(reverse), float(official), rel_tol=1e-3
    )  # KL is asymmetric: direction matters
    batchmean = F.kl_div(
        F.log_softmax(x["prompted_logits"], 1),
        F.log_softmax(x["frozen_logits"], 1),
        reduction="batchmean",
        log_target=True,
    )
    torch.testing.assert_close(official * 3, batchmean)  # divided by B*C, not by B


def test_frozen_side_gets_no_gradient_and_terms_are_switchable():
    x = {k: (v.requires_grad_() if v.is_floating_point() else v) for k, v in _inputs().items()}
    out = promptsrc_loss(**x, text_weight=0.0, image_weight=0.0, logits_weight=1.0)
    assert set(out) == {"ce", "scl_logits", "loss"}
    out["loss"].backward()
    assert x["frozen_logits"].grad is None and x["prompted_logits"].grad is not None
    only_ce = promptsrc_loss(x["prompted_logits"], x["labels"])
    assert set(only_ce) == {"ce", "loss"}
    weights = promptsrc_loss(
        **{k: v.detach() for k, v in x.items()}, text_weight=2.0, image_weight=0.5, ce_weight=0.0
    )
    torch.testing.assert_close(
        weights["loss"], 2 * weights["scl_text"] + 0.5 * weights["scl_image"] + weights["scl_logits"]
    )


def test_feature_loss_normalises_and_kgcoop_term():
    a = torch.randn(5, 8)
    assert float(scl_feature_loss(a, 3 * a)) == pytest.approx(0.0, abs=1e-6)
    assert float(kgcoop_loss(a, 2 * a)) == pytest.approx(0.0, abs=1e-6)
    assert float(kgcoop_loss(a, -a)) == pytest.approx(2.0, abs=1e-6)


def test_frozen_passes_keep_no_autograd_graph():
    from benchmarks.prompts import _saved_bytes
    from prompts.module import IVLP, PromptSRC
    from tests.prompts.tiny import NAMES, TINY

    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    kwargs = {"model_name": TINY, "classnames": NAMES, "text_depth": 2, "vision_depth": 2}
    ivlp, src = (
        _saved_bytes(IVLP(**kwargs), images, labels),
        _saved_bytes(PromptSRC(**kwargs), images, labels),
    )
    # the regularisers only add their (B x C, C x D, B x D) loss inputs, not a second tower's activations
    assert ivlp < src < ivlp * 1.02


@pytest.mark.parametrize(
    ("precision", "native", "expected"),
    [
        ("fp32", True, None),
        ("bf16", False, torch.bfloat16),
        ("auto", True, torch.bfloat16),
        ("auto", False, None),
    ],
)
def test_frozen_teacher_pass_precision_on_cpu(monkeypatch, precision, native, expected):
    from prompts import module as prompt_module
    from prompts.module import PromptSRC
    from tests.prompts.tiny import NAMES, TINY

    monkeypatch.setattr(prompt_module, "native_cpu_bf16", lambda: native)
    model = PromptSRC(
        model_name=TINY, classnames=NAMES, text_depth=2, vision_depth=2, frozen_precision=precision
    )
    images = torch.rand(4, 3, 32, 32)
    with model.frozen_context():
        assert not torch.is_grad_enabled()
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        teacher = model.model.clip.encode_image(images).float()
    assert dtype == expected
    with torch.no_grad():
        exact = model.model.clip.encode_image(images).float()
    if expected is None:
        torch.testing.assert_close(teacher, exact)
    else:  # bf16 teacher features: the same direction to a few parts in a thousand
        assert float(F.cosine_similarity(teacher, exact).min()) > 0.995
