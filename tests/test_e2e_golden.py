"""The three official end-to-end runs, reproduced through ``multitalk generate ... --save-tensor``.

Each test runs the real CLI (the ``multitalk`` typer app, in this process: a subprocess only adds
the interpreter's start-up) on the golden tiny folders (CPU, float32) and compares the
saved video with the official output: the 8x8 block means and per-frame mean/std, within 1e-4. Where
the official code has a bug (see README "Differences from the official script"), the comparison is on
what both produce.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import rel_l2
from multitalk.cli import app

TOL = 1e-4


def _run_cli(args: list[str], cwd):
    here = os.getcwd()
    os.chdir(cwd)                      # the outputs are relative to the run's folder
    try:
        return CliRunner().invoke(app, ["generate", *args, "--quiet", "--device", "cpu", "--dtype", "float32"])
    finally:
        os.chdir(here)


def _weights(golden):
    return ["--ckpt-dir", str(golden / "weights" / "Wan2.1-I2V-tiny"),
            "--wav2vec-dir", str(golden / "weights" / "chinese-wav2vec2-tiny")]


def _compare(video: torch.Tensor, ref: dict, frames: int | None = None) -> dict:
    frames = frames or ref["video_frame_mean"].shape[0]
    v = video[:, :frames].double()
    ds8 = F.avg_pool2d(v.permute(1, 0, 2, 3), 8).permute(1, 0, 2, 3)
    errs = {
        "video_ds8": rel_l2(ds8, ref["video_ds8"][:, :frames]),
        "video_frame_mean": rel_l2(v.mean(dim=(2, 3)).T, ref["video_frame_mean"][:frames]),
        "video_frame_std": rel_l2(v.std(dim=(2, 3), unbiased=False).T, ref["video_frame_std"][:frames]),
    }
    print(json.dumps(errs))
    return errs


def _check(result):
    assert result.exit_code == 0, (result.output[-3000:], result.exception)


@pytest.mark.slow
def test_e2e_single_clip(golden, examples, golden_vectors, tmp_path):
    proc = _run_cli([str(examples / "single_example_1.json"), *_weights(golden),
                     "--frame_num", "9", "--motion_frame", "5", "--mode", "clip", "--sample_steps", "4",
                     "--sample_shift", "7", "--base_seed", "42", "--color_correction_strength", "0",
                     "--out", "single.mp4", "--save-tensor", "single.safetensors"], tmp_path)
    _check(proc)
    video = load_file(str(tmp_path / "single.safetensors"))["video"]
    ref = golden_vectors("e2e_single_clip")
    assert tuple(video.shape) == (3, 9, 448, 896)
    assert all(e < TOL for e in _compare(video, ref).values())
    assert (tmp_path / "single.mp4").stat().st_size > 0


@pytest.mark.slow
def test_e2e_two_speakers_add_bbox_streaming_teacache_apg(golden, examples, golden_vectors, golden_scalars, tmp_path):
    proc = _run_cli([str(examples / "multitalk_example_1.json"), *_weights(golden),
                     "--frame_num", "9", "--motion_frame", "5", "--mode", "streaming", "--max-frames", "17",
                     "--sample_steps", "8", "--sample_shift", "7", "--base_seed", "123", "--use_teacache",
                     "--teacache_thresh", "0.2", "--use_apg", "--color_correction_strength", "0",
                     "--noise-device", "cpu",   # the same video on any device; on CPU the official's draws
                     "--out", "add.mp4", "--save-tensor", "add.safetensors"], tmp_path)
    _check(proc)
    video = load_file(str(tmp_path / "add.safetensors"))["video"]
    ref = golden_vectors("e2e_multi_add_bbox_stream")
    assert tuple(video.shape) == tuple(golden_scalars["e2e"]["e2e_multi_add_bbox_stream"]["video_shape"])
    assert all(e < TOL for e in _compare(video, ref).values())


@pytest.mark.slow
def test_e2e_two_speakers_para_streaming_colour(golden, examples, golden_vectors, tmp_path):
    """Official (iii): 'para' tracks of 44 and 77 frames, streaming, colour correction 1.0.

    Compared on the first 5 clips (25 frames, ``--max-frames 25``): later clips cannot be compared
    at 1e-4 in float32. Each streaming clip starts from the previous clip's colour-corrected frames
    and the random tiny weights amplify float32 rounding about 2.7x per clip: our run differs from
    the official by 1.3e-6 on clip 1, 2.6e-5 over 25 frames, 1.8e-4 over 33 frames, and our own run
    with only the attention's summation order changed (explicit softmax(QK^T)V instead of SDPA)
    differs from our SDPA run by the same amounts (1.5e-6 ... 2.8e-5 over 25 frames). Beyond that the
    runs differ by design (README: the official stops at person 1's end with 41 frames and halves its
    default masks from clip 8 on; we return the 77 frames of the longer track, see test_clips).
    """
    prompt = json.loads((examples / "multitalk_example_1.json").read_text())["prompt"]
    proc = _run_cli(["--image", str(examples / "multi/1/multi1.png"),
                     "--audio", str(examples / "multi/1/1.WAV"), "--audio2", str(examples / "multi/1/2.WAV"),
                     "--audio_type", "para", "--prompt", prompt, *_weights(golden),
                     "--frame_num", "9", "--motion_frame", "5", "--mode", "streaming", "--sample_steps", "4",
                     "--sample_shift", "7", "--base_seed", "2024", "--color_correction_strength", "1.0",
                     "--max-frames", "25", "--out", "para.mp4", "--save-tensor", "para.safetensors"], tmp_path)
    _check(proc)
    video = load_file(str(tmp_path / "para.safetensors"))["video"]
    ref = golden_vectors("e2e_multi_para_stream")
    assert video.shape[1] == 25 and ref["video_frame_mean"].shape[0] == 41
    assert all(e < TOL for e in _compare(video, ref, frames=25).values())
