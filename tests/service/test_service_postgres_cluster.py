"""Postgres as the shared queue: an API and two worker processes on one database.

The module's cluster (API in this process without a worker, two ``multitalk worker`` processes)
goes through three trials in order: 200 concurrent submissions, ``kill -9`` of the worker running a
job, and a Postgres restart while jobs run. The workers' runner appends ``start``/``done`` lines
to one shared file (``media_runner`` ``record``), so "ran once" is read from what really ran.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from service_support import STORES, TOKEN, Proc, Running, job_body, metric, wait_for

from multitalk.service.store import open_store

pytestmark = pytest.mark.skipif("postgres" not in STORES, reason="MULTITALK_TEST_STORES")
log = logging.getLogger(__name__)        # measured values (shown with --log-cli-level=INFO)

FAST_JOBS = {"steps": 1, "step_s": 0.0, "max_frames": 2, "size": 32}


class Cluster:
    def __init__(self, url, tmp_path, media):
        self.url, self.tmp = url, tmp_path
        self.started: list[Proc] = []
        self.record = tmp_path / "runs.log"
        self.record.touch()
        self.options = {**FAST_JOBS, "record": str(self.record)}
        # leases of 3 s: a killed worker's job is re-leased within ~3 s; a Postgres restart
        # (well under a second here) does not cost a lease
        self.settings = dict(db=url, lease_s=3.0, heartbeat_s=0.25)
        self.api = Running(tmp_path / "data", in_process_worker=False, **self.settings)
        self.store = open_store(url)
        self.workers = [self.start_worker() for _ in range(2)]
        self.image = self.api.upload(media["image"])
        self.audio = self.api.upload(media["audio1"])

    def start_worker(self):
        # the API's data_dir: uploads and local outputs are files (one host with several GPUs;
        # across hosts, inputs and outputs go through s3:// or a shared folder: README)
        proc = Proc("worker", self.api.config.data_dir, runner_options=self.options,
                    **self.settings)
        self.started.append(proc)
        return proc

    def close(self):
        for proc in self.started:
            proc.stop()
        self.store.close()
        self.api.close()

    def runs(self) -> tuple[Counter, Counter, dict[str, set[int]]]:
        starts, dones, pids = Counter(), Counter(), {}
        for line in self.record.read_text().splitlines():
            event, job_id, pid = line.split()
            (starts if event == "start" else dones)[job_id] += 1
            pids.setdefault(job_id, set()).add(int(pid))
        return starts, dones, pids

    def finished(self, ids) -> bool:
        return all(self.store.get(i)["status"] in ("succeeded", "failed", "cancelled")
                   for i in ids)

    def drained(self) -> bool:
        counts = self.store.counts()
        return counts["queued"] == counts["running"] == 0


@pytest.fixture
def cluster(postgres, tmp_path, media):
    c = Cluster(postgres.new_database(), tmp_path, media)
    yield c
    c.close()


def test_two_workers_share_one_queue_faults_included(cluster, postgres):
    c = cluster
    before = metric(c.api.client.get("/metrics").text, "multitalk_jobs_finished_total",
                    status="succeeded")

    # -- 1. 200 concurrent submissions: none lost, none run twice -----------------------------
    def submit(k: int) -> str:
        with httpx.Client(base_url=c.api.url, timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            r = client.post("/v1/jobs", json=job_body(c.image, c.audio, prompt=f"job {k}"))
            assert r.status_code == 202, r.text
            return r.json()["id"]

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as ex:
        ids = list(ex.map(submit, range(200)))
    t_submitted = time.monotonic() - t0
    assert len(set(ids)) == 200
    wait_for(c.drained, 180, "200 jobs on two workers", interval=0.5)
    t_drained = time.monotonic() - t0
    jobs = [c.store.get(i) for i in ids]
    bad = [(j["status"], j["attempts"], j["error"]) for j in jobs
           if j["status"] != "succeeded" or j["attempts"] != 1]
    assert not bad, (len(bad), bad[:3], c.workers[0].output()[-3000:])
    starts, dones, pids = c.runs()
    assert set(dones) == set(ids) and set(dones.values()) == {1}      # each ran exactly once
    assert set(starts.values()) == {1}
    per_worker = Counter(next(iter(p)) for p in pids.values())
    assert len(per_worker) == 2 and min(per_worker.values()) >= 20, per_worker   # both worked
    log.info("200 submissions: accepted in %.1f s, drained in %.1f s, jobs per worker %s",
             t_submitted, t_drained, sorted(per_worker.values()))
    # the API process ran no job: its /metrics adds up the worker processes' counters
    after = metric(c.api.client.get("/metrics").text, "multitalk_jobs_finished_total",
                   status="succeeded")
    assert after - before == 200

    # -- 2. kill -9 of the worker running a job: re-leased by the other, finished ------------
    long = submit_one(c, "long [steps=16] [step_s=0.25]")
    short = [submit_one(c, f"short {k}") for k in range(3)]
    running = wait_for(lambda: (j := c.store.get(long))["status"] == "running"
                       and (j["step"] or {}).get("i", 0) >= 2 and j, 30, "the long job running")
    pid = int(running["lease_owner"].split(":")[1])
    victim = next(w for w in c.workers if w.p.pid == pid)
    victim.kill9()
    t_kill, killed_at = time.monotonic(), time.time()
    wait_for(lambda: c.finished([long, *short]), 60, "the long job on the other worker")
    job = c.store.get(long)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert job["step"] == {"i": 16, "n": 16}
    assert job["lease_owner"] is None                           # released at the end
    _, dones, pids = c.runs()
    assert dones[long] == 1 and pid in pids[long] and len(pids[long]) == 2
    assert all(c.store.get(s)["status"] == "succeeded" for s in short)
    assert time.monotonic() - t_kill < 60
    log.info("kill -9 at step %d/16: re-leased after %.1f s, finished %.1f s after the kill",
             running["step"]["i"], job["started_at"] - killed_at, time.monotonic() - t_kill)
    c.workers = [w for w in c.workers if w is not victim] + [c.start_worker()]
    wait_for(lambda: "serving" in c.workers[-1].output(), 60, "the replacement worker")

    # -- 3. Postgres restarts while jobs run: workers reconnect and finish -------------------
    batch = [submit_one(c, f"during restart {k} [steps=20] [step_s=0.1]") for k in range(6)]
    wait_for(lambda: sum(c.store.get(b)["status"] == "running" for b in batch) >= 2, 30,
             "both workers running a job")
    took = postgres.restart()
    c.store.close()                                  # this test's own connection broke too
    wait_for(lambda: _finished_quietly(c, batch), 90, "the jobs after the restart")
    jobs = [c.store.get(b) for b in batch]
    assert [j["status"] for j in jobs] == ["succeeded"] * 6, [j["error"] for j in jobs]
    _, dones, _ = c.runs()
    assert all(dones[b] == 1 for b in batch)
    assert all(j["attempts"] == 1 for j in jobs)      # no lease was lost over the restart
    logs = "".join(w.output() for w in c.workers)
    assert "store unavailable" in logs or "heartbeat failed" in logs, logs[-2000:]
    assert took < 30
    log.info("postgres restart took %.2f s; %d jobs finished, attempts %s",
             took, len(jobs), [j["attempts"] for j in jobs])


def submit_one(c: Cluster, prompt: str) -> str:
    r = c.api.client.post("/v1/jobs", json=job_body(c.image, c.audio, prompt=prompt))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _finished_quietly(c: Cluster, ids) -> bool:
    try:
        return c.finished(ids)
    except Exception:  # noqa: BLE001 - the database may still be coming back
        return False
