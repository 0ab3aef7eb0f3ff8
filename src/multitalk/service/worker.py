"""The worker: lease a job, fetch its inputs, run it, store the video, report, notify.

One :class:`Worker` runs one job at a time. While a job runs, a heartbeat thread renews the lease;
``should_cancel`` (checked by the runner every step) is true once cancellation was requested
through the store or the lease was lost. Failures become job errors with a code:
``bad_input`` (UserInputError), ``out_of_memory`` (torch.OutOfMemoryError, MemoryPlanError), ``storage_error``
(inputs unreadable or output upload failed after retries; the local output is kept),
``timeout`` (the attempt ran past ``job_deadline_s``: the runner stops at its next step through
``should_cancel``, like a cancel), ``internal_error`` (anything else). The worker itself keeps
serving after every failure.

The worker never talks to webhook receivers: finishing a job queues its notification in the store
(outbox) and ``on_finished`` wakes the process's webhook dispatcher. A database that goes away
mid-job (a Postgres restart) does not fail the job: progress and cancellation checks are skipped
while it is unreachable and the final status is written once it is back.
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
from typing import Callable

import tenacity

from multitalk.errors import JobCancelled, MemoryPlanError, ParallelError, UserInputError

from .bounds import check_audio
from .config import ServiceConfig
from .lora_cache import LoraCache
from .metrics import Metrics, process_metrics
from .runner import Runner
from .storage import Storage, StorageError
from .store import JobStore, StoreUnavailable

log = logging.getLogger(__name__)

STORE_OUTAGE_S = 300.0      # how long a finished job waits for an unreachable store

OOM_HINT = ("the GPU ran out of memory: use size multitalk-480, a smaller frame_num, or start the "
            "server with offloading/fp8; retry when no other job shares the GPU")


class _Lost(Exception):
    """The lease was taken over by another worker."""


class _Deadline:
    """``job_deadline_s`` of one attempt: ``passed()`` turns true (and stays) once it is over."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.hit = False

    def passed(self) -> bool:
        self.hit = self.hit or time.monotonic() > self.at
        return self.hit

    def error(self) -> dict:
        return {"code": "timeout",
                "message": f"the job ran longer than this server's limit of {self.seconds:g} s "
                           "(MULTITALK_JOB_DEADLINE_S) and was stopped",
                "hint": "ask for fewer frames or steps or a smaller size, or split the audio"}


