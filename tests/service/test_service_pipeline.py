"""End to end through the REAL generation pipeline: the service (uvicorn + in-process worker) runs
``multitalk.pipeline.runner:PipelineRunner`` on the tiny random-weight preset on the CPU, with its
inputs and outputs on a real S3 server (moto).

The tests reuse the service fixtures of ``conftest.py`` (``moto``, ``make_service``); the only
difference from the other service tests is the runner: ``service_support.RUNNER`` (the factory
that ``Running`` hands to ``Service``) is monkeypatched to the real runner for the test's duration.

Model weights: ``MULTITALK_HOME`` points at a session-scoped temporary folder, so the tiny
folders are written there once per session (~3 s) and the tests neither read nor write the user's
``~/.cache/multitalk`` (no dependency on a stale or half-written home cache). The engine is loaded
once per session (``tiny_runner``) and every service of these tests, on either job store, runs
its jobs with that one loaded runner: the tests run on SQLite and on Postgres, and loading the
engine again for each of them would only repeat the same work.

Generation is kept tiny (one 5-frame clip, 1 sampling step, the quarter-size ``preview`` bucket:
a few seconds per job on a 2-core machine). Leases are long (60 s): the CPU-bound generation must not
lose its lease to a late heartbeat.
"""

from __future__ import annotations

import io
import time

import av
import httpx
import numpy as np
import pytest
import service_support
import soundfile as sf
from service_support import wait_for

from multitalk.pipeline.demo_inputs import DEMO_PROMPT, write_demo_inputs
from multitalk.pipeline.runner import PipelineRunner

PIPELINE = "multitalk.pipeline.runner:PipelineRunner"
TINY_CPU = {"preset": "tiny", "device": "cpu", "dtype": "float32"}
FPS = 25
SHORT = {"mode": "clip", "frame_num": 5, "sample_steps": 1, "seed": 7, "size": "preview"}
JOB_TIMEOUT = 150          # one short generation: ~15-40 s here; generous for a loaded machine

