"""The page's pure parts (no browser): inputs built with the pipeline's validation, the progress
line, the history table, the 422 wording and the recipes list."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from multitalk.errors import UserInputError
from multitalk.pipeline.demo_inputs import write_demo_inputs
from multitalk.pipeline.speech_from_text import SpeechSynthesizer
from multitalk.ui.api_client import job_view, problem_line
from multitalk.ui.jobs import JobView
from multitalk.ui.web import (QUALITY, available_recipes, build_inputs, default_editor, history_rows,
                              progress_html)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    spec = json.loads(write_demo_inputs(d).read_text())
    return {"image": str(d / spec["cond_image"]), "audio1": str(d / spec["cond_audio"]["person1"]),
            "audio2": str(d / spec["cond_audio"]["person2"])}


def _inputs(demo, tmp_path, **kw):
    args = dict(image=demo["image"], prompt="two people", two=True, audio_type="add", boxes=None,
                speakers=[{"source": "audio", "audio": demo["audio1"]}, {"source": "audio", "audio": demo["audio2"]}],
                speech_dir=tmp_path, synthesizer=SpeechSynthesizer(), params={"size": "preview"})
    args.update(kw)
    return build_inputs(**args)


def test_inputs_are_the_official_ones(demo, tmp_path):
    spec, params, warnings = _inputs(demo, tmp_path, boxes=[[28, 25, 547, 486.0], [28, 537, 547, 998]],
                                     params={"size": "preview", "seed": 7, "sample_shift": None})
    assert spec.speaker_paths() == [demo["audio1"], demo["audio2"]] and spec.audio_type == "add"
    assert spec.bbox_dict() == {"person1": [28, 25, 547, 486], "person2": [28, 537, 547, 998]}
    assert (params.size, params.seed, params.sample_steps) == ("preview", 7, 40) and warnings == []
    one, _, _ = _inputs(demo, tmp_path, two=False, boxes=[[1, 2, 3, 4], [5, 6, 7, 8]])
    assert one.num_speakers == 1 and one.bbox_dict() is None


@pytest.mark.parametrize("change, field, words", [
    ({"image": None}, "cond_image", "missing"),
    ({"speakers": [{"source": "audio", "audio": None}, {}]}, "cond_audio.person1", "missing"),
    ({"params": {"frame_num": 8}}, "frame_num", "4n+1"),
    ({"boxes": [[28, 25, 547, 486], [28, 537, 547, 5000]]}, "bbox", "lies outside"),
])
def test_bad_page_inputs_use_the_cli_wording(demo, tmp_path, change, field, words):
    from multitalk.pipeline.generate import prepare_media

    with pytest.raises(UserInputError) as e:
        spec, params, _ = _inputs(demo, tmp_path, **change)
        prepare_media(spec, params)
    assert e.value.field == field and words in str(e.value)


def test_default_boxes_drawn_on_the_image(demo):
    value = default_editor(demo["image"], two=True)
    assert (value["w"], value["h"]) == (1024, 576) and value["show"] is True
    assert value["boxes"] == [[28, 25, 547, 486], [28, 537, 547, 998]]   # the official left/right halves
    assert value["src"].startswith("data:image/jpeg;base64,")
    assert default_editor(None, True) is None


def test_progress_line_and_history():
    now = time.time()
    running = JobView(id="abc", status="running", created_at=now, stage="sampling", progress=0.25, clip=[1, 2],
                      step=[3, 4], eta_s=95)
    html = progress_html(running)
    assert "Clip 1/2 · step 3/4 · sampling · about 1 min 35 s left" in html and "width:25.0%" in html
    done = JobView(id="abc", status="succeeded", created_at=now, started_at=now, finished_at=now + 12, frames=122,
                   duration_s=4.88, width=224, height=112, seed=42, speakers=2, prompt="p")
    assert "Done in 12 s: 122 frames (4.88 s), 224x112, seed 42" in progress_html(done)
    rows = history_rows([done, JobView(id="x", status="failed", created_at=now, error="bbox: bad")])
    assert rows[0][:2] == ["abc", "succeeded"] and rows[0][3] == "122 frames, 4.88 s" and rows[1][3] == "bbox: bad"


def test_service_answers_read_like_the_cli():
    r = httpx.Response(422, json={"detail": [{"loc": ["body", "bbox", 1], "msg": "person2: lies outside",
                                              "type": "user_input", "fix": "use pixels"}]})
    assert problem_line(r) == "bbox.1: person2: lies outside (use pixels)"
    r = httpx.Response(422, json={"detail": [{"loc": ["body", "tts_audio"], "type": "value_error",
                                              "msg": "Value error, tts_audio.text: no line is tagged (s2) (fix)"}]})
    assert problem_line(r) == "tts_audio.text: no line is tagged (s2) (fix)"
    doc = {"id": "j1", "status": "failed", "created_at": 1.0, "request": {"prompt": "p", "cond_audio": {"person1": "u"}},
           "error": {"code": "bad_input", "field": "cond_audio.person1", "message": "silent", "hint": "record it"}}
    assert job_view(doc).error == "cond_audio.person1: silent (record it)" and job_view(doc).speakers == 1


def test_fast_recipes_only_when_configured():
    from multitalk.pipeline.inputs import RECIPES
    from multitalk.ui.web import lora_recipes

    assert available_recipes() == [QUALITY] and lora_recipes(None) == {}
    fast = lora_recipes([{"uri": "/x/lightx2v.safetensors", "scale": 1.0}])
    assert [r.key for r in available_recipes(fast)] == ["quality", *RECIPES]
    assert fast["lightx2v"].params == RECIPES["lightx2v"] and "lightx2v.safetensors" in fast["lightx2v"].label


def test_local_history_survives_a_restart(tmp_path):
    from dataclasses import asdict

    from multitalk.pipeline.engine import EngineConfig
    from multitalk.ui.jobs import LocalJobs

    for job in (JobView(id="done1", status="succeeded", created_at=1.0, frames=9),
                JobView(id="mid1", status="running", created_at=2.0, stage="sampling")):
        (tmp_path / "jobs" / job.id).mkdir(parents=True)
        (tmp_path / "jobs" / job.id / "job.json").write_text(json.dumps(asdict(job)))
    jobs = LocalJobs(EngineConfig(preset="tiny", device="cpu"), tmp_path, preload=False)
    assert [(j.id, j.status) for j in jobs.history()] == [("mid1", "failed"), ("done1", "succeeded")]
    assert "interrupted" in jobs.get("mid1").error
    assert json.loads((tmp_path / "jobs" / "mid1" / "job.json").read_text())["status"] == "failed"
    with pytest.raises(UserInputError):
        jobs.get("nope")


def test_a_service_that_is_down_is_a_message_not_a_crash(tmp_path, demo):
    from page_support import free_port

    from multitalk.ui.api_client import ApiJobs
    from multitalk.ui.web import safe_history

    client = ApiJobs(f"http://127.0.0.1:{free_port()}", "t", cache_dir=tmp_path)
    assert "cannot be reached" in client.status()
    assert safe_history(client) == [["", "", "", "", "", ""]]
    spec, params, _ = _inputs(demo, tmp_path)
    with pytest.raises(UserInputError) as e:
        client.submit(spec, params)
    assert e.value.field == "api" and "multitalk serve" in e.value.fix
