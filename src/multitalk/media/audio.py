"""Speech input: decode any audio/video file, resample to 16 kHz, normalise loudness, combine speakers.

Reproduces the official ``audio_prepare_single`` / ``audio_prepare_multi`` of
``generate_multitalk.py`` without librosa:

* ``librosa.load(path, sr=16000)`` = soundfile float32 read, mean over channels, then
  ``soxr.resample(..., quality="soxr_hq")`` padded/cut to ``ceil(N * 16000 / sr)`` samples
  (:func:`decode_audio` + :func:`resample`). Files soundfile cannot open (mp4/mov/mkv/webm/m4a/...)
  are decoded with PyAV, which plays the role of the official ``ffmpeg`` extraction.
* ``loudness_norm``: pyloudnorm integrated loudness (ITU-R BS.1770-4) and a gain to -23 LUFS
  (:func:`loudness_normalize`).

Every function takes and returns numpy ``float32`` arrays. Bad input raises
:class:`~multitalk.errors.UserInputError` naming ``field`` (the request field the file came from).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from multitalk.errors import UserInputError

SAMPLE_RATE = 16000
TARGET_LUFS = -23.0
LOUDNESS_BLOCK_S = 0.4  # BS.1770 gating block; pyloudnorm needs at least one
AUDIO_TYPES = ("add", "para")

_FORMATS_HINT = "use a WAV, FLAC, OGG, MP3 or M4A file, or a video (mp4/mov/mkv/webm) with an audio track"


# ----------------------------------------------------------------------------- decoding

def decode_audio(path: str | os.PathLike, field: str = "cond_audio") -> tuple[np.ndarray, int]:
    """Decode ``path`` to ``(mono float32 samples [N], native sample rate)``.

    soundfile first (as ``librosa.load``: float32 read, channels averaged); anything it cannot open,
    including the audio stream of a video container, is decoded with PyAV. Rejects missing,
    undecodable, empty, all-silent and non-finite input with a :class:`UserInputError`.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise UserInputError(field, f"audio file not found: {path}", "check the path")
    try:
        samples, rate = _decode_soundfile(path)
    except Exception:
        samples, rate = _decode_pyav(path, field)
    check_samples(samples, field, name)
    return samples, rate


def audio_duration_s(path: str | os.PathLike, field: str = "cond_audio") -> float:
    """Length of the audio in seconds, from the container's header where it has one (no full
    decode); decoded and counted otherwise. Undecodable files raise a :class:`UserInputError`."""
    path = Path(path)
    try:
        import soundfile as sf

        info = sf.info(str(path))
        if info.samplerate > 0 and info.frames > 0:
            return info.frames / info.samplerate
    except Exception:  # noqa: BLE001 - not a soundfile format: PyAV below
        pass
    import av

    try:
        container = av.open(str(path))
    except Exception as exc:
        raise UserInputError(field, f"cannot decode {path.name} as audio ({type(exc).__name__})",
                             _FORMATS_HINT) from None
    with container:
        if not container.streams.audio:
            raise UserInputError(field, f"cannot decode {path.name}: it has no audio track",
                                 _FORMATS_HINT)
        stream = container.streams.audio[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / av.time_base
    samples, rate = _decode_pyav(path, field)
    return len(samples) / rate


def _decode_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        rate = f.samplerate
        data = f.read(dtype="float32", always_2d=True)  # [N, channels]
    return _to_mono(data.T), rate


def _decode_pyav(path: Path, field: str) -> tuple[np.ndarray, int]:
    import av

    try:
        container = av.open(str(path))
    except Exception as exc:
        raise UserInputError(field, f"cannot decode {path.name} as audio ({type(exc).__name__})",
                             _FORMATS_HINT) from None
    with container:
        if not container.streams.audio:
            what = "has no audio track" if container.streams.video else "is not an audio or video file"
            raise UserInputError(field, f"cannot decode {path.name}: it {what}", _FORMATS_HINT)
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        # Planar float at the native layout and rate: to_ndarray() -> [channels, n].
        resampler = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                rate = rate or frame.sample_rate
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        except av.error.FFmpegError as exc:
            raise UserInputError(field, f"cannot decode the audio of {path.name} ({exc})",
                                 _FORMATS_HINT) from None
    if not chunks or not rate:
        return np.zeros(0, dtype=np.float32), int(rate or SAMPLE_RATE)
    data = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    return _to_mono(data), int(rate)


def _to_mono(channels_first: np.ndarray) -> np.ndarray:
    """``librosa.to_mono``: float32 mean over the channel axis of ``[channels, N]``."""
    if channels_first.shape[0] == 1:
        return np.ascontiguousarray(channels_first[0], dtype=np.float32)
    return np.mean(channels_first, axis=0).astype(np.float32, copy=False)


def check_samples(samples: np.ndarray, field: str = "cond_audio", name: str = "the audio") -> None:
    """Reject empty, non-finite or all-zero sample arrays."""
    if samples.size == 0:
        raise UserInputError(field, f"{name} contains no audio samples (empty track)",
                             "provide a file with speech in it")
    if not np.all(np.isfinite(samples)):
        raise UserInputError(field, f"{name} contains NaN or infinite samples",
                             "re-export the audio as ordinary PCM (e.g. 16-bit WAV)")
    if not np.any(samples):
        raise UserInputError(field, f"{name}: the track is silent (every sample is 0)",
                             "provide a recording of the person speaking")


# ----------------------------------------------------------------------------- resampling

def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """librosa's default resampler: ``soxr_hq``, then zero-pad/cut to ``ceil(N * sr_out / sr_in)``."""
    x = np.asarray(x, dtype=np.float32)
    if sr_in == sr_out:
        return x
    import soxr

    ratio = float(sr_out) / sr_in  # librosa computes the length exactly this way
    n_out = int(np.ceil(x.shape[-1] * ratio))
    y = soxr.resample(x, sr_in, sr_out, quality="soxr_hq")
    if y.shape[-1] > n_out:
        y = y[..., :n_out]
    elif y.shape[-1] < n_out:
        y = np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, n_out - y.shape[-1])])
    return np.ascontiguousarray(y, dtype=np.float32)


