"""Classifier-free guidance of MultiTalk: plain CFG and adaptive projected guidance (APG).

Per sampling step the DiT runs once per *branch*:

* 3 branches (``text_guide_scale != 1``): ``cond`` (prompt, audio), ``drop_text`` (negative
  prompt, audio), ``uncond`` (negative prompt, one person of zero audio);
  ``pred = uncond + s_text*(cond - drop_text) + s_audio*(drop_text - uncond)``.
* 2 branches (``text_guide_scale == 1``): ``cond`` and ``drop_audio`` (prompt, zero audio);
  ``pred = drop_audio + s_audio*(cond - drop_audio)``.
* 1 branch (both scales 1): ``cond`` only;
  ``pred = cond``. The official code still runs ``drop_audio`` and computes
  ``drop_audio + 1*(cond - drop_audio)``, the same prediction up to rounding.

With APG (https://arxiv.org/abs/2410.02416) each guidance difference goes through a momentum
buffer, is clipped to ``norm_threshold`` and projected orthogonally to ``cond``;
``pred = cond + (s_text-1)*apg(cond - drop_text) + (s_audio-1)*apg(drop_text - uncond)``
(2 branches: ``cond + (s_audio-1)*apg(cond - drop_audio)``). One buffer per difference, new
buffers per clip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

THREE_BRANCHES = ("cond", "drop_text", "uncond")
TWO_BRANCHES = ("cond", "drop_audio")
ONE_BRANCH = ("cond",)


class MomentumBuffer:
    """``running = value + momentum * running`` (starts at 0), as the official APG buffer."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.running_average: torch.Tensor | float = 0.0

    def update(self, value: torch.Tensor) -> torch.Tensor:
        self.running_average = value + self.momentum * self.running_average
        return self.running_average


def project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``v0`` into its components parallel / orthogonal to ``v1`` (float64, last 4 dims)."""
    dtype = v0.dtype
    dims = [-1, -2, -3, -4]
    v0, v1 = v0.double(), v1.double()
    v1 = torch.nn.functional.normalize(v1, dim=dims)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    return parallel.to(dtype), (v0 - parallel).to(dtype)


def adaptive_projected_guidance(diff: torch.Tensor, pred_cond: torch.Tensor,
                                momentum_buffer: MomentumBuffer | None = None, eta: float = 0.0,
                                norm_threshold: float = 55.0) -> torch.Tensor:
    """The official APG update for one guidance difference ``diff`` (``[C, T, H, W]``).

    Momentum (if a buffer is given), then scale by ``min(1, norm_threshold/||diff||)`` (L2 norm
    over the last four dims, skipped when ``norm_threshold <= 0``), then
    ``orthogonal + eta*parallel`` w.r.t. ``pred_cond``.
    """
    if momentum_buffer is not None:
        diff = momentum_buffer.update(diff)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=[-1, -2, -3, -4], keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / norm)
    parallel, orthogonal = project(diff, pred_cond)
    return orthogonal + eta * parallel


def uses_text_branch(text_guide_scale: float) -> bool:
    """False when the text scale is 1: the official then runs only ``cond`` and ``drop_audio``."""
    return not math.isclose(text_guide_scale, 1.0)


def uses_audio_branch(text_guide_scale: float, audio_guide_scale: float) -> bool:
    """False when both scales are 1: guidance is the identity and one ``cond`` pass is enough."""
    return uses_text_branch(text_guide_scale) or not math.isclose(audio_guide_scale, 1.0)


def branch_names(text_guide_scale: float, audio_guide_scale: float) -> tuple[str, ...]:
    """The DiT passes of one sampling step, in call order."""
    if uses_text_branch(text_guide_scale):
        return THREE_BRANCHES
    return TWO_BRANCHES if uses_audio_branch(text_guide_scale, audio_guide_scale) else ONE_BRANCH


def cfg_combine(preds: Sequence[torch.Tensor], text_guide_scale: float,
                audio_guide_scale: float) -> torch.Tensor:
    """Vanilla CFG of the 3 (2 with text scale 1; 1 with both scales 1) branch predictions, in the official order."""
    if len(preds) == 3:
        cond, drop_text, uncond = preds
        return uncond + text_guide_scale * (cond - drop_text) + audio_guide_scale * (drop_text - uncond)
    if len(preds) == 2:
        cond, drop_audio = preds
        return drop_audio + audio_guide_scale * (cond - drop_audio)
    if len(preds) == 1:
        return preds[0]
    raise ValueError(f"expected 1, 2 or 3 branch predictions, got {len(preds)}")


class GuidanceState:
    """Per-clip guidance: which DiT branches to run and how to combine their predictions.

    ``GuidanceState(params)`` reads ``text_guide_scale``, ``audio_guide_scale``, ``use_apg``,
    ``apg_momentum``, ``apg_norm_threshold`` (a :class:`~multitalk.pipeline.inputs.GenerationParams`
    or anything with these attributes). Make a new one per clip: the APG buffers restart per clip.
    """

    def __init__(self, params):
        self.text_scale = float(params.text_guide_scale)
        self.audio_scale = float(params.audio_guide_scale)
        self.use_apg = bool(params.use_apg)
        self.norm_threshold = float(params.apg_norm_threshold)
        self.names = branch_names(self.text_scale, self.audio_scale)
        self.text_buffer = MomentumBuffer(params.apg_momentum)
        self.audio_buffer = MomentumBuffer(params.apg_momentum)
        self.diff_norms: list[torch.Tensor] = []  # APG: ||buffered diff|| per call (the official print)

    @property
    def num_branches(self) -> int:
        return len(self.names)

    def branches(self, context, context_null, audio, zero_audio) -> list[tuple]:
        """``(text context, audio)`` per DiT call of a step, in the official call order."""
        if self.num_branches == 3:
            return [(context, audio), (context_null, audio), (context_null, zero_audio)]
        if self.num_branches == 2:
            return [(context, audio), (context, zero_audio)]
        return [(context, audio)]

    def combine(self, preds: Sequence[torch.Tensor]) -> torch.Tensor:
        """The guided noise prediction (the velocity the Euler step subtracts)."""
        if len(preds) != self.num_branches:
            raise ValueError(f"expected {self.num_branches} predictions, got {len(preds)}")
        if not self.use_apg:
            return cfg_combine(preds, self.text_scale, self.audio_scale)
        cond = preds[0]
        if self.num_branches == 1:  # both scales 1: (scale - 1) * apg(...) is zero
            return cond
        if self.num_branches == 2:
            return cond + (self.audio_scale - 1) * self._apg(cond - preds[1], cond, self.audio_buffer)
        drop_text, uncond = preds[1], preds[2]
        return (cond + (self.text_scale - 1) * self._apg(cond - drop_text, cond, self.text_buffer)
                + (self.audio_scale - 1) * self._apg(drop_text - uncond, cond, self.audio_buffer))

    def _apg(self, diff, cond, buffer):
        out = adaptive_projected_guidance(diff, cond, momentum_buffer=buffer,
                                          norm_threshold=self.norm_threshold)
        self.diff_norms.append(buffer.running_average.norm())
        return out
