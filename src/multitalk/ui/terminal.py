"""Rich progress display for the CLI: one bar for clips, one for the steps of the current clip, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class ProgressView:
    """Context manager; ``update(progress)`` takes a ``pipeline.generate.Progress``."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stage]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False, disable=not enabled)
        self._clips = None
        self._steps = None
        self._clip_seen = 0

    def __enter__(self) -> "ProgressView":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, p) -> None:
        if not self.enabled:
            return
        if p.num_clips and self._clips is None:
            self._clips = self._progress.add_task("clips", total=p.num_clips, stage="")
            self._steps = self._progress.add_task("steps", total=p.num_steps or 1, stage="")
        if self._clips is None:
            return
        if p.clip != self._clip_seen and p.stage == "sampling":
            self._clip_seen = p.clip
            self._progress.reset(self._steps, total=p.num_steps, stage=f"clip {p.clip}/{p.num_clips}")
            self._progress.update(self._clips, completed=p.clip - 1)
        self._progress.update(self._steps, completed=p.step, stage=p.stage)
        if p.stage == "decoding":
            self._progress.update(self._clips, completed=p.clip, stage="decoding")
