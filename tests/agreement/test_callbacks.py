import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from agreement.callbacks import ClusterUsageCallback, KNNProbeCallback
from agreement.knn import knn_accuracy

DIM, CLASSES = 8, 3


def _dataset(n, seed):
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(123)) * 3
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    return TensorDataset(centres[labels] + torch.randn(n, DIM, generator=gen), labels)


class TinyModule(pl.LightningModule):
    def __init__(self, assignments=None):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(DIM, DIM)
        self.assignments = [] if assignments is None else assignments

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return (self.encoder(x) - x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val/loss", (self.encoder(x) - x).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def extract_features(self, batch):
        x, y = batch
        return self.encoder(x), y

    def cluster_assignments(self):
        return self.assignments


class NoHooks(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(DIM, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n, seed, batch_size=16):
    return DataLoader(_dataset(n, seed), batch_size=batch_size)


def _fit(module, callbacks, max_epochs=1, val=True, train=None):
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|no `val_dataloader`).*")
        trainer.fit(module, train or _loader(64, 0), _loader(32, 1) if val else None)
    return trainer


def _direct_accuracy(module, train_loader, val_loader, k):
    with torch.no_grad():
        train = [module.extract_features(b) for b in train_loader]
        val = [module.extract_features(b) for b in val_loader]
    return knn_accuracy(
        torch.cat([f for f, _ in train]),
        torch.cat([y for _, y in train]),
        torch.cat([f for f, _ in val]),
        torch.cat([y for _, y in val]),
        num_classes=CLASSES,
        k=k,
    )


def test_knn_probe_logs_top1():
    train_loader, val_loader = _loader(90, 2), _loader(40, 3)
    callback = KNNProbeCallback(train_loader, lambda: val_loader, num_classes=CLASSES, k=5)
    module = TinyModule()
    trainer = _fit(module, [callback])
    assert "knn/top1" in trainer.callback_metrics
    logged = float(trainer.callback_metrics["knn/top1"])
    assert logged == pytest.approx(callback.last_accuracy)
    assert logged == pytest.approx(_direct_accuracy(module, train_loader, val_loader, k=5))
    assert logged > 0.9  # well-separated blobs through a near-identity encoder
    assert module.training  # eval mode during extraction is undone


def test_knn_probe_respects_every_n_epochs_and_skips_sanity_check():
    calls = []

    class Counting(KNNProbeCallback):
        def evaluate(self, pl_module):
            calls.append(pl_module.current_epoch)
            return super().evaluate(pl_module)

    callback = Counting(_loader(30, 2), _loader(20, 3), k=3, every_n_epochs=2, log_name="probe/knn")
    trainer = _fit(TinyModule(), [callback], max_epochs=3)
    assert calls == [1]  # epochs 0 and 2 skipped, as is the sanity check before epoch 0
    assert "probe/knn" in trainer.callback_metrics


def test_cluster_usage_logs_per_head():
    heads = [torch.tensor([0, 0, 1, 1]), torch.zeros(0, dtype=torch.long), torch.tensor([2, 2, 2])]
    callback = ClusterUsageCallback(num_clusters=[4, 5, 3])
    trainer = _fit(TinyModule(assignments=heads), [callback], val=False)
    metrics = trainer.callback_metrics
    assert float(metrics["clusters/head0/entropy"]) == pytest.approx(0.5)
    assert float(metrics["clusters/head0/empty"]) == 2
    assert float(metrics["clusters/head0/largest_fraction"]) == pytest.approx(0.5)
    assert not any(key.startswith("clusters/head1/") for key in metrics)  # empty head skipped
    assert float(metrics["clusters/head2/entropy"]) == 0.0
    assert float(metrics["clusters/head2/empty"]) == 2
    assert callback.last_usage[1] is None


def test_cluster_usage_without_heads_logs_nothing():
    trainer = _fit(TinyModule(assignments=[]), [ClusterUsageCallback(num_clusters=4)], val=False)
    assert not any(key.startswith("clusters/") for key in trainer.callback_metrics)


def test_callback_validation():
    with pytest.raises(ValueError, match="extract_features"):
        _fit(NoHooks(), [KNNProbeCallback(_loader(8, 0), _loader(8, 1))], val=False)
    with pytest.raises(ValueError, match="cluster_assignments"):
        _fit(NoHooks(), [ClusterUsageCallback(num_clusters=3)], val=False)
    with pytest.raises(ValueError, match="2 num_clusters entries for 1 heads"):
        _fit(TinyModule(assignments=[torch.tensor([0, 1])]), [ClusterUsageCallback([3, 3])], val=False)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        KNNProbeCallback(_loader(8, 0), _loader(8, 1), k=0)
    with pytest.raises(ValueError, match="every_n_epochs must be"):
        KNNProbeCallback(_loader(8, 0), _loader(8, 1), every_n_epochs=0)
    with pytest.raises(ValueError, match="temperature must be"):
        KNNProbeCallback(_loader(8, 0), _loader(8, 1), temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        KNNProbeCallback(_loader(8, 0), _loader(8, 1), backend="annoy")
    with pytest.raises(ValueError, match="num_clusters must be"):
        ClusterUsageCallback(num_clusters=0)
    with pytest.raises(ValueError, match="num_clusters entries must be"):
        ClusterUsageCallback(num_clusters=[3, -1])
    with pytest.raises(ValueError, match="assignments must hold integer labels"):
        _fit(TinyModule(assignments=[torch.tensor([0.0, 1.0])]), [ClusterUsageCallback(3)], val=False)
    with pytest.raises(ValueError, match="feature_loader_val produced no samples"):
        KNNProbeCallback(_loader(8, 0), []).evaluate(TinyModule())


def test_knn_probe_after_training_epochs_leaves_the_run_unchanged():
    train_loader, val_loader = _loader(90, 2), _loader(40, 3)
    callback = KNNProbeCallback(train_loader, val_loader, num_classes=CLASSES, k=5, on="train")
    shuffled = DataLoader(_dataset(64, 0), batch_size=16, shuffle=True)  # draws from the global generator

    def fit(module, callbacks):
        torch.manual_seed(5)
        _fit(module, callbacks, max_epochs=3, val=False, train=shuffled)
        return module

    monitored, plain = fit(TinyModule(), [callback]), fit(TinyModule(), [])
    assert [epoch for epoch, _ in callback.history] == [0, 1, 2]
    assert callback.history[-1][1] == pytest.approx(
        _direct_accuracy(monitored, train_loader, val_loader, k=5)
    )
    for a, b in zip(monitored.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="on must be 'validation' or 'train'"):
        KNNProbeCallback(train_loader, val_loader, on="test")
