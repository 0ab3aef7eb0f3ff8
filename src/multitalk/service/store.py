"""The durable job queue: one interface, two databases (SQLite file by default, Postgres shared).

``open_store(db)`` picks the implementation from the URL: ``postgresql://...`` is
:class:`~multitalk.service.store_postgres.PostgresJobStore` (several machines share one queue),
anything else a SQLite file (:class:`~multitalk.service.store_sqlite.SqliteJobStore`, WAL).

Both run the same SQL (this module) and differ only in how a transaction takes its locks:
SQLite serialises writers (``BEGIN IMMEDIATE``), Postgres locks rows (``FOR UPDATE SKIP LOCKED``:
two workers never lease the same job and never wait for each other) and serialises one tenant's
submissions with an advisory lock (quota and idempotency checks).

A worker takes the oldest queued job with :meth:`JobStore.lease_next`, renews the lease with
:meth:`JobStore.heartbeat`, and only the lease owner can report progress or finish the job. A lease
that expires (worker killed) re-queues the job, up to ``max_attempts`` leases; then it fails with
``worker_lost``.

Every job belongs to a tenant (``owner``); reads take ``owner=None`` for an admin (all jobs).
Idempotency keys are per tenant. A job that reaches a terminal status and has a ``webhook_url``
gets a row in the ``webhooks`` outbox in the same transaction, so the notification survives any
crash; :mod:`multitalk.service.webhook_delivery` sends it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running") + TERMINAL
DEFAULT_OWNER = "default"


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before (by the same tenant) with a different request body."""

    def __init__(self, job_id: str):
        super().__init__(f"Idempotency-Key already used for job {job_id} with a different request")
        self.job_id = job_id


class QuotaExceeded(Exception):
    """The tenant already has as many queued and running jobs as its quota allows."""

    def __init__(self, owner: str, active: int, quota: int):
        super().__init__(f"tenant {owner!r} has {active} jobs queued or running (quota {quota})")
        self.owner, self.active, self.quota = owner, active, quota


class StoreUnavailable(Exception):
    """The database cannot be reached right now (e.g. a Postgres restart); retry later."""


