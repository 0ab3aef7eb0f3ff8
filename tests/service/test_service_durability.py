"""Worker processes die, the API restarts: jobs survive in the SQLite store and finish once."""

from __future__ import annotations

import httpx
from service_support import TOKEN, free_port, job_body, wait_for


def _api(procs, data_dir):
    port = free_port()
    proc = procs("api", data_dir, port=port)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}",
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def up():
        assert proc.p.poll() is None, proc.output()
        try:
            return client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 60, "API process start", interval=0.2)
    return proc, client


def test_killed_worker_job_is_released_and_api_restart_keeps_jobs(procs, tmp_path, media):
    data = tmp_path / "data"
    api, client = _api(procs, data)

    def upload(path):
        with open(path, "rb") as f:
            return client.post("/v1/files", files={"file": (path.name, f)}).json()["uri"]

    image, audio = upload(media["image"]), upload(media["audio1"])
    body = job_body(image, audio, prompt="long job [steps=12] [step_s=0.25]")
    victim = client.post("/v1/jobs", json=body).json()
    later = client.post("/v1/jobs", json=job_body(image, audio, prompt="second")).json()
    cancelled = client.post("/v1/jobs", json=job_body(image, audio, prompt="third")).json()
    assert client.post(f"/v1/jobs/{cancelled['id']}/cancel").json()["status"] == "cancelled"

    w1 = procs("worker", data)
    get = lambda jid: client.get(f"/v1/jobs/{jid}").json()   # noqa: E731
    wait_for(lambda: (get(victim["id"])["step"] or {}).get("i", 0) >= 2, 60,
             "first worker to reach step 2", interval=0.1)
    w1.kill9()                                                 # mid-job, no clean-up
    j = get(victim["id"])
    assert j["status"] == "running" and j["attempts"] == 1

    w2 = procs("worker", data)
    done = wait_for(lambda: (j := get(victim["id"]))["status"] in ("succeeded", "failed") and j,
                    60, "the job to finish on the second worker", interval=0.2)
    assert done["status"] == "succeeded", (done["error"], w2.output())
    assert done["attempts"] == 2                              # re-leased once after expiry
    assert done["step"] == {"i": 12, "n": 12}
    assert wait_for(lambda: get(later["id"])["status"] == "succeeded", 30, "second job")
    assert "lease expired" in w2.output() or "attempt 2" in w2.output()

    def snapshot(c):    # download_url names the API's port, which changes on restart
        return {j["id"]: (j["status"], j["attempts"], j["created_at"], j["finished_at"],
                          j["result"] and j["result"]["video_uri"]) for j in
                c.get("/v1/jobs").json()["jobs"]}

    before = snapshot(client)
    assert len(before) == 3
    api.stop()
    client.close()
    api2, client2 = _api(procs, data)                         # restart: same store file
    after = snapshot(client2)
    assert after == before
    assert after[victim["id"]][0] == "succeeded" and after[cancelled["id"]][0] == "cancelled"
    r = client2.get(f"/v1/jobs/{victim['id']}/video")
    assert r.status_code == 200 and len(r.content) > 1000
    client2.close()
