"""200 concurrent submissions: every one becomes its own job and the queue drains FIFO."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from service_support import job_body, wait_for


def test_200_concurrent_submissions_drain_in_fifo_order(make_service, media):
    svc = make_service(runner_options={"steps": 1, "step_s": 0.0, "max_frames": 2, "size": 32})
    image, audio = svc.upload(media["image"]), svc.upload(media["audio1"])
    headers = dict(svc.client.headers)

    def submit(k: int) -> tuple[int, dict]:
        with httpx.Client(base_url=svc.url, headers=headers, timeout=60) as c:
            r = c.post("/v1/jobs", json=job_body(image, audio, prompt=f"job {k}"))
            assert r.status_code == 202, r.text
            return k, r.json()

    with ThreadPoolExecutor(16) as ex:
        submitted = list(ex.map(submit, range(200)))
    ids = {j["id"] for _, j in submitted}
    assert len(ids) == 200                                   # 200 distinct jobs
    assert {j["request"]["prompt"] for _, j in submitted} == {f"job {k}" for k in range(200)}

    def drained():
        counts = svc.client.get("/metrics").text
        return "multitalk_queue_depth 0" in counts and 'multitalk_jobs{status="running"} 0' in counts

    wait_for(drained, 90, "the queue to drain", interval=0.25)
    jobs, cursor = [], None
    while True:                                              # walk every page
        page = svc.client.get("/v1/jobs", params={"limit": 75, **({"cursor": cursor} if cursor
                                                                   else {})}).json()
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(jobs) == 200 and {j["id"] for j in jobs} == ids       # none lost
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in jobs)
    oldest_first = jobs[::-1]
    assert [j["created_at"] for j in oldest_first] == sorted(j["created_at"] for j in jobs)
    # one worker: jobs ran exactly in creation order
    assert svc.runner.calls == [j["id"] for j in oldest_first]
    started = [j["started_at"] for j in oldest_first]
    assert started == sorted(started)
