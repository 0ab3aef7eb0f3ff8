"""Speech from text: the official ``tts_audio`` input, synthesised per speaker and placed in time.

``{"text": "(s1) do you know multi-talk? (s2) yes, I know it! (s1) Me too.", "human1_voice": ...,
"human2_voice": ...}``: one text with speaker tags, turns in order (the official pattern
``\\(s(\\d+)\\)\\s*(.*?)(?=\\s*\\(s\\d+\\)|$)``). Each turn is spoken with its speaker's voice
(:class:`SpeechSynthesizer`: espeak-ng names offline, Kokoro voice files with a Kokoro folder),
resampled to 16 kHz, then placed:

* ``add`` (default): turn after turn, the other speaker silent meanwhile (what the official code
  does for every TTS input);
* ``para``: each speaker's lines one after the other, both speakers starting together.

:func:`speak_inputs` writes the tracks as WAV files and returns the input with them as
``cond_audio``, so the normal audio path (decode, loudness normalisation, wav2vec2) follows.
Deliberate difference: the official code ignores ``audio_type`` for TTS (always turns in order)
and does not loudness-normalise the synthesised speech; here ``audio_type`` is honoured and the
speech is normalised like any recording.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from multitalk.errors import UserInputError
from multitalk.media.audio import SAMPLE_RATE, resample
from multitalk.media.speech_synthesis import check_espeak_voice, synthesize_espeak

if TYPE_CHECKING:
    from multitalk.pipeline.inputs import InputSpec

log = logging.getLogger(__name__)

DEFAULT_VOICES = ("en-us", "en-us+f3")   # espeak-ng voices of person 1 / person 2 when none is named
TURN_PATTERN = re.compile(r"\(s(\d+)\)\s*(.*?)(?=\s*\(s\d+\)|$)", re.DOTALL)  # the official one
TAG_PATTERN = re.compile(r"\(s(\d+)\)")
KOKORO_NAME = re.compile(r"^[abefhijpz][fm]_[a-z0-9]+$")
# Kokoro voice -> espeak-ng voice when no Kokoro folder is given (language letter, then gender)
KOKORO_TO_ESPEAK = {"a": "en-us", "b": "en-gb", "e": "es", "f": "fr", "h": "hi", "i": "it", "p": "pt-br",
                    "j": "ja", "z": "cmn"}
_TAG_FIX = "write the text as (s1) what person 1 says (s2) what person 2 says ..."


@dataclass(frozen=True)
class Turn:
    speaker: int   # 1 or 2
    text: str


def parse_turns(text: str, field: str = "tts_audio.text") -> list[Turn]:
    """The turns of a TTS text, in order. Without tags the whole text is person 1's."""
    if not isinstance(text, str) or not text.strip():
        raise UserInputError(field, "the text to speak is empty", _TAG_FIX)
    first = TAG_PATTERN.search(text)
    if first is None:
        return [Turn(1, " ".join(text.split()))]
    if text[:first.start()].strip():
        raise UserInputError(field, f"text before the first speaker tag: {text[:first.start()].strip()[:40]!r}",
                             _TAG_FIX)
    turns = []
    for speaker, content in TURN_PATTERN.findall(text):
        if speaker not in ("1", "2"):
            raise UserInputError(field, f"speaker tag (s{speaker}): MultiTalk has persons 1 and 2", _TAG_FIX)
        content = " ".join(content.split())
        if content:
            turns.append(Turn(int(speaker), content))
    if not turns:
        raise UserInputError(field, "the speaker tags have no text after them", _TAG_FIX)
    return turns


