"""Speech preparation (media/audio.py): golden section a arrays, loudness scalars, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import rel_l2

from multitalk.errors import UserInputError
from multitalk.media.audio import (
    SAMPLE_RATE,
    audio_duration_s,
    combine_speakers,
    decode_audio,
    integrated_loudness,
    load_speech,
    loudness_gain,
    loudness_normalize,
    num_video_frames,
    resample,
)

ARRAY_TOL = 1e-6  # README: audio arrays


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


@pytest.fixture(scope="module")
def speech(examples):
    """``load_speech`` of every example file the golden data uses (each decoded once)."""
    files = ["single/1.wav", "multi/1/1.WAV", "multi/1/2.WAV", "multi/3/1-man.WAV", "multi/3/1-woman.WAV"]
    return {f: load_speech(examples / f) for f in files}


# --- golden arrays ------------------------------------------------------------------------------

def test_single_speech_matches_golden(speech, golden_vectors):
    got = speech["single/1.wav"]
    ref = golden_vectors("audio")["single1_speech"]
    assert got.dtype == np.float32 and got.shape == tuple(ref.shape)
    assert rel_l2(_t(got), ref) < ARRAY_TOL


def test_add_matches_golden(speech, golden_vectors):
    vec = golden_vectors("audio")
    s1, s2, mix = combine_speakers(speech["multi/1/1.WAV"], speech["multi/1/2.WAV"], "add")
    for got, name in [(s1, "multi1_add_speech1"), (s2, "multi1_add_speech2"), (mix, "multi1_add_sum")]:
        assert got.dtype == np.float32
        assert rel_l2(_t(got), vec[name]) < ARRAY_TOL, name
    n1 = len(speech["multi/1/1.WAV"])
    assert not s1[n1:].any() and not s2[:n1].any()  # one after the other


def test_para_matches_golden(speech, golden_vectors):
    vec = golden_vectors("audio")
    s1, s2, mix = combine_speakers(speech["multi/3/1-man.WAV"], speech["multi/3/1-woman.WAV"], "para")
    for got, name in [(s1, "multi3_para_speech1"), (s2, "multi3_para_speech2"), (mix, "multi3_para_sum")]:
        assert rel_l2(_t(got), vec[name]) < ARRAY_TOL, name


def test_para_unequal_lengths_pads_instead_of_crashing(speech, golden_vectors, golden_scalars):
    """The official code raises here (recorded in scalars.json); we zero-pad the shorter speaker."""
    assert "could not be broadcast" in golden_scalars["audio"]["multi1_para_error"]
    vec = golden_vectors("audio")
    a1, a2 = speech["multi/1/1.WAV"], speech["multi/1/2.WAV"]
    assert rel_l2(_t(a1), vec["multi1_para_speech1"]) < ARRAY_TOL
    assert rel_l2(_t(a2), vec["multi1_para_speech2"]) < ARRAY_TOL
    s1, s2, mix = combine_speakers(a1, a2, "para")
    assert len(a1) < len(a2) and len(s1) == len(s2) == len(mix) == len(a2)
    assert np.array_equal(s1[:len(a1)], a1) and not s1[len(a1):].any()
    assert np.array_equal(s2, a2)
    np.testing.assert_allclose(mix, s1.astype(np.float64) + s2, rtol=0, atol=1e-7)


def test_unknown_audio_type():
    with pytest.raises(UserInputError) as e:
        combine_speakers(np.ones(10, np.float32), np.ones(10, np.float32), "mix")
    assert e.value.field == "audio_type" and "'add'" in str(e.value)


# --- scalars ------------------------------------------------------------------------------------

def test_loudness_and_gain_match_scalars(examples, golden_scalars):
    for rel_path, ref in golden_scalars["audio"]["files"].items():
        samples, rate = decode_audio(examples / rel_path)
        x = resample(samples, rate)
        assert len(x) == ref["samples"], rel_path
        loudness = integrated_loudness(x)
        assert loudness == pytest.approx(ref["integrated_loudness_lufs"], rel=1e-9, abs=1e-9), rel_path
        assert loudness_gain(loudness) == pytest.approx(ref["gain"], rel=1e-9), rel_path


def test_frame_counts_match_scalars(golden_scalars):
    audio = golden_scalars["audio"]
    assert audio["fps"] == 25 and audio["sampling_rate"] == SAMPLE_RATE
    for name, ref in audio["embeddings"].items():
        assert num_video_frames(ref["samples"], fps=audio["fps"]) == ref["frames"] == ref["expected_frames"], name


# --- pure-function behaviour ---------------------------------------------------------------------

def test_resample_length_rule():
    x = np.sin(np.arange(44_101, dtype=np.float32) * 0.01)
    y = resample(x, 44_100, 16_000)
    assert y.dtype == np.float32 and len(y) == math.ceil(44_101 * 16_000 / 44_100)
    np.testing.assert_array_equal(resample(x, 16_000, 16_000), x)  # same rate: untouched
    # a 1 kHz tone stays a 1 kHz tone at the new rate
    tone = np.sin(2 * np.pi * 1000 * np.arange(48_000) / 48_000).astype(np.float32)
    out = resample(tone, 48_000, 16_000)
    ref = np.sin(2 * np.pi * 1000 * np.arange(len(out)) / 16_000)
    assert np.abs(out[200:-200] - ref[200:-200]).max() < 1e-3


def test_loudness_normalize_hits_target():
    rng = np.random.default_rng(0)
    x = (0.05 * rng.standard_normal(SAMPLE_RATE * 2)).astype(np.float32)
    y = loudness_normalize(x)
    assert y.dtype == np.float32
    assert integrated_loudness(y) == pytest.approx(-23.0, abs=1e-3)
    assert loudness_gain(-float("inf")) is None  # |L| > 100: left unchanged


def test_decode_averages_channels(tmp_path):
    left = np.linspace(-0.5, 0.5, 8000, dtype=np.float32)
    right = np.full(8000, 0.25, dtype=np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 22_050, subtype="FLOAT")
    mono, rate = decode_audio(path)
    assert rate == 22_050 and mono.dtype == np.float32
    np.testing.assert_array_equal(mono, (left + right) / 2)


# --- containers decoded with PyAV -----------------------------------------------------------------

def _write_aac(path, seconds=1.0, rate=44_100, with_video=False):
    import av

    n = int(seconds * rate)
    t = np.arange(n) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    with av.open(str(path), "w") as out:
        vstream = None
        if with_video:
            vstream = out.add_stream("mpeg4", rate=25)
            vstream.width, vstream.height, vstream.pix_fmt = 64, 64, "yuv420p"
        astream = out.add_stream("aac", rate=rate)
        astream.layout = "stereo"
        data = np.stack([tone, tone])  # planar stereo
        for start in range(0, n, 1024):
            chunk = np.ascontiguousarray(data[:, start:start + 1024])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate = rate
            for pkt in astream.encode(frame):
                out.mux(pkt)
        for pkt in astream.encode(None):
            out.mux(pkt)
        if vstream is not None:
            for i in range(int(seconds * 25)):
                img = np.full((64, 64, 3), i * 5, dtype=np.uint8)
                for pkt in vstream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(pkt)
            for pkt in vstream.encode(None):
                out.mux(pkt)
    return tone


@pytest.mark.parametrize("name,with_video", [("speech.m4a", False), ("talk.mp4", True)])
def test_pyav_decodes_aac_containers(tmp_path, name, with_video):
    path = tmp_path / name
    tone = _write_aac(path, with_video=with_video)
    mono, rate = decode_audio(path)
    assert rate == 44_100 and mono.dtype == np.float32
    assert abs(len(mono) - len(tone)) <= 3 * 1024  # AAC priming / final-frame padding
    rms = float(np.sqrt(np.mean(mono[4096:-4096] ** 2)))
    assert rms == pytest.approx(0.3 / math.sqrt(2), rel=0.05)
    speech = load_speech(path)
    assert abs(len(speech) - SAMPLE_RATE) <= 3 * 1024 * SAMPLE_RATE / 44_100 + 1
    assert integrated_loudness(speech) == pytest.approx(-23.0, abs=0.05)


def test_audio_duration_from_headers(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(24_000, np.float32), 16_000)
    assert audio_duration_s(tmp_path / "a.wav") == pytest.approx(1.5)
    _write_aac(tmp_path / "b.m4a", seconds=2.0)                     # PyAV: container duration
    assert audio_duration_s(tmp_path / "b.m4a") == pytest.approx(2.0, abs=0.1)
    (tmp_path / "c.wav").write_bytes(b"not audio")
    with pytest.raises(UserInputError) as e:
        audio_duration_s(tmp_path / "c.wav", field="cond_audio.person2")
    assert e.value.field == "cond_audio.person2"


def test_video_without_audio_track(tmp_path):
    import av

    path = tmp_path / "silent_film.mp4"
    with av.open(str(path), "w") as out:
        v = out.add_stream("mpeg4", rate=25)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            for pkt in v.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                out.mux(pkt)
        for pkt in v.encode(None):
            out.mux(pkt)
    with pytest.raises(UserInputError, match="has no audio track") as e:
        decode_audio(path, field="cond_audio.person1")
    assert e.value.field == "cond_audio.person1"


# --- bad input ------------------------------------------------------------------------------------

def _one_line(err: UserInputError, field: str = "cond_audio") -> str:
    text = str(err)
    assert err.field == field and err.fix and "\n" not in text
    return text


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError) as e:
        load_speech(tmp_path / "nope.wav", field="cond_audio.person2")
    assert "not found" in _one_line(e.value, "cond_audio.person2")


@pytest.mark.parametrize("name", ["notes.wav", "notes.mp3", "notes.txt"])
def test_not_audio(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not audio at all\n" * 50)
    with pytest.raises(UserInputError) as e:
        decode_audio(path)
    assert "cannot decode" in _one_line(e.value)


def test_empty_audio(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros((0, 1), np.float32), 16_000)
    with pytest.raises(UserInputError) as e:
        load_speech(path)
    assert "empty" in _one_line(e.value)


def test_silent_audio(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16_000, np.int16), 16_000, subtype="PCM_16")
    with pytest.raises(UserInputError) as e:
        load_speech(path)
    assert "the track is silent" in _one_line(e.value)


def test_nan_audio(tmp_path):
    x = np.full(16_000, 0.1, np.float32)
    x[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, 16_000, subtype="FLOAT")
    with pytest.raises(UserInputError) as e:
        load_speech(path)
    assert "NaN" in _one_line(e.value)
    x[100] = np.inf
    sf.write(path, x, 16_000, subtype="FLOAT")
    with pytest.raises(UserInputError, match="infinite"):
        load_speech(path)


def test_too_short_for_loudness(tmp_path):
    path = tmp_path / "blip.wav"
    sf.write(path, np.full(1_600, 0.1, np.float32), 16_000, subtype="FLOAT")  # 0.1 s
    with pytest.raises(UserInputError) as e:
        load_speech(path)
    assert "too short" in _one_line(e.value)
