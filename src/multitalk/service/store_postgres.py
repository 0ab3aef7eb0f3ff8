"""The job store in Postgres (psycopg 3): one queue shared by API and worker machines.

``multitalk serve --db postgresql://user:pass@host:5432/multitalk`` (or ``MULTITALK_DB``). The
SQL is the store's (``store.py``); what differs is locking: leases pick rows with
``FOR UPDATE SKIP LOCKED`` (concurrent workers never take or wait for the same job), a tenant's
submissions are serialised with a transaction-scoped advisory lock (quota and idempotency), and
the database clock is the clock of every lease (machines' clocks may differ).

Each thread keeps one connection. A connection that broke (the server restarted, the network
dropped) is discarded and the call raises :class:`~multitalk.service.store.StoreUnavailable`;
the next call connects again, so workers ride out a database restart.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row

from .store import JobStore, StoreUnavailable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
    lease_expires_at  DOUBLE PRECISION,
    heartbeat_at      DOUBLE PRECISION,
    created_at        DOUBLE PRECISION NOT NULL,
    started_at        DOUBLE PRECISION,
    finished_at       DOUBLE PRECISION,
    output_deleted_at DOUBLE PRECISION,
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner_seq ON jobs(owner, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at);
CREATE TABLE IF NOT EXISTS uploads (
    id         TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    filename   TEXT,
    size       BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_created ON uploads(created_at);
CREATE TABLE IF NOT EXISTS webhooks (
    id               TEXT PRIMARY KEY,
    job_id           TEXT NOT NULL,
    url              TEXT NOT NULL,
    event            TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  DOUBLE PRECISION,
    lease_owner      TEXT,
    lease_expires_at DOUBLE PRECISION,
    last_status_code INTEGER,
    last_error       TEXT,
    created_at       DOUBLE PRECISION NOT NULL,
    finished_at      DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks(status, next_attempt_at);
CREATE INDEX IF NOT EXISTS webhooks_job ON webhooks(job_id);
"""

# one fixed key: concurrent first starts create the schema one after the other
_SCHEMA_LOCK = 0x6D75_6C74


class _Tx:
    """The connection inside a transaction; ``?`` parameters as in the SQLite store."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def execute(self, sql: str, args=()):
        return self.conn.execute(sql.replace("?", "%s"), args)


class PostgresJobStore(JobStore):
    kind = "postgres"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    lock_row = " FOR UPDATE"

    def __init__(self, url: str, *, max_attempts: int = 3):
        super().__init__(max_attempts=max_attempts)
        self.url = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self._local = threading.local()
        with self._tx() as c:
            c.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            c.conn.execute(_SCHEMA)

    def describe(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"{parts.username + '@' if parts.username else ''}{host}" \
                 f"{':' + str(parts.port) if parts.port else ''}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    # -- connection handling ------------------------------------------------------------------
    def _conn(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken
                                 or getattr(self._local, "pid", None) != os.getpid()):
            _close_quietly(conn)
            conn = None
        if conn is None:
            try:
                conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                       connect_timeout=CONNECT_TIMEOUT_S,
                                       application_name="multitalk")
            except psycopg.OperationalError as e:
                raise StoreUnavailable(f"cannot connect to {self.describe()}: "
                                       f"{_first_line(e)}") from e
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _drop(self, conn: psycopg.Connection) -> None:
        _close_quietly(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    @contextmanager
    def _tx(self):
        conn = self._conn()
        try:
            with conn.transaction():
                yield _Tx(conn)
        except psycopg.OperationalError as e:
            self._drop(conn)
            raise StoreUnavailable(f"{self.describe()}: {_first_line(e)}") from e

    def _read(self, sql: str, args=()) -> list:
        conn = self._conn()
        try:
            return conn.execute(sql.replace("?", "%s"), args).fetchall()
        except psycopg.OperationalError as e:
            self._drop(conn)
            raise StoreUnavailable(f"{self.describe()}: {_first_line(e)}") from e

    def _now(self, c) -> float:
        return float(c.execute("SELECT extract(epoch FROM clock_timestamp()) AS t").fetchone()["t"])

    def _lock_owner(self, c, owner: str) -> None:
        c.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (owner,))

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            _close_quietly(conn)
            self._local.conn = None


def _close_quietly(conn) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is gone anyway
        pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
