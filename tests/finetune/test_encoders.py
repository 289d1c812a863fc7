import pytest
import torch

from agreement.inputs import load_state_dict_file
from ssl3d.finetune.classification import ImageClassifier
from ssl3d.finetune.encoders import EncoderWeightsError, encoder_param_groups, register_timm_backbone
from ssl3d.finetune.segmentation import SegmentationTask
from tests.finetune.helpers import TINY_BACKBONE, make_encoder


def test_exported_encoder_loads_strictly_into_the_unet(tmp_path):
    folder = make_encoder(tmp_path / "enc", seed=3)
    state = load_state_dict_file(folder / "encoder.safetensors")
    task = SegmentationTask(backbone=TINY_BACKBONE, encoder=str(folder), class_names=["bg", "a"])
    loaded = task.net.encoder.model.state_dict()
    # The U-Net keeps every feature level; only the unused classifier head is pruned after loading.
    assert set(loaded) <= set(state)
    assert set(state) - set(loaded) == {k for k in state if k.startswith(("conv_head.", "bn2."))}
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key])
    random = SegmentationTask(backbone=TINY_BACKBONE, encoder=None, class_names=["bg", "a"])
    assert not torch.equal(random.net.encoder.model.conv_stem.weight, loaded["conv_stem.weight"])


def test_a_run_folder_stands_for_its_encoder_folder(tmp_path):
    make_encoder(tmp_path / "run" / "encoder", seed=3)
    from_run = SegmentationTask(
        backbone=TINY_BACKBONE, encoder=str(tmp_path / "run"), class_names=["bg", "a"]
    )
    direct = SegmentationTask(
        backbone=TINY_BACKBONE, encoder=str(tmp_path / "run" / "encoder"), class_names=["bg", "a"]
    )
    for key, value in direct.net.encoder.model.state_dict().items():
        torch.testing.assert_close(from_run.net.encoder.model.state_dict()[key], value)
    with pytest.raises(FileNotFoundError, match=r"holds no encoder\.json"):
        SegmentationTask(backbone=TINY_BACKBONE, encoder=str(tmp_path), class_names=["bg", "a"])


def test_encoder_of_another_architecture_lists_missing_and_extra_keys(tmp_path):
    folder = make_encoder(tmp_path / "enc", name="resnet10t")
    with pytest.raises(EncoderWeightsError) as info:
        SegmentationTask(backbone=TINY_BACKBONE, encoder=str(folder), class_names=["bg", "a"])
    message = str(info.value)
    assert "exported from 'resnet10t'" in message
    assert "missing keys (" in message and "blocks.0.0.conv.weight" in message
    assert "unexpected keys (" in message and "conv1.0.weight" in message
    assert "shape mismatches (" in message and "bn1.weight (64,) vs (24,)" in message


def test_same_keys_with_other_shapes_are_listed(tmp_path):
    folder = make_encoder(tmp_path / "enc")
    state = load_state_dict_file(folder / "encoder.safetensors")
    state["conv_stem.weight"] = torch.zeros(3, 3)
    from safetensors.torch import save_file

    save_file(state, str(folder / "encoder.safetensors"))
    with pytest.raises(EncoderWeightsError, match=r"shape mismatches \(1\): conv_stem.weight"):
        SegmentationTask(backbone=TINY_BACKBONE, encoder=str(folder), class_names=["bg", "a"])


def test_missing_encoder_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder weights not found"):
        SegmentationTask(backbone=TINY_BACKBONE, encoder=str(tmp_path / "nope"), class_names=["bg", "a"])


def test_backbones_without_a_stride_two_pyramid_are_rejected():
    with pytest.raises(ValueError, match="strides"):
        register_timm_backbone("convnext_atto")


def test_layer_decay_scales_earlier_blocks_down_and_skips_frozen_parameters():
    task = SegmentationTask(backbone="resnet10t", class_names=["bg", "a"])
    encoder = task.net.encoder.model
    groups = encoder_param_groups(encoder, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    stem, last = encoder.conv1[0].weight, encoder.layer4[0].conv1.weight
    assert lr_of[id(stem)] < lr_of[id(last)] <= 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(encoder.parameters()))
    encoder.conv1.requires_grad_(False)
    groups = encoder_param_groups(encoder, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    assert id(stem) not in {id(p) for g in groups for p in g["params"]}


def test_freeze_encoder_trains_only_the_decoder():
    task = SegmentationTask(backbone=TINY_BACKBONE, class_names=["bg", "a"], freeze_encoder=True)
    assert not any(p.requires_grad for p in task.net.encoder.parameters())
    assert all(p.requires_grad for p in task.net.decoder.parameters())


def test_frozen_parts_stay_in_eval_mode_while_the_rest_trains():
    task = SegmentationTask(backbone=TINY_BACKBONE, class_names=["bg", "a"], freeze_encoder=True)
    task.train()
    task.on_train_epoch_start()
    assert not any(m.training for m in task.net.encoder.modules())  # no BatchNorm drift
    assert task.net.decoder.training
    classifier = ImageClassifier(backbone=TINY_BACKBONE, class_names=["a", "b"], freeze_encoder=True)
    classifier.train()
    classifier.on_train_epoch_start()
    assert not classifier.model.conv_stem.training and classifier.model.get_classifier().training
    trained = SegmentationTask(backbone=TINY_BACKBONE, class_names=["bg", "a"])
    trained.train()
    trained.on_train_epoch_start()
    assert all(m.training for m in trained.modules())
