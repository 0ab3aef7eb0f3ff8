"""End-to-end job flows through a real uvicorn server, real S3 (moto) and real mp4 files."""

from __future__ import annotations

import io

import av
import httpx
from service_support import WEBHOOK_SECRET, job_body, metric, wait_for

from multitalk.service import webhooks


def _streams(data: bytes) -> dict:
    with av.open(io.BytesIO(data)) as f:
        out = {s.type: s.codec_context.name for s in f.streams}
        out["video_frames"] = sum(1 for _ in f.decode(video=0))
    return out


def test_s3_inputs_to_s3_output_with_signed_webhook(make_service, moto, media, webhook_receiver):
    fs = moto.fs()
    fs.put_file(str(media["image"]), "inputs/people/face.png")
    fs.put_file(str(media["audio1"]), "inputs/people/voice1.wav")
    fs.put_file(str(media["audio2"]), "inputs/people/voice2.wav")
    hook = webhook_receiver(fail_first=1)          # first delivery fails: retried
    svc = make_service(s3_endpoint_url=moto.endpoint, allow_private_urls=True)
    wait_for(lambda: svc.client.get("/readyz").status_code == 200, 10, "readiness")
    before = svc.client.get("/metrics").text       # counters are per session: compare deltas

    body = job_body("s3://inputs/people/face.png", "s3://inputs/people/voice1.wav",
                    "s3://inputs/people/voice2.wav", audio_type="para",
                    output="s3://outputs/runs/today/", webhook_url=hook.url)
    created = svc.submit(body)
    assert created["status"] == "queued" and created["attempts"] == 0
    job = svc.wait_status(created["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and job["step"] == {"i": 4, "n": 4}
    assert job["clip"] == {"i": 1, "n": 1} and job["attempts"] == 1
    assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]

    res = job["result"]
    assert res["video_uri"] == f"s3://outputs/runs/today/{job['id']}.mp4"
    assert fs.exists(res["video_uri"][len("s3://"):])
    assert (res["width"], res["height"], res["seed"]) == (64, 64, 42)
    assert abs(res["duration_s"] - res["frames"] / 25) < 1e-9
    # the presigned download URL needs no bearer token
    data = httpx.get(res["download_url"], timeout=10).content
    assert data == fs.cat(res["video_uri"][len("s3://"):])
    info = _streams(data)
    assert info["video"] == "h264" and info["audio"] == "aac"
    assert info["video_frames"] == res["frames"]
    # /video redirects to a presigned URL
    r = svc.client.get(f"/v1/jobs/{job['id']}/video")
    assert r.status_code == 307 and r.headers["location"].startswith(moto.endpoint)
    assert httpx.get(r.headers["location"], timeout=10).content == data

    def delivered():
        j = svc.job(job["id"])
        return j["webhook"] and j["webhook"]["delivered"] and j

    j = wait_for(delivered, 10, "webhook delivery")
    assert j["webhook"]["attempts"] == 2 and len(hook.calls) == 2
    assert j["webhook"]["state"] == "delivered" and j["webhook"]["status_code"] == 200
    first, call = hook.calls
    assert first["headers"]["webhook-id"] == call["headers"]["webhook-id"] == j["webhook"]["id"]
    sent = webhooks.verify(WEBHOOK_SECRET, call["body"], call["headers"])
    assert sent["type"] == "job.succeeded"
    assert sent["data"]["id"] == job["id"] and sent["data"]["status"] == "succeeded"
    assert sent["data"]["result"]["video_uri"] == res["video_uri"]

    metrics = svc.client.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert metric(text, "multitalk_jobs", status="succeeded") == 1
    assert metric(text, "multitalk_queue_depth") == 0
    delta = lambda name, **kw: metric(text, name, **kw) - metric(before, name, **kw)  # noqa: E731
    assert delta("multitalk_job_duration_seconds_count", status="succeeded") == 1
    assert delta("multitalk_step_duration_seconds_count") == 4   # steps 0->1, ..., 3->4
    assert delta("multitalk_webhook_attempts_total", outcome="retry") == 1
    assert delta("multitalk_webhook_attempts_total", outcome="delivered") == 1


def test_uploaded_files_local_output_and_listing(make_service, media):
    svc = make_service()
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    assert image.startswith("upload://") and image.endswith(".png")
    ids = [svc.submit(job_body(image, audio, params={"frame_num": 9, "motion_frame": 5,
                                                     "seed": 1000 + k}))["id"]
           for k in range(3)]
    for job_id in ids:
        assert svc.wait_status(job_id, {"succeeded", "failed"})["status"] == "succeeded"
    job = svc.job(ids[0])
    assert job["result"]["seed"] == 1000
    assert job["result"]["download_url"] == f"{svc.url}/v1/jobs/{ids[0]}/video"
    r = svc.client.get(f"/v1/jobs/{ids[0]}/video")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert _streams(r.content)["audio"] == "aac"
    assert httpx.get(job["result"]["download_url"]).status_code == 401   # needs the token

    page1 = svc.client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page1["jobs"]] == ids[::-1][:2]      # newest first
    page2 = svc.client.get("/v1/jobs", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
    assert [j["id"] for j in page2["jobs"]] == [ids[0]] and page2["next_cursor"] is None
    assert svc.client.get("/v1/jobs", params={"status": "queued"}).json()["jobs"] == []
    assert len(svc.client.get("/v1/jobs", params={"status": "succeeded"}).json()["jobs"]) == 3
    assert svc.client.get("/v1/jobs/nope").status_code == 404


def test_idempotency_key_returns_the_same_job(make_service, media):
    svc = make_service()
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    body = job_body(image, audio)
    a = svc.submit(body, headers={"Idempotency-Key": "order-17"})
    b = svc.submit(body, headers={"Idempotency-Key": "order-17"})
    assert a["id"] == b["id"]
    other = svc.client.post("/v1/jobs", json=dict(body, prompt="something else"),
                            headers={"Idempotency-Key": "order-17"})
    assert other.status_code == 409
    c = svc.submit(body, headers={"Idempotency-Key": "order-18"})
    assert c["id"] != a["id"]
    assert len(svc.client.get("/v1/jobs").json()["jobs"]) == 2


def test_readyz_waits_for_model_loading(make_service):
    svc = make_service(runner_options={"load_s": 1.0})
    assert svc.client.get("/healthz").status_code == 200
    assert svc.client.get("/readyz").status_code == 503
    wait_for(lambda: svc.client.get("/readyz").status_code == 200, 10, "readiness")
    assert metric(svc.client.get("/metrics").text, "multitalk_ready") == 1
