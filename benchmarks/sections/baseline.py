"""diffusers' plain ``WanTransformer3DModel`` (Wan2.1 I2V-14B config) on the same inputs."""

from __future__ import annotations

import time

import torch

from builders import baseline_inputs, build_wan_baseline, dit_inputs
from harness import Bench, free_memory, sync


def run(b: Bench) -> None:
    s, sec = b.setting, b.report.section("baseline")
    one = dit_inputs(s, 1)
    b.drop_dit()  # two 14B models plus activations do not fit on one 80 GB card
    b.require(30 + (b.args.warmup + b.args.repeats + 1) * b.forward_s(), "baseline")
    t0 = time.perf_counter()
    model, config = build_wan_baseline(s)
    sync(s.device)
    sec.update(build_s=time.perf_counter() - t0, config=config)
    try:
        model.set_attention_backend(b.args.backend)
        inputs = baseline_inputs(s, one)
        with torch.no_grad():
            out = model(**inputs)[0]  # warm-up, and a shape check
        sec["output_shape"] = list(out.shape)
        stats, out = b.timed_forward(lambda **kw: model(**kw)[0], inputs, "diffusers Wan forward", warm=True)
        del out
        sec["forward"] = stats
        b.report.set(diffusers_base_forward_s=stats["median_s"])
    finally:
        del model
        free_memory(s.device)
