"""Refusals at the door: field-level 422s, SSRF and traversal, upload size, authentication."""

from __future__ import annotations

import httpx
import pytest
from service_support import job_body

from multitalk.errors import UserInputError
from multitalk.service.cli_commands import serve


@pytest.fixture
def svc(make_service):
    return make_service(max_upload_bytes=64 * 1024, allow_private_urls=False)


@pytest.fixture
def uploaded(svc, media):
    return svc.upload(media["image"]), svc.upload(media["audio1"])


def _problems(r: httpx.Response) -> dict[str, str]:
    assert r.status_code == 422, r.text
    return {".".join(str(p) for p in d["loc"][1:]): d["msg"] for d in r.json()["detail"]}


@pytest.mark.parametrize("params, field, words", [
    ({"frame_num": 80}, "params.frame_num", "4n+1"),
    ({"mode": "streaming", "frame_num": 81, "motion_frame": 81}, "params.motion_frame",
     "smaller than frame_num"),
    ({"sample_steps": 0}, "params.sample_steps", "greater than or equal to 1"),
    ({"size": "multitalk-1080"}, "params.size", "multitalk-480"),
    ({"mode": "streaming", "max_frames": 0}, "params.max_frames", "greater than or equal to 1"),
    ({"color_correction_strength": 1.5}, "params.color_correction_strength", "less than or equal"),
    ({"use_teacache": True, "teacache_thres": 0.3}, "params.teacache_thres", "Extra inputs"),
])
def test_bad_params_are_422_with_the_field(svc, uploaded, params, field, words):
    image, audio = uploaded
    r = svc.client.post("/v1/jobs", json=job_body(image, audio, params=params))
    problems = _problems(r)
    assert field in problems and words in problems[field], problems


def test_bad_request_shapes_are_422(svc, uploaded):
    image, audio = uploaded
    problems = _problems(svc.client.post("/v1/jobs", json={"prompt": "x", "cond_image": image}))
    assert "cond_audio" in problems
    body = job_body(image, audio, bbox={"person1": [10, 10, 5, 50]})
    assert "bbox.person1" in _problems(svc.client.post("/v1/jobs", json=body))
    body = job_body(image, audio, audio, bbox={"person1": [0, 0, 5, 5]})
    assert "bbox must name exactly the persons" in _problems(
        svc.client.post("/v1/jobs", json=body))[""]
    two = job_body(image, audio, audio)
    r = svc.client.post("/v1/jobs", json=two)
    assert r.status_code == 202 and r.json()["request"]["audio_type"] == "add"
    assert _problems(svc.client.post("/v1/jobs", json=dict(two, audio_type="sum")))


@pytest.mark.parametrize("uri, words", [
    ("http://127.0.0.1:9/voice.wav", "non-public"),
    ("https://localhost/voice.wav", "non-public"),
    ("http://169.254.169.254/latest/meta-data/", "non-public"),
    ("http://10.0.0.8/voice.wav", "non-public"),
    ("http://[::1]/voice.wav", "non-public"),
    ("http://[2002:7f00:1::1]/voice.wav", "wrapped in 2002:7f00:1::1"),        # 6to4
    ("http://[64:ff9b::a9fe:a9fe]/voice.wav", "wrapped in 64:ff9b::a9fe:a9fe"),  # NAT64
    ("file:///etc/passwd", "server-local paths are not allowed"),
    ("/etc/passwd", "server-local paths are not allowed"),
    ("ftp://example.com/voice.wav", "unsupported URI"),
    ("s3://bucket/../../etc/passwd", "traversal"),
    ("s3://bucket/a/./b.wav", "traversal"),
    ("upload://../../jobs.sqlite3", "not an upload URI"),
    ("upload://0123456789abcdef0123456789abcdef.wav", "does not exist"),
    ("s3://inputs/x//y.wav", "empty segment"),
])
def test_unsafe_or_unknown_media_uris_are_refused(svc, uploaded, uri, words):
    image, _ = uploaded
    problems = _problems(svc.client.post("/v1/jobs", json=job_body(image, uri)))
    assert words in problems["cond_audio.person1"], problems
    assert svc.client.get("/v1/jobs").json()["jobs"] == []          # nothing was queued


