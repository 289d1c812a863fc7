"""Training-step time and peak memory of PromptSRC against IVLP (same prompts, CE only).

PromptSRC adds two frozen passes per step: the frozen image features (no autograd graph; bf16 where the GPU or
CPU computes it natively, also timed in fp32) and the cached 60-template text features (computed once per class
list, so not in the step). The target is a
step time of at most 1.25x IVLP's. IVLP is also timed in open_clip's batch-first layout (``sequence_first=False``
in ``PromptedCLIP``), which the towers ran in before they were switched to the sequence-first layout.
"""

from __future__ import annotations

import copy
import gc
import statistics
from typing import Any

import torch

from benchmarks.common import official_step_seconds, synchronizer, time_call
from prompts.module import IVLP, PromptSRC

DEMO = {
    "model_name": "prompts-demo-vit",
    "text_depth": 3,
    "vision_depth": 3,
    "classes": 5,
    "batch": 4,
    "size": 32,
}
GPU = {
    "model_name": "ViT-B-16-quickgelu",
    "text_depth": 9,
    "vision_depth": 9,
    "classes": 50,
    "batch": 4,
    "size": 224,
}
# The official implementation's setting in the reference step times (CPU).
VIT_B16 = GPU | {"classes": 10}


def _saved_bytes(module, images, labels) -> int:
    """Bytes of the distinct storages the autograd graph keeps for backward in one training step (activation
    memory); a view or an expanded tensor counts once, as the memory it really holds."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module.compute_loss(images, labels)["loss"]
    return sum(storages.values())


def _step(module, optimizer, images, labels) -> float:
    """Seconds of one training step (device synchronised)."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.compute_loss(images, labels)["loss"].backward()
        optimizer.step()

    return time_call(step, synchronizer(images.device))


BATCH_FIRST = "IVLP, open_clip layout"
# PromptSRC's default teacher pass is bf16 where the CPU or GPU computes it natively ("auto"); this is the fp32 one.
FP32_TEACHER = "PromptSRC, fp32 teacher"


FULL_TEXT = "IVLP, all text tokens"


def _run_all_text_tokens(module: IVLP) -> None:
    """Make the text tower run on every token position, past the end-of-text tokens (until the next
    ``set_classnames``)."""
    module.model.text_length = module.model.clip.positional_embedding.shape[0]


def _open_clip_layout(module: IVLP) -> IVLP:
    """A copy of ``module`` whose CLIP towers run in open_clip's batch-first layout again."""
    module = copy.deepcopy(module)
    clip = module.model.clip
    for tower in (clip.transformer, clip.visual.transformer):
        tower.batch_first = True
        for block in tower.resblocks:
            block.attn.batch_first = True
    return module


def _compare(setting: dict[str, Any], device: str, rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """IVLP and PromptSRC measured in alternating rounds, so that load changes on a shared machine hit both."""
    torch.manual_seed(0)
    names = [f"class {i}" for i in range(setting["classes"])]
    kwargs = {k: setting[k] for k in ("model_name", "text_depth", "vision_depth")}
    modules = {"IVLP": IVLP(classnames=names, **kwargs), "PromptSRC": PromptSRC(classnames=names, **kwargs)}
    modules[FP32_TEACHER] = PromptSRC(classnames=names, frozen_precision="fp32", **kwargs)
    modules[BATCH_FIRST] = _open_clip_layout(modules["IVLP"])
    modules[FULL_TEXT] = copy.deepcopy(modules["IVLP"])
    images = torch.randn(setting["batch"], 3, setting["size"], setting["size"], device=device)
    labels = torch.randint(0, len(names), (setting["batch"],), device=device)
    optimizers, times, memory = {}, {name: [] for name in modules}, {}
    for name, module in modules.items():
        module.to(device)
        module.model.set_classnames(names)  # re-tokenise on the device
        if name == FULL_TEXT:
            _run_all_text_tokens(module)
        if isinstance(module, PromptSRC) and module.regularised:
            module.teacher_text_features()  # computed once per class list, as in training
        params = list(module.model.prompt_parameters().values())
        optimizers[name] = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        _step(module, optimizers[name], images, labels)  # warm-up
        memory[name] = {"autograd_saved_mib": _saved_bytes(module, images, labels) / 2**20}
    for _ in range(rounds):
        for name, module in modules.items():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            times[name] += [_step(module, optimizers[name], images, labels) for _ in range(steps)]
            if device.startswith("cuda"):
                memory[name]["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    out = {}
    for name in modules:
        out[name] = {
            "median_step_s": statistics.median(times[name]),
            "min_step_s": min(times[name]),
            **memory[name],
        }
    del modules, optimizers
    gc.collect()
    return out


def run_prompts_benchmark(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Median training-step time (forward, backward, SGD step) and activation memory of PromptSRC and IVLP.

    The demo config runs single-threaded on CPU (restored afterwards): on a shared machine, several intra-op
    threads make timings depend on other processes far more than on the code. The ViT-B/16 setting (not with
    ``quick``) uses every thread, as the official step times it is compared with did. Returns a JSON-able dict
    with ``rows`` for a table.
    """
    threads = torch.get_num_threads()
    # (label, setting, device, intra-op threads, (rounds, steps per round))
    settings = [("demo config", DEMO, "cpu", 1, (3, 3) if quick else (8, 5))]
    if not quick:  # all threads, as the official step times were measured
        settings.append(("ViT-B/16, 224 px, batch 4", VIT_B16, "cpu", threads, (3, 2)))
    if device.startswith("cuda") and torch.cuda.is_available():
        settings.append(("ViT-B/16, 50 classes", GPU, device, threads, (8, 5)))
    rows, results = [], {}
    try:
        for label, setting, dev, setting_threads, (rounds, steps) in settings:
            torch.set_num_threads(setting_threads)
            measured = _compare(setting, dev, rounds, steps)
            ratio = measured["PromptSRC"]["median_step_s"] / measured["IVLP"]["median_step_s"]
            layout = measured[BATCH_FIRST]["median_step_s"] / measured["IVLP"]["median_step_s"]
            full_text = measured[FULL_TEXT]["median_step_s"] / measured["IVLP"]["median_step_s"]
            results[label] = {
                **measured,
                "rounds": rounds,
                "steps": steps,
                "threads": setting_threads,
                "ratio": ratio,
                "layout_speedup": layout,
                "text_truncation_speedup": full_text,
                "target": 1.25,
                "meets_target": ratio <= 1.25,
                "device": dev,
            }
            for name, r in measured.items():
                official = official_step_seconds(name) if setting is VIT_B16 and dev == "cpu" else None
                if official:
                    results[label].setdefault("official_seconds_per_step", {})[name] = official
                rows.append(
                    {
                        "setting": label,
                        "device": dev,
                        "method": name,
                        "step ms (median)": round(1000 * r["median_step_s"], 2),
                        "autograd MiB": round(r["autograd_saved_mib"], 2),
                        "peak CUDA MiB": round(r["peak_cuda_mib"], 1) if "peak_cuda_mib" in r else "",
                        "PromptSRC / IVLP": round(ratio, 3) if name == "PromptSRC" else "",
                        "open_clip layout / IVLP": round(layout, 3) if name == BATCH_FIRST else "",
                        "all text tokens / IVLP": round(full_text, 3) if name == FULL_TEXT else "",
                        "official s / step": official or "",
                        "ours / official": round(r["median_step_s"] / official, 3) if official else "",
                    }
                )
    finally:
        torch.set_num_threads(threads)
    return {
        "benchmark": "prompts",
        "quick": quick,
        "results": results,
        "rows": rows,
    }
