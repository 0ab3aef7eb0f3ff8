"""Kokoro voices from a local folder: a small random Kokoro model written in the official layout
(``config.json``, ``kokoro-v1_0.pth``, ``voices/*.pt``) loads through ``models.kokoro_speech`` and
speaks through the ``kokoro`` package's own pipeline (its espeak-based phonemizer for a Spanish
voice; the English one needs spaCy's ``en_core_web_sm``, refused clearly when it is missing).

The decoder's channel counts are fixed in Kokoro's code (1024/512), so even this model has 58 M
parameters; the text encoder and PL-BERT are shrunk and ``max_dur`` is 2 so speech stays short.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from multitalk.errors import UserInputError
from multitalk.pipeline.speech_from_text import SpeechSynthesizer, TtsAudio, speak_tracks

kokoro = pytest.importorskip("kokoro", reason="the kokoro package is not installed (pip install 'multitalk[kokoro]')")
torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SYMBOLS = list(";:,.!?—…\"() ") + list("abcdefhijklmnopqrstuvwxyzɑɐɒæβɔɕçɖðʤəɚɛɜɟɡɥɨɪʝɯɰŋɳɲɴøɸθœɹɾɻʁɽʂʃʈʧʊʋʌɣɤχʎʒʔˈˌːʰʲ")


@pytest.fixture(scope="module")
def kokoro_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Kokoro-82M")
    config = {"istftnet": {"upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5,
                           "gen_istft_n_fft": 20, "resblock_dilation_sizes": [[1, 3, 5]], "resblock_kernel_sizes": [3],
                           "upsample_initial_channel": 512},
              "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 2, "multispeaker": True,
              "n_layer": 1, "n_mels": 80, "n_token": 178, "style_dim": 128, "text_encoder_kernel_size": 5,
              "plbert": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                         "max_position_embeddings": 512, "num_hidden_layers": 1, "dropout": 0.1},
              "vocab": {s: i + 1 for i, s in enumerate(dict.fromkeys(SYMBOLS))}}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({}, folder / "empty.pth")   # KModel initialises randomly what the file does not hold
    torch.manual_seed(0)
    model = kokoro.KModel(repo_id="hexgrad/Kokoro-82M", config=config, model=str(folder / "empty.pth"))
    (folder / "empty.pth").unlink()
    torch.save({k: {n: t.half() for n, t in getattr(model, k).state_dict().items()}
                for k in ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")}, folder / "kokoro-v1_0.pth")
    (folder / "voices").mkdir()
    for name in ("ef_dora", "af_heart"):
        torch.save(0.1 * torch.randn(510, 1, 256), folder / "voices" / f"{name}.pt")
    return folder


def test_kokoro_folder_loads_and_speaks(kokoro_dir):
    synth = SpeechSynthesizer(kokoro_dir)
    voice, warning = synth.resolve("weights/Kokoro-82M/voices/ef_dora.pt", "tts_audio.human1_voice")
    assert voice.kind == "kokoro" and voice.name == str(kokoro_dir / "voices" / "ef_dora.pt") and warning is None
    model = synth.kokoro().model
    assert sum(p.numel() for p in model.parameters()) > 50_000_000   # the fixed-size decoder, loaded
    speech, _ = synth.speak("Hola, me llamo Dora.", "ef_dora")
    assert speech.dtype == np.float32 and speech.ndim == 1 and len(speech) > 1600 and np.isfinite(speech).all()
    assert np.abs(speech).max() > 0
    tracks = speak_tracks(TtsAudio(text="(s1) Hola. (s2) ¿Qué tal?", human1_voice="ef_dora",
                                   human2_voice="ef_dora"), "add", synth).tracks
    assert len(tracks[0]) == len(tracks[1]) > 0


def test_kokoro_problems_are_user_errors(kokoro_dir, tmp_path):
    with pytest.raises(UserInputError) as e:
        SpeechSynthesizer(kokoro_dir).speak("hello", "am_adam")      # not in voices/
    assert e.value.field == "voice" and "am_adam.pt not found" in e.value.message
    empty = tmp_path / "not-kokoro"
    (empty / "voices").mkdir(parents=True)
    (empty / "voices" / "ef_dora.pt").write_bytes((kokoro_dir / "voices" / "ef_dora.pt").read_bytes())
    with pytest.raises(UserInputError) as e:
        SpeechSynthesizer(empty).speak("hola", "ef_dora")
    assert e.value.field == "tts_dir" and "no config.json" in e.value.message
    import spacy.util

    if not spacy.util.is_package("en_core_web_sm"):   # English G2P: refused clearly, never downloaded
        with pytest.raises(UserInputError) as e:
            SpeechSynthesizer(kokoro_dir).speak("Hello there.", "af_heart", voice_field="tts_audio.human1_voice")
        assert e.value.field == "tts_audio.human1_voice" and "en_core_web_sm" in e.value.message
