"""``scripts/benchmark.py ssl3d``: deformable slice attention against the ``deformable-attention`` package, and
JointSSL training steps (demo config, the paper config in fp32 / channels_last / bf16, the official code's
anchors); ``--device cuda`` adds the bf16 paper-config step and the fraction of the bf16 matmul rate."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agreement.tables import markdown_table
from benchmarks.common import (
    check_finite_positive,
    environment,
    environment_line,
    interleaved_times,
    load_average,
    matmul_gflops,
    median,
    official_step_seconds,
    peak_rss_mib,
    synchronizer,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "ssl3d" / "demo.yaml"

ATTENTION_SIZES = {
    "full": dict(batch=2, slices=64, dim=640, warmup=5, repeats=20),
    "quick": dict(batch=2, slices=16, dim=128, warmup=1, repeats=3),
}

# Overrides of the demo config's model and data sections for the smoke test.
QUICK_MODEL = dict(d_model=64, num_layers=1, ffn_hidden=128, projection_hidden=64, projection_dim=32)
QUICK_DATA = dict(num_slices=8, size=[32, 32], batch_size_3d=2, batch_size_2d=8)


def _attention_modules(layout: str, slices: int, dim: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and the package's module with the same weights; ``layout`` as in DeformableSliceAttention."""
    from deformable_attention import DeformableAttention1D

    from ssl3d.attention import DeformableSliceAttention, load_from_deformable_attention1d

    package_kwargs = dict(downsample_factor=4, offset_scale=2, offset_kernel_size=6)
    if layout == "code":
        ours = DeformableSliceAttention(dim, layout="code", num_slices=slices)
        package = DeformableAttention1D(dim=slices, **package_kwargs)
    else:
        ours = DeformableSliceAttention(dim, layout="slices")
        package = DeformableAttention1D(dim=dim, **package_kwargs)
    load_from_deformable_attention1d(ours, package)
    return ours, package


def _attention_step(
    module: torch.nn.Module,
    x: torch.Tensor,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    grad: torch.Tensor,
) -> Callable[[], None]:
    """One forward + backward of ``module`` on ``prepare(x)``, with gradients for the input as in a network."""

    def call() -> None:
        module.zero_grad(set_to_none=True)
        inputs = x.detach().requires_grad_()
        module(prepare(inputs)).backward(grad)

    return call


def run_attention(quick: bool, device: torch.device) -> dict[str, Any]:
    size = ATTENTION_SIZES["quick" if quick else "full"]
    batch, slices, dim = size["batch"], size["slices"], size["dim"]
    sync = synchronizer(device)
    results: dict[str, Any] = {}
    for layout in ("code", "slices"):
        torch.manual_seed(0)
        ours, package = (m.to(device).train() for m in _attention_modules(layout, slices, dim))
        x = torch.randn(batch, slices, dim, device=device)
        # The package is channel-first: for "code" the (batch, slices, dim) tensor is already that; for
        # "slices" it sees the transpose, as a model over (batch, slices, dim) tokens would pass it.
        package_input = (lambda t: t) if layout == "code" else (lambda t: t.transpose(1, 2))
        with torch.no_grad():
            reference = package(package_input(x))
            difference = (
                (ours(x) - (reference if layout == "code" else reference.transpose(1, 2))).abs().max()
            )
        grads = {"ours": torch.randn_like(x), "package": torch.randn_like(package_input(x))}

        times = interleaved_times(
            {
                "ours": _attention_step(ours, x, lambda t: t, grads["ours"]),
                "package": _attention_step(package, x, package_input, grads["package"]),
            },
            size["repeats"],
            warmup=size["warmup"],
            sync=sync,
        )
        ours_seconds, package_seconds = median(times["ours"]), median(times["package"])
        check_finite_positive({f"{layout}/ours": ours_seconds, f"{layout}/package": package_seconds})
        results[layout] = {
            "input_shape": [batch, slices, dim],
            "package_dim": slices if layout == "code" else dim,
            "ours_seconds": ours_seconds,
            "package_seconds": package_seconds,
            "speedup": package_seconds / ours_seconds,
            "ours_seconds_all": times["ours"],
            "package_seconds_all": times["package"],
            "max_abs_output_difference": float(difference),
            "warmup": size["warmup"],
            "repeats": size["repeats"],
        }
    return results


