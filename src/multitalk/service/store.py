"""Durable job queue in one SQLite file (WAL), shared by the API and every worker process.

A worker takes the oldest queued job with :meth:`JobStore.lease_next` (one ``BEGIN IMMEDIATE``
transaction, so two workers never take the same job), renews the lease with
:meth:`JobStore.heartbeat`, and only the lease owner can report progress or finish the job. A
lease that expires (worker killed) re-queues the job, up to ``max_attempts`` leases; then it fails
with ``worker_lost``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running") + TERMINAL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    status           TEXT NOT NULL,
    request          TEXT NOT NULL,
    request_hash     TEXT,
    idempotency_key  TEXT UNIQUE,
    progress         TEXT,
    result           TEXT,
    error            TEXT,
    webhook          TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_expires_at REAL,
    heartbeat_at     REAL,
    created_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs(status, seq);
"""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, job_id: str):
        super().__init__(f"Idempotency-Key already used for job {job_id} with a different request")
        self.job_id = job_id


class JobStore:
    """Thread-safe (one connection per thread) and multi-process-safe job store."""

    def __init__(self, path: str | Path, *, max_attempts: int = 3, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    # -- connection handling ------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self):
        """A write transaction that takes the database lock up front (BEGIN IMMEDIATE)."""
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        else:
            c.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- submission and reading ---------------------------------------------------------------
    def submit(self, request: dict, *, idempotency_key: str | None = None,
               request_hash: str | None = None) -> tuple[dict, bool]:
        """Queue a job; returns ``(job, created)``. A known idempotency key returns its job."""
        job_id = uuid.uuid4().hex
        with self._tx() as c:
            now = time.time()          # inside the lock: created_at order == seq order
            if idempotency_key is not None:
                row = c.execute("SELECT * FROM jobs WHERE idempotency_key=?",
                                (idempotency_key,)).fetchone()
                if row is not None:
                    if request_hash is not None and row["request_hash"] != request_hash:
                        raise IdempotencyConflict(row["id"])
                    return _job(row), False
            c.execute("INSERT INTO jobs (id, status, request, request_hash, idempotency_key, "
                      "created_at) VALUES (?, 'queued', ?, ?, ?, ?)",
                      (job_id, json.dumps(request), request_hash, idempotency_key, now))
            row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row), True

    def get(self, job_id: str) -> dict | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def list(self, *, status: str | None = None, limit: int = 50,
             cursor: int | None = None) -> tuple[list[dict], int | None]:
        """Newest first. ``cursor`` is the ``seq`` of the last job of the previous page."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if status is not None:
            sql += " AND status=?"
            args.append(status)
        if cursor is not None:
            sql += " AND seq<?"
            args.append(cursor)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        rows = self._conn().execute(sql, args).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_job(r) for r in rows], (rows[-1]["seq"] if more and rows else None)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self._conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            out[status] = n
        return out

    # -- leasing ------------------------------------------------------------------------------
    def lease_next(self, worker_id: str, lease_s: float) -> dict | None:
        """Atomically take the oldest queued job for ``worker_id``; None when the queue is empty."""
        with self._tx() as c:
            now = time.time()
            row = c.execute("SELECT seq FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1"
                            ).fetchone()
            if row is None:
                return None
            c.execute("UPDATE jobs SET status='running', lease_owner=?, lease_expires_at=?, "
                      "heartbeat_at=?, attempts=attempts+1, started_at=?, progress=NULL "
                      "WHERE seq=?", (worker_id, now + lease_s, now, now, row["seq"]))
            return _job(c.execute("SELECT * FROM jobs WHERE seq=?", (row["seq"],)).fetchone())

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> bool:
        """Extend the lease; False when ``worker_id`` no longer owns the job."""
        now = time.time()
        with self._tx() as c:
            cur = c.execute("UPDATE jobs SET lease_expires_at=?, heartbeat_at=? WHERE id=? AND "
                            "lease_owner=? AND status='running'",
                            (now + lease_s, now, job_id, worker_id))
            return cur.rowcount == 1

    def reap_expired(self) -> list[str]:
        """Re-queue running jobs whose lease expired; returns the ids that became terminal.

        A job that already had ``max_attempts`` leases fails (``worker_lost``); one whose
        cancellation was requested becomes ``cancelled``.
        """
        now = time.time()
        finished: list[str] = []
        with self._tx() as c:
            rows = c.execute("SELECT * FROM jobs WHERE status='running' AND lease_expires_at<?",
                             (now,)).fetchall()
            for r in rows:
                if r["cancel_requested"]:
                    c.execute("UPDATE jobs SET status='cancelled', lease_owner=NULL, "
                              "finished_at=? WHERE seq=?", (now, r["seq"]))
                    finished.append(r["id"])
                elif r["attempts"] >= self.max_attempts:
                    error = {"code": "worker_lost",
                             "message": f"worker lost (lease expired, last owner "
                                        f"{r['lease_owner']}) after {r['attempts']} attempts",
                             "hint": "the worker process died or hung; check its logs"}
                    c.execute("UPDATE jobs SET status='failed', error=?, lease_owner=NULL, "
                              "finished_at=? WHERE seq=?", (json.dumps(error), now, r["seq"]))
                    finished.append(r["id"])
                else:
                    c.execute("UPDATE jobs SET status='queued', lease_owner=NULL, "
                              "lease_expires_at=NULL, progress=NULL WHERE seq=?", (r["seq"],))
        return finished

    def update_progress(self, job_id: str, worker_id: str, progress: dict) -> bool:
        with self._tx() as c:
            cur = c.execute("UPDATE jobs SET progress=? WHERE id=? AND lease_owner=? AND "
                            "status='running'", (json.dumps(progress), job_id, worker_id))
            return cur.rowcount == 1

    def complete(self, job_id: str, worker_id: str, status: str, *, result: dict | None = None,
                 error: dict | None = None) -> bool:
        """Finish a running job; only its lease owner can. False: the lease was lost."""
        if status not in TERMINAL:
            raise ValueError(f"not a terminal status: {status}")
        with self._tx() as c:
            row = c.execute("SELECT progress FROM jobs WHERE id=? AND lease_owner=? AND "
                            "status='running'", (job_id, worker_id)).fetchone()
            if row is None:
                return False
            progress = json.loads(row["progress"]) if row["progress"] else {}
            if status == "succeeded":
                progress.update(progress=1.0, stage="done", eta_s=0.0)
            c.execute("UPDATE jobs SET status=?, result=?, error=?, progress=?, lease_owner=NULL, "
                      "lease_expires_at=NULL, finished_at=? WHERE id=?",
                      (status, json.dumps(result) if result is not None else None,
                       json.dumps(error) if error is not None else None,
                       json.dumps(progress), time.time(), job_id))
            return True

    def release(self, job_id: str, worker_id: str, error: dict) -> str | None:
        """Give back a running job whose attempt ended through no fault of the job (a GPU process of
        the worker died): queued again with ``error`` as the reason of the last attempt, or failed
        with it once ``max_attempts`` leases were used. Returns the new status; None when
        ``worker_id`` no longer held the lease."""
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT attempts, cancel_requested FROM jobs WHERE id=? AND lease_owner=? AND "
                            "status='running'", (job_id, worker_id)).fetchone()
            if row is None:
                return None
            if row["cancel_requested"]:
                status = "cancelled"
            elif row["attempts"] >= self.max_attempts:
                status = "failed"
            else:
                status = "queued"
            if status == "queued":
                c.execute("UPDATE jobs SET status='queued', error=?, lease_owner=NULL, lease_expires_at=NULL, "
                          "progress=NULL WHERE id=?", (json.dumps(error), job_id))
            else:
                c.execute("UPDATE jobs SET status=?, error=?, lease_owner=NULL, lease_expires_at=NULL, "
                          "finished_at=? WHERE id=?",
                          (status, json.dumps(error) if status == "failed" else None, now, job_id))
            return status

    # -- cancellation and webhooks -------------------------------------------------------------
    def cancel(self, job_id: str) -> dict | None:
        """Queued -> cancelled now; running -> cancel requested (the worker stops at its next
        step). Terminal jobs are returned unchanged."""
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "queued":
                c.execute("UPDATE jobs SET status='cancelled', cancel_requested=1, finished_at=? "
                          "WHERE id=?", (now, job_id))
            elif row["status"] == "running":
                c.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
            return _job(c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def cancel_requested(self, job_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id=?",
                                   (job_id,)).fetchone()
        return bool(row and row[0])

    def set_webhook(self, job_id: str, record: dict) -> None:
        with self._tx() as c:
            c.execute("UPDATE jobs SET webhook=? WHERE id=?", (json.dumps(record), job_id))


def _job(row: sqlite3.Row) -> dict:
    """A row as the job dict of the API (progress fields flattened)."""
    progress = json.loads(row["progress"]) if row["progress"] else {}
    job = {
        "id": row["id"],
        "seq": row["seq"],
        "status": row["status"],
        "progress": float(progress.get("progress", 0.0)),
        "stage": progress.get("stage"),
        "clip": progress.get("clip"),
        "step": progress.get("step"),
        "eta_s": progress.get("eta_s"),
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "attempts": row["attempts"],
        "cancel_requested": bool(row["cancel_requested"]),
        "error": json.loads(row["error"]) if row["error"] else None,
        "result": json.loads(row["result"]) if row["result"] else None,
        "webhook": json.loads(row["webhook"]) if row["webhook"] else None,
        "request": json.loads(row["request"]),
        "lease_owner": row["lease_owner"],
    }
    return job