class TtsAudio(BaseModel):
    """Speech from text (the official ``tts_audio``): one ``text`` with ``(s1)`` / ``(s2)`` speaker
    tags, turns in order, and a voice per person.

    A voice is an espeak-ng voice name (``en-us``, ``en-gb+f3``; the offline default) or a Kokoro
    voice (``weights/Kokoro-82M/voices/af_heart.pt`` or ``af_heart``; needs a Kokoro folder). Two
    speakers when ``human2_voice`` is given or the text has an ``(s2)`` line.
    """

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=5000)
    human1_voice: str = Field(DEFAULT_VOICES[0], min_length=1, max_length=4096)
    human2_voice: str | None = Field(None, min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _turns(self) -> "TtsAudio":
        speakers = {t.speaker for t in parse_turns(self.text)}
        if self.human2_voice is not None and 2 not in speakers:
            raise UserInputError("tts_audio.text", "human2_voice is given but no line is tagged (s2)", _TAG_FIX)
        if self.human2_voice is not None and 1 not in speakers:
            raise UserInputError("tts_audio.text", "no line is tagged (s1)", _TAG_FIX)
        return self

    @property
    def turns(self) -> list[Turn]:
        return parse_turns(self.text)

    @property
    def num_speakers(self) -> int:
        two = self.human2_voice is not None or "2" in TAG_PATTERN.findall(self.text)
        return 2 if two else 1

    @property
    def voices(self) -> list[str]:
        """The voice per speaker (person 2's default when the text has ``(s2)`` lines but no voice)."""
        if self.num_speakers == 1:
            return [self.human1_voice]
        return [self.human1_voice, self.human2_voice or DEFAULT_VOICES[1]]


# ---------------------------------------------------------------------------------------------
# voices


def is_kokoro_voice(voice: str) -> bool:
    """A Kokoro voice: a ``.pt`` file or a Kokoro voice name (``af_heart``)."""
    return voice.endswith(".pt") or bool(KOKORO_NAME.match(voice))


def espeak_stand_in(voice: str) -> str:
    """The espeak-ng voice closest to a Kokoro voice (its language; ``+f3`` for a female voice)."""
    name = Path(voice).stem
    lang = KOKORO_TO_ESPEAK.get(name[:1], DEFAULT_VOICES[0])
    return lang + ("+f3" if name[1:2] == "f" else "")


@dataclass(frozen=True)
class Voice:
    kind: str              # "espeak" or "kokoro"
    name: str              # espeak-ng voice name, or the Kokoro voice file's path


class SpeechSynthesizer:
    """Speaks text with espeak-ng voices, or Kokoro voices when a Kokoro folder is given.

    ``voice_files=False`` (the service): a Kokoro voice is looked up by its file name in
    ``<tts_dir>/voices`` only, never as a path of the machine. ``espeak_fallback``: a Kokoro voice
    without a Kokoro folder is spoken with the closest espeak-ng voice (with a warning) instead of
    being refused.
    """

    def __init__(self, tts_dir: str | Path | None = None, *, voice_files: bool = True,
                 espeak_fallback: bool = True, device: str = "cpu"):
        self.tts_dir = Path(tts_dir) if tts_dir else None
        self.voice_files = voice_files
        self.espeak_fallback = espeak_fallback
        self.device = device
        self._kokoro = None
        self._lock = threading.Lock()

    def kokoro(self):
        """The Kokoro model of ``tts_dir`` (loaded on first use)."""
        from multitalk.models.kokoro_speech import KokoroSpeech

        with self._lock:
            if self._kokoro is None:
                if self.tts_dir is None:
                    raise UserInputError("tts_dir", "no Kokoro folder given", "pass --tts_dir Kokoro-82M")
                self._kokoro = KokoroSpeech.load(self.tts_dir, device=self.device)
            return self._kokoro

    def resolve(self, voice: str, field: str = "voice") -> tuple[Voice, str | None]:
        """``(voice, warning or None)``; raises a :class:`UserInputError` for an unusable voice."""
        from multitalk.models.kokoro_speech import voice_file

        if not isinstance(voice, str) or not voice.strip():
            raise UserInputError(field, "empty voice", "use an espeak-ng voice (en-us, en-gb+f3) or a Kokoro voice")
        voice = voice.strip()
        if not is_kokoro_voice(voice):
            return Voice("espeak", check_espeak_voice(voice, field)), None
        if self.tts_dir is None:
            if not self.espeak_fallback:
                raise UserInputError(field, f"Kokoro voice {Path(voice).name} needs a Kokoro folder on the server",
                                     "start it with --tts_dir Kokoro-82M, or use an espeak-ng voice such as en-us")
            stand_in = espeak_stand_in(voice)
            return (Voice("espeak", check_espeak_voice(stand_in, field)),
                    f"{field}: Kokoro voice {Path(voice).name} needs --tts_dir (a Kokoro folder); "
                    f"speaking with the espeak-ng voice {stand_in} instead")
        return Voice("kokoro", str(voice_file(self.tts_dir, voice, field, allow_paths=self.voice_files))), None

    def speak(self, text: str, voice: str, field: str = "text",
              voice_field: str = "voice") -> tuple[np.ndarray, list[str]]:
        """``(speech at 16 kHz, float32 mono; warnings)``."""
        resolved, warning = self.resolve(voice, voice_field)
        if resolved.kind == "espeak":
            samples, rate = synthesize_espeak(text, resolved.name, field=field, voice_field=voice_field)
        else:
            from multitalk.models.kokoro_speech import KOKORO_SAMPLE_RATE

            samples = self.kokoro().synthesize(text, Path(resolved.name), field=field, voice_field=voice_field)
            rate = KOKORO_SAMPLE_RATE
        speech = resample(np.asarray(samples, dtype=np.float32), rate, SAMPLE_RATE)
        return speech, [warning] if warning else []


# ---------------------------------------------------------------------------------------------
# placement


def place_turns(turns: list[Turn], speech: list[np.ndarray], num_speakers: int,
                audio_type: str = "add") -> list[np.ndarray]:
    """One track per speaker from the spoken turns (``speech[i]`` is ``turns[i]`` spoken).

    ``add``: the turns follow each other on a shared timeline (every track as long as the whole
    dialogue, silent while the other speaks). ``para``: each track is its speaker's turns one
    after the other, all starting at 0 (lengths may differ).
    """
    if num_speakers == 1:
        return [np.concatenate(speech).astype(np.float32)]
    tracks: list[list[np.ndarray]] = [[], []]
    for turn, audio in zip(turns, speech):
        tracks[turn.speaker - 1].append(audio)
        if audio_type == "add":
            tracks[2 - turn.speaker].append(np.zeros_like(audio))
    return [np.concatenate(t).astype(np.float32) if t else np.zeros(0, np.float32) for t in tracks]


@dataclass
class SpokenTracks:
    tracks: list[np.ndarray]     # per speaker, 16 kHz float32
    audio_type: str              # how the tracks combine now ("para" once placed on one timeline)
    warnings: list[str]

    @property
    def mix(self) -> np.ndarray:
        n = max(len(t) for t in self.tracks)
        return np.sum([np.pad(t, (0, n - len(t))) for t in self.tracks], axis=0).astype(np.float32)


def speak_tracks(tts: TtsAudio, audio_type: str | None, synthesizer: SpeechSynthesizer) -> SpokenTracks:
    """Synthesise every turn with its speaker's voice and place the tracks (``add`` / ``para``)."""
    turns, voices = tts.turns, tts.voices
    audio_type = audio_type or "add"
    warnings: list[str] = []
    speech = []
    for turn in turns:
        audio, notes = synthesizer.speak(turn.text, voices[turn.speaker - 1], field="tts_audio.text",
                                         voice_field=f"tts_audio.human{turn.speaker}_voice")
        speech.append(audio)
        warnings += [n for n in notes if n not in warnings]
    tracks = place_turns(turns, speech, tts.num_speakers, audio_type)
    if len(tracks) == 2 and audio_type == "para" and len(turns) > 2:
        warnings.append("audio_type para: the two speakers' lines are spoken at the same time (the official code "
                        "plays the (s1)/(s2) turns in order whatever audio_type says; use add for that)")
    # placed on one timeline, the two tracks are as long as each other: they combine as 'para'
    combined = "para" if len(tracks) == 2 else audio_type
    return SpokenTracks(tracks, combined, warnings)


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, rate, subtype="FLOAT", format="WAV")
    return path


