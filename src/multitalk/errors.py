"""User-facing error types shared by every layer.

A :class:`UserInputError` is bad input the user can fix: the CLI prints its message on one line
and exits with code 2, the HTTP service answers 422 with ``field`` and ``message``.
"""

from __future__ import annotations


class MultiTalkError(Exception):
    """Base class of every error multitalk raises on purpose."""


class UserInputError(MultiTalkError, ValueError):
    """Bad input: names the offending field and how to fix it."""

    def __init__(self, field: str, message: str, fix: str | None = None):
        self.field = field
        self.message = message
        self.fix = fix
        text = f"{field}: {message}"
        if fix:
            text += f" ({fix})"
        super().__init__(text)


class CheckpointError(MultiTalkError, ValueError):
    """A weight file is missing, unreadable, or does not hold what the model expects."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 expected: tuple | None = None, got: tuple | None = None):
        self.file, self.key, self.expected, self.got = file, key, expected, got
        parts = [message]
        if file:
            parts.append(f"file={file}")
        if key:
            parts.append(f"key={key}")
        if expected is not None:
            parts.append(f"expected shape={tuple(expected)}")
        if got is not None:
            parts.append(f"got shape={tuple(got)}")
        super().__init__("; ".join(parts))


class GenerationError(MultiTalkError):
    """The generation itself went wrong (NaN or Inf in the latents or frames): nothing is written."""


class MemoryPlanError(MultiTalkError):
    """The GPU memory cannot hold this generation with these settings: what it needs, what there is,
    and the setting to try (``fix``). Raised before sampling by the memory plan, and for an
    out-of-memory error in the middle of a run (``during`` names the stage)."""

    def __init__(self, *, needed: int | None, available: int | None, fix: str, phase: str | None = None,
                 source: str | None = None, workload: str | None = None, during: str | None = None):
        self.needed, self.available, self.fix = needed, available, fix
        self.phase, self.source, self.workload, self.during = phase, source, workload, during
        gib = lambda n: f"{n / 2**30:.1f} GiB" if n >= 10 * 2**30 else f"{n / 2**30:.2f} GiB"  # noqa: E731
        what = f"this clip ({workload})" if workload else "this generation"
        if during:
            text = f"the GPU ran out of memory during {during}"
            if needed is not None and available is not None:
                text += f" ({what} was planned at ~{gib(needed)} of {gib(available)})"
        else:
            text = f"not enough GPU memory: {what} needs about {gib(needed)}"
            if phase:
                text += f" at its peak ({phase})"
            text += f", {gib(available)} available" + (f" ({source})" if source else "")
        super().__init__(f"{text}; try {fix}")


class JobCancelled(MultiTalkError):
    """A generation stopped because its caller asked it to (checked between sampling steps)."""


class ParallelError(MultiTalkError):
    """A multi-process (multi-GPU) generation lost a process or a collective failed or timed out.

    ``rank`` names the process when known; the message says what happened to it.
    """

    def __init__(self, message: str, rank: int | None = None):
        self.rank = rank
        super().__init__(message)