class JobStore:
    """The store interface and its SQL. Subclasses provide connections, transactions and locks."""

    #: appended to the SELECT that picks rows to lease (Postgres: row locks, skipping taken rows)
    skip_locked = ""
    #: appended to a SELECT of one row that the transaction then changes (Postgres: row lock)
    lock_row = ""
    #: a short name for logs and metrics ("sqlite", "postgres")
    kind = "sql"

    def __init__(self, *, max_attempts: int = 3):
        self.max_attempts = max_attempts

    # -- implemented by the database classes ---------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A write transaction; yields an object with ``execute(sql, args)`` (``?`` parameters)."""
        raise NotImplementedError

    def _read(self, sql: str, args: tuple | list = ()) -> list:
        """Rows of one read-only statement (mapping access by column name)."""
        raise NotImplementedError

    def _now(self, c) -> float:
        """The transaction's clock (seconds since the epoch)."""
        return time.time()

    def _lock_owner(self, c, owner: str) -> None:
        """Serialise the submissions of one tenant inside ``c`` (quota, idempotency)."""

    def close(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """Where the store is, without credentials (for logs)."""
        raise NotImplementedError

    # -- submission and reading ---------------------------------------------------------------
    def submit(self, request: dict, *, owner: str = DEFAULT_OWNER,
               idempotency_key: str | None = None, request_hash: str | None = None,
               quota: int = 0) -> tuple[dict, bool]:
        """Queue a job for ``owner``; returns ``(job, created)``.

        A key this tenant used before returns its job (IdempotencyConflict when the body
        differs). ``quota`` > 0 caps the tenant's queued + running jobs (QuotaExceeded).
        """
        job_id = uuid.uuid4().hex
        with self._tx() as c:
            self._lock_owner(c, owner)
            if idempotency_key is not None:
                row = _one(c.execute("SELECT * FROM jobs WHERE owner=? AND idempotency_key=?",
                                     (owner, idempotency_key)))
                if row is not None:
                    if request_hash is not None and row["request_hash"] != request_hash:
                        raise IdempotencyConflict(row["id"])
                    return _job(row), False
            if quota > 0:
                active = _one(c.execute("SELECT COUNT(*) AS n FROM jobs WHERE owner=? AND "
                                        "status IN ('queued', 'running')", (owner,)))["n"]
                if active >= quota:
                    raise QuotaExceeded(owner, active, quota)
            now = self._now(c)    # inside the lock: created_at order == seq order
            c.execute("INSERT INTO jobs (id, owner, status, request, request_hash, "
                      "idempotency_key, created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                      (job_id, owner, json.dumps(request), request_hash, idempotency_key, now))
            row = _one(c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)))
        return _job(row), True

    def get(self, job_id: str, owner: str | None = None) -> dict | None:
        """The job, or None when it does not exist or belongs to another tenant."""
        rows = self._read("SELECT * FROM jobs WHERE id=?", (job_id,))
        if not rows or (owner is not None and rows[0]["owner"] != owner):
            return None
        return _job(rows[0])

    def list(self, *, owner: str | None = None, status: str | None = None, limit: int = 50,
             cursor: int | None = None) -> tuple[list[dict], int | None]:
        """Newest first. ``cursor`` is the ``seq`` of the last job of the previous page."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if owner is not None:
            sql += " AND owner=?"
            args.append(owner)
        if status is not None:
            sql += " AND status=?"
            args.append(status)
        if cursor is not None:
            sql += " AND seq<?"
            args.append(cursor)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        rows = self._read(sql, args)
        more = len(rows) > limit
        rows = rows[:limit]
        return [_job(r) for r in rows], (rows[-1]["seq"] if more and rows else None)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for r in self._read("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
            out[r["status"]] = int(r["n"])
        return out

    # -- leasing ------------------------------------------------------------------------------
    def lease_next(self, worker_id: str, lease_s: float) -> dict | None:
        """Atomically take the oldest queued job for ``worker_id``; None when the queue is empty."""
        with self._tx() as c:
            row = _one(c.execute("SELECT seq FROM jobs WHERE status='queued' ORDER BY seq "
                                 "LIMIT 1" + self.skip_locked))
            if row is None:
                return None
            now = self._now(c)
            c.execute("UPDATE jobs SET status='running', lease_owner=?, lease_expires_at=?, "
                      "heartbeat_at=?, attempts=attempts+1, started_at=?, progress=NULL "
                      "WHERE seq=?", (worker_id, now + lease_s, now, now, row["seq"]))
            return _job(_one(c.execute("SELECT * FROM jobs WHERE seq=?", (row["seq"],))))

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> bool:
        """Extend the lease; False when ``worker_id`` no longer owns the job."""
        with self._tx() as c:
            now = self._now(c)
            cur = c.execute("UPDATE jobs SET lease_expires_at=?, heartbeat_at=? WHERE id=? AND "
                            "lease_owner=? AND status='running'",
                            (now + lease_s, now, job_id, worker_id))
            return cur.rowcount == 1

    def reap_expired(self) -> list[str]:
        """Re-queue running jobs whose lease expired; returns the ids that became terminal.

        A job that already had ``max_attempts`` leases fails (``worker_lost``); one whose
        cancellation was requested becomes ``cancelled``.
        """
        finished: list[str] = []
        with self._tx() as c:
            now = self._now(c)
            rows = c.execute("SELECT * FROM jobs WHERE status='running' AND lease_expires_at<?"
                             + self.skip_locked, (now,)).fetchall()
            for r in rows:
                if r["cancel_requested"]:
                    self._finish(c, r, "cancelled", now)
                    finished.append(r["id"])
                elif r["attempts"] >= self.max_attempts:
                    error = {"code": "worker_lost",
                             "message": f"worker lost (lease expired, last owner "
                                        f"{r['lease_owner']}) after {r['attempts']} attempts",
                             "hint": "the worker process died or hung; check its logs"}
                    self._finish(c, r, "failed", now, error=error)
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
            row = _one(c.execute("SELECT * FROM jobs WHERE id=? AND lease_owner=? AND "
                                 "status='running'" + self.lock_row, (job_id, worker_id)))
            if row is None:
                return False
            self._finish(c, row, status, self._now(c), result=result, error=error)
            return True

    def release(self, job_id: str, worker_id: str, error: dict) -> str | None:
        """Give back a running job whose attempt ended through no fault of the job (a GPU process of
        the worker died): queued again with ``error`` as the reason of the last attempt, or failed
        with it once ``max_attempts`` leases were used (cancelled if that was asked). Returns the
        new status; None when ``worker_id`` no longer held the lease."""
        with self._tx() as c:
            row = _one(c.execute("SELECT * FROM jobs WHERE id=? AND lease_owner=? AND "
                                 "status='running'" + self.lock_row, (job_id, worker_id)))
            if row is None:
                return None
            now = self._now(c)
            if row["cancel_requested"]:
                self._finish(c, row, "cancelled", now)
                return "cancelled"
            if row["attempts"] >= self.max_attempts:
                self._finish(c, row, "failed", now, error=error)
                return "failed"
            c.execute("UPDATE jobs SET status='queued', error=?, lease_owner=NULL, lease_expires_at=NULL, "
                      "progress=NULL WHERE seq=?", (json.dumps(error), row["seq"]))
            return "queued"

    def _finish(self, c, row, status: str, now: float, *, result: dict | None = None,
                error: dict | None = None) -> None:
        """Move ``row`` to a terminal ``status``; queue its webhook in the same transaction."""
        progress = json.loads(row["progress"]) if row["progress"] else {}
        if status == "succeeded":
            progress.update(progress=1.0, stage="done", eta_s=0.0)
        webhook = None
        url = json.loads(row["request"]).get("webhook_url")
        if url:
            msg_id = "msg_" + uuid.uuid4().hex
            event = f"job.{status}"
            c.execute("INSERT INTO webhooks (id, job_id, url, event, status, attempts, "
                      "next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'pending', 0, ?, ?)",
                      (msg_id, row["id"], url, event, now, now))
            webhook = json.dumps(_webhook_state({"id": msg_id, "url": url, "event": event,
                                                 "status": "pending", "attempts": 0,
                                                 "next_attempt_at": now}))
        c.execute("UPDATE jobs SET status=?, result=?, error=?, progress=?, lease_owner=NULL, "
                  "lease_expires_at=NULL, finished_at=?, webhook=COALESCE(?, webhook) "
                  "WHERE seq=?",
                  (status, json.dumps(result) if result is not None else None,
                   json.dumps(error) if error is not None else None, json.dumps(progress),
                   now, webhook, row["seq"]))

    # -- cancellation --------------------------------------------------------------------------
    def cancel(self, job_id: str, owner: str | None = None) -> dict | None:
        """Queued -> cancelled now; running -> cancel requested (the worker stops at its next
        step). Terminal jobs are returned unchanged; None: no such job (for ``owner``)."""
        with self._tx() as c:
            row = _one(c.execute("SELECT * FROM jobs WHERE id=?" + self.lock_row, (job_id,)))
            if row is None or (owner is not None and row["owner"] != owner):
                return None
            if row["status"] == "queued":
                c.execute("UPDATE jobs SET cancel_requested=1 WHERE seq=?", (row["seq"],))
                self._finish(c, row, "cancelled", self._now(c))
            elif row["status"] == "running":
                c.execute("UPDATE jobs SET cancel_requested=1 WHERE seq=?", (row["seq"],))
            return _job(_one(c.execute("SELECT * FROM jobs WHERE seq=?", (row["seq"],))))

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._read("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,))
        return bool(rows and rows[0]["cancel_requested"])

    # -- uploads ------------------------------------------------------------------------------
    def add_upload(self, upload_id: str, owner: str, *, filename: str | None, size: int) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO uploads (id, owner, filename, size, created_at) "
                      "VALUES (?, ?, ?, ?, ?)", (upload_id, owner, filename, size, self._now(c)))

    def get_upload(self, upload_id: str, owner: str | None = None) -> dict | None:
        rows = self._read("SELECT * FROM uploads WHERE id=?", (upload_id,))
        if not rows or (owner is not None and rows[0]["owner"] != owner):
            return None
        return dict(rows[0])

    # -- webhook outbox -----------------------------------------------------------------------
    def lease_webhooks(self, worker_id: str, lease_s: float, limit: int) -> list[dict]:
        """Take up to ``limit`` due deliveries (not leased by a live dispatcher)."""
        with self._tx() as c:
            now = self._now(c)
            rows = c.execute("SELECT id FROM webhooks WHERE status='pending' AND "
                             "next_attempt_at<=? AND (lease_expires_at IS NULL OR "
                             "lease_expires_at<?) ORDER BY next_attempt_at LIMIT ?"
                             + self.skip_locked, (now, now, limit)).fetchall()
            out = []
            for r in rows:
                c.execute("UPDATE webhooks SET lease_owner=?, lease_expires_at=?, "
                          "attempts=attempts+1 WHERE id=?", (worker_id, now + lease_s, r["id"]))
                out.append(dict(_one(c.execute("SELECT * FROM webhooks WHERE id=?",
                                               (r["id"],)))))
            return out

    def next_webhook_due(self) -> float | None:
        """When the next delivery is due (a leased row: when its lease ends); a read only, so
        an idle dispatcher never takes the write lock."""
        rows = self._read("SELECT MIN(COALESCE(lease_expires_at, next_attempt_at)) AS t "
                          "FROM webhooks WHERE status='pending'")
        return rows[0]["t"] if rows and rows[0]["t"] is not None else None

    def webhook_attempted(self, msg_id: str, worker_id: str, *, delivered: bool,
                          status_code: int | None, error: str | None,
                          retry_in_s: float | None) -> bool:
        """Record one attempt: delivered, retried in ``retry_in_s`` seconds, or given up (None).

        Mirrors the state onto the job's ``webhook`` field. False: the lease was lost."""
        with self._tx() as c:
            row = _one(c.execute("SELECT * FROM webhooks WHERE id=? AND lease_owner=? AND "
                                 "status='pending'" + self.lock_row, (msg_id, worker_id)))
            if row is None:
                return False
            now = self._now(c)
            status = "delivered" if delivered else ("pending" if retry_in_s is not None
                                                   else "failed")
            nxt = now + retry_in_s if status == "pending" else None
            c.execute("UPDATE webhooks SET status=?, last_status_code=?, last_error=?, "
                      "next_attempt_at=COALESCE(?, next_attempt_at), lease_owner=NULL, "
                      "lease_expires_at=NULL, finished_at=? WHERE id=?",
                      (status, status_code, error, nxt,
                       now if status != "pending" else None, msg_id))
            state = _webhook_state({**dict(row), "status": status, "last_status_code": status_code,
                                    "last_error": error, "next_attempt_at": nxt,
                                    "finished_at": now if status != "pending" else None})
            c.execute("UPDATE jobs SET webhook=? WHERE id=?", (json.dumps(state), row["job_id"]))
            return True

    def webhook(self, msg_id: str) -> dict | None:
        rows = self._read("SELECT * FROM webhooks WHERE id=?", (msg_id,))
        return dict(rows[0]) if rows else None

    # -- retention ----------------------------------------------------------------------------
    def finished_before(self, before: float, *, outputs_only: bool = False,
                        limit: int = 500) -> list[dict]:
        """Terminal jobs finished before ``before`` (with a stored output when ``outputs_only``)."""
        sql = "SELECT * FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') AND " \
              "finished_at<?"
        if outputs_only:
            sql += " AND result IS NOT NULL AND output_deleted_at IS NULL"
        return [_job(r) for r in self._read(sql + " ORDER BY seq LIMIT ?", (before, limit))]

    def mark_output_deleted(self, job_id: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE jobs SET output_deleted_at=? WHERE id=?", (self._now(c), job_id))

    def delete_jobs(self, job_ids: list[str]) -> int:
        """Delete terminal jobs (and their webhook rows); returns how many jobs went."""
        n = 0
        with self._tx() as c:
            for job_id in job_ids:
                c.execute("DELETE FROM webhooks WHERE job_id=?", (job_id,))
                n += c.execute("DELETE FROM jobs WHERE id=? AND status IN ('succeeded', "
                               "'failed', 'cancelled')", (job_id,)).rowcount
        return n

    def uploads_before(self, before: float, limit: int = 500) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM uploads WHERE created_at<? "
                                            "ORDER BY created_at LIMIT ?", (before, limit))]

    def upload_in_use(self, upload_id: str) -> bool:
        """Whether a queued or running job names ``upload://<upload_id>``."""
        rows = self._read("SELECT COUNT(*) AS n FROM jobs WHERE status IN ('queued', 'running') "
                          "AND request LIKE ?", (f"%upload://{upload_id}%",))
        return bool(rows[0]["n"])

    def delete_upload(self, upload_id: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM uploads WHERE id=?", (upload_id,))


def _one(cur):
    return cur.fetchone()


def _webhook_state(row: dict) -> dict:
    """The delivery state shown on the job (``webhook``)."""
    return {"id": row["id"], "url": row["url"], "event": row.get("event"),
            "state": row["status"], "delivered": row["status"] == "delivered",
            "attempts": row.get("attempts", 0), "status_code": row.get("last_status_code"),
            "error": row.get("last_error"), "next_attempt_at": row.get("next_attempt_at"),
            "finished_at": row.get("finished_at")}


def _job(row) -> dict:
    """A row as the job dict of the API (progress fields flattened)."""
    progress = json.loads(row["progress"]) if row["progress"] else {}
    return {
        "id": row["id"],
        "seq": row["seq"],
        "owner": row["owner"],
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
        "output_deleted_at": row["output_deleted_at"],
        "webhook": json.loads(row["webhook"]) if row["webhook"] else None,
        "request": json.loads(row["request"]),
        "lease_owner": row["lease_owner"],
    }


_URL = re.compile(r"^(postgres|postgresql)(\+psycopg)?://", re.I)


def is_postgres_url(db: str) -> bool:
    return bool(_URL.match(db or ""))


def open_store(db: str | Path, *, max_attempts: int = 3) -> JobStore:
    """``postgresql://user:pass@host/db`` -> Postgres; ``sqlite:///path`` or a path -> SQLite."""
    text = str(db)
    if is_postgres_url(text):
        from .store_postgres import PostgresJobStore

        return PostgresJobStore(text, max_attempts=max_attempts)
    from .store_sqlite import SqliteJobStore

    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///"):]       # sqlite:////abs/path or sqlite:///relative
    return SqliteJobStore(text, max_attempts=max_attempts)