def speak_inputs(spec: "InputSpec", out_dir: str | Path,
                 synthesizer: SpeechSynthesizer | None = None) -> tuple["InputSpec", list[str]]:
    """Synthesise ``spec.tts_audio`` into ``out_dir`` (``person1.wav``, ``person2.wav`` and
    ``speech.wav``, their sum, to listen to) and return the input with them as ``cond_audio``."""
    from multitalk.pipeline.inputs import CondAudio

    if spec.tts_audio is None:
        raise UserInputError("tts_audio", "missing", "add tts_audio {text, human1_voice[, human2_voice]}")
    out_dir = Path(out_dir)
    spoken = speak_tracks(spec.tts_audio, spec.audio_type, synthesizer or SpeechSynthesizer())
    paths = {f"person{i + 1}": str(write_wav(out_dir / f"person{i + 1}.wav", t)) for i, t in enumerate(spoken.tracks)}
    write_wav(out_dir / "speech.wav", spoken.mix)
    spoken_spec = spec.model_copy(update={"cond_audio": CondAudio(**paths), "audio_type": spoken.audio_type})
    spoken_spec._warnings = spec.warnings + spoken.warnings
    return spoken_spec, spoken.warnings


def speak_line(text: str, voice: str, out_path: str | Path, synthesizer: SpeechSynthesizer | None = None,
               field: str = "text", voice_field: str = "voice") -> tuple[Path, list[str]]:
    """One speaker's text spoken into a 16 kHz WAV file (the page's text-to-speech per speaker)."""
    speech, warnings = (synthesizer or SpeechSynthesizer()).speak(text, voice, field=field, voice_field=voice_field)
    return write_wav(Path(out_path), speech), warnings


__all__ = ["DEFAULT_VOICES", "SpeechSynthesizer", "SpokenTracks", "TtsAudio", "Turn", "Voice", "espeak_stand_in",
           "is_kokoro_voice", "parse_turns", "place_turns", "speak_inputs", "speak_line", "speak_tracks"]
