"""Speech from text: the official ``tts_audio`` format, espeak-ng voices, placement of the turns
(add / para) and the normal audio path after it. espeak-ng runs for real (CI installs it)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from multitalk.errors import UserInputError
from multitalk.media.speech_synthesis import check_espeak_voice, espeak_program, synthesize_espeak
from multitalk.pipeline.demo_inputs import write_demo_inputs
from multitalk.pipeline.generate import prepare_media
from multitalk.pipeline.inputs import GenerationParams, InputSpec
from multitalk.pipeline.speech_from_text import (SpeechSynthesizer, TtsAudio, parse_turns, place_turns,
                                                 speak_inputs, speak_line, speak_tracks)

requires_espeak = pytest.mark.skipif(espeak_program() is None and not os.environ.get("CI"),
                                     reason="espeak-ng not installed (.ci/run installs it)")


def _f0(x: np.ndarray, sr: int = 16000) -> float:
    """Median pitch (Hz) of the voiced 40 ms frames, by autocorrelation between 70 and 400 Hz."""
    n, hop = int(0.04 * sr), int(0.02 * sr)
    lo, hi = sr // 400, sr // 70
    energy = np.array([np.sum(x[i:i + n] ** 2) for i in range(0, len(x) - n, hop)])
    out = []
    for k, i in enumerate(range(0, len(x) - n, hop)):
        if energy[k] < 0.1 * energy.max():
            continue
        f = x[i:i + n] - x[i:i + n].mean()
        ac = np.correlate(f, f, "full")[n - 1:]
        best = ac[lo:hi].max()
        # the first lag close to the best one (a multiple of the period correlates as well)
        lag = lo + int(np.argmax(ac[lo:hi] >= 0.85 * best))
        while lag + 1 < hi and ac[lag + 1] > ac[lag]:
            lag += 1
        if ac[lag] > 0.3 * ac[0]:
            out.append(sr / lag)
    return float(np.median(out))


# ----------------------------------------------------------------------------- turns


def test_turns_follow_the_official_pattern():
    text = "(s1) do you know multi-talk? (s2) yes, I know it, that's amazing! (s1) Me too."
    assert [(t.speaker, t.text) for t in parse_turns(text)] == [
        (1, "do you know multi-talk?"), (2, "yes, I know it, that's amazing!"), (1, "Me too.")]
    assert [(t.speaker, t.text) for t in parse_turns("  Welcome to\nmulti-talk.  ")] == [(1, "Welcome to multi-talk.")]
    assert [t.speaker for t in parse_turns("(s2) first (s1)  (s2) again")] == [2, 2]  # empty turns dropped


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("hello (s1) hi", "text before the first speaker tag"),
    ("(s1) hi (s3) who?", "(s3): MultiTalk has persons 1 and 2"),
    ("(s1) (s2) ", "no text after them"),
])
def test_bad_texts_name_the_field(text, message):
    with pytest.raises(UserInputError) as e:
        parse_turns(text)
    assert e.value.field == "tts_audio.text" and message in e.value.message and "(s1)" in e.value.fix


def test_tts_audio_speakers_and_default_voices():
    assert TtsAudio(text="hello").voices == ["en-us"]
    assert TtsAudio(text="(s1) hi (s2) hello").voices == ["en-us", "en-us+f3"]   # (s2) line: two speakers
    assert TtsAudio(text="(s1) hi (s2) ho", human2_voice="fr").num_speakers == 2
    with pytest.raises(UserInputError) as e:
        InputSpec.from_dict({"cond_image": "x.png", "tts_audio": {"text": "(s1) hi", "human2_voice": "fr"}})
    assert e.value.field == "tts_audio.text" and "no line is tagged (s2)" in e.value.message
    with pytest.raises(UserInputError) as e:
        InputSpec.from_dict({"cond_image": "x.png", "cond_audio": {}})
    assert e.value.field == "cond_audio" and "tts_audio" in e.value.fix


# ----------------------------------------------------------------------------- espeak-ng


@requires_espeak
def test_espeak_speaks_with_the_voice_asked_for():
    male, rate = synthesize_espeak("Hello there, do you know multi-talk?", "en-us")
    assert rate == 22050 and male.dtype == np.float32 and 1.0 < len(male) / rate < 5.0
    assert 0.1 < np.abs(male).max() <= 1.0
    synth = SpeechSynthesizer()
    low, _ = synth.speak("Hello there, do you know multi-talk?", "en-us")
    high, _ = synth.speak("Hello there, do you know multi-talk?", "en-gb+f3")
    assert _f0(low) < 160 < _f0(high)   # the female variant speaks higher (measured ~115 vs ~210 Hz)


@requires_espeak
@pytest.mark.parametrize("voice, message", [
    ("xx-nope", "no voice 'xx-nope'"), ("en-us+zz", "no voice variant 'zz'"), ("--help", "not an espeak-ng voice"),
])
def test_unknown_voices_are_refused_before_speaking(voice, message):
    with pytest.raises(UserInputError) as e:
        check_espeak_voice(voice, "tts_audio.human1_voice")
    assert e.value.field == "tts_audio.human1_voice" and message in e.value.message and "en-us" in e.value.fix


@requires_espeak
def test_punctuation_only_is_refused():
    with pytest.raises(UserInputError) as e:
        synthesize_espeak("...", "en-us", field="tts_audio.text")
    assert e.value.field == "tts_audio.text" and "no speech" in e.value.message


@requires_espeak
def test_kokoro_voice_without_a_kokoro_folder():
    synth = SpeechSynthesizer()
    voice, warning = synth.resolve("weights/Kokoro-82M/voices/af_heart.pt", "tts_audio.human1_voice")
    assert (voice.kind, voice.name) == ("espeak", "en-us+f3") and "needs --tts_dir" in warning
    assert synth.resolve("bm_george", "v")[0].name == "en-gb"
    with pytest.raises(UserInputError) as e:   # the service: no silent substitution
        SpeechSynthesizer(espeak_fallback=False).resolve("af_heart.pt", "tts_audio.human1_voice")
    assert e.value.field == "tts_audio.human1_voice" and "--tts_dir" in e.value.fix


def test_kokoro_voice_missing_from_the_folder(tmp_path):
    (tmp_path / "voices").mkdir()
    with pytest.raises(UserInputError) as e:
        SpeechSynthesizer(tmp_path, voice_files=False).resolve("/etc/voices/af_heart.pt", "tts_audio.human1_voice")
    assert e.value.field == "tts_audio.human1_voice" and "af_heart.pt not found in" in e.value.message
    (tmp_path / "af_heart.pt").write_bytes(b"x")   # a file of the machine is never read by the service
    with pytest.raises(UserInputError):
        SpeechSynthesizer(tmp_path, voice_files=False).resolve(str(tmp_path / "af_heart.pt"), "v")


# ----------------------------------------------------------------------------- placement


def test_place_turns_add_and_para():
    turns = parse_turns("(s1) a (s2) b (s1) c")
    speech = [np.full(3, 1.0, np.float32), np.full(2, 2.0, np.float32), np.full(4, 3.0, np.float32)]
    s1, s2 = place_turns(turns, speech, 2, "add")
    assert s1.tolist() == [1, 1, 1, 0, 0, 3, 3, 3, 3] and s2.tolist() == [0, 0, 0, 2, 2, 0, 0, 0, 0]
    p1, p2 = place_turns(turns, speech, 2, "para")
    assert p1.tolist() == [1, 1, 1, 3, 3, 3, 3] and p2.tolist() == [2, 2]
    assert place_turns(turns[:1], speech[:1], 1)[0].tolist() == [1, 1, 1]


@requires_espeak
def test_dialogue_is_spoken_turn_by_turn_and_feeds_the_audio_path(tmp_path):
    demo = write_demo_inputs(tmp_path / "demo")
    tts = {"text": "(s1) Good morning. (s2) Hello, how are you? (s1) Fine, thanks.",
           "human1_voice": "en-us", "human2_voice": "en-gb+f3"}
    spec = InputSpec.from_dict({"prompt": "two people", "cond_image": str(demo.parent / "demo_two_people.png"),
                                     "tts_audio": tts, "audio_type": "add"})
    synth = SpeechSynthesizer()
    turns = [synth.speak(t.text, tts[f"human{t.speaker}_voice"])[0] for t in spec.tts_audio.turns]
    spoken, warnings = speak_inputs(spec, tmp_path / "speech", synth)
    assert warnings == [] and spoken.audio_type == "para" and not spoken.uses_tts
    s1, r1 = sf.read(spoken.cond_audio.person1, dtype="float32")
    s2, _ = sf.read(spoken.cond_audio.person2, dtype="float32")
    n0, n1, n2 = (len(t) for t in turns)
    assert r1 == 16000 and len(s1) == len(s2) == n0 + n1 + n2
    np.testing.assert_allclose(s1[:n0], turns[0], atol=1e-6)            # person 1 speaks first ...
    assert not s1[n0:n0 + n1].any() and not s2[:n0].any()                 # ... while person 2 is silent
    np.testing.assert_allclose(s2[n0:n0 + n1], turns[1], atol=1e-6)
    assert (tmp_path / "speech" / "speech.wav").is_file()
    media = prepare_media(spoken, GenerationParams(size="preview"))     # the normal audio path follows
    assert len(media.mix) == len(s1) and len(media.speech) == 2

    para = speak_tracks(spec.tts_audio, "para", synth)
    assert [len(t) for t in para.tracks] == [n0 + n2, n1] and "at the same time" in para.warnings[0]


@requires_espeak
def test_speak_line_writes_a_16khz_wav(tmp_path):
    path, warnings = speak_line("Nice to meet you.", "en-us", tmp_path / "p2.wav")
    info = sf.info(str(path))
    assert warnings == [] and info.samplerate == 16000 and info.channels == 1 and info.duration > 0.5
