"""Prometheus metrics through ``prometheus_client`` in multiprocess mode.

Every service process of a machine (the API and each ``multitalk worker``) writes its counters and
histograms into one folder (``PROMETHEUS_MULTIPROC_DIR``, else ``MULTITALK_METRICS_DIR``, else
``data_dir/metrics``); ``/metrics`` adds them up across processes, so the API shows the durations
of jobs that ran in separate worker processes. Counters are totals since the folder was created
(they include processes that have exited; Prometheus handles restarts of a counter).

Queue depth, jobs by status and readiness are read at scrape time (from the store, which every
machine shares, and from this process).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_ENV = "PROMETHEUS_MULTIPROC_DIR"
_metrics: "Metrics | None" = None


def multiprocess_dir(default: Path) -> Path:
    """Switch this process to multiprocess mode (once; the first folder stays) and return the
    folder. ``PROMETHEUS_MULTIPROC_DIR`` wins over ``default``."""
    if _ENV not in os.environ:
        os.environ[_ENV] = str(default)
    path = Path(os.environ[_ENV])
    path.mkdir(parents=True, exist_ok=True)
    if values.ValueClass is values.MutexValue:
        # prometheus_client picks its value class when it is imported; a process that imported
        # it before the variable was set switches here, before any metric of ours exists
        values.ValueClass = values.MultiProcessValue()
    return path


class Metrics:
    """The metrics of this process (one instance per process: see :func:`process_metrics`)."""

    def __init__(self):
        # not registered anywhere: in multiprocess mode the values live in the folder's files
        self.step_seconds = Histogram("multitalk_step_duration_seconds",
                                      "Duration of one sampling step.", buckets=STEP_BUCKETS,
                                      registry=None)
        self.job_seconds = Histogram("multitalk_job_duration_seconds",
                                     "Wall time of a job attempt from lease to finish.",
                                     ["status"], buckets=JOB_BUCKETS, registry=None)
        self.jobs_finished = Counter("multitalk_jobs_finished",
                                     "Jobs finished by workers, by status.", ["status"],
                                     registry=None)
        self.upload_failures = Counter("multitalk_output_upload_failures",
                                       "Output uploads that failed after all retries.",
                                       registry=None)
        self.webhook_attempts = Counter("multitalk_webhook_attempts",
                                        "Webhook delivery attempts, by outcome (delivered, "
                                        "retry, failed).", ["outcome"], registry=None)
        self.webhook_failures = Counter("multitalk_webhook_failures",
                                        "Webhooks given up after every retry.", registry=None)


def process_metrics(folder: Path) -> Metrics:
    """This process's metrics, writing into ``folder`` (multiprocess mode)."""
    global _metrics
    if _metrics is None:
        multiprocess_dir(folder)
        _metrics = Metrics()
    return _metrics


class _Scrape:
    """Gauges read at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]], ready: Callable[[], bool]):
        self.counts, self.ready = counts, ready

    def collect(self):
        counts = self.counts()
        depth = GaugeMetricFamily("multitalk_queue_depth", "Jobs waiting for a worker.")
        depth.add_metric([], counts.get("queued", 0))
        jobs = GaugeMetricFamily("multitalk_jobs", "Jobs in the store, by status.",
                                 labels=["status"])
        for status, n in sorted(counts.items()):
            jobs.add_metric([status], n)
        ready = GaugeMetricFamily("multitalk_ready", "1 when the models are loaded.")
        ready.add_metric([], int(self.ready()))
        return [depth, jobs, ready]


def render(counts: Callable[[], dict[str, int]], ready: Callable[[], bool]) -> bytes:
    """The exposition text: every process's counters and histograms plus the scrape gauges."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=os.environ[_ENV])
    registry.register(_Scrape(counts, ready))
    return generate_latest(registry)
