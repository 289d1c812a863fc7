"""The standard sanity test of a SwAV / DeepCluster-V2 implementation, on Fashion-MNIST: the 2D branch alone.

``JointSSL`` is trained with ``L_intra`` only (no volumes) on unlabelled Fashion-MNIST images, then frozen pooled
backbone features are classified by a weighted kNN vote (k=20) on the labelled test set. The comparison is the
same architecture from random initialisations, every encoder's BatchNorm statistics re-estimated on the same
unlabelled training images; the pretraining seed's own initialisation is one of the random ones, so the gain over
it is a paired difference. Besides kNN and a linear probe, the check reads out the clustering itself: k-means of
the frozen features into as many clusters as classes, and the first prototype head's assignments. The images come from the Debian package ``dataset-fashion-mnist`` (idx files), or any
folder of idx files or of one sub-folder of images per class.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from agreement.callbacks import KNNProbeCallback
from agreement.knn import kmeans_probe, knn_accuracy, linear_probe
from agreement.metrics import ari, cluster_usage, nmi, purity
from agreement.sampling import SeededSampler, split_key
from agreement.tables import format_mean_std, markdown_table, mean_std
from ssl3d.data.sources import class_folder_images
from ssl3d.encoder import SliceEncoder
from ssl3d.module import JointSSL
from ssl3d.probe import recalibrate_batchnorm
from ssl3d.report import save_figure

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Decoded with PIL as 8-bit grey (Fashion-MNIST's own scale), not through the percentile scaling of load_image.
PIL_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "pgm")


class DatasetNotFoundError(FileNotFoundError):
    """Evaluation data that is not where it was looked for, with what to install or pass."""


def read_idx(path: str | Path) -> np.ndarray:
    """An idx array (the MNIST file format, plain or gzip-compressed) as a NumPy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read the idx file ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: idx header says shape {shape} ({expected} bytes) but the file has {len(raw)}"
        )
    return np.frombuffer(raw[header:], dtype=dtype).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_image_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from PIL import Image

    paths, labels, classes = class_folder_images(folder, PIL_IMAGE_EXTENSIONS)
    images = []
    for file in paths:
        try:
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("L"), dtype=np.uint8))
        except OSError as error:
            raise ValueError(f"{file}: cannot read the image ({error})") from error
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"{folder}: images differ in size; give images of one size")
    return np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes)


