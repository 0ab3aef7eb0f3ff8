"""CPU smoke test of the benchmark's ``video10s_lora`` section (``bench.py --tiny-cpu --sections video10s_lora``).

Runs the real section on the TINY architecture: a random official-format LoRA is written, then read,
checked and merged by ``Engine.from_components`` (``engine.prepare_dit``), and the
streaming two-speaker video run with ``recipe=lightx2v``. Checks the JSON keys the GPU report must
carry and that the figures follow from what ran (forwards = clips x 4 steps x 2 passes, the 40x3
estimate from the measured forward).
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


def _run(tmp_path: Path, *extra: str) -> dict:
    torch.set_num_threads(2)
    assert bench.main(["--tiny-cpu", "--out-dir", str(tmp_path), "--sections", "video10s_lora", *extra]) == 0
    (path,) = tmp_path.glob("*_cpu-tiny.json")
    return json.loads(path.read_text())


def test_video10s_lora_section(tmp_path):
    report = _run(tmp_path, "--attention", "sdpa")
    assert report["errors"] == {} and report["skipped"] == {}, (report["errors"], report["skipped"])
    for key in ("video10s_lora_warm_s", "video10s_lora_load_s", "video10s_forwards"):
        assert math.isfinite(report[key]) and report[key] > 0, key
    sec = report["sections"]["video10s_lora"]
    clips = report["video10s_clips"]
    assert clips == 2                             # 0.52 s = 13 frames: clips of 9 with 5 carried over
    assert sec["warm_frames"] == sec["warm_frames_delivered"] == 13
    assert (sec["steps"], sec["passes"], sec["shift"], sec["text_guide"], sec["audio_guide"]) == (4, 2, 2.0, 1.0, 2.0)
    assert report["video10s_forwards"] == clips * 4 * 2 == sec["warm_stage_calls"]["dit"]
    assert report["video10s_40x3_forwards"] == clips * 40 * 3
    per = report["video10s_dit_forward_s"]
    assert report["video10s_40x3_estimated_s"] == pytest.approx(sec["non_dit_s"] + clips * 120 * per)
    assert report["video10s_40x3_estimated_s"] > report["video10s_lora_warm_s"]
    for stage in ("audio_features", "text_encode", "clip_encode", "vae_encode", "dit", "vae_decode"):
        assert sec["warm_stages_s"][stage] > 0, stage
    assert report["lora_tensors_changed"] > 0 and sec["lora_files"][0]["format"] == "official"
    assert report["lora_read_s"] > 0 and report["lora_merge_s"] > 0
    assert report["video10s_lora_load_s"] == pytest.approx(report["lora_read_s"] + report["lora_merge_s"])
    assert (sec["attention_asked"], sec["attention"]) == ("sdpa", "sdpa")   # passed to EngineConfig.attention
