"""CPU smoke test of the GPU benchmark (``benchmarks/bench.py --tiny-cpu``).

Runs the real script on the TINY architecture and checks the JSON report: every headline key is
present, the CPU-measurable figures are real numbers, the FLOP counter agrees with the closed-form
count, and a failing section is recorded without stopping the run. The full-size random-weight key
streams are dry-run through the loaders on ``meta`` so a layout problem shows here, not on the GPU.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench  # noqa: E402
import builders  # noqa: E402
import harness  # noqa: E402

CUDA_ONLY = {"floor_bf16_1spk_s", "peak_mem_gib_1spk", "forward_over_floor", "int8attn_kernel_tops"}


def _run(tmp_path: Path, *extra: str) -> dict:
    torch.set_num_threads(2)
    assert bench.main(["--tiny-cpu", "--out-dir", str(tmp_path), "--repeats", "1", *extra]) == 0
    reports = list(tmp_path.glob("*_cpu-tiny.json"))
    assert len(reports) == 1
    return json.loads(reports[0].read_text())


def test_tiny_cpu_report_has_every_figure(tmp_path):
    report = _run(tmp_path)
    assert report["errors"] == {}, report["errors"]
    assert report["skipped"] == {"ceilings": "ceilings need CUDA"}
    for key in ("gpu", "tokens", *harness.HEADLINE_KEYS):
        assert key in report, key
    assert report["tokens"] == 3 * 2 * 2  # 9 frames of 32x32: 3 latent frames of 2x2 tokens
    for key in set(harness.HEADLINE_KEYS) - CUDA_ONLY:
        assert math.isfinite(report[key]), (key, report[key])
    for key in ("forward_bf16_1spk_s", "forward_bf16_2spk_s", "forward_fp8_1spk_s", "diffusers_base_forward_s",
                "clip4_total_s", "clip4_dit_s"):
        assert report[key] > 0, key
    assert 0 < report["clip4_dit_s"] < report["clip4_total_s"]
    assert 0 < report["fp8_rel_err"] < 0.1  # fp8 changes the output, but only a little
    # the 8-bit attention (its PyTorch reference on CPU) changes it less than 1 %
    assert 0 < report["int8attn_rel_err"] < 1e-2 and report["best_rel_err"] <= 3e-2

    sections = report["sections"]
    counted, analytic = sections["forward"]["flops_1spk"], sections["forward"]["flops_1spk_analytic"]
    assert counted["attention"] > 0 and counted["other"] > 0
    assert counted["total"] == pytest.approx(analytic["total"], rel=0.05)
    assert counted["attention"] == pytest.approx(analytic["attention"], rel=0.05)

    clip4 = sections["clip4"]
    assert clip4["stage_calls"]["dit"] == 4 * 3  # 4 steps x (cond, drop_text, uncond)
    for stage in ("text_encode", "audio_features", "clip_encode", "vae_encode", "vae_decode"):
        assert clip4["stages_s"][stage] > 0, stage
    assert clip4["frames_delivered"] == 9

    for thresh in ("0.2", "0.3"):
        tea = sections["teacache"][f"thresh_{thresh}"]
        assert tea["calls"] == 40 * 3
        assert 0 <= tea["skipped"] <= tea["calls"] - 5 * 3  # the first 5 steps always run
    assert sections["fp8"]["quantized_linears"] > 0


def test_failing_section_is_recorded_and_run_goes_on(tmp_path):
    report = _run(tmp_path, "--sections", "forward,baseline", "--backend", "no-such-backend")
    assert "no-such-backend" in report["errors"]["forward"]["error"]
    assert "baseline" in report["errors"]
    assert math.isnan(report["forward_bf16_1spk_s"])


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        bench.parse_args(["--out-dir", str(tmp_path), "--sections", "forward,warp"])


def test_full_size_random_layouts_load():
    summaries = builders.check_full_size_layouts()
    assert set(summaries) == {"transformer", "umT5 text encoder", "CLIP image encoder", "vae",
                              "wav2vec2 audio encoder"}


def test_floor_mfu_and_ratios_follow_the_measured_figures(tmp_path):
    report = harness.Report(tmp_path, "NVIDIA H100 80GB HBM3")
    report.data["sections"]["ceilings"] = {"sdpa_best_tflops": 500.0, "matmul_bf16_tflops": 800.0}
    report.data["sections"]["forward"] = {"flops_1spk": {"total": 1.5e15, "attention": 1.0e15, "other": 0.5e15}}
    report.set(forward_bf16_1spk_s=4.0, forward_bf16_2spk_s=4.4, forward_fp8_1spk_s=3.0,
               diffusers_base_forward_s=5.0, clip4_total_s=100.0, clip4_dit_s=60.0)
    assert report.path.name.endswith("_nvidia-h100-80gb-hbm3.json")
    data = json.loads(report.path.read_text())
    floor = 1.0e15 / 500e12 + 0.5e15 / 800e12
    assert data["floor_bf16_1spk_s"] == pytest.approx(floor)
    assert data["forward_over_floor"] == pytest.approx(4.0 / floor)
    assert data["mfu_bf16_1spk"] == pytest.approx(1.5e15 / 4.0 / 800e12)
    assert data["forward_over_diffusers"] == pytest.approx(0.8)
    assert data["spk2_over_spk1"] == pytest.approx(1.1)
    assert data["fp8_over_bf16"] == pytest.approx(0.75)
    assert data["clip4_non_dit_share"] == pytest.approx(0.4)