def demo_config(quick: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model and data sections of configs/ssl3d/demo.yaml (shrunk for ``quick``)."""
    import yaml

    config = yaml.safe_load(DEMO_CONFIG.read_text())
    model, data = dict(config["model"]), dict(config["data"])
    if quick:
        model |= QUICK_MODEL
        data |= QUICK_DATA
    return model, data


def make_batch(
    volumes: int, slices: int, size: tuple[int, int], images_2d: int, device: torch.device, seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """Random tensors in the training batch format: volume views (B, 1, S, H, W), slice views (B, 1, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size

    def views(*shape: int) -> dict[str, torch.Tensor]:
        return {
            "index": torch.arange(shape[0], device=device),
            "view1": torch.rand(*shape, generator=generator).to(device),
            "view2": torch.rand(*shape, generator=generator).to(device),
        }

    batch = {"volumes": views(volumes, 1, slices, height, width)}
    if images_2d > 0:
        batch["slices"] = views(images_2d, 1, height, width)
    return batch


def training_step_fn(
    model_kwargs: dict[str, Any],
    batch: dict[str, dict[str, torch.Tensor]],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    gradient_clip: float | None = 2.0,
) -> Callable[[], None]:
    """One forward + backward + LARS step of a fresh ``JointSSL(**model_kwargs)`` on ``batch`` per call."""
    from agreement.optim import build_optimizer
    from ssl3d.module import JointSSL

    torch.manual_seed(0)
    model = JointSSL(**model_kwargs).to(device).train()
    model.log_dict = lambda *args, **kwargs: None  # no trainer to log to
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameters, "lars", lr=0.01)

    def step() -> None:
        model.on_train_batch_start(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model.training_step(batch, 0)
        loss.backward()
        model.on_before_optimizer_step(optimizer)
        if gradient_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, gradient_clip)
        optimizer.step()

    return step


def _step_result(
    times: list[float], batch: dict[str, dict[str, torch.Tensor]], warmup: int
) -> dict[str, Any]:
    seconds = median(times)
    volumes = batch["volumes"]["view1"].shape[0]
    slices = batch["volumes"]["view1"].shape[2]
    images_2d = batch["slices"]["view1"].shape[0] if "slices" in batch else 0
    return {
        "seconds_per_step": seconds,
        "seconds_all": times,
        "volumes_per_second": volumes / seconds,
        "images_2d_per_second": images_2d / seconds,
        # Every 2D image the encoder sees: both views of every volume slice and of every 2D image.
        "encoded_images_per_second": 2 * (volumes * slices + images_2d) / seconds,
        "peak_rss_mib_process": peak_rss_mib(),
        "warmup": warmup,
        "repeats": len(times),
    }


def time_training_step(
    model_kwargs: dict[str, Any],
    batch: dict[str, dict[str, torch.Tensor]],
    device: torch.device,
    warmup: int,
    repeats: int,
    autocast_dtype: torch.dtype | None = None,
    gradient_clip: float | None = 2.0,
) -> dict[str, Any]:
    """Median seconds of forward + backward + LARS step of ``JointSSL(**model_kwargs)`` on ``batch``."""
    step = training_step_fn(model_kwargs, batch, device, autocast_dtype, gradient_clip)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = interleaved_times({"step": step}, repeats, warmup=warmup, sync=synchronizer(device))["step"]
    result = _step_result(times, batch, warmup)
    if device.type == "cuda":
        result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


# The paper configuration's step (ResNet-50, 4-layer slice Transformer, 64 slices of 128 x 128, one volume x 2
# views, 2D branch off) in three variants timed round-robin in one process.
PAPER_STEP = dict(
    backbone="resnet50", d_model=640, num_layers=4, ffn_hidden=720, clustering="swav", lambda_intra=0.0
)
PAPER_STEP_QUICK = dict(backbone="resnet18", d_model=64, num_layers=1, ffn_hidden=128, clustering="swav")
PAPER_VARIANTS = {
    "fp32": ({}, None),
    "fp32, channels_last": ({"channels_last": True}, None),
    "bf16 autocast, channels_last": ({"channels_last": True}, torch.bfloat16),
}


def run_paper_steps(quick: bool, device: torch.device) -> dict[str, Any]:
    """fp32, channels-last and bf16-autocast steps of the paper configuration, interleaved in one process."""
    model, slices, size = (PAPER_STEP_QUICK, 8, (32, 32)) if quick else (PAPER_STEP, 64, (128, 128))
    batch = make_batch(1, slices, size, 0, device)
    steps = {
        name: training_step_fn(model | {"num_slices": slices} | options, batch, device, dtype)
        for name, (options, dtype) in PAPER_VARIANTS.items()
    }
    warmup, repeats = (1, 2) if quick else (1, 4)
    times = interleaved_times(steps, repeats, warmup=warmup, sync=synchronizer(device))
    check_finite_positive({name: median(t) for name, t in times.items()})
    fp32 = median(times["fp32"])
    results: dict[str, Any] = {
        "config": model
        | {"num_slices": slices, "size": list(size), "volumes": 1, "views": 2, "optimizer": "lars"}
    }
    for name in PAPER_VARIANTS:
        result = _step_result(times[name], batch, warmup)
        result["speedup_vs_fp32"] = fp32 / result["seconds_per_step"]
        anchor = official_step_seconds("JointSSL paper") if not quick and device.type == "cpu" else None
        if anchor:
            result["anchor_seconds_per_step"] = anchor
            result["speedup_vs_anchor"] = anchor / result["seconds_per_step"]
        results[name] = result
    return results


def run_joint_steps(quick: bool, device: torch.device) -> dict[str, Any]:
    model_cfg, data = demo_config(quick)
    warmup, repeats = (1, 2) if quick else (2, 5)
    slices, size = data["num_slices"], tuple(data["size"])
    volumes, images_2d = data["batch_size_3d"], data["batch_size_2d"]
    # SwAV needs no memory bank; the demo's DeepCluster-V2 head differs only in the (small) clustering loss.
    demo = model_cfg | {
        "clustering": "swav",
        "num_slices": slices,
        "attention_layout": model_cfg.get("attention_layout", "slices"),
    }
    official = demo | (
        dict(d_model=64, num_layers=1, ffn_hidden=128)
        if quick
        else dict(d_model=640, num_layers=4, ffn_hidden=720)
    )
    official |= {"lambda_intra": 0.0}
    variants = {
        "demo": (demo, images_2d),
        "official_encoder_no_2d_slices_layout": (official | {"attention_layout": "slices"}, 0),
        "official_encoder_no_2d_code_layout": (official | {"attention_layout": "code"}, 0),
    }
    results: dict[str, Any] = {}
    # Smallest first: the process's peak RSS only grows, so each figure is at most its variant's own peak.
    for name, (kwargs, n_2d) in variants.items():
        batch = make_batch(volumes, slices, size, n_2d, device)
        result = time_training_step(kwargs, batch, device, warmup, repeats)
        gc.collect()  # free this variant's model before the next one is built
        check_finite_positive({name: result["seconds_per_step"]})
        results[name] = {
            "config": {
                key: kwargs[key]
                for key in (
                    "backbone",
                    "d_model",
                    "num_layers",
                    "ffn_hidden",
                    "attention_layout",
                    "clustering",
                )
                if key in kwargs
            }
            | {
                "lambda_intra": kwargs.get("lambda_intra", 1.0),
                "num_slices": slices,
                "size": list(size),
                "volumes": volumes,
                "images_2d": n_2d,
                "views": 2,
                "optimizer": "lars",
            },
            **result,
        }
        anchor = official_step_seconds("JointSSL small") if device.type == "cpu" else None
        if name.startswith("official") and not quick and anchor:
            results[name]["anchor_seconds_per_step"] = anchor
            results[name]["anchor_note"] = (
                "the official code's step on this machine type (2D branch off), measured at a different sitting"
            )
            results[name]["time_vs_anchor"] = result["seconds_per_step"] / anchor
    return results


def run_cuda_extras(quick: bool, device: torch.device) -> dict[str, Any]:
    """bf16 paper-config step, peak GPU memory and the slice encoder's share of the bf16 matmul rate.

    Meant for CUDA (``--device cuda``), but nothing in it is CUDA-only, so the tests run it on CPU at quick sizes.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from ssl3d.encoder import SliceEncoder

    if quick:
        backbone, slices, size, volumes, d_model, matmul = "resnet18", 8, (32, 32), 2, 64, 512
    else:
        backbone, slices, size, volumes, d_model, matmul = "resnet50", 64, (128, 128), 4, 640, 8192
    paper = dict(
        backbone=backbone,
        d_model=d_model,
        num_slices=slices,
        num_layers=4,
        ffn_hidden=720,
        clustering="swav",
        lambda_intra=0.0,
    )
    batch = make_batch(volumes, slices, size, 0, device)
    step = time_training_step(
        paper, batch, device, warmup=2, repeats=2 if quick else 5, autocast_dtype=torch.bfloat16
    )

    rate = matmul_gflops(matmul, matmul, matmul, repeats=10, dtype=torch.bfloat16, device=device)
    torch.manual_seed(0)
    encoder = SliceEncoder(backbone, d_model).to(device).train()
    images = torch.rand(2 * volumes * slices, 1, *size, device=device)

    def encoder_step() -> None:
        encoder.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = encoder(images)
        out.float().square().mean().backward()

    with FlopCounterMode(display=False) as counter:
        encoder_step()
    flops = counter.get_total_flops()
    times = interleaved_times(
        {"encoder": encoder_step}, 2 if quick else 5, warmup=2, sync=synchronizer(device)
    )
    seconds = median(times["encoder"])
    achieved = flops / seconds / 1e9
    return {
        "paper_step_bf16": {
            "config": paper | {"size": list(size), "volumes": volumes, "views": 2, "autocast": "bfloat16"},
            **step,
        },
        "slice_encoder": {
            "images": images.shape[0],
            "image_size": list(size),
            "forward_backward_flops": flops,
            "seconds": seconds,
            "achieved_gflops": achieved,
            "bf16_matmul_gflops": rate,
            "fraction_of_bf16_matmul_rate": achieved / rate,
        },
    }


def run_ssl3d(quick: bool, device: torch.device) -> dict[str, Any]:
    result: dict[str, Any] = {
        "suite": "ssl3d",
        "quick": quick,
        "device": str(device),
        "environment": environment(device),
        "attention": run_attention(quick, device),
        "joint_step": run_joint_steps(quick, device),
        "paper_step": run_paper_steps(quick, device),
    }
    result["environment"]["load_average_at_end"] = load_average()
    if device.type == "cuda":
        result["cuda"] = run_cuda_extras(quick, device)
    return result


def ssl3d_tables(result: dict[str, Any]) -> str:
    attention_rows = [
        [
            layout,
            "x".join(map(str, r["input_shape"])),
            r["package_dim"],
            r["ours_seconds"],
            r["package_seconds"],
            r["speedup"],
            r["max_abs_output_difference"],
        ]
        for layout, r in result["attention"].items()
    ]
    step_rows = []
    for name, r in result["joint_step"].items():
        cfg = r["config"]
        step_rows.append(
            [
                name,
                f"{cfg['backbone']}, d={cfg['d_model']}, L={cfg['num_layers']}, {cfg['num_slices']}x"
                f"{cfg['size'][0]}x{cfg['size'][1]}, {cfg['volumes']} vol + {cfg['images_2d']} 2D",
                r["seconds_per_step"],
                r["volumes_per_second"],
                r["encoded_images_per_second"],
                r["peak_rss_mib_process"],
                r.get("anchor_seconds_per_step"),
            ]
        )
    attention = next(iter(result["attention"].values()))
    lines = [
        f"### Deformable slice attention, forward + backward ({result['device']}, median of "
        f"{attention['repeats']} interleaved steps after {attention['warmup']} warm-up)",
        "",
        markdown_table(
            ["layout", "input", "package dim", "ours (s)", "package (s)", "package / ours", "max |diff|"],
            attention_rows,
            digits=4,
        ),
        "",
        "### JointSSL training step (forward + backward + LARS), 2 views each",
        "",
        markdown_table(
            [
                "variant",
                "config",
                "s / step",
                "volumes / s",
                "encoded images / s",
                "peak RSS MiB (process)",
                "anchor s / step",
            ],
            step_rows,
        ),
    ]
    anchors = [
        r["anchor_seconds_per_step"] for r in result["joint_step"].values() if "anchor_seconds_per_step" in r
    ]
    if anchors:
        lines += [
            "",
            f"Anchor: the official code at {anchors[0]} s/step (ResNet-18, 32 slices 64x64, 2 volumes x "
            "2 views, no 2D branch) on this machine type, from a different sitting.",
        ]
    paper_step = result.get("paper_step")
    if paper_step:
        cfg = paper_step["config"]
        variants = {name: r for name, r in paper_step.items() if name != "config"}
        lines += [
            "",
            f"### Paper-config step ({cfg['backbone']}, d={cfg['d_model']}, L={cfg['num_layers']}, "
            f"{cfg['num_slices']}x{cfg['size'][0]}x{cfg['size'][1]}, 1 volume x 2 views, 2D branch off), "
            "variants interleaved",
            "",
            markdown_table(
                ["variant", "s / step", "speed-up vs fp32", "official s / step", "official / ours"],
                [
                    [
                        name,
                        r["seconds_per_step"],
                        r["speedup_vs_fp32"],
                        r.get("anchor_seconds_per_step"),
                        r.get("speedup_vs_anchor"),
                    ]
                    for name, r in variants.items()
                ],
            ),
        ]
    if "cuda" in result:
        paper, encoder = result["cuda"]["paper_step_bf16"], result["cuda"]["slice_encoder"]
        lines += [
            "",
            "### CUDA, bf16 autocast",
            "",
            markdown_table(
                ["measure", "value"],
                [
                    ["paper-config step (s)", paper["seconds_per_step"]],
                    ["volumes / s", paper["volumes_per_second"]],
                    ["peak GPU memory (MiB)", paper["peak_gpu_memory_mib"]],
                    ["slice encoder fwd+bwd (TFLOP)", encoder["forward_backward_flops"] / 1e12],
                    ["slice encoder achieved (TFLOP/s)", encoder["achieved_gflops"] / 1e3],
                    ["bf16 matmul rate (TFLOP/s)", encoder["bf16_matmul_gflops"] / 1e3],
                    ["fraction of bf16 matmul rate", encoder["fraction_of_bf16_matmul_rate"]],
                ],
            ),
        ]
    env = result["environment"]
    lines += ["", environment_line(env)]
    return "\n".join(lines)
