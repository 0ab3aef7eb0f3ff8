"""The job store in one SQLite file (WAL): the default, for one machine.

The API and every worker process on the machine open the same file. Writers take the database
lock up front (``BEGIN IMMEDIATE``), so two workers never lease the same job. A file written by an
older version (global idempotency keys, no tenants, no outbox) is upgraded in place on open.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from .store import JobStore

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    owner             TEXT NOT NULL DEFAULT 'default',
    status            TEXT NOT NULL,
    request           TEXT NOT NULL,
    request_hash      TEXT,
    idempotency_key   TEXT,
    progress          TEXT,
    result            TEXT,
    error             TEXT,
    webhook           TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    lease_owner       TEXT,
    lease_expires_at  REAL,
    heartbeat_at      REAL,
    created_at        REAL NOT NULL,
    started_at        REAL,
    finished_at       REAL,
    output_deleted_at REAL,
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner_seq ON jobs(owner, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at);
CREATE TABLE IF NOT EXISTS uploads (
    id         TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    filename   TEXT,
    size       INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_created ON uploads(created_at);
CREATE TABLE IF NOT EXISTS webhooks (
    id               TEXT PRIMARY KEY,
    job_id           TEXT NOT NULL,
    url              TEXT NOT NULL,
    event            TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL,
    lease_owner      TEXT,
    lease_expires_at REAL,
    last_status_code INTEGER,
    last_error       TEXT,
    created_at       REAL NOT NULL,
    finished_at      REAL
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks(status, next_attempt_at);
CREATE INDEX IF NOT EXISTS webhooks_job ON webhooks(job_id);
"""

# version 1 (before tenants): jobs without owner/output_deleted_at, idempotency_key globally unique
_UPGRADE_FROM_1 = """
ALTER TABLE jobs RENAME TO jobs_v1;
DROP INDEX IF EXISTS jobs_status_seq;
""" + _SCHEMA + """
INSERT INTO jobs (seq, id, status, request, request_hash, idempotency_key, progress, result,
                  error, webhook, attempts, cancel_requested, lease_owner, lease_expires_at,
                  heartbeat_at, created_at, started_at, finished_at)
    SELECT seq, id, status, request, request_hash, idempotency_key, progress, result, error,
           webhook, attempts, cancel_requested, lease_owner, lease_expires_at, heartbeat_at,
           created_at, started_at, finished_at FROM jobs_v1;
DROP TABLE jobs_v1;
"""


class _Tx:
    """The connection inside a transaction (execute returns a cursor)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def execute(self, sql: str, args=()):
        return self.conn.execute(sql, args)


class SqliteJobStore(JobStore):
    """Thread-safe (one connection per thread) and multi-process-safe job store."""

    kind = "sqlite"

    def __init__(self, path: str | Path, *, max_attempts: int = 3, busy_timeout_s: float = 30.0):
        super().__init__(max_attempts=max_attempts)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._migrate()

    def describe(self) -> str:
        return f"sqlite:///{self.path}"

    # -- connection handling ------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _tx(self):
        """A write transaction that takes the database lock up front (BEGIN IMMEDIATE)."""
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield _Tx(c)
        except BaseException:
            c.execute("ROLLBACK")
            raise
        else:
            c.execute("COMMIT")

    def _read(self, sql: str, args=()) -> list:
        return self._conn().execute(sql, args).fetchall()

    def _migrate(self) -> None:
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if version < SCHEMA_VERSION:
                if "jobs" in tables and "owner" not in {
                        r[1] for r in c.execute("PRAGMA table_info(jobs)")}:
                    for statement in _statements(_UPGRADE_FROM_1):
                        c.execute(statement)
                else:
                    for statement in _statements(_SCHEMA):
                        c.execute(statement)
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def backup(self, dest: str | Path) -> Path:
        """A consistent copy of the live database at ``dest`` (SQLite's online backup; written
        next to ``dest`` and renamed, so ``dest`` is always a whole database)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.unlink(missing_ok=True)
        out = sqlite3.connect(tmp)
        try:
            self._conn().backup(out)
            out.execute("PRAGMA journal_mode=DELETE")      # one self-contained file
        finally:
            out.close()
        os.replace(tmp, dest)
        return dest


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
