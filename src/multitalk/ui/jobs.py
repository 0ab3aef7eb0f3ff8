"""Jobs of the web page: what the page shows (:class:`JobView`) and the local backend that runs them
with the pipeline in this process (:class:`LocalJobs`). ``api_client.ApiJobs`` is the same interface
over the HTTP API of ``multitalk serve``.

``LocalJobs`` loads the engine once (in the background, at start), runs one job at a time in a
worker thread and keeps each job's record and video under ``<data_dir>/jobs/<id>/`` so the
history survives a restart (a job that was running when the page stopped is marked failed).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from multitalk.errors import JobCancelled, UserInputError

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class JobView:
    """One job as the page shows it (the same for both backends)."""

    id: str
    status: str                          # queued, running, succeeded, failed, cancelled
    created_at: float
    prompt: str = ""
    stage: str | None = None             # conditioning, sampling, decoding, done
    progress: float = 0.0                # 0..1
    clip: list[int] | None = None        # [i, n]
    step: list[int] | None = None        # [i, n]
    eta_s: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None             # one line, the CLI's wording: "field: message (fix)"
    frames: int | None = None
    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    speakers: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def error_line(field_name: str | None, message: str, fix: str | None = None) -> str:
    """The one-line wording of :class:`UserInputError` (``field: message (fix)``)."""
    return str(UserInputError(field_name, message, fix)) if field_name else (
        f"{message} ({fix})" if fix else message)


class LocalJobs:
    """Runs jobs with the pipeline in this process, one at a time, in submission order."""

    kind = "local"

    def __init__(self, engine_config, data_dir: str | Path, preload: bool = True):
        self.config = engine_config
        self.jobs_dir = Path(data_dir) / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, JobView] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._cancel: set[str] = set()
        self.engine = None
        self.load_error: str | None = None
        self._loaded = threading.Event()
        self._load_history()
        self._thread = threading.Thread(target=self._serve, name="multitalk-ui-worker", daemon=True)
        if preload:
            self._thread.start()

    # -- the page's interface ------------------------------------------------------------------
    def describe(self) -> str:
        c = self.config
        weights = f"{c.preset} preset" if c.preset else str(c.ckpt_dir)
        return f"local engine ({weights}, device {c.device})"

    def status(self) -> str:
        if self.load_error:
            return f"the models failed to load: {self.load_error}"
        return "ready" if self._loaded.is_set() else "loading the models ..."

    def submit(self, spec, params) -> str:
        """Validate and decode the inputs (bad input raises here, before queueing), then queue."""
        from multitalk.pipeline.generate import prepare_media

        if self.load_error:
            raise UserInputError("models", f"the models failed to load: {self.load_error}",
                                 "check the weight folders and restart the page")
        media = prepare_media(spec, params)
        job = JobView(id=uuid.uuid4().hex[:12], status="queued", created_at=time.time(), prompt=spec.prompt,
                      speakers=spec.num_speakers,
                      extra={"loras": [Path(lora.uri).name for lora in params.loras],
                             "request": {"spec": spec.model_dump(mode="json"),
                                         "params": params.model_dump(mode="json")}})
        with self._lock:
            self._jobs[job.id] = job
        self._save(job)
        if not self._thread.is_alive():
            self._thread.start()
        self._queue.put((job.id, spec, params, media))
        return job.id

    def get(self, job_id: str) -> JobView:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise UserInputError("job", f"no job {job_id}", "pick a job from the history")
            return JobView(**asdict(job))

    def history(self, limit: int = 50) -> list[JobView]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)[:limit]
            return [JobView(**asdict(j)) for j in jobs]

    def cancel(self, job_id: str) -> None:
        self._cancel.add(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.status == "queued":
                job.status, job.finished_at = "cancelled", time.time()
        if job is not None:
            self._save(job)

    def video_path(self, job_id: str) -> Path | None:
        path = self.jobs_dir / job_id / "video.mp4"
        return path if self.get(job_id).status == "succeeded" and path.is_file() else None

    def close(self) -> None:
        self._queue.put(None)

    # -- worker --------------------------------------------------------------------------------
    def _serve(self) -> None:
        from multitalk.pipeline.engine import Engine

        try:
            self.engine = Engine.load(self.config)
        except Exception as exc:  # noqa: BLE001 - shown on the page; jobs are refused
            self.load_error = str(exc) if isinstance(exc, UserInputError) else f"{type(exc).__name__}: {exc}"
            log.error("the models failed to load:\n%s", traceback.format_exc())
            return
        finally:
            self._loaded.set()
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run(*item)

    def _update(self, job_id: str, **changes) -> JobView:
        with self._lock:
            job = self._jobs[job_id]
            for k, v in changes.items():
                setattr(job, k, v)
            return job

    def _run(self, job_id: str, spec, params, media) -> None:
        from multitalk.pipeline.render import render

        if job_id in self._cancel:
            return
        out = self.jobs_dir / job_id / "video.mp4"
        self._save(self._update(job_id, status="running", started_at=time.time(), stage="conditioning"))

        def progress(p) -> None:
            self._update(job_id, stage=p.stage, progress=p.fraction, eta_s=p.eta_s,
                         clip=[p.clip, p.num_clips] if p.num_clips else None,
                         step=[p.step, p.num_steps] if p.num_steps else None)

        try:
            # the job's LoRAs (a fast recipe) or none: the engine reloads its DiT only when the set
            # changes, so a quality job never runs with a LoRA merged by the job before it
            self._update(job_id, stage="loras" if params.loras else "conditioning")
            self.engine.use_loras(tuple((lora.uri, lora.scale) for lora in params.loras))
            result = render(self.engine, spec, params, out, media=media, progress=progress,
                            should_cancel=lambda: job_id in self._cancel)
            job = self._update(job_id, status="succeeded", stage="done", progress=1.0, eta_s=0.0,
                               frames=result.frames, duration_s=result.duration_s, width=result.width,
                               height=result.height, seed=result.seed)
        except JobCancelled:
            job = self._update(job_id, status="cancelled")
        except UserInputError as exc:
            job = self._update(job_id, status="failed", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - one line on the page, the traceback in the log
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            job = self._update(job_id, status="failed", error=f"internal error: {type(exc).__name__}: {exc}")
        job.finished_at = time.time()
        self._save(job)

    # -- records -------------------------------------------------------------------------------
    def _save(self, job: JobView) -> None:
        folder = self.jobs_dir / job.id
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "job.json.tmp"
        tmp.write_text(json.dumps(asdict(job), indent=1))
        tmp.replace(folder / "job.json")

    def _load_history(self) -> None:
        for record in self.jobs_dir.glob("*/job.json"):
            try:
                job = JobView(**json.loads(record.read_text()))
            except (OSError, ValueError, TypeError):
                log.warning("unreadable job record %s skipped", record)
                continue
            if not job.finished:   # the page stopped while it was queued or running
                job.status, job.error = "failed", "interrupted: the page was stopped before the job finished"
                job.finished_at = job.finished_at or record.stat().st_mtime
                self._save(job)
            self._jobs[job.id] = job


__all__ = ["FINISHED", "JobView", "LocalJobs", "error_line"]
