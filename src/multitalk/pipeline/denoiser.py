"""The DiT calls of one sampling step: one per guidance branch, with TeaCache, on this process.

:class:`LocalDenoiser` is what ``generate`` uses on one GPU; ``multitalk.pipeline.parallel``
provides the same interface over several processes. Per clip :meth:`start_clip` takes the
branch inputs, then :meth:`predict` returns each branch's noise prediction for a step::

    denoiser.start_clip(branches, clip_fea, y, ref_masks)
    preds = denoiser.predict(x_in, t)        # [16, T, h, w] float32 per branch, official order
"""

from __future__ import annotations

import contextlib

import torch

from multitalk.pipeline.teacache import TeaCache


def dit_call(dit, x, t, context, clip_fea, y, audio, ref_masks, teacache: TeaCache | None, branch: int,
             compute: bool | None = None, residuals: dict | None = None) -> torch.Tensor:
    """One DiT call of ``branch``. With TeaCache the blocks run or are skipped: on one process the
    decision comes from ``teacache``; with several processes rank 0 decides and passes ``compute``,
    and the residuals live in ``residuals`` (this process's tokens)."""
    kwargs = dict(hidden_states=x, timestep=t, encoder_hidden_states=[context],
                  encoder_hidden_states_image=clip_fea, y=y, audio=audio, ref_target_masks=ref_masks)
    if teacache is None and compute is None:
        return dit(**kwargs)
    state = dit.prepare(**kwargs)
    if compute is None:
        compute = teacache.should_compute(branch, state.timestep_proj)
    if compute:
        hidden_in = state.hidden_states
        hidden = dit.run_blocks(state)
        if residuals is None:
            teacache.store_residual(branch, hidden - hidden_in)
        else:
            residuals[branch] = (hidden - hidden_in).detach()
    elif residuals is None:
        hidden = teacache.apply(branch, state.hidden_states)
    else:
        hidden = state.hidden_states + residuals[branch].to(state.hidden_states.dtype)
    return dit.finish(state, hidden)


def _untimed(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class LocalDenoiser:
    """Every branch of a step on this process, in the official call order. ``stage("dit")`` is
    entered around each DiT call (``generate``'s timing hook)."""

    def __init__(self, dit, teacache: TeaCache | None = None, stage=None):
        self.dit, self.teacache = dit, teacache
        self.stage = stage or _untimed
        self._clip = None

    def start_clip(self, branches: list[tuple[torch.Tensor, torch.Tensor]], clip_fea: torch.Tensor,
                   y: torch.Tensor, ref_masks: torch.Tensor) -> None:
        self._clip = (branches, clip_fea, y, ref_masks)

    def predict(self, x_in: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        branches, clip_fea, y, ref_masks = self._clip
        preds = []
        for b, (ctx, aud) in enumerate(branches):
            with self.stage("dit"):
                preds.append(dit_call(self.dit, x_in, t, ctx, clip_fea, y, aud, ref_masks, self.teacache, b
                                      ).float()[0])
        return preds

    def close(self) -> None:
        self._clip = None


__all__ = ["LocalDenoiser", "dit_call"]
