"""User inputs: the official input JSON (:class:`InputSpec`) and every generation option
(:class:`GenerationParams`), validated with pydantic v2.

Validation problems become one-line :class:`~multitalk.errors.UserInputError` s naming the field
(:func:`to_user_errors`). Defaults are those of the official ``generate_multitalk.py`` CLI; where
the official CLI and its ``generate()`` function disagree the CLI wins (it is what users run):

* ``color_correction_strength`` = 1.0 (CLI ``--color_correction_strength``; ``generate()``'s
  keyword default is 0, i.e. off);
* ``sample_shift`` None -> 7 for ``multitalk-480``, 11 for ``multitalk-720`` (``_validate_args``);
* ``max_frames`` None = no cap (the official caps streaming at 1000 frames, 40 s).

``audio_type`` has no official default (two speakers without it raise ``KeyError`` there); here it
defaults to ``"add"`` with a warning.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from multitalk.errors import UserInputError
from multitalk.pipeline.speech_from_text import TtsAudio

PERSONS = ("person1", "person2")
SIZES = ("multitalk-480", "multitalk-720", "preview")
DEFAULT_SHIFT = {"multitalk-480": 7.0, "multitalk-720": 11.0, "preview": 7.0}

# Few-step recipes for the step-distillation LoRAs (what the official code, the ComfyUI wrapper,
# Wan2GP and LightX2V run them with): defaults for the options below; given options still win.
RECIPES = {
    "lightx2v": {"sample_steps": 4, "sample_shift": 2.0, "text_guide_scale": 1.0, "audio_guide_scale": 2.0},
    "fusionx": {"sample_steps": 8, "sample_shift": 2.0, "text_guide_scale": 1.0, "audio_guide_scale": 2.0},
}
# every name a recipe field may be given under (an explicit value under any of them wins)
_RECIPE_ALIASES = {"sample_steps": ("sample_steps",), "sample_shift": ("sample_shift",),
                   "text_guide_scale": ("text_guide_scale", "sample_text_guide_scale"),
                   "audio_guide_scale": ("audio_guide_scale", "sample_audio_guide_scale")}
MAX_LORAS = 8

# How to fix a bad value, per field (shown after the message).
_FIXES = {
    "frame_num": "e.g. 81 (3.2 s per clip), 49 or 33",
    "motion_frame": "use fewer frames than frame_num, e.g. 25 with frame_num 81",
    "size": "use multitalk-480 or multitalk-720 (or preview for quick CPU runs)",
    "mode": "use clip or streaming",
    "audio_type": "use add (one after the other) or para (simultaneous)",
    "bbox": "give {person1: [row_min, col_min, row_max, col_max], person2: [...]} in source pixels",
    "cond_audio": "give {person1: path} or {person1: path, person2: path}",
    "color_correction_strength": "use a value between 0 (off) and 1",
    "seed": "use a non-negative integer below 2**63, or -1 for a random seed",
    "noise_device": "use engine (the official behaviour) or cpu (the same video on any device)",
}


# ---------------------------------------------------------------------------------------------
# errors


def _problem(err: dict) -> tuple[str, str, str | None]:
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, UserInputError):  # raised by a model validator: keeps its own field
        return cause.field, cause.message, cause.fix
    field = ".".join(str(p) for p in err.get("loc", ())) or "input"
    msg = err.get("msg", "invalid value")
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return field, msg, _FIXES.get(field.split(".")[0])


def validation_fix(field: str) -> str | None:
    """How to fix a bad value of a generation option or input field (None if nothing to say)."""
    return _FIXES.get(field.split(".")[0])


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """``(dotted field, message)`` per pydantic error (``loc`` joined with dots)."""
    return [_problem(err)[:2] for err in exc.errors()]


def to_user_errors(exc: ValidationError) -> list[UserInputError]:
    """One :class:`UserInputError` per pydantic error, with a fix where one is known."""
    return [UserInputError(*_problem(err)) for err in exc.errors()]


def _validate(model: type[BaseModel], data: Any) -> Any:
    """``model.model_validate(data)``; the first problem raised as a :class:`UserInputError`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = to_user_errors(exc)
        first = errors[0]
        if len(errors) > 1:
            others = "; ".join(str(e) for e in errors[1:])
            raise UserInputError(first.field, f"{first.message} (also: {others})", first.fix) from None
        raise first from None


