"""Bad input through the real ``multitalk generate`` command: one line naming the field and the fix,
exit code 2, no traceback (``--debug`` shows one).

Every problem is detected before any model is loaded, so these run in a second each. The inputs
are the project's own demo media (no ``../shared`` needed) plus deliberately broken files.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from multitalk.cli import app
from multitalk.pipeline.demo_inputs import write_demo_inputs

pytestmark = pytest.mark.timeout(300)  # a missed check would start a generation: fail, don't hang


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    spec = json.loads(write_demo_inputs(d).read_text())
    sr = 16000
    sf.write(d / "silent.wav", np.zeros(sr, dtype=np.float32), sr, subtype="PCM_16")
    sf.write(d / "empty.wav", np.zeros(0, dtype=np.float32), sr, subtype="PCM_16")
    nan = np.sin(np.linspace(0, 600, sr)).astype(np.float32)
    nan[100:200] = np.nan
    sf.write(d / "nan.wav", nan, sr, subtype="FLOAT")
    (d / "notes.wav").write_text("these are meeting notes, not audio\n")
    (d / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    return {"dir": d, "spec": spec, "image": d / spec["cond_image"],
            "person1": d / spec["cond_audio"]["person1"], "person2": d / spec["cond_audio"]["person2"]}


def _json(media, tmp_path, **changes) -> str:
    spec = {**media["spec"], "cond_image": str(media["image"]),
            "cond_audio": {k: str(media["dir"] / v) for k, v in media["spec"]["cond_audio"].items()}}
    spec.update(changes)
    spec = {k: v for k, v in spec.items() if v is not None}
    p = tmp_path / "input.json"
    p.write_text(json.dumps(spec))
    return str(p)


def _run(args, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "out" / "video.mp4")
    full = ["generate", *args, "--preset", "tiny", "--device", "cpu", "--quiet"]
    if "--out" not in args:
        full += ["--out", out]
    return runner.invoke(app, full, catch_exceptions=True)


def _assert_clear_error(result, field: str, *words: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    text = result.stderr
    assert "Traceback" not in text and "Traceback" not in result.output
    assert "models loaded" not in text  # refused before anything was loaded
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, text
    assert errors[0].startswith(f"error: {field}:"), errors[0]
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def _audio_case(media, tmp_path, person1):
    return _json(media, tmp_path, cond_audio={"person1": str(person1), "person2": str(media["person2"])})


@pytest.mark.parametrize("file,words", [
    ("missing.wav", ("not found", "fix the path")),
    ("notes.wav", ("cannot decode",)),
    ("empty.wav", ("no audio samples",)),
    ("silent.wav", ("silent",)),
    ("nan.wav", ("NaN",)),
])
def test_bad_audio(media, tmp_path, file, words):
    path = media["dir"] / file
    result = _run([_audio_case(media, tmp_path, path)], tmp_path)
    _assert_clear_error(result, "cond_audio.person1", *words)


def test_bad_audio_without_json(media, tmp_path):
    result = _run(["--image", str(media["image"]), "--audio", str(media["person1"]),
                   "--audio2", str(media["dir"] / "silent.wav"), "--prompt", "two people"], tmp_path)
    _assert_clear_error(result, "cond_audio.person2", "silent")


def test_image_that_is_not_an_image(media, tmp_path):
    result = _run([_json(media, tmp_path, cond_image=str(media["dir"] / "photo.png"))], tmp_path)
    _assert_clear_error(result, "cond_image", "cannot be decoded", "re-export")
    result = _run([_json(media, tmp_path, cond_image=str(media["person1"]))], tmp_path)  # a wav
    _assert_clear_error(result, "cond_image", "not a readable image")


def test_bbox_outside_the_image(media, tmp_path):
    bbox = dict(media["spec"]["bbox"])
    bbox["person2"] = [10, 900, 500, 5000]   # columns beyond the 1024-pixel width
    result = _run([_json(media, tmp_path, bbox=bbox)], tmp_path)
    _assert_clear_error(result, "bbox", "outside", "[row_min, col_min, row_max, col_max]")  # Rich kept the [...]


@pytest.mark.parametrize("box, words", [
    ([100, 100, 105, 105], ("person1", "covers no cell", "at least 20x20 pixels")),  # under one 16x16 cell of 448x896
    ([0, 100, 25, 400], ("person1", "sample rows 32-525")),       # in the top band the 448x896 crop removes
])
def test_bbox_that_routes_no_token_is_refused(media, tmp_path, box, words):
    """Such a box left the speaker routing an empty region (0/0): an all-NaN, black video with exit 0."""
    bbox = {**media["spec"]["bbox"], "person1": box}
    result = _run([_json(media, tmp_path, bbox=bbox)], tmp_path)
    _assert_clear_error(result, "bbox", *words)


def test_user_text_is_printed_literally(media, tmp_path):
    """Messages are not Rich markup: [...] in a file name stays, and [/] cannot break the printing."""
    for name in ("photo[draft].png", "a[/]b.png", "[bold]x[/bold].png"):
        result = _run([_json(media, tmp_path, cond_image=str(tmp_path / name))], tmp_path)
        _assert_clear_error(result, "cond_image", "not found", name)


def test_bbox_for_the_wrong_number_of_speakers(media, tmp_path):
    bbox = {**media["spec"]["bbox"], "person3": [0, 0, 10, 10]}
    result = _run([_json(media, tmp_path, bbox=bbox)], tmp_path)
    _assert_clear_error(result, "bbox")
    one = _json(media, tmp_path, cond_audio={"person1": str(media["person1"])})
    result = _run([one], tmp_path)
    _assert_clear_error(result, "bbox", "person2")


def test_unknown_audio_type(media, tmp_path):
    result = _run([_json(media, tmp_path, audio_type="both")], tmp_path)
    _assert_clear_error(result, "audio_type", "add", "para")
    result = _run(["--image", str(media["image"]), "--audio", str(media["person1"]), "--audio2",
                   str(media["person2"]), "--audio-type", "both"], tmp_path)   # without a JSON too
    _assert_clear_error(result, "audio_type", "add", "para")


@pytest.mark.parametrize("args, field, words", [
    (["--base_seed", str(10**30)], "seed", ("9223372036854775807", "below 2**63")),
    (["--dtype", "float8"], "dtype", ("float32", "bfloat16")),
    (["--vae-dtype", "half-ish"], "vae_dtype", ("float32",)),
    (["--noise-device", "gpu"], "noise_device", ("engine", "cpu")),
    (["--ckpt-dir", "."], "preset", ("--ckpt_dir", "drop")),
])
def test_bad_options_fail_before_loading(media, tmp_path, args, field, words):
    _assert_clear_error(_run([_json(media, tmp_path), *args], tmp_path), field, *words)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_requested_without_cuda(media, tmp_path):
    result = CliRunner().invoke(app, ["generate", _json(media, tmp_path), "--preset", "tiny", "--device", "cuda",
                                      "--out", str(tmp_path / "v.mp4")])
    _assert_clear_error(result, "device", "no CUDA", "--device cpu")


def test_missing_checkpoint_folder_is_named(media, tmp_path):
    result = CliRunner().invoke(app, ["generate", _json(media, tmp_path), "--ckpt-dir", str(tmp_path / "missing"),
                                      "--out", str(tmp_path / "v.mp4")])
    _assert_clear_error(result, "ckpt_dir", "does not exist")


@pytest.mark.parametrize("flag", ["--frame_num", "--frame-num"])
def test_frame_num_not_4n_plus_1(media, tmp_path, flag):
    result = _run([_json(media, tmp_path), flag, "80"], tmp_path)
    _assert_clear_error(result, "frame_num", "4n+1", "81")


def test_unknown_json_keys_warn_and_name_the_key(media, tmp_path):
    # an unknown key is only a warning; the run then stops at the (real) frame_num problem
    result = _run([_json(media, tmp_path, cond_vidoe="x.mp4"), "--frame_num", "10"], tmp_path)
    assert "warning:" in result.stderr and "cond_vidoe" in result.stderr
    _assert_clear_error(result, "frame_num")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_output_folder_not_writable(media, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        result = _run([_json(media, tmp_path), "--out", str(locked / "sub" / "video.mp4")], tmp_path)
        _assert_clear_error(result, "out", "writable" if (locked / "sub").exists() else "output folder")
    finally:
        locked.chmod(stat.S_IRWXU)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_output_that_cannot_be_written(media, tmp_path):
    # /proc takes no new files, whoever asks (os.access says yes to root): refused before the run
    result = _run([_json(media, tmp_path), "--out", "/proc/multitalk-video.mp4"], tmp_path)
    _assert_clear_error(result, "out", "not writable")


def test_output_path_that_is_a_file(media, tmp_path):
    # works as root too: the parent "folder" is a regular file
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    result = _run([_json(media, tmp_path), "--out", str(blocker / "video.mp4")], tmp_path)
    _assert_clear_error(result, "out", "output folder")


def test_missing_input_and_weights(media, tmp_path):
    _assert_clear_error(CliRunner().invoke(app, ["generate", "--quiet"]), "input_json")
    result = CliRunner().invoke(app, ["generate", _json(media, tmp_path), "--out", str(tmp_path / "v.mp4")])
    _assert_clear_error(result, "ckpt_dir", "--preset tiny")


def test_help_at_80_columns_shows_every_option_name_whole():
    result = CliRunner().invoke(app, ["generate", "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert max(len(line) for line in result.output.splitlines()) <= 80
    for name in ("--sample_text_guide_scale", "--sample-audio-guide-scale", "--color_correction_strength",
                 "--apg_norm_threshold", "--multitalk_dir", "--offload_model", "--save_file", "--vae-dtype",
                 "--noise-device", "--base_seed"):
        assert name in result.output, name


def test_output_names():
    """``--out foo`` -> foo.mp4 (what the CLI then reports), ``--out <folder>`` -> inside it (the full
    runs: tests/test_generate_long.py, tests/test_render.py)."""
    import tempfile
    from pathlib import Path

    from multitalk.pipeline.render import check_output_path

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        assert check_output_path(d / "clip") == d / "clip.mp4"
        assert check_output_path(d / "clip.v2") == d / "clip.v2.mp4"
        assert check_output_path(d / "CLIP.MP4") == d / "CLIP.MP4"
        assert check_output_path(d, stem="input") == d / "input.mp4"
        assert check_output_path(d / "new" / "sub" / "v.mp4") == d / "new" / "sub" / "v.mp4"
        assert check_output_path(d / "video.safetensors", suffix=None) == d / "video.safetensors"
        assert not [p for p in d.rglob(".multitalk-write-check-*")]   # the write check leaves nothing


def test_debug_shows_the_traceback_in_a_real_process(media, tmp_path):
    args = [sys.executable, "-m", "multitalk.cli", "generate", _audio_case(media, tmp_path, media["dir"] / "silent.wav"),
            "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "v.mp4")]
    plain = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: cond_audio.person1:")
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserInputError" in debug.stderr


def test_messages_keep_their_brackets(media, tmp_path):
    # rich markup must not swallow "[row_min, col_min, row_max, col_max]" from the fix
    result = _run([_json(media, tmp_path, bbox={"person1": [28, 25, 547, 486], "person2": [28, 537, 547, 5000]})],
                  tmp_path)
    line = _assert_clear_error(result, "bbox", "lies outside")
    assert line.endswith("(the order is [row_min, col_min, row_max, col_max] in source-image pixels)"), line
