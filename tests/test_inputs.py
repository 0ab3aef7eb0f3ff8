"""Input JSON and generation options: official defaults, path resolution, one-line errors."""

import json

import pytest
from pydantic import ValidationError

from multitalk.errors import UserInputError
from multitalk.pipeline.inputs import (GenerationParams, InputSpec, load_input_json, to_user_errors,
                                       validation_problems)


def test_official_examples_load(examples):
    spec, warnings = load_input_json(examples / "multitalk_example_1.json")
    assert warnings == []
    # "examples/multi/1/multi1.png" is relative to the official repo root = the JSON folder's parent
    assert spec.cond_image == str((examples / "multi/1/multi1.png").resolve())
    assert spec.speaker_paths() == [str((examples / "multi/1/1.WAV").resolve()),
                                    str((examples / "multi/1/2.WAV").resolve())]
    assert spec.audio_type == "add" and spec.num_speakers == 2
    assert spec.bbox_dict() == {"person1": [160, 120, 1280, 1080], "person2": [160, 1320, 1280, 2280]}
    single, _ = load_input_json(examples / "single_example_1.json")
    assert single.num_speakers == 1 and single.bbox_dict() is None
    para, _ = load_input_json(examples / "multitalk_example_3.json")
    assert para.audio_type == "para"


def test_tts_examples_load_as_speech_from_text(examples):
    spec, warnings = load_input_json(examples / "multitalk_example_tts_1.json")
    assert warnings == [] and spec.uses_tts and spec.cond_audio is None
    assert spec.num_speakers == 2 and spec.audio_type == "para"
    assert [(t.speaker, t.text) for t in spec.tts_audio.turns] == [
        (1, "do you know multi-talk?"), (2, "yes, I know it, that's amazing!"), (1, "Me too.")]
    # Kokoro voice files that do not exist stay as given (looked up in --tts_dir later)
    assert spec.tts_audio.human2_voice == "weights/Kokoro-82M/voices/am_adam.pt"
    single, _ = load_input_json(examples / "single_example_tts_1.json")
    assert single.num_speakers == 1 and single.tts_audio.voices == ["weights/Kokoro-82M/voices/af_heart.pt"]
    with pytest.raises(UserInputError) as e:
        single.speaker_paths()
    assert e.value.field == "cond_audio"


def _write(tmp_path, data, media=("img.png", "a.wav", "b.wav")):
    for m in media:
        (tmp_path / m).write_bytes(b"x")
    p = tmp_path / "in.json"
    p.write_text(json.dumps(data))
    return p


def test_relative_paths_resolve_against_the_json_folder_and_warn_on_unknown_keys(tmp_path):
    p = _write(tmp_path, {"prompt": "hi", "cond_image": "img.png", "cond_audio": {"person1": "a.wav", "person2": "b.wav"},
                          "extra_key": 1})
    spec, warnings = load_input_json(p)
    assert spec.cond_image == str((tmp_path / "img.png").resolve())
    assert any("extra_key" in w for w in warnings)
    assert any("audio_type" in w for w in warnings) and spec.audio_type == "add"
    assert spec.warnings == warnings
    assert "extra_key" not in spec.model_dump()


def test_missing_media_names_the_field(tmp_path):
    p = _write(tmp_path, {"prompt": "", "cond_image": "img.png", "cond_audio": {"person1": "nope.wav"}})
    with pytest.raises(UserInputError) as e:
        load_input_json(p)
    assert e.value.field == "cond_audio.person1" and "nope.wav" in e.value.message


@pytest.mark.parametrize("data,field", [
    ({"prompt": "x", "cond_image": "img.png"}, "cond_audio"),
    ({"prompt": "x", "cond_image": "img.png", "cond_audio": {"person1": "a.wav"}, "audio_type": "mix"}, "audio_type"),
    ({"prompt": "x", "cond_image": "img.png", "cond_audio": {"person1": "a.wav", "person3": "b.wav"}}, "cond_audio.person3"),
    ({"prompt": "x", "cond_image": "img.png", "cond_audio": {"person1": "a.wav", "person2": "b.wav"},
      "bbox": {"person1": [0, 0, 10, 10]}}, "bbox"),
    ({"prompt": "x", "cond_image": "img.png", "cond_audio": {"person1": "a.wav", "person2": "b.wav"},
      "bbox": {"person1": [0, 0, 10, 10], "person2": [5, 20, 5, 30]}}, "bbox"),
])
def test_bad_json_fields(tmp_path, data, field):
    p = _write(tmp_path, data)
    with pytest.raises(UserInputError) as e:
        load_input_json(p)
    assert e.value.field == field
    assert "\n" not in str(e.value)


