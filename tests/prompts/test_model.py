import copy

import pytest
import torch

from prompts.model import PromptedCLIP, _seq_first, frozen_text_features
from prompts.templates import PROMPTSRC_TEMPLATES
from tests.prompts.tiny import NAMES, tiny_clip


def _prompted(bundle, **kwargs):
    return PromptedCLIP(bundle.model, NAMES, tokenizer=bundle.tokenizer, **kwargs).eval()


def test_sequence_first_towers_give_open_clips_results_and_gradients():
    bundle = tiny_clip()  # not the shared bundle: prompting switches its towers' layout
    assert not _seq_first(bundle.model.transformer.resblocks[0])  # the pinned open_clip builds batch-first
    kept = PromptedCLIP(copy.deepcopy(bundle.model), NAMES, tokenizer=bundle.tokenizer, depth=3,
                        sequence_first=False)  # fmt: skip
    switched = PromptedCLIP(bundle.model, NAMES, tokenizer=bundle.tokenizer, depth=3)
    assert not kept.sequence_first and not _seq_first(kept.clip.visual.transformer.resblocks[0])
    assert switched.sequence_first
    assert all(
        _seq_first(b)
        for t in (bundle.model.transformer, bundle.model.visual.transformer)
        for b in t.resblocks
    )
    switched.load_state_dict(kept.state_dict())  # the same prompts
    images = torch.randn(3, 3, 32, 32)
    logits = {}
    for name, model in (("kept", kept), ("switched", switched)):
        logits[name] = model(images)
        logits[name].logsumexp(-1).sum().backward()
    torch.testing.assert_close(logits["switched"], logits["kept"], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(kept.prompt_parameters().items(), switched.prompt_parameters().values()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # open_clip's own encoders are unchanged by the switch
        torch.testing.assert_close(switched.clip.encode_image(images), kept.clip.encode_image(images))
        tokens = bundle.tokenizer(NAMES)
        torch.testing.assert_close(switched.clip.encode_text(tokens), kept.clip.encode_text(tokens))


def test_zero_depth_equals_plain_open_clip(tiny_bundle):
    model = _prompted(tiny_bundle, depth=0)
    images = torch.randn(3, 3, 32, 32)
    clip = tiny_bundle.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), clip.encode_image(images), rtol=1e-5, atol=1e-6
        )
        tokens = tiny_bundle.tokenizer([f"a photo of a {n}." for n in NAMES])
        torch.testing.assert_close(model.encode_text(), clip.encode_text(tokens), rtol=1e-5, atol=1e-6)
    assert model.num_prompt_parameters() == 0