def test_unsafe_webhook_and_output_are_refused(svc, uploaded):
    image, audio = uploaded
    problems = _problems(svc.client.post("/v1/jobs", json=job_body(
        image, audio, webhook_url="http://169.254.169.254/hook")))
    assert "non-public" in problems["webhook_url"]
    problems = _problems(svc.client.post("/v1/jobs", json=job_body(
        image, audio, output="/var/www/html")))
    assert "server-local" in problems["output"]
    problems = _problems(svc.client.post("/v1/jobs", json=job_body(
        image, audio, output="s3://outputs/../secrets")))
    assert "traversal" in problems["output"]


def test_local_paths_only_under_local_root(make_service, media):
    svc = make_service(local_root=media["image"].parent)
    job = svc.submit(job_body(str(media["image"]), f"file://{media['audio1']}"))
    assert svc.wait_status(job["id"], {"succeeded", "failed"})["status"] == "succeeded"
    problems = _problems(svc.client.post("/v1/jobs", json=job_body(
        str(media["image"]), "/no/such/file.wav")))
    assert "does not exist or this server may not read it" in problems["cond_audio.person1"]


def test_upload_size_limit(svc, tmp_path):
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (64 * 1024 + 1))
    with open(big, "rb") as f:
        r = svc.client.post("/v1/files", files={"file": ("big.wav", f)})
    assert r.status_code == 413
    assert list(svc.config.uploads_dir.iterdir()) == []           # partial file removed
    ok = tmp_path / "ok.wav"
    ok.write_bytes(b"\1" * (64 * 1024))
    with open(ok, "rb") as f:
        r = svc.client.post("/v1/files", files={"file": ("../../ok.WAV", f)})
    assert r.status_code == 201 and r.json()["size"] == 64 * 1024
    name = r.json()["uri"][len("upload://"):]
    assert name.endswith(".wav") and "/" not in name
    assert (svc.config.uploads_dir / name).read_bytes() == ok.read_bytes()
    r = svc.client.post("/v1/files", data={"other": "x"})
    assert r.status_code == 422


def test_authentication(svc, uploaded):
    image, audio = uploaded
    anon = httpx.Client(base_url=svc.url)
    assert anon.get("/healthz").status_code == 200
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/metrics"),
                         ("GET", "/readyz"), ("POST", "/v1/files"), ("GET", "/v1/jobs/x"),
                         ("POST", "/v1/jobs/x/cancel"), ("GET", "/v1/jobs/x/video")]:
        assert anon.request(method, path).status_code == 401, path
        wrong = anon.request(method, path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
    r = anon.post("/v1/jobs", json=job_body(image, audio),
                  headers={"Authorization": "Basic dGVzdC10b2tlbi0xOg=="})
    assert r.status_code == 401
    anon.close()
    assert svc.client.get("/v1/jobs").status_code == 200


def test_openapi_documents_the_contract(svc):
    schema = svc.client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/files", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
            "/v1/jobs/{job_id}/video", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    params = schema["components"]["schemas"]["GenerationParams"]["properties"]
    assert {"size", "frame_num", "motion_frame", "mode", "sample_steps", "sample_shift",
            "text_guide_scale", "audio_guide_scale", "seed", "use_teacache", "teacache_thresh",
            "use_apg", "apg_momentum", "apg_norm_threshold", "color_correction_strength",
            "max_frames", "n_prompt"} <= set(params)
    assert params["frame_num"]["default"] == 81 and params["sample_steps"]["default"] == 40


def test_unauthenticated_server_refuses_public_bind(tmp_path):
    with pytest.raises(UserInputError) as e:
        serve("0.0.0.0", 8000, tmp_path, "media_runner:MediaRunner", api_tokens="")
    assert e.value.field == "host"