def load_fashion_mnist(
    root: str | Path | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """``(images, labels, class_names)``: ``(N, 1, H, W)`` float in 0..1 and ``(N,)`` int64 labels of ``split``.

    ``root`` holds ``{train,t10k}-images-idx3-ubyte[.gz]`` and the matching label files, or ``train/`` and
    ``test/`` folders with one sub-folder of images per class; default: the Debian package's folder.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"{folder}: Fashion-MNIST not found; install it with `apt-get install dataset-fashion-mnist` "
            "or pass the folder of its idx files (--data_dir)"
        )
    if (folder / split).is_dir():
        images, labels, classes = _read_image_folder(folder / split)
    else:
        prefix = "train" if split == "train" else "t10k"
        image_file = _find(folder, f"{prefix}-images-idx3-ubyte")
        label_file = _find(folder, f"{prefix}-labels-idx1-ubyte")
        if image_file is None or label_file is None:
            raise DatasetNotFoundError(
                f"{folder}: no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] and no "
                f"{split}/ image folder; install `dataset-fashion-mnist` or pass the right folder (--data_dir)"
            )
        images, labels = read_idx(image_file), read_idx(label_file).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{image_file}: {images.shape} images do not match {labels.shape} labels in {label_file}"
            )
        classes = CLASS_NAMES if int(labels.max()) < len(CLASS_NAMES) else tuple(map(str, np.unique(labels)))
    tensor = torch.from_numpy(np.array(images)).float().div_(255.0).unsqueeze(1)
    return tensor, torch.from_numpy(labels), classes


def class_balanced_subset(
    labels: torch.Tensor, per_class: int, seed: int, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of ``per_class`` samples of every class (all of a class when it has fewer), in random order,
    none of them in ``exclude``."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None:
        allowed[exclude] = False
    chosen = []
    for label in labels.unique():
        members = torch.nonzero((labels == label) & allowed).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    picked = torch.cat(chosen)
    return picked[torch.randperm(len(picked), generator=generator)]


class ImageViews(Dataset):
    """Samples ``{"index", "seed"}`` of in-memory images; :class:`BatchViews` makes the two views per batch."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, int]:
        index, seed = split_key(key, len(self))
        return {"index": index, "seed": seed}


class BatchViews:
    """Collates samples of :class:`ImageViews` into two augmented views, drawn for the whole batch at once.

    The recipe of ``ssl3d.data.transforms.view_transform_2d`` (random resized crop with aspect ratio 3/4..4/3,
    horizontal flip, brightness and contrast jitter with probability 0.8, Gaussian blur with probability 0.5),
    vectorised: one ``grid_sample`` for the crops and flips and one grouped convolution for the blurs instead of
    a chain of per-image transforms: on a 2-core CPU 6 ms against 243 ms (``TwoViews2D`` per image under
    ``seeded_views_2d``) for two views of 128 images, median of 7 interleaved rounds, a minute of each seed's
    250 steps. A generator seeded by the batch's per-sample seeds makes it deterministic.
    With ``small_crops``, SwAV's multi-crop: that many more views per sample, ``small_size`` pixels square, cut
    from ``small_scale`` of the image, as ``small_views`` (B, small_crops, 1, small_size, small_size).
    """

    def __init__(
        self,
        images: torch.Tensor,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: float = 0.4,
        jitter_p: float = 0.8,
        blur_p: float = 0.5,
        small_crops: int = 0,
        small_size: int = 12,
        small_scale: tuple[float, float] = (0.05, 0.2),
    ) -> None:
        for name, value in (("scale", scale), ("small_scale", small_scale)):
            if len(value) != 2 or not 0.0 < value[0] <= value[1] <= 1.0:
                raise ValueError(f"BatchViews: {name} must be (low, high) in (0, 1], got {value}")
        if small_crops < 0 or small_size < 4:
            raise ValueError(
                f"BatchViews: small_crops must be >= 0 and small_size >= 4, got {small_crops} and {small_size}"
            )
        self.images = images
        self.small_crops = small_crops
        self.small_size = small_size
        self.small_scale = small_scale
        self.scale = scale
        self.ratio = ratio
        self.jitter = jitter
        self.jitter_p = jitter_p
        self.blur_p = blur_p
        self.kernel = max(3, int(0.1 * min(images.shape[-2:])) // 2 * 2 + 1)

    def view(
        self,
        images: torch.Tensor,
        generator: torch.Generator,
        scale: tuple[float, float] | None = None,
        size: int | None = None,
    ) -> torch.Tensor:
        """One augmented view of every image: a crop of ``scale`` of its area (default ``self.scale``) resized to
        ``size`` pixels square (default: the images' size)."""
        n = images.shape[0]
        out_shape = [n, images.shape[1], *((size, size) if size is not None else images.shape[-2:])]

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) * (high - low) + low

        area = uniform(*(scale or self.scale))
        ratio = torch.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        width = torch.sqrt(area * ratio).clamp(max=1.0)
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        centre_x = (uniform(0, 1) * (1 - width) + width / 2) * 2 - 1
        centre_y = (uniform(0, 1) * (1 - height) + height / 2) * 2 - 1
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
        theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
        grid = torch.nn.functional.affine_grid(theta, out_shape, align_corners=False)
        out = torch.nn.functional.grid_sample(images, grid, mode="bilinear", align_corners=False)
        jittered = (torch.rand(n, generator=generator) < self.jitter_p).float().view(n, 1, 1, 1)
        brightness = 1 + (uniform(-self.jitter, self.jitter).view(n, 1, 1, 1)) * jittered
        contrast = 1 + (uniform(-self.jitter, self.jitter).view(n, 1, 1, 1)) * jittered
        out = (out * brightness).clamp(0, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * contrast + mean).clamp(0, 1)
        sigma = uniform(0.1, 2.0)
        blurred = torch.rand(n, generator=generator) < self.blur_p
        offsets = torch.arange(self.kernel, dtype=torch.float32) - self.kernel // 2
        weights = torch.exp(-(offsets**2) / (2 * sigma.view(n, 1) ** 2))
        weights = torch.where(blurred.view(n, 1), weights, (offsets == 0).float())
        weights = weights / weights.sum(dim=1, keepdim=True)
        pad = self.kernel // 2
        rows = torch.nn.functional.pad(out.transpose(0, 1), (pad, pad, pad, pad), mode="reflect")
        rows = torch.nn.functional.conv2d(rows, weights.view(n, 1, 1, -1), groups=n)
        return (
            torch.nn.functional.conv2d(rows, weights.view(n, 1, -1, 1), groups=n).transpose(0, 1).contiguous()
        )

    def __call__(self, samples: list[dict[str, int]]) -> dict[str, torch.Tensor]:
        index = torch.tensor([s["index"] for s in samples])
        seed = int(np.random.SeedSequence([s["seed"] for s in samples]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        images = self.images[index]
        batch = {"index": index, "view1": self.view(images, generator), "view2": self.view(images, generator)}
        if self.small_crops:
            small = [
                self.view(images, generator, self.small_scale, self.small_size)
                for _ in range(self.small_crops)
            ]
            batch["small_views"] = torch.stack(small, dim=1)
        return batch


class ImageViewsDataModule(pl.LightningDataModule):
    """2D images only: the ``slices`` loader of ``JointSSL`` and no volumes."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, **views: Any) -> None:
        super().__init__()
        self.dataset = ImageViews(images)
        self.collate = BatchViews(images, **views)
        self.batch_size = batch_size
        self.seed = seed

    @property
    def num_slice_samples(self) -> int:
        return len(self.dataset)

    @property
    def num_volume_samples(self) -> int:
        return 0

    def train_dataloader(self) -> dict[str, DataLoader]:
        sampler = SeededSampler(self.dataset, seed=self.seed)
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate, drop_last=True
        )
        return {"slices": loader}


@dataclass
class CheckConfig:
    """Settings of the check: a ResNet-18, SwAV / DeepCluster-V2's heads (2048-128 projection, temperature 0.1),
    sized to a 2-core CPU. A few hundred steps are too few for LARS (trust 0.001 moves each weight by about
    lr x 0.001 of its norm per step), so the check uses SGD with momentum at a fixed learning rate.

    ``swav_queue_length``: SwAV's queue per view, used from ``queue_start_epoch`` on. SwAV's reference recipe
    adds one whenever the batch is small next to the number of prototypes (3840 rows, 15 batches of 256): without
    it Sinkhorn spreads 128 samples over 300 prototypes, and the codes it equipartitions are close to uniform.
    ``small_crops``: SwAV / DeepCluster-V2's multi-crop, small views of ``small_size`` pixels from
    ``small_crop_scale`` of the image besides the two large ones (0: two views only).
    ``split``: ``"report"`` (the images the README reports) or ``"tuning"`` (pretraining, kNN and test images
    disjoint from the report split's, for choosing settings without looking at reported data).
    """

    backbone: str = "resnet18"
    train_images: int = 6400
    epochs: int = 5
    batch_size: int = 128
    crop_scale: tuple[float, float] = (0.2, 1.0)
    small_crops: int = 0
    small_size: int = 12
    small_crop_scale: tuple[float, float] = (0.05, 0.2)
    prototypes: int = 300
    heads_deepcluster: int = 3
    projection_hidden: int = 2048
    projection_dim: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    lr_reference_batch: int | None = None
    warmup_epochs: float = 1.0
    freeze_prototypes_steps: int = 50
    swav_queue_length: int = 0
    queue_start_epoch: int = 1
    split: str = "report"
    knn_train_images: int = 5000
    knn_test_images: int = 2000
    k: int = 20
    methods: list[str] = field(default_factory=lambda: ["swav", "deepcluster"])

    def model_kwargs(self, clustering: str, seed: int) -> dict[str, Any]:
        heads = self.heads_deepcluster if clustering == "deepcluster" else 1
        swav = dict(
            freeze_prototypes_steps=self.freeze_prototypes_steps,
            queue_length=self.swav_queue_length,
            queue_start_epoch=self.queue_start_epoch,
        )
        return dict(
            backbone=self.backbone,
            multi_level=False,
            d_model=self.projection_hidden,
            num_layers=1,
            heads=1,
            dim_head=8,
            ffn_hidden=8,
            num_slices=1,
            clustering=clustering,
            prototypes_2d=[self.prototypes] * heads,
            prototypes_3d=[1],
            projection_hidden=self.projection_hidden,
            projection_dim=self.projection_dim,
            small_crops=self.small_crops,
            lambda_inter=0.0,
            lambda_mask=0.0,
            optimizer=self.optimizer,
            lr=self.lr,
            lr_reference_batch=self.lr_reference_batch,
            warmup_epochs=self.warmup_epochs,
            seed=seed,
            **(swav if clustering == "swav" else {}),
        )


class PrototypePath(nn.Module):
    """The 2D branch of a ``JointSSL`` from images to the first prototype head's scores: encoder, projection,
    L2 normalisation, prototypes (the model's own modules; ``copy.deepcopy`` it for a separate copy)."""

    def __init__(self, model: JointSSL) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.projection = model.projection_2d
        self.prototypes = model.clustering_2d.prototypes

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.num_prototypes[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.prototypes(nn.functional.normalize(self.projection(self.encoder(images))))[0]


@torch.no_grad()
def prototype_assignments(path: PrototypePath, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Hard assignment of each image to its best-scoring prototype, in eval mode."""
    was_training = path.training
    path.eval()
    assigned = torch.cat(
        [path(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
    )
    path.train(was_training)
    return assigned


class TrainingLog(pl.Callback):
    """Per step ``L_intra``; per epoch the normalised entropy of the k-means / Sinkhorn cluster usage."""

    def __init__(self) -> None:
        self.loss: list[float] = []
        self.usage: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        path = PrototypePath(pl_module)
        assigned = prototype_assignments(path, trainer.datamodule.dataset.images)
        self.usage.append(cluster_usage(assigned, path.num_prototypes)["entropy"])


@torch.no_grad()
def pooled_features(encoder: SliceEncoder, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Frozen global-average-pooled backbone features (what a downstream user takes) of ``images``."""
    encoder.eval()
    return torch.cat(
        [encoder.pooled_features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


def probe_branch(path: PrototypePath, data: dict[str, torch.Tensor], k: int) -> dict[str, Any]:
    """Every readout of a 2D branch, on a copy whose BatchNorm statistics are re-estimated on the
    unlabelled train images (``data["recalibrate"]``):

    - ``knn`` and ``linear``: the weighted kNN vote and a multinomial logistic regression (L-BFGS, 100
      iterations) on the standardised frozen pooled features;
    - ``kmeans``: ``agreement.knn.kmeans_probe`` of the test images' pooled features (as many clusters as
      classes: Hungarian accuracy, NMI, ARI);
    - ``prototypes``: the first prototype head's assignments of the test images (hundreds of prototypes for a
      few classes, so NMI, purity and ARI rather than a one-to-one accuracy) and their usage (normalised entropy).
    """
    path = copy.deepcopy(path).cpu()
    recalibrate_batchnorm(path, data["recalibrate"])
    train = pooled_features(path.encoder, data["train_images"])
    test = pooled_features(path.encoder, data["test_images"])
    labels, classes = data["test_labels"], data["num_classes"]
    labelled = (train, data["train_labels"], test, labels, classes)
    assigned = prototype_assignments(path, data["test_images"])
    return {
        "knn": knn_accuracy(*labelled, k=k),
        "linear": linear_probe(*labelled),
        "kmeans": kmeans_probe(test, labels, classes),
        "prototypes": {
            "nmi": nmi(labels, assigned),
            "purity": purity(labels, assigned),
            "ari": ari(labels, assigned),
            "usage": cluster_usage(assigned, path.num_prototypes)["entropy"],
        },
    }


CLUSTERING_SCORES = (
    ("k-means accuracy", "kmeans_accuracy"),
    ("k-means NMI", "kmeans_nmi"),
    ("k-means ARI", "kmeans_ari"),
    ("prototype NMI", "prototype_nmi"),
    ("prototype purity", "prototype_purity"),
    ("prototype ARI", "prototype_ari"),
)


def clustering_scores(readout: dict[str, Any]) -> dict[str, float]:
    """The clustering readouts of :func:`probe_branch` as one flat mapping (the keys of ``CLUSTERING_SCORES``)."""
    kmeans, prototypes = readout["kmeans"], readout["prototypes"]
    return {
        "kmeans_accuracy": kmeans["accuracy"],
        "kmeans_nmi": kmeans["nmi"],
        "kmeans_ari": kmeans["ari"],
        "prototype_nmi": prototypes["nmi"],
        "prototype_purity": prototypes["purity"],
        "prototype_ari": prototypes["ari"],
        "prototype_usage": prototypes["usage"],
    }


def _scores_text(scores: dict[str, float]) -> str:
    return ", ".join(f"{title} {scores[key]:.3f}" for title, key in CLUSTERING_SCORES)


def online_knn_monitor(data: dict[str, torch.Tensor], k: int, batch_size: int = 512) -> KNNProbeCallback:
    """kNN accuracy of the pooled backbone features after every epoch, with the training run's own BatchNorm
    statistics (no re-estimation): the learning curve of the check."""

    def loader(images: torch.Tensor, labels: torch.Tensor) -> DataLoader:
        return DataLoader(TensorDataset(images, labels), batch_size=batch_size)

    return KNNProbeCallback(
        loader(data["train_images"], data["train_labels"]),
        loader(data["test_images"], data["test_labels"]),
        num_classes=data["num_classes"],
        k=k,
        on="train",
        log_name="knn/online_top1",
    )


def pretrain_2d(
    images: torch.Tensor,
    clustering: str,
    seed: int,
    config: CheckConfig,
    run_dir: Path | None = None,
    monitor: KNNProbeCallback | None = None,
) -> tuple[JointSSL, dict[str, PrototypePath | TrainingLog]]:
    """Train ``JointSSL``'s 2D branch on ``images`` from seed ``seed`` (with an optional online kNN
    ``monitor``); returns the model, a copy of its initial 2D branch and the training log."""
    pl.seed_everything(seed, verbose=False)
    model = JointSSL(**config.model_kwargs(clustering, seed))
    initial = copy.deepcopy(PrototypePath(model))
    log = TrainingLog()
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        gradient_clip_val=None,
        callbacks=[log] if monitor is None else [log, monitor],
        default_root_dir=run_dir,
    )
    data = ImageViewsDataModule(
        images,
        config.batch_size,
        seed,
        scale=config.crop_scale,
        small_crops=config.small_crops,
        small_size=config.small_size,
        small_scale=config.small_crop_scale,
    )
    trainer.fit(model, data)
    return model, {"initial": initial, "log": log}


def check_subsets(
    config: CheckConfig, train_labels: torch.Tensor, test_labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of the pretraining, kNN training and test images of ``config.split``, class-balanced; the tuning
    split's images are none of the report split's."""
    if config.split not in ("report", "tuning"):
        raise ValueError(f"split must be 'report' or 'tuning', got {config.split!r}")

    def draw(exclude_train: torch.Tensor | None, exclude_test: torch.Tensor | None, seed: int):
        pretrain = class_balanced_subset(
            train_labels, config.train_images // num_classes, seed, exclude_train
        )
        knn = class_balanced_subset(
            train_labels, config.knn_train_images // num_classes, seed + 1, exclude_train
        )
        test = class_balanced_subset(
            test_labels, config.knn_test_images // num_classes, seed + 2, exclude_test
        )
        return pretrain, knn, test

    report = draw(None, None, seed=1)
    if config.split == "report":
        return report
    tuning = draw(torch.cat(report[:2]), report[2], seed=11)
    short = [
        name
        for name, idx, wanted in zip(
            ("train_images", "knn_train_images", "knn_test_images"),
            tuning,
            (config.train_images, config.knn_train_images, config.knn_test_images),
        )
        if len(idx) < wanted // num_classes * num_classes
    ]
    if short:
        raise ValueError(f"the tuning split has too few images left for {', '.join(short)}; ask for fewer")
    return tuning


def run_check(
    config: CheckConfig | None = None,
    seeds: list[int] = (0,),
    random_seeds: int = 3,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain each method from each of ``seeds`` and compare kNN accuracy with ``random_seeds`` random
    initialisations (the first ones share the pretraining seeds' initialisations). Writes ``fashion_check.md``,
    ``.json`` and ``.png`` to ``out_dir`` when given."""
    config = config or CheckConfig()
    seeds = list(seeds)
    start = time.perf_counter()
    train_images, train_labels, classes = load_fashion_mnist(data_dir, "train")
    test_images, test_labels, _ = load_fashion_mnist(data_dir, "test")
    if config.train_images > len(train_images):
        raise ValueError(
            f"train_images {config.train_images} exceeds the {len(train_images)} training images"
        )
    pretrain_idx, knn_idx, test_idx = check_subsets(config, train_labels, test_labels, len(classes))
    pretrain = train_images[pretrain_idx]
    data = {
        "recalibrate": pretrain[:4096],
        "train_images": train_images[knn_idx],
        "train_labels": train_labels[knn_idx],
        "test_images": test_images[test_idx],
        "test_labels": test_labels[test_idx],
        "num_classes": len(classes),
    }

    def say(message: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    random_ids = list(seeds)
    while len(random_ids) < random_seeds:
        random_ids.append(next(s for s in range(len(random_ids) + max(seeds) + 1) if s not in random_ids))
    random_acc, random_linear, random_clustering, random_contingency = {}, {}, {}, {}
    for seed in random_ids:
        pl.seed_everything(seed, verbose=False)
        model = JointSSL(**config.model_kwargs("swav", seed))  # the same draws as pretrain_2d's model
        readout = probe_branch(PrototypePath(model), data, config.k)
        random_acc[seed], random_linear[seed] = readout["knn"], readout["linear"]
        random_clustering[seed] = clustering_scores(readout)
        random_contingency[seed] = readout["kmeans"]["contingency"]
        say(
            f"random initialisation, seed {seed}: kNN accuracy {random_acc[seed]:.4f}, "
            f"linear probe {random_linear[seed]:.4f}; " + _scores_text(random_clustering[seed])
        )
    random_mean, random_std = mean_std(list(random_acc.values()))
    linear_mean, linear_std = mean_std(list(random_linear.values()))
    methods: dict[str, Any] = {}
    for method in config.methods:
        runs = []
        for seed in seeds:
            say(f"pretraining {method}, seed {seed}: {config.epochs} epochs of {len(pretrain)} images")
            monitor = online_knn_monitor(data, config.k)
            model, extra = pretrain_2d(pretrain, method, seed, config, monitor=monitor)
            log: TrainingLog = extra["log"]
            readout = probe_branch(PrototypePath(model), data, config.k)
            initial = probe_branch(extra["initial"], data, config.k)
            accuracy, initial_acc = readout["knn"], initial["knn"]
            runs.append(
                {
                    "seed": seed,
                    "accuracy": accuracy,
                    "own_initialisation": initial_acc,
                    "paired_gain": accuracy - initial_acc,
                    "linear_accuracy": readout["linear"],
                    "own_initialisation_linear": initial["linear"],
                    "clustering": clustering_scores(readout),
                    "own_initialisation_clustering": clustering_scores(initial),
                    "kmeans_contingency": readout["kmeans"]["contingency"],
                    "loss_intra": log.loss,
                    "cluster_usage": log.usage,
                    "online_knn_by_epoch": [accuracy for _, accuracy in monitor.history],
                    "steps": len(log.loss),
                }
            )
            say(
                f"{method} seed {seed}: kNN accuracy {accuracy:.4f} (own initialisation {initial_acc:.4f}), "
                f"linear probe {readout['linear']:.4f} (own initialisation {initial['linear']:.4f}); "
                f"L_intra {log.loss[0]:.3f} -> {log.loss[-1]:.3f} (log K = {math.log(config.prototypes):.3f}); "
                f"cluster usage {log.usage[-1]:.3f}; online kNN by epoch "
                + ", ".join(f"{a:.3f}" for a in runs[-1]["online_knn_by_epoch"])
                + "; "
                + _scores_text(runs[-1]["clustering"])
            )
        mean, std = mean_std([r["accuracy"] for r in runs])
        gain = mean - random_mean
        methods[method] = {
            "runs": runs,
            "accuracy_mean": mean,
            "accuracy_std": std,
            "gain_over_random_mean": gain,
            "gain_in_random_stds": gain / random_std if random_std > 0 else math.inf,
            "paired_gain_mean": mean_std([r["paired_gain"] for r in runs])[0],
            "paired_gain_std": mean_std([r["paired_gain"] for r in runs])[1],
            "linear_mean": mean_std([r["linear_accuracy"] for r in runs])[0],
            "linear_std": mean_std([r["linear_accuracy"] for r in runs])[1],
            "passes": bool(gain >= 0.03 and gain > 3 * random_std),
        }
    result = {
        "config": asdict(config),
        "seeds": seeds,
        "random": {
            "accuracy_by_seed": random_acc,
            "mean": random_mean,
            "std": random_std,
            "linear_by_seed": random_linear,
            "linear_mean": linear_mean,
            "linear_std": linear_std,
            "clustering_by_seed": random_clustering,
            "kmeans_contingency_by_seed": random_contingency,
        },
        "methods": methods,
        "classes": list(classes),
        "log_k": math.log(config.prototypes),
        "seconds": time.perf_counter() - start,
    }
    if out_dir is not None:
        write_report(result, Path(out_dir))
    return result


def report_table(result: dict[str, Any]) -> str:
    """The Markdown table of :func:`run_check`'s result."""
    rnd = result["random"]
    columns = [
        "encoder",
        "kNN accuracy (k=20)",
        "gain over random mean",
        "paired gain (own init)",
        "linear probe",
        "L_intra first -> last (log K)",
        "cluster usage",
        "passes",
    ]
    rows = [
        [
            f"random initialisation ({len(rnd['accuracy_by_seed'])} seeds)",
            f"{rnd['mean']:.4f} ± {rnd['std']:.4f}",
            "",
            "",
            _linear(rnd),
            "",
            "",
            "",
        ]
    ]
    for method, m in result["methods"].items():
        runs = m["runs"]
        loss = " / ".join(f"{r['loss_intra'][0]:.2f} -> {r['loss_intra'][-1]:.2f}" for r in runs)
        rows.append(
            [
                f"{method} ({len(runs)} seeds, {runs[0]['steps']} steps)",
                f"{m['accuracy_mean']:.4f} ± {m['accuracy_std']:.4f}",
                f"{m['gain_over_random_mean']:+.4f} ({m['gain_in_random_stds']:.1f} std)",
                f"{m['paired_gain_mean']:+.4f} ± {m['paired_gain_std']:.4f}",
                _linear(m),
                f"{loss} ({result['log_k']:.2f})",
                " / ".join(f"{r['cluster_usage'][-1]:.2f}" for r in runs),
                "yes" if m["passes"] else "no",
            ]
        )
    return markdown_table(columns, rows)


def clustering_table(result: dict[str, Any]) -> str:
    """Markdown table of the clustering readouts: mean ± std over seeds, and each method's paired difference
    from its own initialisation."""

    def cells(by_run: list[dict[str, float]], signed: bool = False) -> list[str]:
        return [
            format_mean_std([scores[key] for scores in by_run], signed=signed) for _, key in CLUSTERING_SCORES
        ]

    random_runs = list(result["random"]["clustering_by_seed"].values())
    rows = [[f"random initialisation ({len(random_runs)} seeds)", *cells(random_runs)]]
    for method, m in result["methods"].items():
        runs = m["runs"]
        rows.append([f"{method} ({len(runs)} seeds)", *cells([r["clustering"] for r in runs])])
        paired = [
            {
                key: r["clustering"][key] - r["own_initialisation_clustering"][key]
                for _, key in CLUSTERING_SCORES
            }
            for r in runs
        ]
        rows.append([f"{method} − own initialisation (paired)", *cells(paired, signed=True)])
    return markdown_table(["encoder", *(title for title, _ in CLUSTERING_SCORES)], rows)


def _linear(row: dict[str, Any]) -> str:
    return f"{row['linear_mean']:.4f} ± {row['linear_std']:.4f}" if "linear_mean" in row else ""


def _small_crops(config: dict[str, Any]) -> str:
    if not config.get("small_crops"):
        return "none"
    low, high = config["small_crop_scale"]
    return f"{config['small_crops']} of {config['small_size']} px from {low:g}-{high:g} of the area"


def write_report(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fashion_check.json").write_text(json.dumps(result, indent=2))
    (out_dir / "fashion_check.md").write_text(
        "# Fashion-MNIST check of the 2D branch\n\n"
        f"split: {result['config']['split']}; SwAV queue per view: {result['config']['swav_queue_length']}; "
        f"small crops: {_small_crops(result['config'])}\n\n" + report_table(result) + "\n\n"
        "Passes: gain over the random mean >= 0.03 and > 3 random standard deviations.\n\n"
        "Online kNN accuracy by epoch (the run's own BatchNorm statistics):\n\n"
        + "".join(
            f"- {method} seed {run['seed']}: {', '.join(f'{a:.4f}' for a in run.get('online_knn_by_epoch', []))}\n"
            for method, m in result["methods"].items()
            for run in m["runs"]
        )
        + "\nClustering readouts of the test images: spherical k-means of the frozen pooled features into as many "
        "clusters as classes (10 starts), and the first prototype head's assignments "
        f"({result['config']['prototypes']} prototypes), BatchNorm statistics re-estimated as for kNN:\n\n"
        + clustering_table(result)
        + "\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(16, 9.5), gridspec_kw={"height_ratios": [1, 1.3]})
    loss_ax, curve_ax, acc_ax = axes[0]
    tables = [("random initialisation", *next(iter(result["random"]["kmeans_contingency_by_seed"].items())))]
    tables += [
        (method, m["runs"][0]["seed"], m["runs"][0]["kmeans_contingency"])
        for method, m in result["methods"].items()
    ]
    for ax, (name, seed, table) in zip(axes[1], tables):
        ax.imshow(np.asarray(table), cmap="Blues")
        ax.set(title=f"{name}, seed {seed}: k-means clusters", xlabel="cluster (ordered by majority class)")
        if len(table) == len(result["classes"]):  # a class missing from the test images has no row
            ax.set_yticks(range(len(table)), result["classes"], fontsize=7)
    for ax in axes[1][len(tables) :]:
        ax.axis("off")
    for method, m in result["methods"].items():
        for run in m["runs"]:
            loss_ax.plot(run["loss_intra"], label=f"{method} seed {run['seed']}", lw=0.8)
            online = [run["own_initialisation"], *run.get("online_knn_by_epoch", [])]
            curve_ax.plot(range(len(online)), online, marker="o", ms=3, label=f"{method} seed {run['seed']}")
    curve_ax.axhline(result["random"]["mean"], color="grey", ls="--", label="random mean")
    curve_ax.set(
        xlabel="epoch (0: initialisation, BatchNorm re-estimated)",
        ylabel="kNN accuracy (k=20)",
        title="online kNN (the run's BatchNorm statistics)",
    )
    curve_ax.legend(fontsize=7)
    loss_ax.axhline(result["log_k"], color="grey", ls="--", label="log K (chance)")
    loss_ax.set(xlabel="step", ylabel="L_intra", title="training loss")
    loss_ax.legend(fontsize=7)
    names = ["random", *result["methods"]]
    means = [result["random"]["mean"], *(m["accuracy_mean"] for m in result["methods"].values())]
    stds = [result["random"]["std"], *(m["accuracy_std"] for m in result["methods"].values())]
    acc_ax.bar(names, means, yerr=stds, capsize=4, color=["grey", "tab:blue", "tab:orange"][: len(names)])
    acc_ax.set(
        ylabel="kNN accuracy (k=20)", title="Fashion-MNIST test", ylim=(min(means) - 0.05, max(means) + 0.03)
    )
    save_figure(figure, out_dir / "fashion_check.png", dpi=120)
