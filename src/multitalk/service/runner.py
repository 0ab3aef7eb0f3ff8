"""The contract between the job service and whatever generates the video.

A runner is loaded once per worker (``load``: readiness) and then runs one request at a time.
``request`` is the submitted job body with every medium already fetched to a local path
(``cond_image``, ``cond_audio.person1/2``) plus ``job_id``. ``progress`` takes
``{stage, progress 0..1, clip: {i, n}, step: {i, n}, eta_s}`` (any subset); ``should_cancel`` is
checked once per sampling step and the runner then raises :class:`multitalk.errors.JobCancelled`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from multitalk.errors import UserInputError

ProgressFn = Callable[[dict], None]
CancelFn = Callable[[], bool]


@runtime_checkable
class Runner(Protocol):
    def load(self) -> None:
        """Load the models (once)."""

    def run(self, request: dict, workdir: Path, progress: ProgressFn,
            should_cancel: CancelFn) -> dict:
        """Generate; returns ``{video_path, frames, duration_s, width, height, seed}``."""


RunnerFactory = Callable[..., Runner]


def resolve_runner_factory(spec: str | RunnerFactory) -> RunnerFactory:
    """``"package.module:callable"`` (or a callable) -> a callable returning a Runner."""
    if callable(spec):
        return spec
    module, sep, attr = str(spec).partition(":")
    if not sep or not module or not attr:
        raise UserInputError("runner", f"{spec!r} is not 'module:callable'",
                             "e.g. multitalk.pipeline.runner:PipelineRunner")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise UserInputError("runner", f"cannot import {module!r}: {e}",
                             "check the module name and PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserInputError("runner", f"{module!r} has no attribute {attr!r}",
                                 "check the callable name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserInputError("runner", f"{spec!r} is not callable", "name a class or function")
    return obj
