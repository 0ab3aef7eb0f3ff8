"""The worker: lease a job, fetch its inputs, run it, store the video, report, notify.

One :class:`Worker` runs one job at a time. While a job runs, a heartbeat thread renews the lease;
``should_cancel`` (checked by the runner every step) is true once cancellation was requested
through the store or the lease was lost. Failures become job errors with a code:
``bad_input`` (UserInputError), ``out_of_memory`` (torch.OutOfMemoryError), ``storage_error``
(inputs unreadable or output upload failed after retries; the local output is kept),
``internal_error`` (anything else). The worker itself keeps serving after every failure.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

from multitalk.errors import ParallelError, UserInputError

from .config import ServiceConfig
from .metrics import Metrics
from .runner import JobCancelled, Runner
from .schemas import job_document
from .storage import Storage, StorageError
from .store import JobStore
from .webhooks import deliver

log = logging.getLogger(__name__)

TERMINAL_STATUSES = ("failed", "cancelled")
OOM_HINT = ("the GPU ran out of memory: use size multitalk-480, a smaller frame_num, or start the "
            "server with offloading/fp8; retry when no other job shares the GPU")


class _Lost(Exception):
    """The lease was taken over by another worker."""


class Worker:
    """Runs queued jobs from ``store`` with ``runner`` until stopped."""

    def __init__(self, store: JobStore, storage: Storage, runner: Runner, config: ServiceConfig,
                 *, metrics: Metrics | None = None, worker_id: str | None = None):
        self.store, self.storage, self.runner, self.config = store, storage, runner, config
        self.metrics = metrics or Metrics()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.ready = threading.Event()
        self.load_error: str | None = None
        # a multi-GPU runner whose process group broke (a GPU process died): this worker stops and
        # must be restarted; the job it ran was given back to the queue
        self.fatal: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        """Load the runner's models; ``ready`` is set afterwards."""
        t0 = time.monotonic()
        try:
            self.runner.load()
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            raise
        log.info("worker %s ready (models loaded in %.1fs)", self.worker_id, time.monotonic() - t0)
        self.ready.set()

    def serve_forever(self, stop: threading.Event, *, max_jobs: int | None = None) -> int:
        """Load (if needed), then process jobs until ``stop`` is set; returns jobs processed."""
        if not self.ready.is_set():
            self.load()
        done = 0
        while not stop.is_set() and self.fatal is None and (max_jobs is None or done < max_jobs):
            try:
                worked = self.run_once()
            except Exception:  # noqa: BLE001 - e.g. database busy: log, back off, go on
                log.exception("worker %s: loop error", self.worker_id)
                worked = False
            if worked:
                done += 1
            else:
                stop.wait(self.config.poll_interval_s)
        return done

    def run_once(self) -> bool:
        """Reap expired leases, then lease and process one job; False when the queue is empty."""
        for job_id in self.store.reap_expired():
            log.warning("job %s: lease expired, finished as %s", job_id,
                        (self.store.get(job_id) or {}).get("status"))
            self.notify(job_id)
        job = self.store.lease_next(self.worker_id, self.config.lease_s)
        if job is None:
            return False
        self.process(job)
        return True

    # -- one job -----------------------------------------------------------------------------
    def process(self, job: dict) -> None:
        job_id = job["id"]
        log.info("job %s: attempt %d on %s", job_id, job["attempts"], self.worker_id)
        t0 = time.monotonic()
        workdir = self.config.work_dir / job_id / f"attempt-{job['attempts']}"
        workdir.mkdir(parents=True, exist_ok=True)
        lost = threading.Event()
        finished = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job_id, lost, finished),
                                name=f"heartbeat-{job_id[:8]}", daemon=True)
        beat.start()

        def should_cancel() -> bool:
            return lost.is_set() or self.store.cancel_requested(job_id)

        status, result, error, keep = "failed", None, None, False
        try:
            request = self._localise(job["request"], workdir / "inputs")
            request["job_id"] = job_id
            out = self.runner.run(request, workdir, self._progress_fn(job_id, lost),
                                  should_cancel)
            if lost.is_set():
                raise _Lost()
            result = self._store_output(job, out)
            status = "succeeded"
        except _Lost:
            status = None
        except ParallelError as e:  # a GPU process of this worker died: not the job's fault
            status, error = None, e
        except Exception as e:  # noqa: BLE001 - every failure becomes a job error
            if lost.is_set():
                status = None
            elif isinstance(e, JobCancelled) or self.store.cancel_requested(job_id):
                status = "cancelled"
            else:
                error = self._error(job_id, e)
                keep = error["code"] == "storage_error"
        finally:
            finished.set()
            beat.join(timeout=5)
        if isinstance(error, ParallelError):
            self._give_back(job_id, error)
            return
        if error is not None and error["code"] == "out_of_memory":
            _free_accelerator_memory()      # after the except block: the traceback's tensors are gone

        elapsed = time.monotonic() - t0
        if status is None or not self.store.complete(job_id, self.worker_id, status,
                                                    result=result, error=error):
            log.warning("job %s: lease lost to another worker; result of this attempt dropped",
                        job_id)
            return
        log.info("job %s: %s in %.1fs", job_id, status, elapsed)
        self.metrics.job_seconds.observe(elapsed, status=status)
        self.metrics.jobs_finished.inc(status=status)
        if not keep and not self.config.keep_workdirs:
            shutil.rmtree(self.config.work_dir / job_id, ignore_errors=True)
        self.notify(job_id)

    def _give_back(self, job_id: str, e: ParallelError) -> None:
        """The job's attempt ended because the worker's process group broke: queue it again (or fail
        it after ``max_attempts``) with the reason, and stop this worker (its GPUs need a restart)."""
        error = {"code": "worker_lost", "message": f"a GPU process of worker {self.worker_id} failed: {e}",
                 "hint": "the worker stops and must be restarted; the job is retried on the next lease"}
        status = self.store.release(job_id, self.worker_id, error)
        self.fatal = str(e)
        log.error("job %s: %s; job %s, worker stopping for a restart", job_id, e, status or "lease already lost")
        if status in TERMINAL_STATUSES:
            self.metrics.jobs_finished.inc(status=status)
            self.notify(job_id)

    def _localise(self, request: dict, inputs: Path) -> dict:
        """The request with every input URI replaced by a fetched local path."""
        req = {k: (dict(v) if isinstance(v, dict) else v) for k, v in request.items()}
        req["cond_image"] = str(self.storage.fetch("cond_image", req["cond_image"], inputs))
        for person, uri in list(req["cond_audio"].items()):
            if uri is not None:
                req["cond_audio"][person] = str(
                    self.storage.fetch(f"cond_audio.{person}", uri, inputs))
        return req

    def _store_output(self, job: dict, out: dict) -> dict:
        video = Path(out["video_path"])
        if not video.is_file():
            raise RuntimeError(f"runner reported {video} but wrote no file there")
        uri = self.storage.output_uri(job["request"].get("output"), f"{job['id']}.mp4")
        try:
            self.storage.put_output(video, uri)
        except StorageError as e:
            self.metrics.upload_failures.inc()
            raise StorageError(f"{e}; the video is kept at {video}") from e
        return {"video_uri": uri, "frames": int(out["frames"]),
                "duration_s": float(out["duration_s"]), "width": int(out["width"]),
                "height": int(out["height"]), "seed": int(out["seed"])}

    def _error(self, job_id: str, e: Exception) -> dict:
        if _is_oom(e):
            log.error("job %s: out of memory: %s", job_id, e)
            return {"code": "out_of_memory", "message": str(e).splitlines()[0][:500],
                    "hint": OOM_HINT}
        if isinstance(e, UserInputError):
            return {"code": "bad_input", "message": e.message, "field": e.field, "hint": e.fix}
        if isinstance(e, StorageError):
            log.error("job %s: storage error: %s", job_id, e)
            return {"code": "storage_error", "message": str(e),
                    "hint": "check the storage credentials/endpoint and resubmit"}
        log.error("job %s: internal error\n%s", job_id, traceback.format_exc())
        return {"code": "internal_error", "message": f"{type(e).__name__}: {e}"[:1000]}

    def _heartbeat(self, job_id: str, lost: threading.Event, finished: threading.Event) -> None:
        while not finished.wait(self.config.heartbeat_s):
            try:
                if not self.store.heartbeat(job_id, self.worker_id, self.config.lease_s):
                    log.warning("job %s: lease lost", job_id)
                    lost.set()
                    return
            except Exception:  # noqa: BLE001 - a busy database must not kill the heartbeat
                log.exception("job %s: heartbeat failed", job_id)

    def _progress_fn(self, job_id: str, lost: threading.Event):
        t0 = time.monotonic()
        last = {"step": None, "t": t0}
        p: dict = {"stage": None, "progress": 0.0, "clip": None, "step": None}

        def progress(update: dict) -> None:
            """Merge a runner update (keys it leaves out keep their last value) and store it."""
            now = time.monotonic()
            if "stage" in update:
                p["stage"] = update["stage"]
            if "progress" in update:
                p["progress"] = min(1.0, max(0.0, float(update["progress"])))
            for key in ("clip", "step"):
                if key in update:
                    p[key] = _fraction(update[key])
            p["eta_s"] = update.get("eta_s")
            if p["eta_s"] is None and p["progress"] > 0:
                p["eta_s"] = round((now - t0) / p["progress"] * (1 - p["progress"]), 1)
            ident = (p["clip"] and p["clip"]["i"], p["step"] and p["step"]["i"])
            if p["step"] is not None and ident != last["step"]:
                if last["step"] is not None and last["step"][0] == ident[0]:
                    self.metrics.step_seconds.observe(now - last["t"])
                last.update(step=ident, t=now)
            if not self.store.update_progress(job_id, self.worker_id, p):
                lost.set()

        return progress

    # -- notifications -----------------------------------------------------------------------
    def notify(self, job_id: str) -> None:
        """Send the job's webhook (if any) and record the outcome on the job."""
        send_webhook(self.store, self.storage, self.config, job_id, self.metrics)