# ---------------------------------------------------------------------------------------------
# input JSON


class CondAudio(BaseModel):
    """Speech per speaker: ``person1`` and optionally ``person2`` (paths)."""

    model_config = ConfigDict(extra="forbid")
    person1: str = Field(min_length=1)
    person2: str | None = Field(None, min_length=1)


class InputSpec(BaseModel):
    """The official input JSON: ``prompt``, ``cond_image``, ``cond_audio`` or ``tts_audio``,
    ``audio_type``, ``bbox``.

    ``bbox`` boxes are ``[row_min, col_min, row_max, col_max]`` in source-image pixels (the
    official code indexes ``mask[x_min:x_max, y_min:y_max]``, so the first pair are rows).
    Unknown keys are kept out and reported in :attr:`warnings`. With ``tts_audio`` and no
    ``cond_audio`` the speech is synthesised (``pipeline/speech_from_text.py``) before generation.
    """

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    cond_image: str = Field(min_length=1)
    cond_audio: CondAudio | None = None
    audio_type: Literal["add", "para"] | None = None
    bbox: dict[str, list[float]] | None = None
    tts_audio: TtsAudio | None = None
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @field_validator("cond_audio", mode="before")
    @classmethod
    def _empty_audio(cls, v):
        return None if v == {} else v  # the official TTS examples carry "cond_audio": {}

    @field_validator("bbox")
    @classmethod
    def _boxes(cls, v):
        if v is None:
            return v
        for name, box in v.items():
            if name not in PERSONS:
                raise ValueError(f"unknown person {name!r} (expected person1, person2)")
            if len(box) != 4 or not all(math.isfinite(x) for x in box):
                raise ValueError(f"{name}: expected 4 finite numbers, got {box}")
            r0, c0, r1, c1 = box
            if min(box) < 0 or r1 <= r0 or c1 <= c0:
                raise ValueError(f"{name}: {box} must be [row_min, col_min, row_max, col_max] "
                                 f"with min < max and no negative value")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "InputSpec":
        warnings = [f"unknown key {k!r} ignored" for k in (self.model_extra or {})]
        if self.model_extra:
            self.model_extra.clear()
        if self.cond_audio is None and self.tts_audio is None:
            raise UserInputError("cond_audio", "missing", _FIXES["cond_audio"] + ", or tts_audio {text, human1_voice}")
        if self.cond_audio is not None and self.tts_audio is not None:
            warnings.append("both cond_audio and tts_audio given: cond_audio is used (--audio_mode tts speaks the text)")
        two = self.num_speakers == 2
        if self.audio_type is None:
            if two:
                warnings.append("audio_type missing: using 'add' (person1 speaks, then person2)")
            self.audio_type = "add"
        if self.bbox is not None:
            if not two and set(self.bbox) - {"person1"}:
                raise UserInputError("bbox", f"boxes for {sorted(self.bbox)}, but only person1 has audio",
                                     "add cond_audio.person2, or drop the extra boxes")
            if not two:
                warnings.append("bbox ignored: it only routes audio between two speakers")
            elif set(self.bbox) != set(PERSONS):
                raise UserInputError("bbox", f"boxes for {sorted(self.bbox)}, but the speakers are "
                                     "person1 and person2", _FIXES["bbox"])
        self._warnings = warnings
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        """The official fields given without a JSON file; a bad one raises a one-line :class:`UserInputError`."""
        return _validate(cls, data)

    @property
    def warnings(self) -> list[str]:
        """Non-fatal problems found while validating (unknown keys, defaults applied)."""
        return list(self._warnings)

    @property
    def uses_tts(self) -> bool:
        """True when the speech must be synthesised from ``tts_audio`` (no ``cond_audio``)."""
        return self.cond_audio is None

    @property
    def num_speakers(self) -> int:
        if self.cond_audio is None:
            return self.tts_audio.num_speakers
        return 2 if self.cond_audio.person2 is not None else 1

    def speaker_paths(self) -> list[str]:
        """Speech file per speaker, person1 first."""
        audio = self.cond_audio
        if audio is None:
            raise UserInputError("cond_audio", "the speech is still to be synthesised from tts_audio",
                                 "synthesise it first (pipeline.speech_from_text.speak_inputs)")
        return [audio.person1] if audio.person2 is None else [audio.person1, audio.person2]

    def bbox_dict(self) -> dict[str, list[float]] | None:
        """The boxes in speaker order for two speakers, else None."""
        if self.bbox is None or self.num_speakers < 2:
            return None
        return {p: list(self.bbox[p]) for p in PERSONS}


