"""Retention: uploads, job outputs and finished job rows are deleted after N days.

Three settings, in days (0 keeps forever): ``upload_retention_days`` (files sent to
``/v1/files``; an upload that a queued or running job still names is kept),
``output_retention_days`` (each finished job's video, local or s3; the job stays, its result shows
``output_deleted_at`` and ``/video`` answers 410) and ``job_retention_days`` (terminal job rows,
with their outbox rows and, if still there, their output). Queued and running jobs are never
touched. :class:`RetentionSweeper` runs :func:`sweep` every ``retention_interval_s`` in each
service process; every step is idempotent, so several processes may sweep the same store.
"""

from __future__ import annotations

import logging
import threading
import time

from .config import ServiceConfig
from .storage import Storage
from .store import JobStore

log = logging.getLogger(__name__)

DAY_S = 86400.0


def sweep(store: JobStore, storage: Storage, config: ServiceConfig,
          now: float | None = None) -> dict[str, int]:
    """Delete what is past its retention; returns how many uploads, outputs and jobs went."""
    now = time.time() if now is None else now
    done = {"uploads": 0, "outputs": 0, "jobs": 0}
    if config.output_retention_days > 0:
        for job in store.finished_before(now - config.output_retention_days * DAY_S,
                                         outputs_only=True):
            if _delete_output(storage, job):
                store.mark_output_deleted(job["id"])
                done["outputs"] += 1
    if config.job_retention_days > 0:
        gone = []
        for job in store.finished_before(now - config.job_retention_days * DAY_S):
            if job["result"] and not job["output_deleted_at"]:
                if not _delete_output(storage, job):
                    continue                   # keep the row: it names what is still stored
                done["outputs"] += 1
            gone.append(job["id"])
        done["jobs"] = store.delete_jobs(gone)
    if config.upload_retention_days > 0:
        for upload in store.uploads_before(now - config.upload_retention_days * DAY_S):
            if store.upload_in_use(upload["id"]):
                continue
            (config.uploads_dir / upload["id"]).unlink(missing_ok=True)
            store.delete_upload(upload["id"])
            done["uploads"] += 1
    if any(done.values()):
        log.info("retention: deleted %(uploads)d uploads, %(outputs)d outputs, %(jobs)d jobs",
                 done)
    return done


def _delete_output(storage: Storage, job: dict) -> bool:
    """Delete a job's video (local or s3); False when it could not be deleted now."""
    uri = job["result"]["video_uri"]
    try:
        if uri.startswith("s3://"):
            fs = storage.s3()
            if fs.exists(uri[len("s3://"):]):
                fs.rm(uri[len("s3://"):])
        else:
            path = storage.local_file(uri)
            if path is not None:
                path.unlink(missing_ok=True)
        return True
    except Exception as e:  # noqa: BLE001 - a store that is down now is retried next sweep
        log.warning("retention: cannot delete %s of job %s: %s", uri, job["id"], e)
        return False


class RetentionSweeper:
    """Runs :func:`sweep` in a thread every ``retention_interval_s`` (when any retention is set)."""

    def __init__(self, store: JobStore, storage: Storage, config: ServiceConfig):
        self.store, self.storage, self.config = store, storage, config
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        c = self.config
        return any(d > 0 for d in (c.upload_retention_days, c.output_retention_days,
                                   c.job_retention_days))

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="multitalk-retention",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.config.retention_interval_s):
            try:
                sweep(self.store, self.storage, self.config)
            except Exception as e:  # noqa: BLE001 - next time
                log.warning("retention sweep failed: %s", e)
