"""Speech from text through the real ``multitalk generate``: the official TTS example JSON end to end
(tiny preset, one 5-frame clip), and the TTS flags' one-line errors."""

from __future__ import annotations

import io
import json
import os

import av
import pytest
import soundfile as sf
from typer.testing import CliRunner

from multitalk.cli import app
from multitalk.media.speech_synthesis import espeak_program
from multitalk.pipeline.demo_inputs import write_demo_inputs

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(espeak_program() is None and not os.environ.get("CI"),
                                 reason="espeak-ng not installed (.ci/run installs it)")]
SMALL = ["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--size", "preview", "--mode", "clip",
         "--frame_num", "5", "--sample_steps", "1", "--quiet"]


def _error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    return lines[0][len("error: "):]


def test_official_tts_example_end_to_end(examples, tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITALK_HOME", str(tmp_path / "home"))
    out = tmp_path / "out" / "tts.mp4"
    result = CliRunner().invoke(app, ["generate", str(examples / "multitalk_example_tts_1.json"), *SMALL,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    # no Kokoro folder: the official Kokoro voices are spoken by the closest espeak-ng voices, said so
    assert "af_heart.pt needs --tts_dir" in result.stderr and "espeak-ng voice en-us+f3" in result.stderr
    assert "at the same time" in result.stderr           # the example says para
    speech = out.parent / "tts_speech"
    tracks = [sf.read(str(speech / f"person{i}.wav"))[0] for i in (1, 2)]
    assert tracks[0].any() and tracks[1].any() and (speech / "speech.wav").is_file()
    with av.open(io.BytesIO(out.read_bytes())) as f:
        assert f.streams.audio[0].codec_context.name == "aac" and sum(1 for _ in f.decode(video=0)) == 5


def test_tts_flag_errors(tmp_path):
    demo = write_demo_inputs(tmp_path / "demo")
    image = str(demo.parent / "demo_two_people.png")
    run = lambda *args: CliRunner().invoke(app, ["generate", *args, *SMALL, "--out", str(tmp_path / "x.mp4")])  # noqa: E731
    assert _error_line(run("--image", image, "--text", "(s1) hi (s3) who?")).startswith(
        "tts_audio.text: speaker tag (s3): MultiTalk has persons 1 and 2")
    assert _error_line(run("--image", image, "--text", "hi", "--audio", image)).startswith("text: given together")
    assert _error_line(run("--image", image, "--text", "hi", "--voice1", "xx-nope")).startswith(
        "tts_audio.human1_voice: espeak-ng has no voice 'xx-nope'")
    assert _error_line(run(str(demo), "--audio_mode", "tts")).startswith("tts_audio: missing (--audio_mode tts)")
    assert _error_line(run(str(demo), "--audio_mode", "speech")).startswith("audio_mode: unknown audio mode")
    tts = json.loads(demo.read_text())
    tts.update(cond_audio={}, tts_audio={"text": "hello"}, bbox=None)
    (demo.parent / "tts.json").write_text(json.dumps(tts))
    assert _error_line(run(str(demo.parent / "tts.json"), "--audio_mode", "localfile")).startswith(
        "cond_audio: missing (--audio_mode localfile)")
