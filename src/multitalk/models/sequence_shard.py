"""The DiT's token sequence split over processes (sequence parallelism): what the model needs to know.

A context-parallel engine (diffusers' ``_cp_plan`` hooks, installed by
:mod:`multitalk.runtime.parallel`) cuts the patch tokens into contiguous slices, one per process,
right after the patch embedding (:class:`SplitPoint`); the self-attention exchanges heads for
tokens (Ulysses) and the head's output is gathered again (:meth:`TokenShard.gather`). Everything
else in a block is per token, except two things MultiTalk adds, which need more than a process's
own tokens:

* the **audio cross-attention** groups tokens by latent frame: each token attends to the audio of
  its own frame. A slice need not start or end on a frame boundary, so each process needs the
  global position of its slice (:meth:`TokenShard.span`) and splits it into per-frame segments
  (:func:`frame_segments`); every query row stays exact because it only ever sees its own frame's
  audio keys;
* the **speaker routing map** (two speakers) compares every token with the keys of the *first*
  latent frame, which live on the first process(es) (:meth:`TokenShard.reference_keys`), and
  min-max scales each speaker row over *all* tokens (:meth:`TokenShard.row_extrema`).

Without a shard (one process) ``AudioContext.shard`` is None and the span is the whole sequence.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TokenShard(Protocol):
    """This process's part of the token sequence, and the collectives the MultiTalk blocks need."""

    def span(self, total: int) -> tuple[int, int]:
        """``[start, stop)`` of this process's tokens out of ``total`` (called once per forward,
        before the sequence is split)."""

    def reference_keys(self, key: torch.Tensor, count: int) -> torch.Tensor:
        """The global keys ``[B, count, heads, D]`` of tokens ``0..count-1`` from the local ``key``."""

    def row_extrema(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)`` over all processes' tokens of ``rows [B, R, L_local]`` -> two ``[B, R]``."""

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x [B, L_local, C]`` joined along the tokens -> ``[B, L, C]``."""


class SplitPoint(nn.Identity):
    """Where a context-parallel plan splits the patch tokens ``[B, L, C]`` (identity on one process)."""


def frame_segments(start: int, length: int, frame_tokens: int) -> list[tuple[int, int, int, int]]:
    """Split local tokens ``[start, start+length)`` of a frame-major sequence into frame-aligned parts.

    Returns ``(lo, hi, first_frame, frames)`` with ``lo/hi`` local indices: a partial frame at
    either end is its own part (``frames == 1``), the whole frames between are one part. One
    process holding every token gets one part ``(0, L, 0, T)``.
    """
    if length <= 0:
        return []
    stop = start + length
    parts = []
    pos = start
    head_end = min(stop, -(-pos // frame_tokens) * frame_tokens) if pos % frame_tokens else pos
    if head_end > pos:                                   # partial first frame
        parts.append((pos, head_end, pos // frame_tokens, 1))
        pos = head_end
    whole_end = pos + (stop - pos) // frame_tokens * frame_tokens
    if whole_end > pos:
        parts.append((pos, whole_end, pos // frame_tokens, (whole_end - pos) // frame_tokens))
        pos = whole_end
    if stop > pos:                                       # partial last frame
        parts.append((pos, stop, pos // frame_tokens, 1))
    return [(lo - start, hi - start, f, n) for lo, hi, f, n in parts]


__all__ = ["SplitPoint", "TokenShard", "frame_segments"]