@pytest.mark.parametrize("depth", [0, 3])
def test_text_tower_stops_at_the_last_end_token_with_the_same_features_and_gradients(tiny_bundle, depth):
    # float64, so that the comparison sees the maths and not the summation order of fp32 products
    model = PromptedCLIP(
        copy.deepcopy(tiny_bundle.model), tokenizer=tiny_bundle.tokenizer, depth=depth
    ).double()
    model.set_classnames(["cat", "a much longer class name with many words"])
    model.token_embeds = model.token_embeds.double()
    full_length = model.clip.positional_embedding.shape[0]
    assert model.text_length == int(model.tokens.argmax(-1).max()) + 1 < full_length
    results = {}
    for length in (model.text_length, full_length):
        model.text_length = length
        model.zero_grad()
        features = model.encode_text()
        if depth:
            features.pow(2).sum().backward()
        results[length] = features.detach(), [p.grad.clone() for p in model.text_prompts]
    (short, short_grads), (full, full_grads) = results.values()
    torch.testing.assert_close(short, full, rtol=1e-12, atol=1e-12)
    assert len(short_grads) == depth
    for a, b in zip(short_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_text_tower_runs_every_token_without_a_causal_mask(tiny_bundle):
    model = PromptedCLIP(copy.deepcopy(tiny_bundle.model), tokenizer=tiny_bundle.tokenizer, depth=2)
    model.clip.attn_mask = torch.zeros_like(model.clip.attn_mask)  # every token sees every other one
    model.set_classnames(NAMES)
    assert model.text_length == model.clip.positional_embedding.shape[0]


def test_prompt_shapes_and_ctx_init(tiny_bundle):
    model = _prompted(tiny_bundle, n_ctx=4, depth=3)
    assert len(model.text_prompts) == 3 and len(model.vision_prompts) == 3
    assert tuple(model.text_prompts[0].shape) == (4, 64) and tuple(model.vision_prompts[2].shape) == (4, 64)
    tokens = tiny_bundle.tokenizer(["a photo of a"])
    expected = tiny_bundle.model.token_embedding(tokens)[0, 1:5]
    torch.testing.assert_close(model.text_prompts[0].data, expected.detach())
    # with the init text the layer-0 prompt input is exactly the frozen "a photo of a <class>." embedding
    assert model.template == "a photo of a {}."
    assert not any(p.requires_grad for p in model.clip.parameters())


def _block_outputs(blocks):
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone())) for b in blocks]
    return outputs, hooks


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_vision_prompt_of_layer_i_acts_from_layer_i_on(tiny_bundle, layer):
    model = _prompted(tiny_bundle, depth=3)
    images = torch.randn(2, 3, 32, 32)
    blocks = model.clip.visual.transformer.resblocks
    before, hooks = _block_outputs(blocks)
    with torch.no_grad():
        model.encode_image(images)
        model.vision_prompts[layer].add_(1.0)
        model.encode_image(images)
    for h in hooks:
        h.remove()
    n = len(blocks)
    first, second = before[:n], before[n:]
    for i in range(n):
        same = torch.equal(first[i], second[i])
        assert same == (i < layer), (
            f"block {i} output {'unchanged' if same else 'changed'} for prompt {layer}"
        )


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_text_prompt_of_layer_i_acts_from_layer_i_on(tiny_bundle, layer):
    model = _prompted(tiny_bundle, depth=3)
    blocks = model.clip.transformer.resblocks
    before, hooks = _block_outputs(blocks)
    with torch.no_grad():
        model.encode_text()
        model.text_prompts[layer].add_(1.0)
        model.encode_text()
    for h in hooks:
        h.remove()
    n = len(blocks)
    for i in range(n):
        same = torch.equal(before[i], before[n + i])
        assert same == (i < layer)
    # the causal mask keeps the start token independent of every prompt (blocks run sequence-first)
    torch.testing.assert_close(before[n - 1][0], before[2 * n - 1][0])


def test_vision_prompts_have_no_positional_embedding_and_pass_ln_pre(tiny_bundle):
    model = _prompted(tiny_bundle, depth=1)
    seen = {}
    hook = model.clip.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.update(inp=i[0].detach()))
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, 32, 32))
    hook.remove()
    torch.testing.assert_close(seen["inp"][:, -4:], model.vision_prompts[0].detach().expand(2, -1, -1))
    assert seen["inp"].shape[1] == 1 + 16 + 4


def test_gradients_reach_prompts_only(tiny_bundle):
    model = _prompted(tiny_bundle, depth=2)
    logits = model(torch.randn(2, 3, 32, 32))
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prompt_parameters().values())
    assert all(p.grad is None for p in model.clip.parameters())


def test_depth_beyond_layers_is_refused(tiny_bundle):
    with pytest.raises(ValueError, match="depth must lie in"):
        _prompted(tiny_bundle, depth=4)


def test_class_specific_context_cannot_describe_other_classes(tiny_bundle):
    model = _prompted(tiny_bundle, depth=1, vision_depth=0, class_specific=True)
    assert tuple(model.text_prompts[0].shape) == (len(NAMES), 4, 64)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, len(NAMES))
    with pytest.raises(ValueError, match="class-specific"):
        model.set_classnames(["one", "two"])


def test_frozen_text_features_are_mean_of_unnormalised(tiny_bundle):
    clip = tiny_bundle.model.eval()
    feats = frozen_text_features(clip, tiny_bundle.tokenizer, NAMES[:2], PROMPTSRC_TEMPLATES)
    assert len(PROMPTSRC_TEMPLATES) == 60 and PROMPTSRC_TEMPLATES[0] == "a photo of a {}."
    with torch.no_grad():
        direct = clip.encode_text(tiny_bundle.tokenizer([t.format("dog") for t in PROMPTSRC_TEMPLATES])).mean(
            0
        )
    torch.testing.assert_close(feats[1], direct, rtol=1e-5, atol=1e-5)
