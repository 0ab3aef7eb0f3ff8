"""The pipeline's side of the memory plan: the workload of a generation, and an out-of-memory
error in the middle of a run turned into the same one-line error as a plan that cannot fit."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator

import torch

from multitalk.errors import MemoryPlanError
from multitalk.pipeline.generate import SAMPLE_RATE, Media
from multitalk.pipeline.inputs import GenerationParams
from multitalk.runtime.memory_plan import GIB, Workload

log = logging.getLogger(__name__)


def workload_of(media: Media, params: GenerationParams) -> Workload:
    """What a generation puts on the GPU: clip size, frames per clip, speakers, speech length."""
    seconds = max((len(s) for s in media.speech), default=0) / SAMPLE_RATE
    # the sampler always runs whole clips of frame_num frames (shorter audio is padded)
    return Workload(height=media.height, width=media.width, frames=params.frame_num, speakers=len(media.speech),
                    audio_seconds=seconds)


@contextlib.contextmanager
def out_of_memory_as_plan_error(engine) -> Iterator[None]:
    """An accelerator OOM inside the block becomes a :class:`MemoryPlanError` naming the plan and a
    setting to try; the memory is released before it propagates (a service worker serves on)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        plan = getattr(engine, "plan", None)
        log.error("out of memory: %s", str(exc).splitlines()[0][:300])
        del exc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if plan is None:
            fix = "--max-vram with what this GPU has free (a memory plan), --weights fp8, or a smaller --size"
            raise MemoryPlanError(needed=None, available=None, fix=fix, during="the generation") from None
        lower = max(1.0, 0.8 * plan.budget / GIB)
        fix = (f"--max-vram {lower:.0f} (the plan assumed {plan.budget / GIB:.1f} GiB; another process may "
               f"be using the GPU)" + ("" if plan.weights == "fp8" else ", or --weights fp8"))
        raise MemoryPlanError(needed=plan.peak, available=plan.budget, fix=fix, during="the generation",
                              workload=plan.workload.describe()) from None
