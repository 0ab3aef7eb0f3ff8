"""Speech from text with eSpeak NG, the offline default voice (no model, no download).

The Debian package ``espeak-ng`` provides the ``espeak-ng`` program; it is run as a subprocess
with the text on stdin (never on the command line) and writes a 16-bit mono WAV (22050 Hz). A
voice is an espeak-ng voice name, optionally with a variant: ``en-us``, ``en-gb+f3``, ``fr``,
``de+m3`` (``espeak-ng --voices`` and ``espeak-ng --voices=variant`` list them).

Bad input raises :class:`~multitalk.errors.UserInputError` naming ``field``.
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess

import numpy as np

from multitalk.errors import UserInputError

ESPEAK_PROGRAM = "espeak-ng"
ESPEAK_TIMEOUT_S = 120
MAX_TEXT_CHARS = 5000
_VOICE_SYNTAX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(\+[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_INSTALL_FIX = "install espeak-ng (Debian/Ubuntu: apt-get install espeak-ng), or give a Kokoro voice with --tts_dir"


def espeak_program() -> str | None:
    """Path of the ``espeak-ng`` program, or None when it is not installed."""
    return shutil.which(ESPEAK_PROGRAM)


def _require_program(field: str) -> str:
    program = espeak_program()
    if program is None:
        raise UserInputError(field, "espeak-ng is not installed (needed to speak text offline)", _INSTALL_FIX)
    return program


def _listing(program: str, which: str) -> list[list[str]]:
    out = subprocess.run([program, f"--voices{which}"], capture_output=True, timeout=30, check=False)
    rows = []
    for line in out.stdout.decode("utf-8", "replace").splitlines()[1:]:  # first line: the header
        parts = line.split()
        if len(parts) >= 5:
            rows.append(parts)
    return rows


@functools.lru_cache(maxsize=1)
def _voice_files() -> dict[str, str]:
    """Every name ``-v`` accepts for a language voice (language code, voice name, file name) ->
    the voice file it selects (the best-priority eSpeak voice for a language, MBROLA voices last:
    they need the separate mbrola program)."""
    program = _require_program("voice")
    rows = _listing(program, "")
    # Pty Language Age/Gender VoiceName File [Other Languages]
    rows.sort(key=lambda parts: (parts[4].startswith("mb/"), int(parts[0]) if parts[0].isdigit() else 99))
    files: dict[str, str] = {}
    for parts in rows:
        lang, name, file = parts[1].lower(), parts[3].lower(), parts[4]
        for key in (lang, name, file.lower(), file.rsplit("/", 1)[-1].lower()):
            files.setdefault(key, file)
    return files


def espeak_voices() -> frozenset[str]:
    """Every name ``-v`` accepts for a language voice (language codes, voice names, file names)."""
    return frozenset(_voice_files())


@functools.lru_cache(maxsize=1)
def espeak_variants() -> frozenset[str]:
    """Every variant name accepted after ``+`` (``f3``, ``m2``, ``klatt`` ...)."""
    program = _require_program("voice")
    return frozenset(parts[4].rsplit("/", 1)[-1].lower() for parts in _listing(program, "=variant"))


def check_espeak_voice(voice: str, field: str = "voice") -> str:
    """Return ``voice`` if espeak-ng knows it (language voice and optional ``+variant``)."""
    if not isinstance(voice, str) or not _VOICE_SYNTAX.match(voice):
        raise UserInputError(field, f"{voice!r} is not an espeak-ng voice name",
                             "use e.g. en-us, en-gb+f3, fr, de+m3 (espeak-ng --voices lists them)")
    base, _, variant = voice.partition("+")
    _require_program(field)
    if base.lower() not in espeak_voices():
        raise UserInputError(field, f"espeak-ng has no voice {base!r}",
                             "use e.g. en-us, en-gb, fr, de, es (espeak-ng --voices lists them)")
    if variant and variant.lower() not in espeak_variants():
        raise UserInputError(field, f"espeak-ng has no voice variant {variant!r}",
                             "use e.g. en-us+f3 (female variants f1..f5, male m1..m7; espeak-ng --voices=variant)")
    return voice


def synthesize_espeak(text: str, voice: str = "en-us", field: str = "text",
                      voice_field: str = "voice") -> tuple[np.ndarray, int]:
    """Speak ``text`` with espeak-ng: ``(mono float32 samples, sample rate)``.

    Raises a :class:`UserInputError` for an unknown voice, an empty text, a missing program or a
    text that produces no sound (e.g. punctuation only).
    """
    import soundfile as sf

    if not isinstance(text, str) or not text.strip():
        raise UserInputError(field, "the text to speak is empty", "type what the person says")
    if len(text) > MAX_TEXT_CHARS:
        raise UserInputError(field, f"the text is {len(text)} characters long (at most {MAX_TEXT_CHARS})",
                             "split it, or record the speech as an audio file")
    check_espeak_voice(voice, voice_field)
    program = _require_program(field)
    base, _, variant = voice.partition("+")
    if variant:
        # espeak-ng 1.51 drops the variant when the base is a language code that is not also a file
        # name ("en-gb+f3" speaks exactly as "en-gb"; "en-us+f3" works): name the file instead
        base = _voice_files()[base.lower()]
    try:
        # -b 1: the input is UTF-8; --stdin: the text never reaches the argument list
        done = subprocess.run([program, "-v", f"{base}+{variant}" if variant else base, "-b", "1", "--stdin",
                               "--stdout"],
                              input=text.encode("utf-8"), capture_output=True, timeout=ESPEAK_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        raise UserInputError(field, f"espeak-ng took longer than {ESPEAK_TIMEOUT_S} s",
                             "give a shorter text") from None
    if done.returncode != 0 or not done.stdout:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UserInputError(voice_field, f"espeak-ng failed ({detail[-1] if detail else f'exit code {done.returncode}'})",
                             "check the voice name (espeak-ng --voices)")
    samples, rate = _read_wav(done.stdout, sf)
    if samples.size == 0 or not np.any(samples):
        raise UserInputError(field, f"espeak-ng produced no speech for {text[:40]!r}",
                             "give words to speak, not only punctuation")
    return samples, rate


def _read_wav(data: bytes, sf) -> tuple[np.ndarray, int]:
    """Decode espeak's streamed WAV (its header may announce a length of 0 or 0xFFFFFFFF)."""
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return np.ascontiguousarray(samples.mean(axis=1), dtype=np.float32), int(rate)
    except Exception:  # noqa: BLE001 - fall back to the PCM16 payload after the RIFF header
        pass
    pos = data.find(b"data")
    rate = int.from_bytes(data[24:28], "little") if len(data) >= 28 else 22050
    pcm = np.frombuffer(data[pos + 8:len(data) - (len(data) - pos - 8) % 2], dtype="<i2")
    return (pcm.astype(np.float32) / 32768.0), rate


__all__ = ["ESPEAK_PROGRAM", "check_espeak_voice", "espeak_program", "espeak_variants", "espeak_voices",
           "synthesize_espeak"]
