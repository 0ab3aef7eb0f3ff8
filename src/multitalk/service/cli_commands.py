"""Plain functions behind ``multitalk serve`` and ``multitalk worker`` (the typer CLI wires them).

``serve`` runs the API and, by default, one in-process worker thread; ``worker`` runs a worker
process against the same job store (the SQLite file of the same ``data_dir``, or the same
``--db postgresql://...`` from any machine), as many as the GPUs allow. Every process also runs
a webhook dispatcher (the store's outbox) and, when retention is set, a retention sweeper.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from multitalk.errors import MultiTalkError, UserInputError
from multitalk.hosts import is_loopback

from .api import create_app
from .config import ServiceConfig
from .metrics import process_metrics
from .retention import RetentionSweeper
from .runner import RunnerFactory, resolve_runner_factory
from .storage import Storage
from .store import JobStore, open_store
from .webhook_delivery import WebhookDispatcher
from .worker import Worker

log = logging.getLogger(__name__)

DEFAULT_RUNNER = "multitalk.pipeline.runner:PipelineRunner"


class Background:
    """The threads every service process runs beside its main job: webhook dispatcher and
    retention sweeper."""

    def __init__(self, store: JobStore, storage: Storage, config: ServiceConfig, metrics):
        self.dispatcher = WebhookDispatcher(store, storage, config, metrics=metrics)
        self.sweeper = RetentionSweeper(store, storage, config)

    def start(self) -> None:
        self.dispatcher.start()
        self.sweeper.start()

    def stop(self, timeout: float | None = 10) -> None:
        self.sweeper.stop(timeout)
        self.dispatcher.stop(timeout)


class Service:
    """API app + optional in-process worker thread sharing one store, storage and metrics."""

    def __init__(self, config: ServiceConfig, runner_factory: str | RunnerFactory | None = None,
                 *, runner_options: dict | None = None, in_process_worker: bool = True):
        self.config = config
        self.store = open_store(config.db_url, max_attempts=config.max_attempts)
        self.storage = Storage(config)
        self.metrics = process_metrics(config.metrics_path)
        self.background = Background(self.store, self.storage, config, self.metrics)
        self.worker: Worker | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if in_process_worker:
            factory = resolve_runner_factory(runner_factory or DEFAULT_RUNNER)
            runner = factory(**(runner_options or {}))
            self.worker = Worker(self.store, self.storage, runner, config, metrics=self.metrics,
                                 on_finished=lambda _id: self.background.dispatcher.notify())
        ready = self.worker.ready.is_set if self.worker is not None else None
        check_lora = getattr(self.worker.runner, "check_lora", None) if self.worker is not None else None
        self.app = create_app(config, store=self.store, storage=self.storage, ready=ready, check_lora=check_lora)
        log.info("job store: %s", self.store.describe())
        self.background.start()

    def start_worker(self) -> None:
        """Load the models and serve jobs in a background thread (readyz turns 200 when loaded)."""
        if self.worker is None or self._thread is not None:
            return

        def loop():
            try:
                self.worker.serve_forever(self._stop)
            except Exception:  # noqa: BLE001 - model loading failed: stay up, never ready
                log.exception("in-process worker stopped")

        self._thread = threading.Thread(target=loop, name="multitalk-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.background.stop(timeout)


def _config(data_dir, config: ServiceConfig | None, overrides: dict) -> ServiceConfig:
    if config is not None:
        return config.with_overrides(**overrides)
    return ServiceConfig.from_env(data_dir=Path(data_dir) if data_dir else None, **overrides)


def serve(host: str = "127.0.0.1", port: int = 8000, data_dir: str | Path | None = None,
          runner_factory: str | RunnerFactory | None = None, *, runner_options: dict | None = None,
          in_process_worker: bool = True, config: ServiceConfig | None = None,
          log_level: str = "info", **overrides) -> None:
    """Run the HTTP API (uvicorn) with one in-process worker until interrupted."""
    import uvicorn

    cfg = _config(data_dir, config, overrides)
    if not cfg.authenticated:
        if not is_loopback(host):
            raise UserInputError("host", f"refusing to listen on {host} without authentication",
                                 "set MULTITALK_API_TOKENS=name:token,... or use --host 127.0.0.1")
        log.warning("no API tokens configured: serving UNAUTHENTICATED on %s:%d", host, port)
    service = Service(cfg, runner_factory, runner_options=runner_options,
                      in_process_worker=in_process_worker)
    service.start_worker()
    try:
        uvicorn.run(service.app, host=host, port=port, log_level=log_level)
    finally:
        service.stop(timeout=30)


def worker(data_dir: str | Path | None = None,
           runner_factory: str | RunnerFactory | None = None, *,
           runner_options: dict | None = None, config: ServiceConfig | None = None,
           max_jobs: int | None = None, stop: threading.Event | None = None,
           **overrides) -> int:
    """Run one worker process against the job store until SIGTERM/SIGINT; returns jobs processed.

    SIGTERM lets the current job finish (its lease keeps being renewed), then exits.
    """
    cfg = _config(data_dir, config, overrides)
    store = open_store(cfg.db_url, max_attempts=cfg.max_attempts)
    storage = Storage(cfg)
    metrics = process_metrics(cfg.metrics_path)
    background = Background(store, storage, cfg, metrics)
    runner = resolve_runner_factory(runner_factory or DEFAULT_RUNNER)(**(runner_options or {}))
    w = Worker(store, storage, runner, cfg, metrics=metrics,
               on_finished=lambda _id: background.dispatcher.notify())
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    log.info("worker %s serving %s", w.worker_id, store.describe())
    background.start()
    try:
        done = w.serve_forever(stop, max_jobs=max_jobs)
    finally:
        background.stop(timeout=10)
        close = getattr(runner, "close", None)
        if close is not None:
            close()
    if w.fatal is not None:
        raise WorkerStopped(f"worker stopped after {done} jobs: {w.fatal}; restart it (its job was put back "
                            "in the queue)")
    return done


class WorkerStopped(MultiTalkError):
    """The worker cannot go on (a GPU process of a multi-GPU worker died); a restart is needed."""