def send_webhook(store: JobStore, storage: Storage, config: ServiceConfig, job_id: str,
                 metrics: Metrics | None = None) -> None:
    job = store.get(job_id)
    url = job and job["request"].get("webhook_url")
    if not url:
        return
    payload = job_document(job, download_url(storage, config, job))
    record = deliver(url, payload, secret=config.webhook_secret, retries=config.webhook_retries,
                     backoff_s=config.webhook_backoff_s, timeout_s=config.webhook_timeout_s,
                     allow_private=config.allow_private_urls)
    if not record["delivered"] and metrics is not None:
        metrics.webhook_failures.inc()
    store.set_webhook(job_id, record)


def download_url(storage: Storage, config: ServiceConfig, job: dict,
                 base_url: str | None = None) -> str | None:
    """Presigned URL for s3 outputs, else the service's ``/v1/jobs/{id}/video`` route."""
    result = job.get("result")
    if not result:
        return None
    try:
        signed = storage.presign(result["video_uri"])
    except Exception as e:  # noqa: BLE001 - storage down: no link rather than no job
        log.warning("cannot presign %s: %s", result["video_uri"], e)
        return None
    if signed:
        return signed
    base = (base_url or config.public_url or "").rstrip("/")
    return f"{base}/v1/jobs/{job['id']}/video"


def _fraction(value) -> dict | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return {"i": int(value["i"]), "n": int(value["n"])}
    i, n = value
    return {"i": int(i), "n": int(n)}


def _is_oom(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def _free_accelerator_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
