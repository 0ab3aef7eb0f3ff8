"""Kokoro text-to-speech (the voices of the official TTS mode) loaded from a local folder.

The official code runs ``KPipeline(lang_code='a', repo_id='weights/Kokoro-82M')`` with a voice
file per person (``weights/Kokoro-82M/voices/af_heart.pt``). Here the folder is given explicitly
(``--tts_dir Kokoro-82M``) and nothing is downloaded: ``config.json`` and the weight file
(``kokoro-v1_0.pth``, or the one ``.pth`` in the folder) load into the ``kokoro`` package's
``KModel``; a voice is a ``.pt`` style pack from ``voices/``. The language is the voice name's
first letter (Kokoro's convention: ``a`` American English, ``b`` British English, ``e`` Spanish,
``f`` French, ``h`` Hindi, ``i`` Italian, ``p`` Brazilian Portuguese, ``j`` Japanese, ``z``
Mandarin), as the official ``lang_code`` does for its English voices.

English grapheme-to-phoneme conversion (misaki) needs spaCy's ``en_core_web_sm`` package; misaki
would download it on first use, which is refused here with a clear message when it is missing.
The ``kokoro`` package is optional: ``pip install 'multitalk[kokoro]'``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from multitalk.errors import UserInputError

log = logging.getLogger(__name__)

KOKORO_SAMPLE_RATE = 24000
KOKORO_REPO_ID = "hexgrad/Kokoro-82M"   # only a label for KModel/KPipeline: nothing is fetched
WEIGHT_NAMES = ("kokoro-v1_0.pth", "kokoro-v1_1-zh.pth")
LANGUAGES = {"a": "American English", "b": "British English", "e": "Spanish", "f": "French",
             "h": "Hindi", "i": "Italian", "p": "Brazilian Portuguese", "j": "Japanese", "z": "Mandarin"}
_SPACY_MODEL = "en_core_web_sm"


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.pth"))
    if len(found) == 1:
        return found[0]
    raise UserInputError("tts_dir", f"{folder} has no Kokoro weight file ({' or '.join(WEIGHT_NAMES)})",
                         "give the Kokoro-82M folder as downloaded (config.json, kokoro-v1_0.pth, voices/)")


def voice_file(folder: Path | None, voice: str, field: str = "voice", allow_paths: bool = True) -> Path:
    """The ``.pt`` file of a Kokoro voice: an existing file as given (``allow_paths``), else
    ``<folder>/voices/<name>.pt`` (``af_heart``, ``af_heart.pt`` and
    ``weights/Kokoro-82M/voices/af_heart.pt`` all name it). Without ``allow_paths`` (the service)
    only the folder is looked in."""
    given = Path(voice)
    if allow_paths and given.suffix == ".pt" and given.is_file():
        return given
    name = given.name if given.suffix == ".pt" else f"{given.name}.pt"
    if folder is not None:
        candidate = Path(folder) / "voices" / name
        if candidate.is_file():
            return candidate
        raise UserInputError(field, f"Kokoro voice {name} not found in {Path(folder) / 'voices'}",
                             "use a voice file of the Kokoro folder, e.g. af_heart.pt or am_adam.pt")
    raise UserInputError(field, f"Kokoro voice {voice} needs a Kokoro folder",
                         "pass --tts_dir Kokoro-82M, or use an espeak-ng voice such as en-us")


class KokoroSpeech:
    """A loaded Kokoro model; :meth:`synthesize` speaks a text with a voice file (24 kHz)."""

    def __init__(self, model, folder: Path):
        self.model = model
        self.folder = folder
        self._pipelines: dict[str, object] = {}
        self._lock = threading.Lock()   # one synthesis at a time (the page may ask concurrently)

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "KokoroSpeech":
        folder = Path(folder)
        if not folder.is_dir():
            raise UserInputError("tts_dir", f"folder {folder} does not exist", "give the Kokoro-82M folder")
        config = folder / "config.json"
        if not config.is_file():
            raise UserInputError("tts_dir", f"{folder} has no config.json", "give the Kokoro-82M folder as downloaded")
        weights = _weights_file(folder)
        KModel = _kokoro().KModel
        try:
            model = KModel(repo_id=KOKORO_REPO_ID, config=str(config), model=str(weights))
        except (KeyError, RuntimeError, AssertionError, ValueError) as exc:
            raise UserInputError("tts_dir", f"{weights.name} does not load as a Kokoro model "
                                 f"({type(exc).__name__}: {str(exc)[:200]})",
                                 "give the Kokoro-82M folder as downloaded") from None
        return cls(model.to(device).eval(), folder)

    def _pipeline(self, lang: str, field: str):
        if lang not in LANGUAGES:
            raise UserInputError(field, f"unknown Kokoro language {lang!r} (the voice name's first letter)",
                                 f"use a voice whose name starts with one of {', '.join(LANGUAGES)}")
        if lang not in self._pipelines:
            if lang in "ab":
                import spacy.util

                if not spacy.util.is_package(_SPACY_MODEL):
                    raise UserInputError(field, f"Kokoro's English phonemizer needs spaCy's {_SPACY_MODEL}, "
                                         "which is not installed (misaki would download it)",
                                         f"pip install {_SPACY_MODEL} (from spaCy's model releases), "
                                         "or use an espeak-ng voice such as en-us")
            self._pipelines[lang] = _kokoro().KPipeline(lang_code=lang, repo_id=KOKORO_REPO_ID, model=self.model)
        return self._pipelines[lang]

    def synthesize(self, text: str, voice: Path, field: str = "text", voice_field: str = "voice") -> np.ndarray:
        """Speak ``text`` with the voice file ``voice``: mono float32 at 24 kHz (the official call:
        speed 1, paragraphs split at blank lines, the pieces concatenated)."""
        import torch

        if not text.strip():
            raise UserInputError(field, "the text to speak is empty", "type what the person says")
        voice = Path(voice)
        try:
            pack = torch.load(voice, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file
            raise UserInputError(voice_field, f"{voice.name} is not a Kokoro voice file ({type(exc).__name__})",
                                 "use a .pt file from the Kokoro folder's voices/") from None
        if not isinstance(pack, torch.Tensor) or pack.ndim != 3 or pack.shape[-1] != 256:
            raise UserInputError(voice_field, f"{voice.name} does not hold a Kokoro style pack [N, 1, 256]",
                                 "use a .pt file from the Kokoro folder's voices/")
        with self._lock:
            pipeline = self._pipeline(voice.name[0].lower(), voice_field)
            pieces = [r.audio for r in pipeline(text, voice=pack.float(), speed=1, split_pattern=r"\n+")
                      if r.audio is not None]
        if not pieces:
            raise UserInputError(field, f"Kokoro produced no speech for {text[:40]!r}", "give words to speak")
        return torch.cat(pieces).float().numpy()


def _kokoro():
    try:
        import kokoro
    except ImportError:
        raise UserInputError("tts_dir", "the kokoro package is not installed",
                             "pip install 'multitalk[kokoro]', or use an espeak-ng voice such as en-us") from None
    return kokoro


__all__ = ["KOKORO_SAMPLE_RATE", "KokoroSpeech", "LANGUAGES", "voice_file"]
