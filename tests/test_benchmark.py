"""Smoke test of scripts/benchmark.py at its --quick sizes: the JSON it writes has the documented fields."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.ssl3d import run_cuda_extras

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
# One thread: on a CPU shared with other jobs, tiny parallel ops otherwise wait on descheduled workers.
QUICK = ["--quick", "--threads", "1"]


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive_finite(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_agreement_quick_writes_timings_and_ratios(benchmark, tmp_path):
    out = tmp_path / "agreement.json"
    threads = torch.get_num_threads()
    returned = benchmark.main(["agreement", *QUICK, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(returned))
    assert data["suite"] == "agreement" and data["quick"] is True
    assert data["environment"]["torch_threads"] == 1
    assert {"torch", "cpu", "torch_threads", "load_average_1_5_15_min"} <= set(data["environment"])
    kmeans = data["kmeans"]
    assert positive_finite(kmeans["matmul_gflops"]) and positive_finite(kmeans["bound_seconds"])
    assert set(kmeans["results"]) == {
        "torch",
        "torch bf16",
        "torch bf16, min with indices",
        "faiss",
        "sklearn",
    }
    for result in kmeans["results"].values():
        assert positive_finite(result["seconds"])
        assert all(positive_finite(t) for t in result["seconds_all"])
        assert positive_finite(result["time_vs_sklearn"]) and positive_finite(result["time_vs_matmul_bound"])
        # Same data, same initial centroids, same number of Lloyd iterations: the same clustering.
        assert abs(result["inertia_vs_sklearn"] - 1) < 0.01
    assert set(kmeans["target_met"]) == {"torch", "torch bf16"}
    assert all(isinstance(met, bool) for met in kmeans["target_met"].values())
    assert positive_finite(data["sinkhorn"]["seconds"])
    assert torch.get_num_threads() == threads  # --threads applies to the run only


def test_ssl3d_quick_writes_attention_and_step_timings(benchmark, tmp_path, capsys):
    out = tmp_path / "nested" / "ssl3d.json"
    benchmark.main(["ssl3d", *QUICK, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["suite"] == "ssl3d" and "cuda" not in data
    for layout in ("code", "slices"):
        attention = data["attention"][layout]
        assert positive_finite(attention["ours_seconds"]) and positive_finite(attention["package_seconds"])
        assert positive_finite(attention["speedup"])
        # Both modules carry the same weights, so they compute the same function.
        assert attention["max_abs_output_difference"] < 1e-4
    steps = data["joint_step"]
    assert set(steps) == {
        "demo",
        "official_encoder_no_2d_slices_layout",
        "official_encoder_no_2d_code_layout",
    }
    for name, step in steps.items():
        for key in (
            "seconds_per_step",
            "volumes_per_second",
            "encoded_images_per_second",
            "peak_rss_mib_process",
        ):
            assert positive_finite(step[key]), (name, key)
    assert steps["demo"]["config"]["images_2d"] > 0
    assert steps["official_encoder_no_2d_code_layout"]["config"]["images_2d"] == 0
    paper = data["paper_step"]
    assert set(paper) == {"config", "fp32", "fp32, channels_last", "bf16 autocast, channels_last"}
    assert paper["fp32"]["speedup_vs_fp32"] == 1.0
    for name in ("fp32, channels_last", "bf16 autocast, channels_last"):
        assert positive_finite(paper[name]["seconds_per_step"]) and positive_finite(
            paper[name]["speedup_vs_fp32"]
        )
    assert "Paper-config step" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_without_a_gpu_is_a_clear_error(benchmark, tmp_path):
    with pytest.raises(SystemExit, match="CUDA is not available"):
        benchmark.main(["ssl3d", "--quick", "--device", "cuda", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_gpu_measurements_run_on_cpu_at_quick_sizes():
    # --device cuda cannot run without a GPU, but its code has nothing CUDA-specific: exercise it here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_cuda_extras(True, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    step, encoder = result["paper_step_bf16"], result["slice_encoder"]
    assert step["config"]["autocast"] == "bfloat16" and positive_finite(step["seconds_per_step"])
    assert encoder["forward_backward_flops"] > 0
    for key in ("seconds", "achieved_gflops", "bf16_matmul_gflops", "fraction_of_bf16_matmul_rate"):
        assert positive_finite(encoder[key]), key


@pytest.mark.parametrize("suite", ["prompts", "entities", "entities-eval", "finetune"])
def test_package_suites_quick_write_rows(benchmark, tmp_path, suite):
    out = tmp_path / f"{suite}.json"
    returned = benchmark.main([suite, *QUICK, "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["rows"] and len(written["rows"]) == len(returned["rows"])
    timings = [v for row in written["rows"] for k, v in row.items() if "ms" in k or k == "seconds"]
    assert timings and all(positive_finite(float(v)) for v in timings)


def test_entities_evaluation_writes_markdown_and_tunes_on_the_tuning_half_only(benchmark, tmp_path):
    out = tmp_path / "eval.json"
    result = benchmark.main(["entities-eval", *QUICK, "--out", str(out)])
    assert result["split"] == "held-out" and "| **mean** |" in out.with_suffix(".md").read_text()
    assert {"stage 2 mean_per_class_accuracy worst", "stage 3 accuracy mean"} <= set(result["margins"])
    tuned = benchmark.main(["entities-eval", *QUICK, "--split", "tuning", "--tune", "--out", str(out)])
    assert tuned["seeds"] == [0] and tuned["chosen"] in [row["options"] for row in tuned["candidates"]]
    best = max(
        tuned["candidates"],
        key=lambda row: (round(row["worst"], 3), row["stage 3 mean_per_class_accuracy mean"]),
    )
    assert tuned["chosen"] == best["options"]
    with pytest.raises(ValueError, match="tuning half only"):
        benchmark.main(["entities-eval", *QUICK, "--tune", "--out", str(out)])


def test_official_step_times_are_those_of_this_machine_type(monkeypatch):
    from benchmarks import common

    monkeypatch.setattr(common, "cpu_model", lambda: "Intel(R) Xeon(R) Processor")
    assert common.official_step_seconds("JointSSL paper") == 16.09
    monkeypatch.setattr(common, "cpu_model", lambda: "AMD EPYC 9R14")
    assert common.official_step_seconds("JointSSL paper") == 9.81
    monkeypatch.setattr(common, "cpu_model", lambda: "Apple M3")
    assert common.official_step_seconds("IVLP") is None  # never measured there: no ratio is printed


def test_allocator_pairs_report_both_modes(benchmark, tmp_path):
    result = benchmark.main(
        ["allocator", "--quick", "--pairs", "1", "--out", str(tmp_path / "allocator.json")]
    )
    assert set(result["runs"]) == {"glibc", "retain"}
    for runs in result["runs"].values():
        assert positive_finite(runs[0]["seconds_per_step"]) and runs[0]["minor_page_faults"] >= 0
    assert len(result["ratios"]) == 1 and positive_finite(result["ratios"][0])
    assert "| glibc |" in result["markdown"] and (tmp_path / "allocator.json").is_file()
