"""Prometheus text exposition without a client library.

Queue depth and jobs by status come from the store at scrape time (true across processes);
durations and counters are those observed by this process's workers.
"""

from __future__ import annotations

import threading

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, buckets
        self._lock = threading.Lock()
        self._series: dict[tuple, list] = {}   # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            s = self._series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    s[i] += 1
            s[-2] += value
            s[-1] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for key, s in sorted(self._series.items()):
                for i, b in enumerate(self.buckets):
                    lines.append(f"{self.name}_bucket{_labels(key, le=_num(b))} {s[i]}")
                lines.append(f"{self.name}_bucket{_labels(key, le='+Inf')} {s[-1]}")
                lines.append(f"{self.name}_sum{_labels(key)} {s[-2]:.6f}")
                lines.append(f"{self.name}_count{_labels(key)} {s[-1]}")
        return lines


class Counter:
    def __init__(self, name: str, help_: str):
        self.name, self.help = name, help_
        self._lock = threading.Lock()
        self._values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            lines += [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self._values.items())]
        return lines


class Metrics:
    """All metrics of one service process."""

    def __init__(self):
        self.step_seconds = Histogram("multitalk_step_duration_seconds",
                                      "Duration of one sampling step.", STEP_BUCKETS)
        self.job_seconds = Histogram("multitalk_job_duration_seconds",
                                     "Wall time of a job attempt from lease to finish.",
                                     JOB_BUCKETS)
        self.jobs_finished = Counter("multitalk_jobs_finished_total",
                                     "Jobs finished by this process's workers, by status.")
        self.upload_failures = Counter("multitalk_output_upload_failures_total",
                                       "Output uploads that failed after all retries.")
        self.webhook_failures = Counter("multitalk_webhook_failures_total",
                                        "Webhooks that could not be delivered.")

    def render(self, counts: dict[str, int], *, ready: bool) -> str:
        lines = ["# HELP multitalk_queue_depth Jobs waiting for a worker.",
                 "# TYPE multitalk_queue_depth gauge",
                 f"multitalk_queue_depth {counts.get('queued', 0)}",
                 "# HELP multitalk_jobs Jobs in the store, by status.",
                 "# TYPE multitalk_jobs gauge"]
        lines += [f'multitalk_jobs{{status="{s}"}} {n}' for s, n in sorted(counts.items())]
        lines += ["# HELP multitalk_ready 1 when the models are loaded.",
                  "# TYPE multitalk_ready gauge", f"multitalk_ready {int(ready)}"]
        for m in (self.step_seconds, self.job_seconds, self.jobs_finished, self.upload_failures,
                  self.webhook_failures):
            lines += m.render()
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _labels(key: tuple, **extra) -> str:
    items = list(key) + list(extra.items())
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in items) + "}"