class Worker:
    """Runs queued jobs from ``store`` with ``runner`` until stopped."""

    def __init__(self, store: JobStore, storage: Storage, runner: Runner, config: ServiceConfig,
                 *, metrics: Metrics | None = None, worker_id: str | None = None,
                 on_finished: Callable[[str], None] | None = None):
        self.store, self.storage, self.runner, self.config = store, storage, runner, config
        self.metrics = metrics or process_metrics(config.metrics_path)
        self.on_finished = on_finished
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.lora_cache = LoraCache(storage, Path(config.data_dir) / "loras", config.max_lora_bytes)
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
        done, outage = 0, False
        while not stop.is_set() and self.fatal is None and (max_jobs is None or done < max_jobs):
            try:
                worked = self.run_once()
                if outage:
                    log.info("worker %s: job store reachable again", self.worker_id)
                    outage = False
            except StoreUnavailable as e:   # e.g. Postgres restarting: back off, go on
                if not outage:              # once per outage, not once per poll
                    log.warning("worker %s: job store unavailable (retrying): %s",
                                self.worker_id, e)
                outage, worked = True, False
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

        deadline = _Deadline(self.config.job_deadline_s)

        def should_cancel() -> bool:
            return (lost.is_set() or deadline.passed()
                    or self._cancel_requested(job_id))

        status, result, error, keep = "failed", None, None, False
        try:
            request = self._localise(job["request"], workdir / "inputs")
            request["job_id"] = job_id
            if deadline.passed():                    # the downloads took the whole budget
                raise JobCancelled("deadline")
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
            elif deadline.hit:
                error = deadline.error()
            elif isinstance(e, JobCancelled) or self._cancel_requested(job_id):
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
        if error is not None and error["code"] in ("out_of_memory", "timeout"):
            _free_accelerator_memory()      # after the except block: the traceback's tensors are gone

        elapsed = time.monotonic() - t0
        if status is None or not self._complete(job_id, status, result, error):
            log.warning("job %s: lease lost to another worker; result of this attempt dropped",
                        job_id)
            return
        log.info("job %s: %s in %.1fs", job_id, status, elapsed)
        self.metrics.job_seconds.labels(status=status).observe(elapsed)
        self.metrics.jobs_finished.labels(status=status).inc()
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
        if status in ("failed", "cancelled"):
            self.metrics.jobs_finished.labels(status=status).inc()
            self.notify(job_id)

    def _localise(self, request: dict, inputs: Path) -> dict:
        """The request with every input URI replaced by a fetched local path."""
        req = {k: (dict(v) if isinstance(v, dict) else v) for k, v in request.items()}
        req["cond_image"] = str(self.storage.fetch("cond_image", req["cond_image"], inputs))
        for person, uri in list((req.get("cond_audio") or {}).items()):
            if uri is not None:
                req["cond_audio"][person] = str(
                    self.storage.fetch(f"cond_audio.{person}", uri, inputs))
        # tts_audio jobs have no speech files yet (the runner speaks them; text <= 5000 characters)
        check_audio({f"cond_audio.{p}": Path(v) for p, v in (req.get("cond_audio") or {}).items() if v},
                    req.get("audio_type"), self.config)
        params = req.get("params")
        if isinstance(params, dict) and params.get("loras"):
            loras, hashes = [], []
            for i, item in enumerate(params["loras"]):
                path, digest = self.lora_cache.get(f"params.loras.{i}.uri", item["uri"])
                loras.append({**item, "uri": str(path)})
                hashes.append(digest)
            req["params"] = {**params, "loras": loras}
            req["lora_sha256"] = hashes   # the runner need not hash the files again
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
        if isinstance(e, MemoryPlanError):  # the memory plan cannot fit the job, or it ran out mid-run
            log.error("job %s: out of memory: %s", job_id, e)
            return {"code": "out_of_memory", "message": str(e)[:1000], "hint": f"try {e.fix}"}
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

    def _cancel_requested(self, job_id: str) -> bool:
        try:
            return self.store.cancel_requested(job_id)
        except StoreUnavailable:        # cannot tell now: go on, ask again at the next step
            return False

    def _complete(self, job_id: str, status: str, result: dict | None,
                  error: dict | None) -> bool:
        """Write the final status, waiting (up to ``STORE_OUTAGE_S``) for an unreachable store."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(StoreUnavailable),
            wait=tenacity.wait_exponential_jitter(initial=0.2, max=5.0),
            stop=tenacity.stop_after_delay(STORE_OUTAGE_S), reraise=True,
            before_sleep=lambda s: log.warning("job %s: store unavailable, final status %s "
                                               "pending: %s", job_id, status,
                                               s.outcome.exception()))
        return retrying(self.store.complete, job_id, self.worker_id, status, result=result,
                        error=error)

    def _heartbeat(self, job_id: str, lost: threading.Event, finished: threading.Event) -> None:
        while not finished.wait(self.config.heartbeat_s):
            try:
                if not self.store.heartbeat(job_id, self.worker_id, self.config.lease_s):
                    log.warning("job %s: lease lost", job_id)
                    lost.set()
                    return
            except StoreUnavailable as e:
                log.warning("job %s: heartbeat failed: %s", job_id, e)
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
            try:
                if not self.store.update_progress(job_id, self.worker_id, p):
                    lost.set()
            except StoreUnavailable as e:   # progress is advisory: the job goes on
                log.warning("job %s: progress not stored: %s", job_id, e)

        return progress

    # -- notifications -----------------------------------------------------------------------
    def notify(self, job_id: str) -> None:
        """The job ended: its webhook (if any) is in the outbox; wake the dispatcher."""
        if self.on_finished is not None:
            self.on_finished(job_id)


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
