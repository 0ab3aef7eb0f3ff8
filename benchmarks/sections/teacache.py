"""Forwards TeaCache skips over a 40-step schedule (shift 7) at thresholds 0.2 / 0.3."""

from __future__ import annotations

import torch

from harness import Bench


def run(b: Bench) -> None:
    from multitalk.pipeline.schedule import sample_timesteps
    from multitalk.pipeline.teacache import TeaCache

    s, sec = b.setting, b.report.section("teacache")
    model = b.get_dit()
    steps, branches = 40, 3
    timesteps = sample_timesteps(steps, 7.0, s.arch.num_train_timesteps)
    with torch.no_grad():  # e0 depends only on t: the same for the 3 branches of a step
        e0s = [model.condition_embedder.time_embedding(t.to(s.device))[1].unflatten(1, (6, -1))
               for t in timesteps[:steps]]
    fwd = b.report.data["forward_bf16_1spk_s"]
    sec.update(steps=steps, shift=7.0, branches=branches, forward_s=fwd)
    for thresh in (0.2, 0.3):
        cache = TeaCache(steps, thresh, "multitalk-480", branches=branches)
        for e0 in e0s:
            for branch in range(branches):
                if cache.should_compute(branch, e0):
                    cache.store_residual(branch, e0.new_zeros(1))
        skipped = len(cache.skipped_calls)
        sec[f"thresh_{thresh}"] = {"calls": cache.total_calls, "skipped": skipped,
                                   "skip_fraction": skipped / cache.total_calls,
                                   "dit_s_per_clip": cache.total_calls * fwd, "saved_s_per_clip": skipped * fwd}
        b.log(f"teacache {thresh}: {skipped}/{cache.total_calls} forwards skipped")
    b.report.save()
