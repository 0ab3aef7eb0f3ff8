"""Webhooks: off the GPU path, Standard Webhooks signatures, deadlines, retries across a restart."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from service_support import TOKEN, WEBHOOK_SECRET, free_port, job_body, wait_for
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from multitalk.service import webhooks

log = logging.getLogger(__name__)        # measured values (shown with --log-cli-level=INFO)


def _webhook_done(svc, job_id: str, timeout: float = 15) -> dict:
    return wait_for(lambda: (j := svc.job(job_id))["webhook"]
                    and j["webhook"]["state"] != "pending" and j, timeout, "webhook outcome")


def test_slow_receiver_does_not_delay_the_next_job(make_service, media, webhook_receiver):
    hook = webhook_receiver(sleep_s=60)               # answers nothing for a minute
    svc = make_service(allow_private_urls=True, webhook_timeout_s=1.0, webhook_retries=1,
                       webhook_backoff_s=0.1)
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    first = svc.submit(job_body(image, audio, webhook_url=hook.url))
    second = svc.submit(job_body(image, audio, prompt="the next job"))
    a = svc.wait_status(first["id"], {"succeeded", "failed"})
    b = svc.wait_status(second["id"], {"succeeded", "failed"})
    assert a["status"] == b["status"] == "succeeded"
    gap = b["started_at"] - a["finished_at"]
    assert 0 <= gap < 1.0, f"the next job started {gap:.2f} s after the first ended"
    log.info("receiver sleeping 60 s: the next job started %.3f s after the first ended", gap)
    assert svc.runner.calls == [first["id"], second["id"]]

    j = _webhook_done(svc, first["id"])               # each attempt cut at its 1 s deadline
    w = j["webhook"]
    assert (w["state"], w["attempts"], w["delivered"]) == ("failed", 2, False)
    assert "no response status within 1 s" in w["error"]
    assert len(hook.calls) == 2
    assert hook.calls[1]["at"] - hook.calls[0]["at"] < 5      # retried after ~1.1 s, not 60 s


def test_a_receiver_that_drips_its_body_is_delivered_at_its_status(make_service, media,
                                                                   webhook_receiver):
    hook = webhook_receiver(drip_s=30)                # 200 at once, then one byte a second
    svc = make_service(allow_private_urls=True, webhook_timeout_s=2.0)
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    job = svc.submit(job_body(image, audio, webhook_url=hook.url))
    j = _webhook_done(svc, job["id"])
    w = j["webhook"]
    assert (w["state"], w["attempts"], w["status_code"]) == ("delivered", 1, 200)
    assert w["finished_at"] - j["finished_at"] < 2.0   # the body was never waited for


def test_signatures_verify_with_a_standard_webhooks_verifier(make_service, media,
                                                             webhook_receiver):
    hook = webhook_receiver()
    svc = make_service(allow_private_urls=True)
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    job = svc.submit(job_body(image, audio, webhook_url=hook.url))
    j = _webhook_done(svc, job["id"])
    assert j["webhook"]["state"] == "delivered"
    [call] = hook.calls
    headers = {k.lower(): v for k, v in call["headers"].items()}
    assert headers["webhook-id"] == j["webhook"]["id"] and headers["webhook-id"].startswith("msg_")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 30
    assert headers["webhook-signature"].startswith("v1,")

    verifier = Webhook(WEBHOOK_SECRET)                # the standardwebhooks package
    payload = verifier.verify(call["body"], headers)
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]
    assert payload["data"]["result"]["download_url"].endswith(f"/v1/jobs/{job['id']}/video")
    assert payload == webhooks.verify(WEBHOOK_SECRET, call["body"], headers)   # ours agrees

    tampered = call["body"].replace(b'"succeeded"', b'"failed"')
    with pytest.raises(WebhookVerificationError):
        verifier.verify(tampered, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "QUFB" * 11).verify(call["body"], headers)      # another secret
    # a genuine, correctly signed notification replayed ten minutes later is refused
    old = webhooks.headers(WEBHOOK_SECRET, headers["webhook-id"], call["body"],
                           now=time.time() - 600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verifier.verify(call["body"], old)
    with pytest.raises(webhooks.WebhookVerificationError, match="replayed"):
        webhooks.verify(WEBHOOK_SECRET, call["body"], old)


def test_webhooks_need_a_signing_secret(make_service, media):
    svc = make_service(allow_private_urls=True, webhook_secret="")
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    r = svc.client.post("/v1/jobs", json=job_body(image, audio,
                                                  webhook_url="http://127.0.0.1:9/hook"))
    assert r.status_code == 422, r.text
    [problem] = r.json()["detail"]
    assert problem["loc"] == ["body", "webhook_url"] and "disabled" in problem["msg"]
    assert "MULTITALK_WEBHOOK_SECRET" in problem["fix"]
    assert svc.client.get("/v1/jobs").json()["jobs"] == []


def test_a_webhook_being_retried_when_the_server_dies_is_sent_after_restart(
        procs, tmp_path, media, webhook_receiver):
    hook = webhook_receiver(fail_first=10**9)         # 500 until told otherwise
    data = tmp_path / "data"
    settings = dict(allow_private_urls=True, webhook_retries=1000, webhook_backoff_s=0.2,
                    webhook_max_backoff_s=0.3, webhook_timeout_s=1.0)

    def start():
        port = free_port()
        proc = procs("serve", data, port=port, **settings)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                              headers={"Authorization": f"Bearer {TOKEN}"})

        def up():
            assert proc.p.poll() is None, proc.output()
            try:
                return client.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 60, "server start", interval=0.2)
        return proc, client

    server, client = start()
    uris = []
    for name in ("image", "audio1"):
        with open(media[name], "rb") as f:
            uris.append(client.post("/v1/files", files={"file": (media[name].name, f)})
                        .json()["uri"])
    job = client.post("/v1/jobs", json=job_body(*uris, webhook_url=hook.url)).json()
    wait_for(lambda: len(hook.calls) >= 2, 30, "two failed deliveries")
    server.kill9()                                    # dies between retries, no clean-up
    client.close()
    died_at, failed = time.time(), len(hook.calls)
    hook.fail_first = failed                          # the receiver is fixed meanwhile
    time.sleep(1.0)
    assert len(hook.calls) == failed                  # nobody is sending now

    server, client = start()
    j = wait_for(lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["webhook"]
                 ["state"] == "delivered" and j, 30, "delivery after the restart")
    call = hook.calls[failed]
    assert call["at"] > died_at
    msg_id = {k.lower(): v for k, v in call["headers"].items()}["webhook-id"]
    assert msg_id == j["webhook"]["id"] == {
        k.lower(): v for k, v in hook.calls[0]["headers"].items()}["webhook-id"]  # same message
    assert json.loads(call["body"])["data"]["status"] == "succeeded"
    assert j["webhook"]["attempts"] == failed + 1 and len(hook.calls) == failed + 1
    Webhook(WEBHOOK_SECRET).verify(call["body"], call["headers"])
    client.close()