def test_unreadable_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(UserInputError) as e:
        load_input_json(p)
    assert e.value.field == "input_json" and "line 1" in e.value.message
    with pytest.raises(UserInputError):
        load_input_json(tmp_path / "missing.json")


def test_official_defaults():
    p = GenerationParams()
    assert (p.size, p.frame_num, p.motion_frame, p.mode, p.sample_steps) == ("multitalk-480", 81, 25, "clip", 40)
    assert (p.text_guide_scale, p.audio_guide_scale, p.seed, p.n_prompt) == (5.0, 4.0, 42, "")
    assert (p.use_teacache, p.teacache_thresh, p.use_apg, p.apg_momentum, p.apg_norm_threshold) == (False, 0.2, False, -0.75, 55.0)
    assert p.color_correction_strength == 1.0 and p.max_frames is None
    assert p.shift == 7.0 and GenerationParams(size="multitalk-720").shift == 11.0
    assert GenerationParams(sample_shift=3).shift == 3.0
    assert p.max_frames_num == 81 and GenerationParams(mode="streaming").max_frames_num == 1000
    assert 0 <= GenerationParams(seed=-1).seed <= 99_999_999


def test_official_option_names_are_accepted():
    """Requests written for generate_multitalk.py keep working (service params, JSON configs)."""
    p = GenerationParams.model_validate({"sample_text_guide_scale": 1.0, "sample_audio_guide_scale": 2.5,
                                         "base_seed": 7, "sample_steps": 8})
    assert (p.text_guide_scale, p.audio_guide_scale, p.seed, p.sample_steps) == (1.0, 2.5, 7, 8)
    assert GenerationParams(seed=3).seed == 3 and GenerationParams(text_guide_scale=2).text_guide_scale == 2
    with pytest.raises(ValidationError, match="base_seed"):   # both spellings at once: ambiguous
        GenerationParams.model_validate({"seed": 1, "base_seed": 2})


def test_offload_model_is_refused_as_an_engine_setting():
    """The official flag names where the models live: an engine setting, never silently ignored per job."""
    for value in (True, False):
        with pytest.raises(UserInputError) as e:
            GenerationParams.from_dict({"offload_model": value, "sample_steps": 4})
        assert e.value.field == "offload_model" and "engine setting" in e.value.message
    assert "offload_model" not in GenerationParams.model_fields


def test_frame_num_must_be_4n_plus_1():
    with pytest.raises(UserInputError) as e:
        GenerationParams.from_cli(frame_num=80)
    assert e.value.field == "frame_num" and "4n+1, e.g. 81" in e.value.message


def test_validation_error_conversion():
    with pytest.raises(ValidationError) as e:
        GenerationParams.model_validate({"frame_num": 10, "size": "1080p", "nope": 1})
    problems = dict(validation_problems(e.value))
    assert set(problems) == {"frame_num", "size", "nope"}
    errors = to_user_errors(e.value)
    assert all(isinstance(x, UserInputError) and "\n" not in str(x) for x in errors)
    assert {x.field for x in errors} == {"frame_num", "size", "nope"}
    with pytest.raises(UserInputError) as e2:
        GenerationParams.from_cli(mode="streaming", frame_num=9, motion_frame=9)
    assert e2.value.field == "motion_frame"


def test_spec_from_dict_without_json_file():
    spec = InputSpec.model_validate({"prompt": "", "cond_image": "x.png", "cond_audio": {"person1": "a.wav"},
                                     "audio_type": "add"})
    assert spec.speaker_paths() == ["a.wav"] and spec.warnings == []
