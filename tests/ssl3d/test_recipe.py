"""The pretraining recipe against the reference code (SwAV, DeepCluster-V2, the official joint-SSL code)."""

import pytest
import pytorch_lightning as pl
import torch
from timm.optim import Lars
from torch import nn

from agreement.optim import build_optimizer, parameter_groups, scaled_lr
from ssl3d.encoder import SliceEncoder, create_backbone
from ssl3d.module import JointSSL
from tests.ssl3d.test_module import make_trainer
from tests.ssl3d.tiny import TINY_MODEL, TINY_SWAV, TinyDataModule


class EveryStep(pl.Callback):
    """Per step: the logged losses, the encoder's gradient norm and the change of its weights."""

    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []
        self.encoder_grad: list[float] = []
        self.encoder_change: list[float] = []
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = [p.detach().clone() for p in pl_module.encoder.parameters()]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.encoder.parameters() if p.grad is not None]
        self.encoder_grad.append(float(sum(g.abs().sum() for g in grads)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.losses.append({k: float(v) for k, v in metrics.items() if k.endswith("_step")})
        after = [p.detach() for p in pl_module.encoder.parameters()]
        self.encoder_change.append(float(sum((p - b).abs().sum() for p, b in zip(after, self._before))))


def test_deepcluster_trains_from_the_first_step(tmp_path):
    """The memory banks are filled before the first step, so epoch 0 has targets and gradients."""
    pl.seed_everything(0)
    model = JointSSL(clustering="deepcluster", **TINY_MODEL)
    steps = EveryStep()
    make_trainer(tmp_path, 1, [steps], enable_checkpointing=False).fit(model, TinyDataModule())
    assert len(steps.losses) == 4
    for losses, grad in zip(steps.losses, steps.encoder_grad):
        assert losses["train/loss_intra_step"] > 0 and losses["train/loss_inter_step"] > 0
        assert grad > 0
    # The warm-up starts at lr 0 (as the references do); every later step moves the encoder.
    assert all(change > 0 for change in steps.encoder_change[1:])
    assert (model.clustering_2d.assignments >= 0).all() and (model.clustering_3d.assignments >= 0).all()


def test_deepcluster_prototypes_stay_the_centroids_within_an_epoch(tmp_path):
    pl.seed_everything(0)
    model = JointSSL(clustering="deepcluster", **TINY_MODEL)
    centroids = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:  # after the epoch's k-means
                centroids[trainer.current_epoch] = [
                    p.detach().clone() for p in pl_module.clustering_2d.parameters()
                ]

    make_trainer(tmp_path, 1, [Snapshot()], enable_checkpointing=False).fit(model, TinyDataModule())
    assert not any(p.requires_grad for p in model.clustering_2d.parameters())
    for start, end in zip(centroids[0], model.clustering_2d.parameters()):
        assert torch.equal(start, end)


def test_resumed_epoch_keeps_its_assignments():
    model = JointSSL(clustering="deepcluster", **TINY_MODEL)
    clustering = model.clustering_2d
    clustering.allocate(24)
    clustering.memory.update(
        torch.arange(24), [torch.nn.functional.normalize(torch.randn(24, 16), dim=1)] * 2
    )
    clustering.recluster(seed=0, epoch=3)
    first = clustering.assignments.clone()
    clustering.memory.update(
        torch.arange(24), [torch.nn.functional.normalize(torch.randn(24, 16), dim=1)] * 2
    )
    clustering.recluster(seed=0, epoch=3)
    assert torch.equal(clustering.assignments, first)
    clustering.recluster(seed=0, epoch=4)
    assert not torch.equal(clustering.assignments, first)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_residual_branches_start_switched_on(backbone):
    """timm zero-initialises each block's last norm; the references (zero_init_residual=False) do not."""
    model = create_backbone(backbone)
    last_norms = [m.bn3 if hasattr(m, "bn3") else m.bn2 for m in model.modules() if hasattr(m, "conv2")]
    assert last_norms and all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in last_norms)
    assert SliceEncoder(backbone, 32).backbone.layer1[0].bn2.weight.abs().min() > 0


def test_backbones_without_residual_blocks_still_build():
    assert create_backbone("test_efficientnet", in_chans=3) is not None


def test_lars_leaves_biases_and_norms_to_plain_sgd():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    groups = parameter_groups(net)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["always_adapt"] is False
    reference = [p.detach().clone() for p in net.parameters()]
    grads = [torch.randn_like(p) for p in net.parameters()]
    for p, g in zip(net.parameters(), grads):
        p.grad = g.clone()
    build_optimizer(groups, "lars", lr=0.5, weight_decay=0.1, momentum=0.0, trust_coefficient=0.001).step()
    weight, bias, gamma, beta = net.parameters()
    assert beta.grad is not None
    # Excluded: a plain SGD step of size lr, no decay.
    for param, start, grad in ((bias, reference[1], grads[1]), (gamma, reference[2], grads[2])):
        torch.testing.assert_close(param.detach(), start - 0.5 * grad)
    # The weight: LARS-adapted step with decay, relative size lr * trust.
    w0, g0 = reference[0], grads[0]
    trust = 0.001 * w0.norm() / (g0.norm() + 0.1 * w0.norm())
    torch.testing.assert_close(weight.detach(), w0 - 0.5 * trust * (g0 + 0.1 * w0))


def test_lars_without_exclusion_adapts_everything():
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    groups = parameter_groups(net, exclude_bias_and_norm=False)
    assert len(groups) == 1 and len(groups[0]["params"]) == 4
    assert isinstance(build_optimizer(groups, "lars"), Lars)


def test_learning_rate_scales_with_the_global_batch(tmp_path):
    assert scaled_lr(0.6, 4096, 256) == pytest.approx(9.6)
    assert scaled_lr(0.05, 32, None) == 0.05
    with pytest.raises(ValueError, match="positive"):
        scaled_lr(0.6, 32, 0)
    pl.seed_everything(0)
    model = JointSSL(clustering="swav", **{**TINY_MODEL, **TINY_SWAV, "lr": 0.6, "lr_reference_batch": 256})
    trainer = make_trainer(tmp_path, 1, enable_checkpointing=False, max_steps=1, accumulate_grad_batches=2)
    trainer.fit(model, TinyDataModule())
    assert model.global_batch_size() == 12  # 6 slices per batch, 2 batches per step
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.6 * 12 / 256)


def test_mask_stage_keeps_the_frozen_encoder_in_eval_mode(tmp_path):
    pl.seed_everything(0)
    model = JointSSL(schedule="curriculum", curriculum_epochs=(0, 2), **TINY_MODEL)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    make_trainer(tmp_path, 1, enable_checkpointing=False).fit(model, TinyDataModule())
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(("max_epochs", "max_steps"), [(5, 2), (2, -1)])
def test_warmup_lasts_its_epochs_also_when_max_steps_ends_the_run_first(tmp_path, max_epochs, max_steps):
    model = JointSSL(**{**TINY_MODEL, "warmup_epochs": 0.5})
    trainer = make_trainer(tmp_path, max_epochs, max_steps=max_steps)
    trainer.fit(model, TinyDataModule())  # 4 batches per epoch
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.warmup_steps == 2  # half an epoch, not half of max_steps / max_epochs
    assert scheduler.total_steps == (max_steps if max_steps > 0 else 4 * max_epochs)
