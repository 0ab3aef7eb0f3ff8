"""Cancellation and failures of running jobs: each ends the job cleanly and the worker goes on."""

from __future__ import annotations

import time
from pathlib import Path

from service_support import job_body, metric, wait_for


def test_cancel_running_job_stops_within_one_step_and_next_job_runs(make_service, media,
                                                                    webhook_receiver):
    hook = webhook_receiver()
    svc = make_service(allow_private_urls=True)
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    slow = svc.submit(job_body(image, audio, prompt="slow [steps=50] [step_s=0.2]",
                               webhook_url=hook.url))
    queued = svc.submit(job_body(image, audio, prompt="queued then cancelled"))
    nxt = svc.submit(job_body(image, audio, prompt="runs after the cancel"))

    wait_for(lambda: (svc.job(slow["id"])["step"] or {}).get("i", 0) >= 2, 15, "two steps")
    r = svc.client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"   # queued: never starts
    t0 = time.monotonic()
    r = svc.client.post(f"/v1/jobs/{slow['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"]
    step_at_cancel = r.json()["step"]["i"]
    job = svc.wait_status(slow["id"], {"cancelled", "failed", "succeeded"}, timeout=5)
    assert job["status"] == "cancelled"
    assert time.monotonic() - t0 < 1.0               # one 0.2 s step + polling, not 50 steps
    assert job["step"]["i"] <= step_at_cancel + 1
    assert job["result"] is None and job["error"] is None

    assert svc.wait_status(nxt["id"], {"succeeded", "failed"})["status"] == "succeeded"
    assert svc.job(queued["id"])["status"] == "cancelled"
    assert queued["id"] not in svc.runner.calls      # the queued job never reached the runner
    assert svc.runner.calls == [slow["id"], nxt["id"]]
    assert svc.client.post(f"/v1/jobs/{nxt['id']}/cancel").status_code == 409
    j = wait_for(lambda: (j := svc.job(slow["id"]))["webhook"] and j, 5, "cancel webhook")
    assert j["webhook"]["delivered"] and hook.json(0)["type"] == "job.cancelled"
    assert hook.json(0)["data"]["status"] == "cancelled"


def test_output_upload_failure_is_storage_error_and_keeps_local_video(make_service, moto, media):
    svc = make_service(s3_endpoint_url=moto.endpoint)
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    job = svc.submit(job_body(image, audio, prompt="[steps=6] [step_s=0.15]",
                              output="s3://outputs/failing"))
    wait_for(lambda: svc.job(job["id"])["status"] == "running", 10, "job running")
    moto.stop()                                      # the store goes away mid-job
    t0 = time.monotonic()
    done = svc.wait_status(job["id"], {"succeeded", "failed"}, timeout=30)
    assert done["status"] == "failed"
    err = done["error"]
    assert err["code"] == "storage_error"
    assert "after 3 attempts" in err["message"]       # upload_retries=2 -> 3 attempts
    kept = Path(err["message"].rsplit("the video is kept at ", 1)[1])
    assert kept.is_file() and kept.stat().st_size > 0
    assert time.monotonic() - t0 < 25
    # the worker keeps serving
    ok = svc.submit(job_body(image, audio))
    assert svc.wait_status(ok["id"], {"succeeded", "failed"})["status"] == "succeeded"


def test_out_of_memory_fails_job_with_hint_and_worker_keeps_serving(make_service, media):
    svc = make_service()
    before = metric(svc.client.get("/metrics").text, "multitalk_jobs_finished_total",
                    status="failed")
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    oom = svc.submit(job_body(image, audio, prompt="too big [oom]"))
    ok = svc.submit(job_body(image, audio))
    job = svc.wait_status(oom["id"], {"succeeded", "failed"})
    assert job["status"] == "failed"
    assert job["error"]["code"] == "out_of_memory"
    assert "out of memory" in job["error"]["message"]
    assert "multitalk-480" in job["error"]["hint"]
    assert svc.wait_status(ok["id"], {"succeeded", "failed"})["status"] == "succeeded"
    after = metric(svc.client.get("/metrics").text, "multitalk_jobs_finished_total",
                   status="failed")
    assert after - before == 1


def test_undecodable_audio_is_refused_at_submission_or_fails_with_bad_input(make_service, media,
                                                                            moto):
    svc = make_service(s3_endpoint_url=moto.endpoint)
    image, bad = svc.upload(media["image"]), svc.upload(media["bad_audio"])
    r = svc.client.post("/v1/jobs", json=job_body(image, bad))     # an upload is probed at once
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "cond_audio",
                                                                     "person1"]
    moto.fs().put_file(str(media["bad_audio"]), "inputs/bad.wav")   # known after the download
    job = svc.submit(job_body(image, "s3://inputs/bad.wav"))
    done = svc.wait_status(job["id"], {"succeeded", "failed"})
    assert done["status"] == "failed"
    assert done["error"]["code"] == "bad_input"
    assert done["error"]["field"] == "cond_audio.person1"
