"""What a new user found by attacking a running server, one test per finding (the early 413 and
the unterminated upload are in test_service_limits.py)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from service_support import job_body


def test_upper_case_s3_output_is_written_to_s3(make_service, moto, media):
    svc = make_service(s3_endpoint_url=moto.endpoint)
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    job = svc.submit(job_body(image, audio, output="S3://outputs/Upper"))
    assert job["request"]["output"] == "s3://outputs/Upper"           # stored canonical
    done = svc.wait_status(job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["video_uri"] == f"s3://outputs/Upper/{job['id']}.mp4"
    assert moto.fs().exists(f"outputs/Upper/{job['id']}.mp4")
    r = svc.client.get(f"/v1/jobs/{job['id']}/video")
    assert r.status_code == 307                                       # not 410
    assert not any("S3:" in p.name for p in svc.config.data_dir.parent.rglob("*"))


def test_malformed_urls_are_422_not_500(make_service):
    svc = make_service()
    for url in ("http://example.com:99999/x", "http://[::1", f"https://{'a' * 64}.example.com/x",
                "s3://[::1/x"):
        body = job_body(url, url, webhook_url=url, output=url)
        r = svc.client.post("/v1/jobs", json=body)
        assert r.status_code == 422, r.text
        fields = {".".join(map(str, d["loc"][1:])) for d in r.json()["detail"]}
        assert fields == {"cond_image", "cond_audio.person1", "webhook_url", "output"}, r.text


def test_idempotent_retry_with_random_seed_is_the_same_job(make_service, media):
    svc = make_service()
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    body = job_body(image, audio, params={"frame_num": 9, "motion_frame": 5, "seed": -1})
    a = svc.submit(body, headers={"Idempotency-Key": "k-1"})
    b = svc.submit(body, headers={"Idempotency-Key": "k-1"})
    assert a["id"] == b["id"] and a["request"]["params"]["seed"] >= 0   # the drawn seed is kept
    other = dict(body, params={**body["params"], "seed": 5})
    assert svc.client.post("/v1/jobs", json=other,
                           headers={"Idempotency-Key": "k-1"}).status_code == 409


def test_422_never_echoes_the_input_and_carries_loc_msg_fix(make_service):
    svc = make_service(max_body_bytes=4 * 1024 * 1024)
    secret = "ECHO" * 500_000                                            # 2 MB prompt
    r = svc.client.post("/v1/jobs", json={"prompt": secret, "cond_image": 7,
                                          "cond_audio": {"person1": "x", "person9": "y"},
                                          "params": {"frame_num": "many"}})
    assert r.status_code == 422 and len(r.content) < 4000 and "ECHOECHO" not in r.text
    detail = r.json()["detail"]
    assert len(detail) >= 4
    for entry in detail:
        assert set(entry) == {"loc", "msg", "type", "fix"} and entry["loc"][0] == "body"
        assert entry["msg"] and entry["fix"]
    bad_json = svc.client.post("/v1/jobs", content=b'{"prompt": "' + b"ECHO" * 1000,
                               headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 422 and "ECHOECHO" not in bad_json.text
    assert svc.client.post("/v1/jobs", content=b"{" * (5 * 1024 * 1024),
                           headers={"Content-Type": "application/json"}).status_code == 413


@pytest.mark.parametrize("raw, field", [
    ('"bbox": {"person1": [0, 0, NaN, 10], "person2": [0, 10, 5, 20]}', "bbox.person1.2"),
    ('"bbox": {"person1": [0, 0, 5, Infinity], "person2": [0, 10, 5, 20]}', "bbox.person1.3"),
    ('"params": {"seed": 9223372036854775808}', "params.seed"),
    ('"params": {"apg_momentum": -Infinity}', "params.apg_momentum"),
])
def test_nan_infinity_and_huge_seed_are_refused_at_submission(make_service, media, raw, field):
    svc = make_service()
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    body = json.dumps(job_body(image, audio, audio))[:-1] + ", " + raw + "}"
    body = body.replace('"params": {"frame_num": 9, "motion_frame": 5, "sample_steps": 4}, ',
                        "") if raw.startswith('"params"') else body
    r = svc.client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in {".".join(map(str, d["loc"][1:])) for d in r.json()["detail"]}, r.text
    assert svc.client.get("/v1/jobs").json()["jobs"] == []


@pytest.mark.parametrize("uri", ["s3://inputs//voice.wav", "s3://inputs/a//b.wav"])
def test_empty_key_segments_are_refused(make_service, media, uri):
    svc = make_service()
    r = svc.client.post("/v1/jobs", json=job_body(svc.upload(media["image"]), uri))
    assert r.status_code == 422 and "empty segment" in r.text
    r = svc.client.post("/v1/jobs", json=job_body(svc.upload(media["image"]),
                                                  svc.upload(media["audio1"]),
                                                  output="s3://outputs//x"))
    assert r.status_code == 422 and "empty segment" in r.text


def test_video_uri_shows_no_server_path(make_service, media):
    svc = make_service()
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    job = svc.submit(job_body(image, audio))
    svc.wait_status(job["id"], "succeeded")
    text = svc.client.get(f"/v1/jobs/{job['id']}").text
    assert json.loads(text)["result"]["video_uri"] == f"output://{job['id']}.mp4"
    assert str(svc.config.data_dir.parent) not in text
    assert svc.client.get(f"/v1/jobs/{job['id']}/video").headers["content-type"] == "video/mp4"
    r = svc.client.post("/v1/jobs", json=job_body(f"output://{job['id']}.mp4", audio))
    assert r.status_code == 422                          # outputs are not inputs


@pytest.mark.parametrize("docs, anonymous, with_token", [
    ("token", 401, 200), ("public", 200, 200), ("off", 404, 404)])
def test_docs_and_openapi_access_is_a_setting(make_service, docs, anonymous, with_token):
    svc = make_service(docs=docs)
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(svc.url + path).status_code == anonymous, path
        assert svc.client.get(path).status_code == with_token, path


def test_s3_existence_check_does_not_block_the_server(make_service, media, aws_env):
    """An S3 endpoint that accepts connections and never answers: the submission is accepted
    after the probe bound (the worker checks again) and the server keeps answering meanwhile."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)
    endpoint = f"http://127.0.0.1:{hang.getsockname()[1]}"
    try:
        svc = make_service(s3_endpoint_url=endpoint, probe_timeout_s=2.0)
        image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
        busy = svc.submit(job_body(image, audio, prompt="[steps=100] [step_s=0.1]"))
        result = {}

        def submit():
            t0 = time.monotonic()
            result["r"] = svc.client.post("/v1/jobs", json=job_body(image, "s3://inputs/v.wav"))
            result["s"] = time.monotonic() - t0

        t = threading.Thread(target=submit)
        t.start()
        time.sleep(0.3)
        assert svc.client.get("/healthz").status_code == 200
        assert svc.client.get("/v1/jobs").status_code == 200
        assert "r" not in result                    # answered while the probe still hangs
        t.join(15)
        assert result["r"].status_code == 202 and result["s"] < 6
        for job_id in (result["r"].json()["id"], busy["id"]):   # the worker never dials it
            svc.client.post(f"/v1/jobs/{job_id}/cancel")
    finally:
        hang.close()
