"""CPU smoke test of the few-step LoRA video benchmark (``benchmarks/bench_lora.py --tiny-cpu``).

Runs the real script on the TINY architecture: a random official-format LoRA is written, read,
checked and merged through ``engine.prepare_dit``, then a warm-up clip and the streaming two-speaker
video run with ``--recipe lightx2v``. Checks the JSON keys the GPU report must carry and that the
figures follow from what ran (forwards = clips x 4 steps x 2 passes, the 40x3 estimate).
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

import bench_lora  # noqa: E402


def test_tiny_cpu_report(tmp_path):
    torch.set_num_threads(2)
    assert bench_lora.main(["--tiny-cpu", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*_cpu-tiny_video10s_lora.json")
    report = json.loads(path.read_text())
    assert report["errors"] == {}
    for key in ("video10s_lora_warm_s", "video10s_lora_load_s", "video10s_forwards"):
        assert key in report and math.isfinite(report[key]) and report[key] > 0, key
    video = report["sections"]["video"]
    clips = report["video10s_clips"]
    assert clips == 2                          # 0.52 s = 13 frames: clips of 9 with 5 carried over
    assert video["warm_frames"] == video["warm_frames_delivered"] == 13
    assert (video["steps"], video["passes"], video["shift"]) == (4, 2, 2.0)
    assert report["video10s_forwards"] == clips * 4 * 2
    assert report["video10s_40x3_forwards"] == clips * 40 * 3
    per = report["video10s_dit_forward_s"]
    assert report["video10s_40x3_estimated_s"] == pytest.approx(video["non_dit_s"] + clips * 120 * per)
    assert report["video10s_40x3_estimated_s"] > report["video10s_lora_warm_s"]
    for stage in ("audio_features", "text_encode", "clip_encode", "vae_encode", "dit", "vae_decode"):
        assert video["warm_stages_s"][stage] > 0, stage
    assert report["lora_tensors_changed"] > 0 and report["lora_files"][0]["format"] == "official"
    assert report["lora_read_s"] > 0 and report["lora_merge_s"] > 0


def test_attention_option_needs_the_engine_field(tmp_path):
    import dataclasses

    from multitalk.pipeline.engine import EngineConfig

    if "attention" in {f.name for f in dataclasses.fields(EngineConfig)}:
        pytest.skip("EngineConfig has an attention field: the option is passed through")
    with pytest.raises(SystemExit, match="no 'attention' field"):
        bench_lora.main(["--tiny-cpu", "--out-dir", str(tmp_path), "--attention", "sage8"])