# real generations (~2 min for the file): out of `make test-fast` (-m "not slow"), in `make test`
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory):
    """``MULTITALK_HOME`` of these tests: the tiny weights are written here on first load."""
    return tmp_path_factory.mktemp("multitalk-home")


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict:
    """The project's authored two-person demo inputs plus a silent (all-zero) 16 kHz wav."""
    import json

    d = tmp_path_factory.mktemp("demo")
    spec = json.loads(write_demo_inputs(d).read_text())
    sf.write(d / "silent.wav", np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")
    return {"image": d / spec["cond_image"], "person1": d / spec["cond_audio"]["person1"],
            "person2": d / spec["cond_audio"]["person2"], "silent": d / "silent.wav",
            "bbox": spec["bbox"], "prompt": spec["prompt"]}


@pytest.fixture(scope="session")
def tiny_runner(tiny_home) -> PipelineRunner:
    """The real runner with the tiny preset, loaded once (the factory ``PIPELINE`` names)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MULTITALK_HOME", str(tiny_home))
        module, _, name = PIPELINE.partition(":")
        runner = getattr(__import__(module, fromlist=[name]), name)(**TINY_CPU)
        runner.load()
    return runner


@pytest.fixture
def pipeline_service(make_service, moto, monkeypatch, tiny_home, tiny_runner, demo):
    """A ready service running the real PipelineRunner, with the demo inputs on s3://inputs/demo/."""
    monkeypatch.setenv("MULTITALK_HOME", str(tiny_home))
    monkeypatch.setattr(service_support, "RUNNER", lambda **_options: tiny_runner)
    fs = moto.fs()
    for name in ("image", "person1", "person2", "silent"):
        fs.put_file(str(demo[name]), f"inputs/demo/{demo[name].name}")
    svc = make_service(TINY_CPU, s3_endpoint_url=moto.endpoint, lease_s=60.0, heartbeat_s=0.5)
    assert isinstance(svc.runner, PipelineRunner), type(svc.runner)
    wait_for(lambda: svc.client.get("/readyz").status_code == 200, 120, "models loaded (readyz)",
             interval=0.2)
    svc.moto = moto
    return svc


def s3(demo: dict, name: str) -> str:
    return f"s3://inputs/demo/{demo[name].name}"


def two_person_body(demo: dict, output: str, **params) -> dict:
    return {"prompt": DEMO_PROMPT, "cond_image": s3(demo, "image"),
            "cond_audio": {"person1": s3(demo, "person1"), "person2": s3(demo, "person2")},
            "audio_type": "add", "bbox": demo["bbox"], "output": output,
            "params": {**SHORT, **params}}


def watch(svc, job_id: str, until, timeout: float, interval: float = 0.2) -> tuple[dict, list[dict]]:
    """Poll the job until ``until(job)``; returns the last document and every one seen."""
    seen: list[dict] = []

    def poll():
        job = svc.job(job_id)
        seen.append(job)
        return job if until(job) else None

    return wait_for(poll, timeout, f"job {job_id}", interval=interval), seen


def finished(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def probe(data: bytes) -> dict:
    """Codecs, decoded video frame count, and each stream's presentation end (from its packets:
    the AAC tail packet carries the trimmed duration, so this is what a player plays).

    Packet timestamps are read while the container is open: a packet kept past the container's
    close may report no duration."""
    with av.open(io.BytesIO(data)) as f:
        v, a = f.streams.video[0], f.streams.audio[0]
        out = {"video": v.codec_context.name, "audio": a.codec_context.name,
               "size": (v.codec_context.width, v.codec_context.height),
               "audio_rate": a.codec_context.sample_rate}
        ends = {"video": 0.0, "audio": 0.0}
        for p in f.demux(v, a):
            if p.pts is None or not p.size:
                continue
            assert p.duration is not None, f"{p.stream.type} packet at pts {p.pts} has no duration"
            ends[p.stream.type] = max(ends[p.stream.type],
                                      float((p.pts + p.duration) * p.stream.time_base))
    with av.open(io.BytesIO(data)) as f:
        out["frames"] = sum(1 for _ in f.decode(video=0))
    out["video_s"], out["audio_s"] = ends["video"], ends["audio"]
    return out


# -- 1. the two-speaker flow -------------------------------------------------------------------
def test_two_speakers_from_s3_to_s3_with_real_pipeline(pipeline_service, demo):
    svc, fs = pipeline_service, pipeline_service.moto.fs()
    created = svc.submit(two_person_body(demo, "s3://outputs/multitalk/two-people/"))
    assert created["status"] == "queued"
    job, seen = watch(svc, created["id"], finished, JOB_TIMEOUT)
    assert job["status"] == "succeeded", job["error"]

    # progress along the way: conditioning, then sampling/decoding of clip 1/1 at step 1/1
    running = [j for j in seen if j["status"] == "running"]
    stages = {j["stage"] for j in running}
    assert "conditioning" in stages, stages
    assert stages & {"sampling", "decoding"}, stages
    sampled = [j for j in running if j["stage"] in ("sampling", "decoding")]
    assert all(j["clip"] == {"i": 1, "n": 1} and j["step"] == {"i": 1, "n": 1} for j in sampled)
    assert all(0.0 <= j["progress"] <= 1.0 for j in seen)
    assert job["progress"] == 1.0 and job["stage"] == "done" and job["attempts"] == 1

    res = job["result"]
    assert res["video_uri"] == f"s3://outputs/multitalk/two-people/{job['id']}.mp4"
    key = res["video_uri"][len("s3://"):]
    assert fs.exists(key)
    assert (res["width"], res["height"], res["seed"]) == (224, 112, 7)   # 16:9 preview bucket
    assert res["frames"] == 5 and abs(res["duration_s"] - res["frames"] / FPS) < 1e-9

    data = fs.cat(key)
    info = probe(data)
    assert (info["video"], info["audio"]) == ("h264", "aac")
    assert info["size"] == (res["width"], res["height"])
    assert info["frames"] == res["frames"]
    assert abs(info["video_s"] - res["frames"] / FPS) < 1e-6
    assert abs(info["audio_s"] - info["video_s"]) <= 1 / FPS, info

    # download_url: a presigned S3 URL that needs no token; /video redirects to one
    assert httpx.get(res["download_url"], timeout=30).content == data
    r = svc.client.get(f"/v1/jobs/{job['id']}/video")
    if r.status_code == 307:
        r = httpx.get(r.headers["location"], timeout=30)
    assert r.status_code == 200 and r.content == data


# -- 2. cancelling a running real generation ---------------------------------------------------
def test_cancel_running_generation_then_next_job_runs(pipeline_service, demo):
    svc, fs = pipeline_service, pipeline_service.moto.fs()
    long = svc.submit(two_person_body(demo, "s3://outputs/cancelled/", sample_steps=40))
    job, _ = watch(svc, long["id"], lambda j: finished(j) or (
        j["status"] == "running" and j["step"] and j["step"]["i"] >= 1), JOB_TIMEOUT)
    assert job["status"] == "running" and job["stage"] == "sampling", job
    assert job["step"]["n"] == 40

    t0 = time.monotonic()
    r = svc.client.post(f"/v1/jobs/{long['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    job, _ = watch(svc, long["id"], finished, 20, interval=0.1)
    latency = time.monotonic() - t0
    assert job["status"] == "cancelled", job
    assert latency < 10, f"cancel took {latency:.1f}s"          # stops at the next step
    assert job["step"]["i"] < job["step"]["n"] and job["result"] is None and job["error"] is None
    assert not fs.exists(f"outputs/cancelled/{long['id']}.mp4")

    # the same worker takes the next job and finishes it (one speaker, no bbox)
    nxt = svc.submit({"prompt": "a man talking", "cond_image": s3(demo, "image"),
                      "cond_audio": {"person1": s3(demo, "person1")},
                      "output": "s3://outputs/after-cancel/", "params": dict(SHORT)})
    job, _ = watch(svc, nxt["id"], finished, JOB_TIMEOUT)
    assert job["status"] == "succeeded", job["error"]
    info = probe(fs.cat(job["result"]["video_uri"][len("s3://"):]))
    assert info["frames"] == job["result"]["frames"] == 5


# -- 3. bad input only the pipeline can see ----------------------------------------------------
def test_silent_track_fails_as_bad_input_and_worker_keeps_serving(pipeline_service, demo):
    svc = pipeline_service
    body = two_person_body(demo, "s3://outputs/silent/")
    body["cond_audio"]["person1"] = s3(demo, "silent")
    bad = svc.submit(body)                     # accepted: the file exists, it is only silent
    job, _ = watch(svc, bad["id"], finished, JOB_TIMEOUT)
    assert job["status"] == "failed", job
    err = job["error"]
    assert err["code"] == "bad_input" and err["field"] == "cond_audio.person1", err
    assert "silent" in err["message"], err
    assert job["attempts"] == 1                # bad input is final, not retried

    # the worker keeps serving: the next job runs to the end
    good = svc.submit(two_person_body(demo, "s3://outputs/after-bad/"))
    job, _ = watch(svc, good["id"], finished, JOB_TIMEOUT)
    assert job["status"] == "succeeded", job["error"]
    assert svc.client.get("/readyz").status_code == 200