def _resolve_media(value: str, field: str, bases: list[Path]) -> str:
    path = Path(os.path.expanduser(value))
    candidates = [path] if path.is_absolute() else [b / path for b in bases]
    for cand in candidates:
        if cand.is_file():
            return str(cand.resolve())
    where = ", ".join(str(c.parent) for c in candidates)
    raise UserInputError(field, f"file not found: {value} (looked in {where})",
                         "fix the path; relative paths are resolved against the JSON's folder")


def _resolve_voice(value: str, bases: list[Path]) -> str:
    """A voice that names an existing file (relative to the JSON like media) becomes its absolute
    path; anything else (an espeak-ng name, a Kokoro voice looked up in ``--tts_dir``) is kept."""
    path = Path(os.path.expanduser(value))
    for cand in ([path] if path.is_absolute() else [b / path for b in bases]):
        if cand.is_file():
            return str(cand.resolve())
    return value


def load_input_json(path: str | os.PathLike) -> tuple[InputSpec, list[str]]:
    """Read and validate an official input JSON; returns ``(spec, warnings)``.

    Relative media paths are resolved against the JSON's folder, then its parent (the official
    examples say ``examples/multi/1/1.WAV`` relative to the repository root), then the current
    directory; the returned spec holds absolute paths.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError("input_json", f"file not found: {path}", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError("input_json", f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserInputError("input_json", f"{path} is not valid JSON (line {exc.lineno}, column "
                             f"{exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise UserInputError("input_json", f"{path} must hold a JSON object, got {type(data).__name__}")
    spec = _validate(InputSpec, data)
    folder = path.resolve().parent
    bases = [folder, folder.parent, Path.cwd()]
    update = {"cond_image": _resolve_media(spec.cond_image, "cond_image", bases)}
    if spec.cond_audio is not None:
        audio = {p: _resolve_media(v, f"cond_audio.{p}", bases)
                 for p, v in spec.cond_audio.model_dump().items() if v is not None}
        update["cond_audio"] = CondAudio(**audio)
    if spec.tts_audio is not None:  # voice files (Kokoro .pt) resolve like media; voice names stay
        voices = {k: _resolve_voice(v, bases) for k, v in spec.tts_audio.model_dump().items()
                  if k.endswith("_voice") and v is not None}
        update["tts_audio"] = spec.tts_audio.model_copy(update=voices)
    resolved = spec.model_copy(update=update)
    resolved._warnings = spec.warnings
    return resolved, spec.warnings


# ---------------------------------------------------------------------------------------------
# generation options


class LoraRef(BaseModel):
    """One LoRA file and its strength: a path (CLI) or a storage URI the service accepts."""

    model_config = ConfigDict(extra="forbid")
    uri: str = Field(min_length=1, max_length=4096)
    scale: float = Field(1.0, allow_inf_nan=False)


class GenerationParams(BaseModel):
    """Every generation option, with the official CLI names, meanings and defaults.

    ``recipe`` (``lightx2v`` / ``fusionx``) sets the few-step defaults of :data:`RECIPES` for the
    options not given explicitly. ``loras`` are merged into the DiT by the engine before sampling
    (the service switches its loaded engine to them; the CLI gives them to ``Engine.load``).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    size: Literal["multitalk-480", "multitalk-720", "preview"] = "multitalk-480"  # aspect-ratio bucket table
    frame_num: int = 81            # frames per clip, 4n+1
    motion_frame: int = Field(25, ge=1)   # streaming: frames carried into the next clip
    mode: Literal["clip", "streaming"] = "clip"  # one clip, or clips until the audio ends
    sample_steps: int = Field(40, ge=1, le=1000)
    sample_shift: float | None = Field(None, gt=0)  # None: 7 (480) / 11 (720)
    # the official script's names are accepted too (sample_text_guide_scale, ..., base_seed)
    text_guide_scale: float = Field(5.0, ge=0, validation_alias=AliasChoices(
        "text_guide_scale", "sample_text_guide_scale"))
    audio_guide_scale: float = Field(4.0, ge=0, validation_alias=AliasChoices(
        "audio_guide_scale", "sample_audio_guide_scale"))
    seed: int = Field(42, ge=-1, le=2**63 - 1, validation_alias=AliasChoices(
        "seed", "base_seed"))   # -1: a random seed is drawn at validation (seed_drawn)
    n_prompt: str = ""             # "" -> the official negative prompt
    use_teacache: bool = False
    teacache_thresh: float = Field(0.2, gt=0)
    use_apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0
    color_correction_strength: float = Field(1.0, ge=0, le=1)
    max_frames: int | None = Field(None, ge=1)  # streaming cap (None: follow the audio)
    face_scale: float = Field(0.05, ge=0, lt=0.5)  # margin of the default two-speaker boxes
    # where the seeded noise is drawn: "engine" (the official code's behaviour: the engine's device,
    # so CPU and CUDA give different videos for a seed) or "cpu" (the same video on any device)
    noise_device: Literal["engine", "cpu"] = "engine"
    official_trim: bool = False    # reproduce the official final cut (see pipeline/clips.py)
    recipe: Literal["lightx2v", "fusionx"] | None = None  # few-step defaults (RECIPES)
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)  # merged in this order
    _seed_drawn: bool = PrivateAttr(False)

    @model_validator(mode="before")
    @classmethod
    def _no_engine_settings(cls, data: Any) -> Any:
        # The official script's --offload_model decides where the models live: a setting of the
        # loaded engine (CLI flag; the server's or worker's start-up), not of one generation.
        if isinstance(data, dict) and "offload_model" in data:
            raise UserInputError("offload_model", "is an engine setting, not a per-job option",
                                 "leave it out of params: where the models live is chosen when the engine "
                                 "starts (multitalk generate --offload_model; the server's or worker's start-up)")
        return data

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("recipe") not in RECIPES:
            return data  # no recipe, or an unknown one (reported by the field's validation)
        data = dict(data)
        for name, value in RECIPES[data["recipe"]].items():
            if all(data.get(alias) is None for alias in _RECIPE_ALIASES[name]):
                data[name] = value
        return data

    @field_validator("frame_num")
    @classmethod
    def _four_n_plus_one(cls, v: int) -> int:
        if v < 5 or (v - 1) % 4:
            raise ValueError(f"must be 4n+1, e.g. 81 (got {v})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "GenerationParams":
        if self.mode == "streaming" and self.motion_frame >= self.frame_num:
            raise UserInputError("motion_frame", f"{self.motion_frame} must be smaller than frame_num "
                                 f"({self.frame_num}) in streaming mode", _FIXES["motion_frame"])
        if self.seed < 0:
            self.seed = random.randint(0, 99_999_999)  # the official range
            self._seed_drawn = True
        return self

    @property
    def seed_drawn(self) -> bool:
        """True when ``seed`` was -1 and a random one was drawn."""
        return self._seed_drawn

    @property
    def shift(self) -> float:
        """The flow shift actually used (``sample_shift`` or the size's default)."""
        return float(self.sample_shift) if self.sample_shift is not None else DEFAULT_SHIFT[self.size]

    @property
    def max_frames_num(self) -> int:
        """The official ``max_frames_num``: ``frame_num`` in clip mode, else the cap (1000 if none)."""
        if self.mode == "clip":
            return self.frame_num
        return self.max_frames if self.max_frames is not None else 1000

    @classmethod
    def from_cli(cls, **options) -> "GenerationParams":
        """Validate keyword options; a bad one raises a one-line :class:`UserInputError`."""
        return _validate(cls, options)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationParams":
        return _validate(cls, data)
