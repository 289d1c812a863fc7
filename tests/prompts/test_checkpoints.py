import pytest
import torch

from agreement.clip import build_clip, check_model_name
from prompts.checkpoint import load_prompts, save_prompts
from prompts.model import PromptedCLIP
from prompts.module import PromptSRC
from tests.prompts.tiny import NAMES, TINY


def test_prompt_only_checkpoint_round_trip(tmp_path, tiny_bundle):
    model = PromptedCLIP(tiny_bundle.model, NAMES, depth=2, tokenizer=tiny_bundle.tokenizer)
    path = save_prompts(model, tmp_path / "p.safetensors")
    assert path.stat().st_size < 20_000  # prompts only, no CLIP weights
    other = PromptedCLIP(tiny_bundle.model, NAMES, depth=2, tokenizer=tiny_bundle.tokenizer)
    assert not torch.equal(other.vision_prompts[1], model.vision_prompts[1])
    load_prompts(other, path)
    for name, value in model.prompt_parameters().items():
        assert torch.equal(other.prompt_parameters()[name], value)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(other(images), model(images))


def test_prompt_checkpoint_of_other_shape_is_refused(tmp_path, tiny_bundle):
    model = PromptedCLIP(tiny_bundle.model, NAMES, depth=3, tokenizer=tiny_bundle.tokenizer)
    path = save_prompts(model, tmp_path / "p.safetensors")
    with pytest.raises(
        ValueError, match=r"another architecture or prompt shape.*text_depth: file 3 vs model 2"
    ):
        load_prompts(PromptedCLIP(tiny_bundle.model, NAMES, depth=2, tokenizer=tiny_bundle.tokenizer), path)


def test_lightning_checkpoint_of_other_prompt_shape_is_refused(tiny_bundle):
    module = PromptSRC(model_name=TINY, classnames=NAMES, text_depth=2, vision_depth=2)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    other = PromptSRC(model_name=TINY, classnames=NAMES, n_ctx=2, text_depth=2, vision_depth=2)
    with pytest.raises(ValueError, match="n_ctx: checkpoint 4 vs run 2"):
        other.on_load_checkpoint(checkpoint)


def test_unknown_model_name_lists_close_ones():
    with pytest.raises(ValueError, match=r"unknown open_clip model name 'ViT-B-61'.*ViT-B-16"):
        check_model_name("ViT-B-61")
    assert check_model_name("ViT-B/16") == "ViT-B-16"


def test_weights_of_another_architecture_are_refused(tmp_path, tiny_bundle):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_bundle.model.state_dict(), path)
    reloaded = build_clip(TINY, pretrained=str(path))
    assert reloaded.weights == str(path)
    assert torch.equal(reloaded.model.visual.conv1.weight, tiny_bundle.model.visual.conv1.weight)
    with pytest.raises(
        ValueError, match=r"does not match the open_clip architecture 'prompts-demo-vit'.*shape mismatch"
    ):
        build_clip("prompts-demo-vit", pretrained=str(path))


def test_missing_weights_never_download():
    with pytest.raises(FileNotFoundError, match="neither an existing file nor an open_clip tag"):
        build_clip(TINY, pretrained="/no/such/file.pt")
