"""The project's own two-person demo input, authored from code (no external file).

:func:`write_demo_inputs` writes a reference image of two cartoon faces, one synthetic speech
track per person and an input JSON in the official MultiTalk format (``audio_type="add"``: person 1
speaks, then person 2). The media paths in the JSON are relative to the JSON's folder. Same bytes
on every run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
IMAGE_SIZE = (1024, 576)  # (width, height): 16:9 like the official examples
IMAGE_FILE = "demo_two_people.png"
AUDIO_FILES = {"person1": "demo_person1.wav", "person2": "demo_person2.wav"}
INPUT_FILE = "demo_input.json"

DEMO_PROMPT = (
    "Two cartoon characters stand side by side in front of a sunny sky and green hills and talk "
    "to each other. The man on the left, with short brown hair and a blue shirt, speaks first "
    "while the woman on the right, with long dark hair and a red dress, listens and smiles; then "
    "she answers. Soft, warm light, a calm and friendly atmosphere, a medium shot."
)

# Vowel formants (Hz) and bandwidths (Hz) of a generic adult voice: a, e, i, o, u.
_VOWELS = {
    "a": ((730, 90), (1090, 110), (2440, 170)),
    "e": ((530, 70), (1840, 100), (2480, 160)),
    "i": ((300, 60), (2290, 100), (3010, 170)),
    "o": ((570, 80), (840, 100), (2410, 160)),
    "u": ((320, 60), (870, 100), (2240, 160)),
}


@dataclass(frozen=True)
class Person:
    """One demo person: face placement (image pixels) and voice."""
    center_x: int
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]
    long_hair: bool
    f0_hz: float          # mean pitch
    formant_scale: float  # >1: shorter vocal tract (higher formants)
    duration_s: float
    seed: int


PERSONS = {
    "person1": Person(center_x=300, hair=(92, 58, 30), shirt=(52, 96, 178), long_hair=False,
                      f0_hz=115.0, formant_scale=1.0, duration_s=2.6, seed=11),
    "person2": Person(center_x=724, hair=(40, 28, 24), shirt=(186, 52, 60), long_hair=True,
                      f0_hz=215.0, formant_scale=1.15, duration_s=2.3, seed=22),
}

_HEAD_RX, _HEAD_RY, _HEAD_CY = 95, 120, 250  # head ellipse radii and centre row


def person_bbox(p: Person) -> list[int]:
    """``[row_min, col_min, row_max, col_max]`` (official bbox convention) of head and shoulders."""
    h = IMAGE_SIZE[1]
    return [_HEAD_CY - _HEAD_RY - 40, p.center_x - 175, h - 40, p.center_x + 175]


# ---------------------------------------------------------------------------------------------
# Image
# ---------------------------------------------------------------------------------------------

def draw_reference_image():
    """RGB PIL image of two cartoon faces side by side on a sky / hills background."""
    from PIL import Image, ImageDraw

    w, h = IMAGE_SIZE
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    for y in range(h):  # sky gradient
        t = y / (h - 1)
        d.line([(0, y), (w, y)], fill=(int(120 + 90 * t), int(170 + 60 * t), int(235 - 10 * t)))
    d.ellipse([-200, 380, 560, 820], fill=(96, 168, 88))   # hills
    d.ellipse([420, 400, 1260, 860], fill=(80, 150, 76))
    d.ellipse([880, 40, 960, 120], fill=(255, 226, 120))  # sun
    for p in PERSONS.values():
        _draw_person(d, p)
    return img


def _draw_person(d, p: Person) -> None:
    cx, cy, rx, ry = p.center_x, _HEAD_CY, _HEAD_RX, _HEAD_RY
    h = IMAGE_SIZE[1]
    skin, dark = (240, 200, 160), (40, 30, 30)
    if p.long_hair:  # hair behind the head and shoulders
        d.rounded_rectangle([cx - rx - 25, cy - ry - 10, cx + rx + 25, cy + ry + 60], 60, fill=p.hair)
    d.pieslice([cx - 170, h - 200, cx + 170, h + 180], 180, 360, fill=p.shirt)  # shoulders
    d.rectangle([cx - 30, cy + ry - 20, cx + 30, cy + ry + 40], fill=skin)     # neck
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin)                  # head
    d.chord([cx - rx - 5, cy - ry - 15, cx + rx + 5, cy + ry - 85], 180, 360, fill=p.hair)
    d.ellipse([cx - rx - 12, cy - 15, cx - rx + 14, cy + 30], fill=skin)        # ears
    d.ellipse([cx + rx - 14, cy - 15, cx + rx + 12, cy + 30], fill=skin)
    for ex in (cx - 38, cx + 38):                                               # eyes, brows
        d.ellipse([ex - 20, cy - 22, ex + 20, cy + 8], fill=(255, 255, 255), outline=dark, width=2)
        d.ellipse([ex - 9, cy - 15, ex + 9, cy + 3], fill=(60, 90, 140))
        d.ellipse([ex - 4, cy - 10, ex + 4, cy - 2], fill=(10, 10, 10))
        d.line([(ex - 22, cy - 38), (ex + 22, cy - 42)], fill=p.hair, width=6)
    d.line([(cx, cy), (cx - 10, cy + 35), (cx + 6, cy + 38)], fill=(190, 140, 110), width=4)
    d.chord([cx - 38, cy + 45, cx + 38, cy + 85], 0, 180, fill=(170, 60, 70), outline=dark)  # mouth
    d.ellipse([cx - rx + 18, cy + 25, cx - rx + 48, cy + 45], fill=(245, 170, 160))          # cheeks
    d.ellipse([cx + rx - 48, cy + 25, cx + rx - 18, cy + 45], fill=(245, 170, 160))


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------

def _resonator(x: np.ndarray, freq: float, bw: float) -> np.ndarray:
    """Second-order formant resonator (Klatt), unit gain at DC."""
    from scipy.signal import lfilter

    r = math.exp(-math.pi * bw / SAMPLE_RATE)
    c, b = -r * r, 2 * r * math.cos(2 * math.pi * freq / SAMPLE_RATE)
    a = 1 - b - c
    return lfilter([a], [1, -b, -c], x)


def _syllable(rng: np.random.Generator, f0_start: float, f0_end: float, dur: float,
              vowel: str, formant_scale: float) -> np.ndarray:
    n = int(dur * SAMPLE_RATE)
    t = np.arange(n) / n
    vibrato = 1 + 0.01 * np.sin(2 * np.pi * 5.5 * np.arange(n) / SAMPLE_RATE)
    f0 = (f0_start + (f0_end - f0_start) * t) * vibrato
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    source = np.zeros(n)
    for k in range(1, int(3800 / max(f0_start, f0_end)) + 1):  # band-limited glottal source
        source += np.sin(k * phase) / k ** 1.2
    source += 0.02 * rng.standard_normal(n)  # breathiness
    voiced = sum(_resonator(source, f * formant_scale, bw) * g
                 for (f, bw), g in zip(_VOWELS[vowel], (1.0, 0.6, 0.3)))
    attack, release = int(0.025 * SAMPLE_RATE), int(0.06 * SAMPLE_RATE)
    env = np.ones(n)
    env[:attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
    env[n - release:] = 0.5 + 0.5 * np.cos(np.pi * np.arange(release) / release)
    return voiced * env


def _consonant(rng: np.random.Generator, dur: float) -> np.ndarray:
    """A short fricative-like burst: high-passed noise with a smooth envelope."""
    n = int(dur * SAMPLE_RATE)
    noise = rng.standard_normal(n)
    noise = noise - _resonator(noise, 400.0, 800.0)  # remove the low band
    return 0.15 * noise * np.hanning(n)


def synthesize_speech(person: Person) -> np.ndarray:
    """Speech-like mono float32 signal at 16 kHz: words of voiced syllables with a falling pitch
    contour, formant-filtered vowels, fricative onsets and pauses; ``person.duration_s`` long."""
    rng = np.random.default_rng(person.seed)
    total = int(person.duration_s * SAMPLE_RATE)
    out = np.zeros(total)
    pos = int(0.15 * SAMPLE_RATE)
    vowels = list(_VOWELS)
    while True:
        n_syll = int(rng.integers(1, 4))
        word = []
        for _ in range(n_syll):
            if rng.random() < 0.5:
                word.append(_consonant(rng, float(rng.uniform(0.03, 0.07))))
            progress = pos / total  # declination: pitch falls over the phrase
            f0 = person.f0_hz * (1.12 - 0.2 * progress) * float(rng.uniform(0.92, 1.08))
            word.append(_syllable(rng, f0, f0 * float(rng.uniform(0.85, 1.1)),
                                  float(rng.uniform(0.14, 0.26)),
                                  vowels[int(rng.integers(len(vowels)))], person.formant_scale))
        chunk = np.concatenate(word)
        if pos + len(chunk) > total - int(0.1 * SAMPLE_RATE):
            break
        out[pos:pos + len(chunk)] += chunk
        pos += len(chunk) + int(rng.uniform(0.08, 0.3) * SAMPLE_RATE)  # pause between words
    out += 1e-4 * rng.standard_normal(total)  # room noise floor
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------

def demo_input_json() -> dict:
    """The input JSON (official format), media paths relative to its folder."""
    return {
        "prompt": DEMO_PROMPT,
        "cond_image": IMAGE_FILE,
        "audio_type": "add",
        "cond_audio": dict(AUDIO_FILES),
        "bbox": {name: person_bbox(p) for name, p in PERSONS.items()},
    }


def write_demo_inputs(out_dir: str | os.PathLike) -> Path:
    """Write the demo image, the two WAV tracks and the input JSON; returns the JSON's path."""
    import soundfile as sf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw_reference_image().save(out_dir / IMAGE_FILE, format="PNG")
    for name, person in PERSONS.items():
        sf.write(str(out_dir / AUDIO_FILES[name]), synthesize_speech(person), SAMPLE_RATE,
                 subtype="PCM_16", format="WAV")
    path = out_dir / INPUT_FILE
    path.write_text(json.dumps(demo_input_json(), indent=4) + "\n", encoding="utf-8")
    return path