# ----------------------------------------------------------------------------- loudness

def integrated_loudness(x: np.ndarray, sr: int = SAMPLE_RATE, field: str = "cond_audio") -> float:
    """BS.1770-4 integrated loudness in LUFS (pyloudnorm ``Meter(sr)``); ``-inf`` for silence."""
    import pyloudnorm

    if x.shape[-1] < LOUDNESS_BLOCK_S * sr:
        raise UserInputError(field, f"the audio is too short ({x.shape[-1] / sr:.3f} s)",
                             f"provide at least {LOUDNESS_BLOCK_S} s of speech")
    return float(pyloudnorm.Meter(sr).integrated_loudness(x))


def loudness_gain(loudness: float, target_lufs: float = TARGET_LUFS) -> float | None:
    """The official gain ``10**((target - L)/20)``, or ``None`` when ``|L| > 100`` (left unchanged)."""
    if abs(loudness) > 100:
        return None
    return float(np.power(10.0, (target_lufs - loudness) / 20.0))


def loudness_normalize(x: np.ndarray, sr: int = SAMPLE_RATE, target_lufs: float = TARGET_LUFS,
                       field: str = "cond_audio") -> np.ndarray:
    """The official ``loudness_norm``: scale to ``target_lufs`` integrated loudness, float32.

    The product is formed in float64 (as numpy >= 2 does in the reference) and rounded once.
    """
    x = np.asarray(x, dtype=np.float32)
    gain = loudness_gain(integrated_loudness(x, sr, field), target_lufs)
    if gain is None:
        return x
    return (gain * x.astype(np.float64)).astype(np.float32)


def load_speech(path: str | os.PathLike, field: str = "cond_audio") -> np.ndarray:
    """The official ``audio_prepare_single``: decode, resample to 16 kHz, loudness-normalise."""
    samples, rate = decode_audio(path, field)
    speech = resample(samples, rate, SAMPLE_RATE)
    check_samples(speech, field, Path(path).name)
    return loudness_normalize(speech, SAMPLE_RATE, field=field)


# ----------------------------------------------------------------------------- two speakers

def combine_speakers(a1: np.ndarray, a2: np.ndarray, audio_type: str,
                     field: str = "audio_type") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official ``audio_prepare_multi`` on two prepared arrays: ``(speaker1, speaker2, mix)``.

    * ``'add'``: the speakers talk one after the other: ``[a1, 0...]`` and ``[0..., a2]``, both
      ``len(a1) + len(a2)`` long.
    * ``'para'``: they talk simultaneously; the arrays are returned as they are, except that the
      shorter one is zero-padded at the end to the longer length. (Deliberate fix: the official code
      raises ``ValueError: operands could not be broadcast`` for files of different lengths.)

    ``mix = speaker1 + speaker2`` (summed in float64, rounded once). All three are float32.
    """
    a1 = np.asarray(a1, dtype=np.float32)
    a2 = np.asarray(a2, dtype=np.float32)
    if audio_type == "add":
        s1 = np.concatenate([a1, np.zeros(len(a2), dtype=np.float32)])
        s2 = np.concatenate([np.zeros(len(a1), dtype=np.float32), a2])
    elif audio_type == "para":
        n = max(len(a1), len(a2))
        s1 = np.pad(a1, (0, n - len(a1)))
        s2 = np.pad(a2, (0, n - len(a2)))
    else:
        raise UserInputError(field, f"unknown audio_type {audio_type!r}",
                             "use 'add' (speakers take turns) or 'para' (speakers talk at the same time)")
    mix = (s1.astype(np.float64) + s2.astype(np.float64)).astype(np.float32)
    return s1, s2, mix


def num_video_frames(num_samples: int, fps: int = 25, sr: int = SAMPLE_RATE) -> int:
    """Frames the official code gives ``num_samples`` of speech: ``int(num_samples / sr * fps)``."""
    return int(num_samples / sr * fps)


__all__ = [
    "AUDIO_TYPES", "SAMPLE_RATE", "TARGET_LUFS", "check_samples", "combine_speakers", "decode_audio",
    "integrated_loudness", "load_speech", "loudness_gain", "loudness_normalize", "num_video_frames",
    "resample",
]
