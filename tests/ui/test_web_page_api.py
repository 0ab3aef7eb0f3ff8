"""The page's ``--api`` backend against a real ``multitalk serve --preset tiny`` on loopback (a
subprocess, with an API token): uploads, submission, progress, history, cancellation, the video
download and bad input worded as the CLI words it; a ``tts_audio`` job (the official format) spoken
by the service's worker; then the page itself in ``--api`` mode, loaded in chromium, shows the
service's state and history."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from page_support import CHROMIUM, CHROMIUM_FLAGS, Server, free_port, offline_env  # noqa: E402

from multitalk.errors import UserInputError  # noqa: E402
from multitalk.media.speech_synthesis import espeak_program  # noqa: E402
from multitalk.pipeline.demo_inputs import write_demo_inputs  # noqa: E402
from multitalk.pipeline.inputs import InputSpec  # noqa: E402
from multitalk.pipeline.speakers import validate_bbox  # noqa: E402
from multitalk.pipeline.speech_from_text import SpeechSynthesizer  # noqa: E402
from multitalk.ui.api_client import ApiJobs, ServiceProblem  # noqa: E402
from multitalk.ui.web import build_inputs  # noqa: E402

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow,
              pytest.mark.skipif(espeak_program() is None and not os.environ.get("CI"),
                                 reason="espeak-ng not installed (.ci/run installs it)")]
TOKEN = "ui-test-token"
SMALL = {"size": "preview", "mode": "clip", "frame_num": 9, "sample_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {**offline_env(tmp / "home"), "MULTITALK_API_TOKENS": TOKEN, "MULTITALK_POLL_INTERVAL_S": "0.1"}
    server = Server(["serve", "--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--port", str(port),
                     "--data-dir", str(tmp / "data")], env, tmp / "serve.log", f"http://127.0.0.1:{port}",
                    ready_path="/healthz")
    server.wait()
    yield server
    server.stop()


def _wait(client: ApiJobs, job_id: str, timeout: float = 200):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_id)
        seen.append(job)
        if job.finished:
            return job, seen
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished: {seen[-1]}")


def test_api_backend_against_multitalk_serve(service, tmp_path):
    demo_json = write_demo_inputs(tmp_path / "demo")
    demo = json.loads(demo_json.read_text())
    image, audio1 = str(tmp_path / "demo" / demo["cond_image"]), str(tmp_path / "demo" / demo["cond_audio"]["person1"])

    assert "refused the token" in ApiJobs(service.url, "wrong", cache_dir=tmp_path / "c0").status()
    client = ApiJobs(service.url, TOKEN, cache_dir=tmp_path / "cache")
    deadline = time.monotonic() + 120
    while client.status() != "ready":
        assert time.monotonic() < deadline, client.status()
        time.sleep(0.3)

    # the page's inputs: speaker 1 recorded, speaker 2 typed (spoken here, uploaded as a wav)
    spec, params, warnings = build_inputs(
        image=image, prompt=demo["prompt"], two=True, audio_type="add", boxes=[demo["bbox"]["person1"],
                                                                                 demo["bbox"]["person2"]],
        speakers=[{"source": "audio", "audio": audio1}, {"source": "text", "text": "Hi there!", "voice": "en-gb+f3"}],
        speech_dir=tmp_path / "speech", synthesizer=SpeechSynthesizer(), params=SMALL)
    assert warnings == [] and spec.speaker_paths()[1] == str(tmp_path / "speech" / "person2.wav")
    job_id = client.submit(spec, params)
    queued = client.submit(spec, params)          # waits behind the first: cancelled while queued
    client.cancel(queued)
    job, seen = _wait(client, job_id)
    assert job.status == "succeeded", job.error
    assert any(j.status == "running" and j.clip == [1, 1] and j.step and j.step[1] == 2 for j in seen), seen
    assert (job.frames, job.width, job.height, job.seed, job.speakers) == (9, 224, 112, 3, 2)
    assert client.get(queued).status == "cancelled"

    video = client.video_path(job_id)
    with av.open(str(video)) as f:
        assert f.streams.video[0].frames in (0, 9) and f.streams.audio[0].codec_context.name == "aac"
        assert sum(1 for _ in f.decode(video=0)) == 9
    assert client.video_path(job_id) == video                    # fetched once, then cached
    assert [j.id for j in client.history()][:2] == [queued, job_id]


    # speech from text in the service: the official tts_audio format, spoken by the worker
    tts = {"text": "(s1) Do you know multi-talk? (s2) Yes, I know it!", "human1_voice": "en-us",
           "human2_voice": "en-gb+f3"}
    body = {**client.request_body(spec, params), "tts_audio": tts, "cond_audio": {}}
    spoken, _ = _wait(client, client._call("POST", "/v1/jobs", "submitting", json=body).json()["id"])
    assert spoken.status == "succeeded" and spoken.frames == 9, spoken.error
    with av.open(str(client.video_path(spoken.id))) as f:
        sound = np.concatenate([fr.to_ndarray().ravel() for fr in f.decode(audio=0)])
    assert np.abs(sound).max() > 0.01               # the synthesised speech is the sound track
    # a Kokoro voice on a server without --tts_dir: bad input naming the voice, no stand-in voice
    kokoro = {**body, "tts_audio": {**tts, "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt"}}
    failed, _ = _wait(client, client._call("POST", "/v1/jobs", "submitting", json=kokoro).json()["id"])
    assert failed.status == "failed" and failed.error.startswith("tts_audio.human1_voice: Kokoro voice af_heart.pt")
    # refused at submission: both kinds of speech, or a third speaker
    with pytest.raises(ServiceProblem, match="not both"):
        client._call("POST", "/v1/jobs", "submitting", json={**body, "cond_audio": {"person1": body["cond_image"]}})
    with pytest.raises(ServiceProblem, match=r"\(s3\): MultiTalk has persons 1 and 2"):
        client._call("POST", "/v1/jobs", "submitting", json={**body, "tts_audio": {"text": "(s1) hi (s3) who?"}})

    # bad input only the worker sees: the job fails with the pipeline's own wording
    boxes = {"person1": [28, 25, 547, 486], "person2": [28, 537, 547, 5000]}
    bad = InputSpec.from_dict({**spec.model_dump(exclude={"bbox"}), "bbox": boxes})
    failed, _ = _wait(client, client.submit(bad, params))
    with pytest.raises(UserInputError) as expected:
        validate_bbox(bad.bbox_dict(), 2, 576, 1024)
    assert failed.status == "failed" and failed.error == str(expected.value)
    # bad input the API refuses (422), one line naming the field
    with pytest.raises(ServiceProblem) as refused:
        client._call("POST", "/v1/jobs", "submitting", json={**client.request_body(spec, params),
                                                              "params": {"frame_num": 8}})
    assert str(refused.value).startswith("params.frame_num: must be 4n+1"), str(refused.value)

    # the page in --api mode: the service's state and history, in the browser
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
        pytest.skip("chromium not installed (.ci/run installs it)")
    from multitalk.ui.web import create_page, serve_page

    page_app, _ = create_page(data_dir=tmp_path / "page", api=service.url, token=TOKEN)
    port = free_port()
    serve_page(page_app, "127.0.0.1", port, prevent_thread_lock=True, quiet=True,
               allowed_paths=[str(tmp_path / "page")])
    try:
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text(f"service at {service.url}: ready").wait_for(timeout=60_000)
            page.locator("#mt-history").get_by_text(job_id).wait_for(timeout=30_000)
            page.locator("#mt-history").get_by_text(job_id).click()       # the history plays a past video
            page.wait_for_function("() => { const v = document.querySelector('#mt-video video');"
                                   " return v && v.readyState >= 1 && v.duration > 0 }", timeout=60_000)
            href = page.locator("#mt-download a[href]").first.get_attribute("href")
            with av.open(io.BytesIO(page.request.get(href).body())) as f:
                assert f.streams.audio[0].codec_context.name == "aac"
            browser.close()
    finally:
        page_app.close()
