"""Whole generations on the tiny preset, through the real command line, checked on the mp4 itself.

* ``multitalk demo`` (what ``make demo`` runs, with fewer steps): an H.264 yuv420p mp4 at 25 fps
  whose frame count follows the authored speech, with an AAC track of the same length.
* Streaming a 30 s track uses about as much host memory as a 5 s one: frames go to the encoder
  clip by clip instead of piling up (the 30 s video alone is 56 MB as uint8, 226 MB as float).
"""

from __future__ import annotations

import json
import subprocess
import sys

import av
import numpy as np
import pytest
import soundfile as sf

from multitalk.media.audio import num_video_frames
from multitalk.pipeline.demo_inputs import AUDIO_FILES, PERSONS, SAMPLE_RATE, synthesize_speech, write_demo_inputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
FPS = 25

# Runs the CLI in this process and reports its peak resident memory (KiB on Linux) afterwards.
_WRAPPER = """
import resource, sys
from multitalk.cli import app
sys.argv = ["multitalk", *sys.argv[1:]]
code = 0
try:
    app()
except SystemExit as exc:
    code = exc.code or 0
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _cli(args, cwd, env_home) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "MULTITALK_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-c", _WRAPPER, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1400)


def _probe(path) -> dict:
    with av.open(str(path)) as f:
        v, a = f.streams.video[0], f.streams.audio[0]
        info = {"codec": v.codec_context.name, "pix_fmt": v.codec_context.pix_fmt, "rate": v.average_rate,
                "size": (v.codec_context.width, v.codec_context.height), "audio": a.codec_context.name,
                "audio_rate": a.codec_context.sample_rate}
        ends = {"video": 0.0, "audio": 0.0}
        for p in f.demux(v, a):
            if p.pts is not None and p.size:
                ends[p.stream.type] = max(ends[p.stream.type], float((p.pts + p.duration) * p.stream.time_base))
    with av.open(str(path)) as f:
        info["frames"] = sum(1 for _ in f.decode(video=0))
    with av.open(str(path)) as f:
        samples = np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(audio=0)])
    info.update(video_s=ends["video"], audio_s=ends["audio"], audio_rms=float(np.sqrt(np.mean(samples ** 2))))
    return info


def _maxrss_mb(proc) -> float:
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MAXRSS_KB")][-1]
    return int(line.split()[1]) / 1024


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("multitalk-home")


def test_demo_command_writes_an_mp4_with_sound(tmp_path, home):
    proc = _cli(["demo", "--out", "out/demo.mp4", "--inputs-dir", "inputs", "--sample-steps", "1"], tmp_path, home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = json.loads((tmp_path / "inputs" / "demo_input.json").read_text())
    assert spec["audio_type"] == "add"  # person 1, then person 2
    samples = sum(sf.info(str(tmp_path / "inputs" / AUDIO_FILES[p])).frames for p in PERSONS)
    expected = num_video_frames(samples, FPS, SAMPLE_RATE)
    assert expected == int(sum(p.duration_s for p in PERSONS.values()) * FPS)

    info = _probe(tmp_path / "out" / "demo.mp4")
    assert (info["codec"], info["pix_fmt"], info["rate"]) == ("h264", "yuv420p", FPS)
    assert info["frames"] == expected
    assert info["size"] == (224, 112)  # the demo's preview bucket of the 16:9 image
    assert abs(info["video_s"] - expected / FPS) < 1e-6
    assert info["audio"] == "aac" and abs(info["audio_s"] - info["video_s"]) <= 1 / FPS, info
    assert info["audio_rms"] > 0.01  # the speech is there, not silence


def test_para_tracks_of_unequal_length_last_as_long_as_the_longer(tmp_path, home):
    """'para' (both at once) with 2.6 s and 2.3 s tracks: no crash, 65 frames, the mix as sound."""
    spec_path = write_demo_inputs(tmp_path / "inputs")
    spec = json.loads(spec_path.read_text())
    spec["audio_type"] = "para"
    spec_path.write_text(json.dumps(spec))
    proc = _cli(["generate", str(spec_path), "--preset", "tiny", "--device", "cpu", "--size", "preview",
                 "--mode", "streaming", "--frame_num", "33", "--motion_frame", "5", "--sample_steps", "1",
                 "--quiet", "--out", "para"], tmp_path, home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("wrote para.mp4 (")  # --out without .mp4: written and reported with it
    longest = max(sf.info(str(spec_path.parent / f)).frames for f in spec["cond_audio"].values())
    info = _probe(tmp_path / "para.mp4")
    assert info["frames"] == num_video_frames(longest, FPS, SAMPLE_RATE) == 65
    assert abs(info["audio_s"] - info["video_s"]) <= 1 / FPS and info["audio_rms"] > 0.01, info


def _long_track(seconds: float) -> np.ndarray:
    one = synthesize_speech(PERSONS["person1"])
    reps = int(np.ceil(seconds * SAMPLE_RATE / len(one)))
    return np.tile(one, reps)[: int(seconds * SAMPLE_RATE)]


def test_streaming_30s_uses_about_the_memory_of_5s(tmp_path, home):
    json_path = write_demo_inputs(tmp_path / "inputs")
    image = json_path.parent / json.loads(json_path.read_text())["cond_image"]
    runs = {}
    for seconds in (5, 30):  # 30 s: 10 clips of 81 frames (60 s took 13 minutes of CI's 2 cores)
        wav = tmp_path / f"speech_{seconds}s.wav"
        sf.write(str(wav), _long_track(seconds), SAMPLE_RATE, subtype="PCM_16")
        out = tmp_path / f"video_{seconds}s.mp4"
        proc = _cli(["generate", "--image", str(image), "--audio", str(wav), "--prompt", "a man talking",
                     "--preset", "tiny", "--device", "cpu", "--size", "preview", "--mode", "streaming",
                     "--frame_num", "81", "--motion_frame", "5", "--sample_steps", "1",
                     "--sample_text_guide_scale", "1", "--color_correction_strength", "0.5",
                     "--quiet", "--out", str(out)], tmp_path, home)
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = _probe(out)
        assert info["frames"] == seconds * FPS, info
        assert abs(info["audio_s"] - info["video_s"]) <= 1 / FPS, info
        runs[seconds] = _maxrss_mb(proc)
    print(json.dumps({f"maxrss_mb_{s}s": round(v, 1) for s, v in runs.items()}))
    # Holding the frames would add at least the whole 30 s video: 54 MB as uint8, 215 MB as the
    # pipeline's float32 frames. Measured 2026-12-02: 906 MB (5 s) and 943 MB (30 s); what grows
    # with the track besides frames (speech, audio features, their encoder's peak) is in those 37 MB.
    video_u8_mb = 30 * FPS * 3 * 112 * 224 / 2**20
    assert runs[30] - runs[5] < video_u8_mb, runs
