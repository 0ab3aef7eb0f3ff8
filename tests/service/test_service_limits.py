"""Limits: request bodies capped before they are read, upper bounds on what a job may ask for,
and a per-job deadline after which the job fails with ``timeout`` and the next one runs."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from service_support import TOKEN, job_body

MB = 1024 * 1024


def _raw(svc, head: str, chunks: int = 0, timeout: float = 5.0) -> tuple[bytes, int]:
    """Send ``head`` then up to ``chunks`` chunked MiB on a raw socket while a reader thread
    waits for the answer; returns the answer (b"" if the server reset the connection first) and
    how many body bytes went out before the server answered or hung up."""
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=timeout)
    got: list[bytes] = []

    def read():
        try:
            while data := sock.recv(65536):
                got.append(data)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent = 0
    try:
        sock.sendall(head.encode())
        for _ in range(chunks):
            if got or not reader.is_alive():
                break
            sock.sendall(b"100000\r\n" + b"{" * MB + b"\r\n")
            sent += MB
    except OSError:
        pass                        # the server hung up on the rest
    reader.join(timeout)
    sock.close()
    return b"".join(got), sent


def test_unauthenticated_50mb_body_is_rejected_without_being_read(make_service):
    svc = make_service()
    t0 = time.monotonic()
    # declared: answered from the headers alone (the 50 MB are never sent)
    head = ("POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {50 * MB}\r\n\r\n")
    answer, sent = _raw(svc, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent == 0 and time.monotonic() - t0 < 2
    # chunked (no length): counted while it streams; the answer comes after ~1 MiB, not 50
    head = ("POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    answer, sent = _raw(svc, head, chunks=50)
    # 413, or a reset when the close overtakes it (the server does not drain what it refused)
    assert answer.startswith(b"HTTP/1.1 413") or answer == b"", answer[:200]
    assert sent < 50 * MB
    assert svc.client.get("/healthz").status_code == 200


def test_declared_huge_upload_gets_an_early_413(make_service):
    svc = make_service(max_upload_bytes=MB)
    head = (f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {2 * 1024 * MB}\r\n\r\n")
    answer, sent = _raw(svc, head)
    assert answer.startswith(b"HTTP/1.1 413") and sent == 0
    assert list(svc.config.uploads_dir.iterdir()) == []


def test_unterminated_multipart_upload_is_not_stored(make_service):
    svc = make_service()
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="v.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + b"\1" * 5000)      # no closing boundary
    r = svc.client.post("/v1/files", content=body,
                        headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 422 and "closing boundary" in r.text
    assert list(svc.config.uploads_dir.iterdir()) == []
    complete = body + b"\r\n--b--\r\n"
    r = svc.client.post("/v1/files", content=complete,
                        headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 201 and r.json()["size"] == 5000


@pytest.fixture
def bounded(make_service):
    return make_service(limit_frames=33, limit_steps=8, limit_resolution=480, limit_audio_s=0.5)


@pytest.mark.parametrize("params, field, words", [
    ({"frame_num": 37}, "params.frame_num", "frame_num 37 is above this server's limit of 33 "
                                            "(MULTITALK_LIMIT_FRAMES)"),
    ({"mode": "streaming", "frame_num": 9, "max_frames": 40}, "params.max_frames",
     "limit of 33 (MULTITALK_LIMIT_FRAMES)"),
    ({"sample_steps": 9}, "params.sample_steps", "limit of 8 (MULTITALK_LIMIT_STEPS)"),
    ({"size": "multitalk-720"}, "params.size", "limit of 480p (MULTITALK_LIMIT_RESOLUTION)"),
])
def test_bounds_are_422_naming_the_bound(bounded, media, params, field, words):
    image, audio = bounded.upload(media["image"]), bounded.upload(media["audio2"])
    small = {"frame_num": 9, "motion_frame": 5, "sample_steps": 4}
    r = bounded.client.post("/v1/jobs", json=job_body(image, audio, params={**small, **params}))
    assert r.status_code == 422, r.text
    (entry,) = r.json()["detail"]
    assert ".".join(map(str, entry["loc"][1:])) == field and words in entry["msg"], entry
    assert entry["fix"]


def test_audio_bound_and_streaming_cap(bounded, media):
    image = bounded.upload(media["image"])
    short, long_ = bounded.upload(media["audio2"]), bounded.upload(media["audio1"])  # 0.5/0.6 s
    r = bounded.client.post("/v1/jobs", json=job_body(image, long_))
    assert r.status_code == 422
    assert "0.6 s is above this server's limit of 0.5 s (MULTITALK_LIMIT_AUDIO_S)" in r.text
    r = bounded.client.post("/v1/jobs", json=job_body(image, short, short))   # 'add': 1.0 s
    assert r.status_code == 422 and "both speakers together" in r.text
    job = bounded.submit(job_body(image, short, short, audio_type="para",
                                  params={"mode": "streaming", "frame_num": 9,
                                          "motion_frame": 5, "sample_steps": 4}))
    assert job["request"]["params"]["max_frames"] == 33     # no max_frames: capped at the bound


def test_job_over_its_deadline_ends_timeout_and_the_next_job_runs(make_service, media):
    svc = make_service(job_deadline_s=0.8)
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    slow = svc.submit(job_body(image, audio, prompt="slow [steps=100] [step_s=0.1]"))
    nxt = svc.submit(job_body(image, audio))
    done = svc.wait_status(slow["id"], {"succeeded", "failed", "cancelled"}, timeout=10)
    assert done["status"] == "failed" and done["error"]["code"] == "timeout", done
    assert "MULTITALK_JOB_DEADLINE_S" in done["error"]["message"]
    # stopped at the deadline: ~8 of its 100 steps of 0.1 s (the full run would take 10 s)
    assert done["step"]["i"] <= 20 and done["finished_at"] - done["started_at"] < 8
    assert svc.wait_status(nxt["id"], {"succeeded", "failed"})["status"] == "succeeded"
    assert svc.runner.calls == [slow["id"], nxt["id"]]
