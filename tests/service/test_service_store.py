"""The SQLite job store: atomic FIFO leases, expiry, ownership, cancellation, idempotency."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from multitalk.service.store import IdempotencyConflict, JobStore


def _req(k: int) -> dict:
    return {"prompt": f"job {k}"}


def test_concurrent_workers_lease_each_job_once_in_fifo_order(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    first = JobStore(path)
    ids = [first.submit(_req(k))[0]["id"] for k in range(60)]
    stores = [JobStore(path) for _ in range(4)]       # separate connections, as processes have
    per_worker: list[list[str]] = [[] for _ in stores]
    start = threading.Barrier(len(stores))

    def drain(n: int) -> None:
        start.wait()
        while (job := stores[n].lease_next(f"w{n}", 30)) is not None:
            per_worker[n].append(job["id"])
            time.sleep(0.005)                           # "work": the others lease meanwhile
            assert stores[n].complete(job["id"], f"w{n}", "succeeded", result={"n": n})

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(drain, range(4)))
    leased = [i for w in per_worker for i in w]
    assert sorted(leased) == sorted(ids) and len(leased) == 60      # each job exactly once
    for got in per_worker:                              # each worker takes the oldest first
        assert got == sorted(got, key=ids.index)
    assert sum(1 for w in per_worker if w) >= 2         # the workers really competed
    assert first.counts()["succeeded"] == 60
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_expired_lease_requeues_then_fails_after_max_attempts(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3", max_attempts=2)
    job, _ = store.submit(_req(0))
    other, _ = store.submit(_req(1))
    a = store.lease_next("worker-a", 0.05)
    assert a["id"] == job["id"] and a["attempts"] == 1
    time.sleep(0.1)
    assert store.reap_expired() == []                   # back to the queue, first in line
    assert store.get(job["id"])["status"] == "queued"
    b = store.lease_next("worker-b", 0.05)
    assert b["id"] == job["id"] and b["attempts"] == 2
    assert not store.complete(job["id"], "worker-a", "succeeded")   # a lost its lease
    assert not store.heartbeat(job["id"], "worker-a", 10)
    assert not store.update_progress(job["id"], "worker-a", {"progress": 0.5})
    time.sleep(0.1)
    assert store.reap_expired() == [job["id"]]
    failed = store.get(job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    assert "after 2 attempts" in failed["error"]["message"]
    assert not store.complete(job["id"], "worker-b", "succeeded")    # never runs to completion
    assert store.lease_next("worker-c", 10)["id"] == other["id"]


def test_heartbeat_keeps_the_lease(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    job, _ = store.submit(_req(0))
    store.lease_next("w", 0.2)
    for _ in range(4):
        time.sleep(0.1)
        assert store.heartbeat(job["id"], "w", 0.2)
        assert store.reap_expired() == []
    assert store.update_progress(job["id"], "w", {"progress": 0.5, "stage": "sampling"})
    assert store.get(job["id"])["progress"] == 0.5
    assert store.complete(job["id"], "w", "succeeded", result={"video_uri": "x"})
    assert store.get(job["id"])["status"] == "succeeded"
    with pytest.raises(ValueError):
        store.complete(job["id"], "w", "running")


def test_cancel_queued_running_and_expired(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    q, _ = store.submit(_req(0))
    r, _ = store.submit(_req(1))
    assert store.cancel(q["id"])["status"] == "cancelled"
    assert store.lease_next("w", 0.05)["id"] == r["id"]  # the cancelled job is skipped
    running = store.cancel(r["id"])
    assert running["status"] == "running" and running["cancel_requested"]
    assert store.cancel_requested(r["id"])
    time.sleep(0.1)
    assert store.reap_expired() == [r["id"]]             # dead worker + cancel -> cancelled
    assert store.get(r["id"])["status"] == "cancelled"
    assert store.cancel("missing") is None


def test_idempotency_key(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    a, created_a = store.submit(_req(0), idempotency_key="k", request_hash="h1")
    b, created_b = store.submit(_req(0), idempotency_key="k", request_hash="h1")
    assert created_a and not created_b and a["id"] == b["id"]
    with pytest.raises(IdempotencyConflict):
        store.submit(_req(1), idempotency_key="k", request_hash="h2")
    jobs, cursor = store.list()
    assert [j["id"] for j in jobs] == [a["id"]] and cursor is None
