"""CPU smoke run of the memory-tier benchmark (``benchmarks/bench_memory.py --tiny-cpu``): the real
script on the TINY architecture, three of its rows; the JSON carries every headline key, the
streamed rows make the resident row's video bit for bit, the fp8 row stays close to it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_memory  # noqa: E402


def test_tiny_cpu_memory_bench(tmp_path):
    torch.set_num_threads(2)
    assert bench_memory.main(["--tiny-cpu", "--out-dir", str(tmp_path), "--rows", "resident,cap24,cap12",
                              "--steps", "1"]) == 0
    [path] = tmp_path.glob("*_cpu-tiny_memory.json")
    report = json.loads(path.read_text())
    assert report["errors"] == {}, report["errors"]
    for key in bench_memory.HEADLINE:
        assert key in report, key
    rows = report["rows"]
    assert set(rows) == {"resident", "cap24", "cap12"}
    assert math.isfinite(report["cap24_over_resident"]) and math.isfinite(report["cap12_over_resident"])
    assert math.isnan(report["cap8_s"]) and math.isnan(report["cap24_peak_gib"])   # not run / CUDA only
    cap24, cap12 = rows["cap24"], rows["cap12"]
    assert "1/2 blocks resident, 1 streamed" in cap24["plan"] and cap24["plan_detail"]["weights"] == "bf16"
    assert cap24["video_bit_identical_to_resident"] is True
    assert cap24["streamers"][0]["blocks_streamed"] == 1 * 3 and cap24["streamers"][0]["waited"] == 0
    assert cap12["plan_detail"]["weights"] == "fp8"
    assert report["fp8"]["matmul"] == "dequant" and 1e-4 < report["fp8"]["dit_rel_err_vs_bf16"] < 0.2
    assert 1e-4 < cap12["video_rel_err_vs_resident"] < 0.3
    assert cap24["host_weights_gib"] > 0 and cap24["frames"] == 9
