"""``params.loras`` through the service with the REAL pipeline (tiny preset, CPU) and a real S3 (moto).

* A job without LoRA after a job with one gives exactly the video of a job that never saw a LoRA
  (the worker's engine switches LoRA sets per job and never keeps a merge it was not asked for);
  the LoRA comes from S3 and is kept by content hash (``test_lora_cache.py``: fetched once).
* A bad LoRA already on the server (upload) is a 422 at submission naming the field, the key and both
  shapes; one on S3 fails its job as ``bad_input`` with the same message, and the worker keeps serving.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import av
import numpy as np
import pytest
import service_support
from safetensors.torch import save_file
from service_support import wait_for

from multitalk.models.architecture import TINY
from multitalk.models.lora import random_official_lora
from multitalk.pipeline.demo_inputs import DEMO_PROMPT, write_demo_inputs
from multitalk.pipeline.runner import PipelineRunner

PIPELINE = "multitalk.pipeline.runner:PipelineRunner"
TINY_CPU = {"preset": "tiny", "device": "cpu", "dtype": "float32"}
SHORT = {"mode": "clip", "frame_num": 5, "sample_steps": 1, "seed": 7, "size": "preview",
         "color_correction_strength": 0.0}
JOB_TIMEOUT = 150

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-inputs")
    spec = json.loads(write_demo_inputs(d).read_text())
    save_file(random_official_lora(TINY.dit, rank=4, seed=11, strength=0.5), str(d / "style.safetensors"))
    save_file(random_official_lora(replace(TINY.dit, dim=96, num_heads=2), rank=4), str(d / "for_1.3b.safetensors"))
    return {"image": d / spec["cond_image"], "person1": d / spec["cond_audio"]["person1"],
            "style": d / "style.safetensors", "wrong": d / "for_1.3b.safetensors"}


@pytest.fixture
def db_kind():
    return "sqlite"  # the LoRA path never touches the job store: one store is enough


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("multitalk-home")  # the tiny weights are written here once


@pytest.fixture
def service(make_service, moto, monkeypatch, home, inputs):
    monkeypatch.setenv("MULTITALK_HOME", str(home))
    monkeypatch.setattr(service_support, "RUNNER", PIPELINE)
    fs = moto.fs()
    for name in ("image", "person1", "style", "wrong"):
        fs.put_file(str(inputs[name]), f"inputs/lora/{inputs[name].name}")
    svc = make_service(TINY_CPU, s3_endpoint_url=moto.endpoint, lease_s=60.0, heartbeat_s=0.5)
    assert isinstance(svc.runner, PipelineRunner)
    wait_for(lambda: svc.client.get("/readyz").status_code == 200, 120, "models loaded", interval=0.2)
    svc.fs = fs
    return svc


def _s3(inputs, name):
    return f"s3://inputs/lora/{inputs[name].name}"


def _body(inputs, loras=None, image=None):
    params = dict(SHORT, **({"loras": loras} if loras is not None else {}))
    return {"prompt": DEMO_PROMPT, "cond_image": image or _s3(inputs, "image"),
            "cond_audio": {"person1": _s3(inputs, "person1")}, "output": "s3://outputs/lora/", "params": params}


def _run(svc, body) -> dict:
    created = svc.submit(body)
    return svc.wait_status(created["id"], ("succeeded", "failed", "cancelled"), timeout=JOB_TIMEOUT)


def _frames(svc, job) -> np.ndarray:
    assert job["status"] == "succeeded", job["error"]
    data = svc.fs.cat(job["result"]["video_uri"][len("s3://"):])
    with av.open(io.BytesIO(data)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])


def test_loras_per_job_no_merge_inherited_bad_loras_refused(service, inputs):
    svc = service
    runner = svc.runner

    # a bad LoRA already on the server: refused at submission, naming the field, key and shapes
    wrong = svc.upload(inputs["wrong"])
    r = svc.client.post("/v1/jobs", json=_body(inputs, [{"uri": _s3(inputs, "style")}, {"uri": wrong}]))
    assert r.status_code == 422, r.text
    problem = r.json()["detail"][0]
    assert problem["loc"] == ["body", "params", "loras", 1, "uri"], problem
    for words in ("does not fit this model", "model shape (64, 64)", "LoRA shape (96, 96)", "key diffusion_model."):
        assert words in problem["msg"], problem
    for loras in ([{"uri": _s3(inputs, "style"), "scale": float("nan")}], [{"uri": "ftp://example.com/x.safetensors"}],
                  [{"uri": _s3(inputs, "style"), "weight": 1.0}]):
        r = svc.client.post("/v1/jobs", content=json.dumps(_body(inputs, loras)),  # NaN as the JSON literal
                            headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (loras, r.text)
        assert r.json()["detail"][0]["loc"][:4] == ["body", "params", "loras", 0], r.text

    pristine = _frames(svc, _run(svc, _body(inputs)))
    dit_before = runner.engine.transformer
    with_lora = _frames(svc, _run(svc, _body(inputs, [{"uri": _s3(inputs, "style"), "scale": 1.0}])))
    assert not np.array_equal(with_lora, pristine)               # the LoRA changes the video
    assert runner.engine.transformer is not dit_before            # merged into a fresh DiT
    assert [f["scale"] for f in runner.engine.lora_report.files] == [1.0]
    kept = sorted(p.name for p in (svc.config.data_dir / "loras").glob("*.safetensors"))
    assert len(kept) == 1 and len(kept[0]) == 64 + len(".safetensors")   # kept by content hash

    # a bad LoRA on S3: only the worker can see it; the job fails as bad_input, once
    job = _run(svc, _body(inputs, [{"uri": _s3(inputs, "wrong"), "scale": 0.8}]))
    assert job["status"] == "failed" and job["attempts"] == 1, job
    err = job["error"]
    assert err["code"] == "bad_input" and err["field"] == "params.loras.0.uri", err
    assert "LoRA shape (96, 96)" in err["message"] and "model shape (64, 64)" in err["message"], err

    # the worker keeps serving, and a job without LoRA is exactly the pristine one: nothing inherited
    after = _frames(svc, _run(svc, _body(inputs)))
    assert np.array_equal(after, pristine)
