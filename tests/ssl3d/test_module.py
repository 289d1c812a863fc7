import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from agreement import clustering as clustering_module
from agreement.runs import ExactResume
from ssl3d.module import JointSSL
from tests.ssl3d.tiny import TINY_MODEL, TINY_SWAV, TinyDataModule


class StepLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class StopAfterEpochs(pl.Callback):
    """Interrupts a run at an epoch boundary, as a crash or a time limit would."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def make_trainer(tmp_path, max_epochs, callbacks=(), **kwargs):
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        gradient_clip_val=2.0,
        callbacks=list(callbacks),
        **kwargs,
    )


@pytest.mark.parametrize("clustering", ["swav", "deepcluster"])
def test_trains_and_all_losses_are_finite(tmp_path, clustering):
    pl.seed_everything(0)
    model = JointSSL(clustering=clustering, **TINY_MODEL, **(TINY_SWAV if clustering == "swav" else {}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = StepLosses()
    trainer = make_trainer(tmp_path, 2, [recorder], enable_checkpointing=False)
    trainer.fit(model, TinyDataModule())
    assert len(recorder.losses) == 8 and all(math.isfinite(x) for x in recorder.losses)
    for name in ("train/loss_intra", "train/loss_inter", "train/loss_mask"):
        assert math.isfinite(float(trainer.callback_metrics[name]))
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert any(k.startswith("encoder.backbone") for k in changed)
    assert any(k.startswith("transformer.") for k in changed)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_deepcluster_assigns_every_sample_after_the_first_epoch(tmp_path, precision, monkeypatch):
    pl.seed_everything(0)
    model = JointSSL(clustering="deepcluster", kmeans_precision=precision, **TINY_MODEL)
    used = []
    kmeans = clustering_module.kmeans
    monkeypatch.setattr(
        clustering_module, "kmeans", lambda *a, **kw: used.append(kw["precision"]) or kmeans(*a, **kw)
    )
    data = TinyDataModule()
    make_trainer(tmp_path, 2, enable_checkpointing=False).fit(model, data)
    assert model.clustering_2d.memory.fill_fraction == 1.0
    assert (model.clustering_2d.assignments >= 0).all()
    assert (model.clustering_3d.assignments >= 0).all()
    # Prototypes were overwritten by unit-norm k-means centroids.
    torch.testing.assert_close(
        model.clustering_3d.prototypes.weight(0).norm(dim=1), torch.ones(3), atol=0.2, rtol=0
    )
    assert used and set(used) == {precision}
    with pytest.raises(ValueError, match="k-means precision must be one of"):
        JointSSL(clustering="deepcluster", kmeans_precision="float16", **TINY_MODEL)


def test_swav_prototypes_stay_fixed_while_frozen(tmp_path):
    pl.seed_everything(0)
    model = JointSSL(clustering="swav", **{**TINY_MODEL, "freeze_prototypes_steps": 100})
    model.clustering_2d.prototypes.normalize_()
    start = model.clustering_2d.prototypes.weight(0).detach().clone()
    make_trainer(tmp_path, 1, enable_checkpointing=False).fit(model, TinyDataModule())
    torch.testing.assert_close(model.clustering_2d.prototypes.weight(0), start)


def test_curriculum_replays_the_three_stages():
    model = JointSSL(
        schedule="curriculum", curriculum_epochs=(2, 3), lambda_intra=1.0, lambda_inter=2.0, **TINY_MODEL
    )
    assert model.stage_weights(0) == (1.0, 0.0, 0.0)
    assert model.stage_weights(1) == (1.0, 0.0, 0.0)
    assert model.stage_weights(2) == (0.0, 0.0, 1.0)
    assert model.stage_weights(4) == (0.0, 0.0, 1.0)
    assert model.stage_weights(5) == (0.0, 2.0, 0.0)


def test_mask_stage_leaves_the_encoder_frozen(tmp_path):
    pl.seed_everything(0)
    model = JointSSL(schedule="curriculum", curriculum_epochs=(0, 2), **TINY_MODEL)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    token_before = model.masked_model.mask_token.detach().clone()
    make_trainer(tmp_path, 1, enable_checkpointing=False).fit(model, TinyDataModule())
    for key, value in model.encoder.state_dict().items():
        if "running" not in key and "num_batches" not in key:  # BatchNorm statistics still move in train mode
            assert torch.equal(value, encoder_before[key]), key
    assert not torch.equal(model.masked_model.mask_token, token_before)


@pytest.mark.parametrize(
    ("clustering", "extra"), [("deepcluster", {}), ("swav", {**TINY_SWAV, "queue_length": 12})]
)
def test_resume_reaches_the_same_losses(tmp_path, clustering, extra):
    config = {**TINY_MODEL, **extra, "clustering": clustering}
    pl.seed_everything(0)
    straight = StepLosses()
    make_trainer(tmp_path / "a", 4, [straight], enable_checkpointing=False).fit(
        JointSSL(**config), TinyDataModule()
    )

    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, save_top_k=0)
    first = StepLosses()
    make_trainer(tmp_path / "b", 4, [ExactResume(), first, checkpoint, StopAfterEpochs(2)]).fit(
        JointSSL(**config), TinyDataModule()
    )
    pl.seed_everything(123)  # a resumed run must not depend on the seed of the new process
    resumed = StepLosses()
    make_trainer(tmp_path / "b", 4, [ExactResume(), resumed]).fit(
        JointSSL(**config), TinyDataModule(), ckpt_path=str(tmp_path / "b" / "last.ckpt")
    )
    assert first.losses == pytest.approx(straight.losses[:8], rel=1e-6)
    assert resumed.losses == pytest.approx(straight.losses[8:], rel=1e-5)


def test_checkpoint_holds_memory_banks_and_loads_with_weights_only(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    model = JointSSL(clustering="deepcluster", **TINY_MODEL)
    make_trainer(tmp_path, 2, [checkpoint]).fit(model, TinyDataModule())
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert "clustering_2d.memory.features" in state["state_dict"]
    assert "rng_state" in state
    restored = JointSSL.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert torch.equal(restored.clustering_3d.assignments, model.clustering_3d.assignments)
    assert torch.equal(restored.clustering_2d.memory.features, model.clustering_2d.memory.features)


def test_bad_mask_ratio_raises():
    with pytest.raises(ValueError, match="mask_ratio"):
        JointSSL(mask_ratio=0.0, **TINY_MODEL)


def test_too_many_clusters_for_the_dataset_raises_before_training(tmp_path):
    model = JointSSL(clustering="deepcluster", **{**TINY_MODEL, "prototypes_3d": [50]})
    with pytest.raises(ValueError, match="at least as many samples as clusters"):
        make_trainer(tmp_path, 1, enable_checkpointing=False).fit(model, TinyDataModule())


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    pl.seed_everything(0)
    model = JointSSL(clustering="deepcluster", **TINY_MODEL)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, TinyDataModule())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    # Every sample was written to the bank although each rank only saw half of them.
    assert model.clustering_2d.memory.fill_fraction == 1.0


@pytest.mark.parametrize(
    ("clustering", "setting", "message"),
    [
        ("deepcluster", {"queue_length": 64}, "queue_length=64: SwAV settings"),
        ("deepcluster", {"freeze_prototypes_steps": 5}, "freeze_prototypes_steps=5: SwAV settings"),
        ("swav", {"kmeans_iterations": 3}, "kmeans_iterations=3: DeepCluster-V2 settings"),
    ],
)
def test_settings_of_the_other_head_are_refused(clustering, setting, message):
    with pytest.raises(ValueError, match=message):
        JointSSL(clustering=clustering, **TINY_MODEL, **setting)


def test_both_heads_share_one_call_shape_and_the_swav_queue_starts_at_its_epoch():
    from agreement.clustering import ClusteringHead, DeepClusterV2Clustering, SwAVClustering

    views = [torch.nn.functional.normalize(torch.randn(4, 8), dim=1) for _ in range(2)]
    index = torch.arange(4)
    swav = SwAVClustering(8, [5], queue_length=8, queue_start_epoch=1)
    deepcluster = DeepClusterV2Clustering(8, [3])
    deepcluster.allocate(8)
    for head in (swav, deepcluster):
        assert isinstance(head, ClusteringHead)
        head.on_epoch_start(0, seed=0)
        assert torch.isfinite(head(views, index))
    swav(views, index)  # the queue is full now, but epoch 0 does not use it
    used = []
    sinkhorn = clustering_module.sinkhorn
    clustering_module.sinkhorn = lambda scores, *a: used.append(scores.shape[0]) or sinkhorn(scores, *a)
    try:
        swav(views, index)
        swav.on_epoch_start(1, seed=0)
        swav(views, index)
    finally:
        clustering_module.sinkhorn = sinkhorn
    assert used == [4, 4, 12, 12]  # the batch alone, then the 8 queued embeddings before it
    with pytest.raises(ValueError, match="needs the samples' global indices"):
        deepcluster(views)


@pytest.mark.parametrize("clustering", ["swav", "deepcluster"])
def test_small_crops_train_the_encoder_and_must_match_the_data(clustering):
    pl.seed_everything(0)
    model = JointSSL(
        clustering=clustering, small_crops=2, **TINY_MODEL, **(TINY_SWAV if clustering == "swav" else {})
    )
    model.clustering_2d.allocate(6)
    base = torch.rand(6, 1, 32, 32)
    slices = {
        "index": torch.arange(6),
        "view1": base,
        "view2": base.flip(-1),
        "small_views": torch.rand(6, 2, 1, 16, 16),
    }
    model.clustering_2d(model._slice_views(slices, small=False)[:2] * 2, slices["index"])  # memory
    if clustering == "deepcluster":
        model.clustering_2d.recluster(seed=0)
    views = model._slice_views(slices)
    assert len(views) == 4 and all(v.shape == (6, 16) for v in views)
    # The small views alone carry gradient to the backbone: they are predictors, never targets.
    loss = model.clustering_2d([views[0].detach(), views[1].detach(), *views[2:]], slices["index"])
    loss.backward()
    stem = next(p for p in model.encoder.backbone.parameters() if p.requires_grad)
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    with pytest.raises(
        ValueError, match="1 small views per sample but the model was built for small_crops=2"
    ):
        model._slice_views(slices | {"small_views": slices["small_views"][:, :1]})


def test_the_architecture_defaults_are_one_configuration():
    import inspect

    from ssl3d.architecture import SliceModelConfig

    defaults = inspect.signature(JointSSL.__init__).parameters
    assert {name: defaults[name].default for name in SliceModelConfig.names()} == SliceModelConfig().as_dict()
    model = JointSSL(**TINY_MODEL)
    assert model.architecture == SliceModelConfig.from_mapping({**SliceModelConfig().as_dict(), **TINY_MODEL})
