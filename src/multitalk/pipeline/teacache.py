"""TeaCache for MultiTalk: skip the DiT blocks when the timestep modulation barely moved.

A small state machine equal to the official ``WanModel.teacache_init`` / ``forward`` logic:

* one call counter over *all* DiT calls, wrapping at ``steps * branches`` (so every clip starts
  at 0); the branch of a call is ``counter % branches`` (cond, drop_text, uncond);
* calls with ``counter < ret_calls`` (``5*branches`` with ``use_ret_steps``) or
  ``counter >= cutoff_calls`` always run the blocks (with ``use_ret_steps`` the cutoff equals the
  wrap point, so the last step is *not* forced: the official behaviour);
* otherwise, per branch, ``acc += poly(coeffs)(mean|e0 - e0_prev| / mean|e0_prev|)``; if
  ``acc < thresh`` the blocks are skipped and the branch's previous residual
  (blocks output - blocks input) is added instead, else they run and ``acc = 0``.

``e0`` is the timestep projection ``[1, 6, dim]`` (``use_ret_steps=True``, the official setting)
or the time embedding ``e`` (``use_ret_steps=False``). Usage per DiT call::

    if cache.should_compute(branch, e0):
        out = blocks(x); cache.store_residual(branch, out - x)
    else:
        out = cache.apply(branch, x)
"""

from __future__ import annotations

import numpy as np
import torch

from multitalk.errors import UserInputError

# np.poly1d coefficients (highest power first) of the official rescale functions.
COEFFICIENTS = {
    ("multitalk-480", True): (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01),
    ("multitalk-720", True): (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02),
    ("multitalk-480", False): (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01),
    ("multitalk-720", False): (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|current - previous| / mean|previous|`` in float32 (as the official, on e0)."""
    current, previous = current.float(), previous.float()
    return float(((current - previous).abs().mean() / previous.abs().mean()).item())


class TeaCache:
    """Per-generation TeaCache state; ``branches`` DiT calls per step (3, or 2 when text scale is 1)."""

    def __init__(self, steps: int, thresh: float = 0.2, size: str = "multitalk-480",
                 branches: int = 3, use_ret_steps: bool = True):
        if (size, use_ret_steps) not in COEFFICIENTS:
            raise UserInputError("size", f"TeaCache has no coefficients for {size!r}",
                                 "use multitalk-480 or multitalk-720")
        self.coefficients = COEFFICIENTS[(size, use_ret_steps)]
        self.thresh = float(thresh)
        self.branches = int(branches)
        self.num_calls = steps * branches
        self.ret_calls = (5 if use_ret_steps else 1) * branches
        self.cutoff_calls = steps * branches if use_ret_steps else (steps - 1) * branches
        self.counter = 0
        self.accumulated = [0.0] * branches
        self._previous_e0: list[torch.Tensor | None] = [None] * branches
        self._residual: list[torch.Tensor | None] = [None] * branches
        self.total_calls = 0
        self.skipped_calls: list[int] = []  # indices over all calls of the generation

    def start_clip(self) -> None:
        """Restart the call counter (a no-op after a complete clip: the counter has wrapped)."""
        self.counter = 0

    def should_compute(self, branch: int, e0: torch.Tensor) -> bool:
        """Decide for this call (then advance the counter); ``False`` means use :meth:`apply`."""
        expected = self.counter % self.branches
        if branch != expected:
            raise ValueError(f"TeaCache: call {self.counter} belongs to branch {expected}, got {branch}")
        if self.counter < self.ret_calls or self.counter >= self.cutoff_calls:
            compute = True
            self.accumulated[branch] = 0.0
        else:
            rel = relative_l1(e0, self._previous_e0[branch])
            self.accumulated[branch] += float(np.polyval(self.coefficients, rel))
            compute = self.accumulated[branch] >= self.thresh
            if compute:
                self.accumulated[branch] = 0.0
        if not compute and self._residual[branch] is None:
            compute = True  # nothing cached yet (cannot happen in the official call order)
            self.accumulated[branch] = 0.0
        self._previous_e0[branch] = e0.detach().float().clone()
        if not compute:
            self.skipped_calls.append(self.total_calls)
        self.total_calls += 1
        self.counter = (self.counter + 1) % self.num_calls
        return compute

    def store_residual(self, branch: int, residual: torch.Tensor) -> None:
        """Remember ``blocks_output - blocks_input`` of a computed call."""
        self._residual[branch] = residual.detach()

    def note_residual(self, branch: int) -> None:
        """A computed call whose residual another process keeps (guidance/sequence parallelism: the
        process that ran the branch stores its own slice and applies it when told to skip)."""
        self._residual[branch] = _HELD_ELSEWHERE

    def apply(self, branch: int, hidden: torch.Tensor) -> torch.Tensor:
        """The blocks' output of a skipped call: ``hidden + previous residual`` of the branch."""
        residual = self._residual[branch]
        if residual is None or residual is _HELD_ELSEWHERE:
            raise RuntimeError(f"TeaCache: no residual stored for branch {branch} on this process")
        return hidden + residual.to(hidden.dtype)


_HELD_ELSEWHERE = object()
