"""The job store on SQLite and on Postgres: atomic FIFO leases, expiry, ownership, cancellation,
tenants, idempotency, quotas, the webhook outbox, retention queries, SQLite upgrade and backup."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from multitalk.service.store import IdempotencyConflict, QuotaExceeded, open_store


def _req(k: int, **extra) -> dict:
    return {"prompt": f"job {k}", **extra}


def test_concurrent_workers_lease_each_job_once_in_fifo_order(open_test_store, db_kind):
    first = open_test_store()
    ids = [first.submit(_req(k))[0]["id"] for k in range(60)]
    stores = [open_test_store() for _ in range(4)]     # separate connections, as processes have
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
    if db_kind == "sqlite":
        conn = sqlite3.connect(open_test_store.url[len("sqlite:///"):])
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


def test_expired_lease_requeues_then_fails_after_max_attempts(open_test_store):
    store = open_test_store(max_attempts=2)
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


def test_heartbeat_keeps_the_lease(open_test_store):
    store = open_test_store()
    job, _ = store.submit(_req(0))
    store.lease_next("w", 0.3)
    for _ in range(4):
        time.sleep(0.1)
        assert store.heartbeat(job["id"], "w", 0.3)
        assert store.reap_expired() == []
    assert store.update_progress(job["id"], "w", {"progress": 0.5, "stage": "sampling"})
    assert store.get(job["id"])["progress"] == 0.5
    assert store.complete(job["id"], "w", "succeeded", result={"video_uri": "x"})
    assert store.get(job["id"])["status"] == "succeeded"
    with pytest.raises(ValueError):
        store.complete(job["id"], "w", "running")


def test_cancel_queued_running_and_expired(open_test_store):
    store = open_test_store()
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


def test_tenants_idempotency_and_quota(open_test_store):
    store = open_test_store()
    a, created_a = store.submit(_req(0), owner="alice", idempotency_key="k", request_hash="h1")
    b, created_b = store.submit(_req(0), owner="alice", idempotency_key="k", request_hash="h1")
    assert created_a and not created_b and a["id"] == b["id"] and a["owner"] == "alice"
    with pytest.raises(IdempotencyConflict):
        store.submit(_req(1), owner="alice", idempotency_key="k", request_hash="h2")
    # the same key is another tenant's own key: a new job, not alice's
    c, created_c = store.submit(_req(1), owner="bob", idempotency_key="k", request_hash="h2")
    assert created_c and c["id"] != a["id"] and c["owner"] == "bob"
    assert store.get(a["id"], owner="bob") is None and store.get(a["id"], owner="alice")
    assert store.cancel(a["id"], owner="bob") is None
    assert store.get(a["id"])["status"] == "queued"
    assert [j["id"] for j in store.list(owner="bob")[0]] == [c["id"]]
    assert {j["id"] for j in store.list()[0]} == {a["id"], c["id"]}       # admin: all

    # quota: queued + running count, finished jobs do not
    with pytest.raises(QuotaExceeded, match="quota 1"):
        store.submit(_req(2), owner="alice", quota=1)
    store.submit(_req(2), owner="alice", quota=2)
    leased = store.lease_next("w", 30)
    assert leased["id"] == a["id"]
    with pytest.raises(QuotaExceeded):
        store.submit(_req(3), owner="alice", quota=2)
    store.complete(a["id"], "w", "succeeded", result={"video_uri": "x"})
    store.submit(_req(3), owner="alice", quota=2)

    store.add_upload("u1", "alice", filename="a.wav", size=3)
    assert store.get_upload("u1", owner="alice")["size"] == 3
    assert store.get_upload("u1", owner="bob") is None and store.get_upload("u1") is not None


def test_quota_holds_under_concurrent_submissions(open_test_store):
    stores = [open_test_store() for _ in range(6)]
    start = threading.Barrier(len(stores))

    def submit(n: int) -> int:
        start.wait()
        ok = 0
        for k in range(5):
            try:
                stores[n].submit(_req(k), owner="carol", quota=7)
                ok += 1
            except QuotaExceeded:
                pass
        return ok

    with ThreadPoolExecutor(len(stores)) as ex:
        accepted = sum(ex.map(submit, range(len(stores))))
    assert accepted == 7 == stores[0].counts()["queued"]


def test_terminal_status_and_webhook_outbox_are_one_transaction(open_test_store):
    store = open_test_store()
    hooked, _ = store.submit(_req(0, webhook_url="https://example.com/hook"))
    plain, _ = store.submit(_req(1))
    store.lease_next("w", 30)
    store.lease_next("w", 30)
    assert store.lease_webhooks("d", 30, 10) == []          # nothing has ended yet
    store.complete(hooked["id"], "w", "failed", error={"code": "x", "message": "y"})
    store.complete(plain["id"], "w", "succeeded", result={"video_uri": "v"})
    job = store.get(hooked["id"])
    assert job["webhook"]["state"] == "pending" and job["webhook"]["event"] == "job.failed"
    assert store.get(plain["id"])["webhook"] is None

    other = open_test_store()                               # a second dispatcher
    [entry] = store.lease_webhooks("d1", 30, 10)
    assert entry["job_id"] == hooked["id"] and entry["attempts"] == 1
    assert other.lease_webhooks("d2", 30, 10) == []          # leased: not sent twice
    assert store.webhook_attempted(entry["id"], "d1", delivered=False, status_code=500,
                                   error="HTTP 500", retry_in_s=0.05)
    state = store.get(hooked["id"])["webhook"]
    assert (state["state"], state["attempts"], state["status_code"]) == ("pending", 1, 500)
    assert state["next_attempt_at"] > time.time() - 1
    assert other.lease_webhooks("d2", 30, 10) == []          # not due yet
    time.sleep(0.1)
    [again] = other.lease_webhooks("d2", 30, 10)
    assert again["id"] == entry["id"] and again["attempts"] == 2
    assert not store.webhook_attempted(entry["id"], "d1", delivered=True, status_code=200,
                                       error=None, retry_in_s=None)   # d1's lease is over
    assert other.webhook_attempted(entry["id"], "d2", delivered=True, status_code=200,
                                   error=None, retry_in_s=None)
    state = store.get(hooked["id"])["webhook"]
    assert state["state"] == "delivered" and state["delivered"] and state["attempts"] == 2
    time.sleep(0.06)
    assert store.lease_webhooks("d", 30, 10) == []

    queued, _ = store.submit(_req(2, webhook_url="https://example.com/hook"))
    assert store.cancel(queued["id"])["webhook"]["event"] == "job.cancelled"


def test_a_dead_dispatchers_lease_expires(open_test_store):
    store = open_test_store()
    job, _ = store.submit(_req(0, webhook_url="https://example.com/hook"))
    store.lease_next("w", 30)
    store.complete(job["id"], "w", "succeeded", result={"video_uri": "v"})
    [entry] = store.lease_webhooks("dead", 0.05, 10)       # then the process dies
    time.sleep(0.1)
    [again] = store.lease_webhooks("alive", 30, 10)
    assert again["id"] == entry["id"] and again["attempts"] == 2


def test_retention_queries(open_test_store):
    store = open_test_store()
    done, _ = store.submit(_req(0, cond_image="upload://aaa.png"))
    active, _ = store.submit(_req(1, cond_image="upload://bbb.png"))
    store.lease_next("w", 30)
    store.complete(done["id"], "w", "succeeded", result={"video_uri": "v"})
    later = time.time() + 10
    assert [j["id"] for j in store.finished_before(later, outputs_only=True)] == [done["id"]]
    assert store.finished_before(time.time() - 3600) == []
    store.mark_output_deleted(done["id"])
    assert store.finished_before(later, outputs_only=True) == []
    assert store.get(done["id"])["output_deleted_at"] is not None
    assert store.upload_in_use("bbb.png") and not store.upload_in_use("aaa.png")
    store.add_upload("aaa.png", "default", filename=None, size=1)
    assert [u["id"] for u in store.uploads_before(later)] == ["aaa.png"]
    store.delete_upload("aaa.png")
    assert store.uploads_before(later) == []
    assert store.delete_jobs([done["id"], active["id"]]) == 1     # never a queued job
    assert store.get(done["id"]) is None and store.get(active["id"]) is not None


def test_sqlite_file_of_the_previous_version_is_upgraded(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL, request TEXT NOT NULL, request_hash TEXT,
            idempotency_key TEXT UNIQUE, progress TEXT, result TEXT, error TEXT, webhook TEXT,
            attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT, lease_expires_at REAL, heartbeat_at REAL, created_at REAL NOT NULL,
            started_at REAL, finished_at REAL);
        CREATE INDEX jobs_status_seq ON jobs(status, seq);""")
    conn.execute("INSERT INTO jobs (id, status, request, idempotency_key, created_at) VALUES "
                 "('old1', 'queued', ?, 'k', 1.0)", (json.dumps(_req(0)),))
    conn.commit()
    conn.close()
    store = open_store(path)
    old = store.get("old1")
    assert old["owner"] == "default" and old["status"] == "queued"
    new, created = store.submit(_req(1), owner="alice", idempotency_key="k")
    assert created and new["seq"] > old["seq"]             # the key is per tenant now
    assert store.lease_next("w", 30)["id"] == "old1"
    store.close()
    assert open_store(path).get("old1")["status"] == "running"   # opening again: no change


def test_sqlite_backup_is_a_consistent_copy_while_writing(tmp_path):
    store = open_store(tmp_path / "jobs.sqlite3")
    stop = threading.Event()

    def write():
        writer = open_store(tmp_path / "jobs.sqlite3")
        k = 0
        while not stop.is_set():
            writer.submit(_req(k))
            k += 1

    t = threading.Thread(target=write)
    t.start()
    try:
        time.sleep(0.2)
        copies = [store.backup(tmp_path / "backup" / "jobs.sqlite3") for _ in range(3)]
    finally:
        stop.set()
        t.join()
    conn = sqlite3.connect(copies[-1])
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"   # one file, no WAL
    n = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    conn.close()
    assert 0 < n <= store.counts()["queued"]
    assert open_store(copies[-1]).counts()["queued"] == n
