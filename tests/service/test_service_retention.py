"""Retention: uploads, outputs and finished job rows are deleted after N days; nothing a queued or
running job needs is touched."""

from __future__ import annotations

import time

from service_support import job_body, wait_for

from multitalk.service.retention import DAY_S, sweep


def test_sweep_deletes_by_age_and_keeps_what_is_in_use(make_service, media):
    # no sweeper thread (interval of an hour): sweep() is called with chosen clocks
    svc = make_service(upload_retention_days=2, output_retention_days=7, job_retention_days=30,
                       runner_options={"steps": 60, "step_s": 0.05})
    store, storage, cfg = svc.service.store, svc.service.storage, svc.config
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    spare = svc.upload(media["audio2"])
    done = svc.submit(job_body(image, audio, prompt="[steps=1]"))
    finished = svc.wait_status(done["id"], {"succeeded", "failed"})
    assert finished["status"] == "succeeded"
    video = storage.local_file(finished["result"]["video_uri"])
    running = svc.submit(job_body(image, spare, prompt="long"))      # 60 steps: 3 s
    wait_for(lambda: svc.job(running["id"])["status"] == "running", 10, "the long job")
    t = finished["finished_at"]

    assert sweep(store, storage, cfg, now=t + 1.9 * DAY_S) == {"uploads": 0, "outputs": 0,
                                                               "jobs": 0}
    # 2 days on: the uploads are old; the two that the running job names stay
    assert sweep(store, storage, cfg, now=t + 2.1 * DAY_S)["uploads"] == 1
    assert sorted(p.name for p in cfg.uploads_dir.iterdir()) == sorted(
        u[len("upload://"):] for u in (image, spare))
    svc.client.post(f"/v1/jobs/{running['id']}/cancel")
    svc.wait_status(running["id"], {"cancelled"})
    assert sweep(store, storage, cfg, now=t + 2.1 * DAY_S)["uploads"] == 2
    assert list(cfg.uploads_dir.iterdir()) == []
    r = svc.client.post("/v1/jobs", json=job_body(image, audio))
    assert r.status_code == 422 and "does not exist" in r.text       # the upload is gone

    # 7 days on: the video goes, the job stays and says so
    assert video.is_file()
    assert sweep(store, storage, cfg, now=t + 7.1 * DAY_S)["outputs"] == 1
    assert not video.exists()
    job = svc.job(done["id"])
    assert job["status"] == "succeeded" and job["output_deleted_at"] is not None
    assert job["result"]["download_url"] is None
    assert svc.client.get(f"/v1/jobs/{done['id']}/video").status_code == 410

    # 30 days after the cancel: the two finished rows go, a job finished later is kept
    cancelled_at = svc.job(running["id"])["finished_at"]
    time.sleep(0.05)
    late = svc.submit(job_body(svc.upload(media["image"]), svc.upload(media["audio1"]),
                               prompt="[steps=1]"))
    late_at = svc.wait_status(late["id"], {"succeeded"})["finished_at"]
    assert late_at > cancelled_at
    now = (cancelled_at + late_at) / 2 + 30 * DAY_S
    assert sweep(store, storage, cfg, now=now)["jobs"] == 2             # done + cancelled
    assert svc.client.get(f"/v1/jobs/{done['id']}").status_code == 404
    assert svc.client.get(f"/v1/jobs/{running['id']}").status_code == 404
    assert [j["id"] for j in svc.client.get("/v1/jobs").json()["jobs"]] == [late["id"]]


def test_the_sweeper_runs_in_the_service(make_service, media):
    day = 1.0 / DAY_S                                  # retention of one second
    svc = make_service(upload_retention_days=day, output_retention_days=day,
                       job_retention_days=3 * day, retention_interval_s=0.2)
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    job = svc.submit(job_body(image, audio))
    done = svc.wait_status(job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded"
    video = svc.service.storage.local_file(done["result"]["video_uri"])
    t0 = time.monotonic()
    wait_for(lambda: not video.exists() and not any(svc.config.uploads_dir.iterdir()), 10,
             "outputs and uploads deleted")
    wait_for(lambda: svc.client.get(f"/v1/jobs/{job['id']}").status_code == 404, 10,
             "the job row deleted")
    assert time.monotonic() - t0 >= 1.0                # not before its time
