"""The authored two-person demo input: files, format, determinism, usable media."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from multitalk.pipeline import demo_inputs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_inputs.write_demo_inputs(tmp_path_factory.mktemp("demo"))


def _read(path):
    import soundfile as sf

    return sf.read(str(path), dtype="float32", always_2d=True)


def test_json_in_official_format_with_existing_files(demo):
    spec = json.loads(demo.read_text())
    assert set(spec) == {"prompt", "cond_image", "audio_type", "cond_audio", "bbox"}
    assert spec["audio_type"] == "add" and len(spec["prompt"]) > 50
    assert set(spec["cond_audio"]) == set(spec["bbox"]) == {"person1", "person2"}
    for rel in (spec["cond_image"], *spec["cond_audio"].values()):
        assert (demo.parent / rel).is_file(), rel  # paths are relative to the JSON's folder


def test_deterministic_bytes(demo, tmp_path):
    again = demo_inputs.write_demo_inputs(tmp_path)
    names = sorted(p.name for p in demo.parent.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir()) and len(names) == 4
    for name in names:
        a = hashlib.sha256((demo.parent / name).read_bytes()).hexdigest()
        b = hashlib.sha256((again.parent / name).read_bytes()).hexdigest()
        assert a == b, name


def test_image_is_rgb_of_stated_size(demo):
    from PIL import Image

    spec = json.loads(demo.read_text())
    img = Image.open(demo.parent / spec["cond_image"])
    assert img.mode == "RGB" and img.size == demo_inputs.IMAGE_SIZE
    arr = np.asarray(img)
    assert arr.std() > 20  # a picture, not a flat colour


def test_bboxes_inside_image_and_cover_the_faces(demo):
    from PIL import Image

    spec = json.loads(demo.read_text())
    arr = np.asarray(Image.open(demo.parent / spec["cond_image"])).astype(int)
    w, h = demo_inputs.IMAGE_SIZE
    boxes = [spec["bbox"][p] for p in ("person1", "person2")]
    for (r0, c0, r1, c1) in boxes:  # [row_min, col_min, row_max, col_max]
        assert 0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w
    assert boxes[0][3] <= boxes[1][1]  # person 1 left of person 2, no overlap
    skin = (np.abs(arr - np.array([240, 200, 160])).sum(-1) == 0)
    assert skin.sum() > 10000
    rows, cols = np.nonzero(skin)
    for (r0, c0, r1, c1) in boxes:
        inside = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
        assert inside.sum() > 0.4 * skin.sum()  # each box holds one of the two faces
    inside_any = np.zeros_like(skin)
    for (r0, c0, r1, c1) in boxes:
        inside_any[r0:r1, c0:c1] = True
    assert not (skin & ~inside_any).any()


def _pitch_hz(x: np.ndarray, sr: int) -> float:
    """Median autocorrelation pitch over the loudest 40 ms frames."""
    n = int(0.04 * sr)
    frames = [x[i:i + n] for i in range(0, len(x) - n, n // 2)]
    energies = np.array([np.sum(f ** 2) for f in frames])
    lo, hi = int(sr / 400), int(sr / 70)
    pitches = []
    for idx in np.argsort(energies)[-10:]:
        f = frames[idx] - frames[idx].mean()
        ac = np.correlate(f, f, "full")[n - 1:]
        pitches.append(sr / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(pitches))


def test_audio_is_16k_mono_speech_like(demo):
    import pyloudnorm

    spec = json.loads(demo.read_text())
    pitches = []
    for name in ("person1", "person2"):
        x, sr = _read(demo.parent / spec["cond_audio"][name])
        assert sr == 16000 and x.shape[1] == 1
        x = x[:, 0]
        assert np.isfinite(x).all() and 2.0 <= len(x) / sr <= 3.0
        assert 0.05 < np.sqrt(np.mean(x ** 2)) and np.abs(x).max() <= 1.0
        # pauses: some 40 ms frames are near-silent, most are voiced
        rms = np.sqrt(np.mean(x[: len(x) // 640 * 640].reshape(-1, 640) ** 2, axis=1))
        assert 0.05 < (rms < 0.01).mean() < 0.6
        loud = pyloudnorm.Meter(sr).integrated_loudness(x.astype(np.float64))
        assert -40 < loud < 0  # the loudness normalisation applies (|loudness| < 100)
        pitches.append(_pitch_hz(x.astype(np.float64), sr))
    assert 90 < pitches[0] < 150 and 170 < pitches[1] < 270, pitches
