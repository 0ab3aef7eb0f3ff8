"""Regional ``compile_repeated_blocks``: compile time, compiled forward without and with ``fuse_dit``."""

from __future__ import annotations

import time

import torch

from builders import dit_inputs
from harness import Bench, ratio, rel_l2, sync

TINY_CPU = False  # inductor on CPU takes minutes: left out of the --tiny-cpu default


def run(b: Bench) -> None:
    s, sec = b.setting, b.report.section("compile")
    model = b.get_dit()
    one = dit_inputs(s, 1)
    attempts = (True, False) if b.args.fullgraph else (False,)
    for fullgraph in attempts:  # fullgraph first; on a graph-break error, the Engine's fullgraph=False
        b.require(120 + (b.args.repeats + 1) * b.forward_s(), f"compile (fullgraph={fullgraph})")
        try:
            model.compile_repeated_blocks(fullgraph=fullgraph, dynamic=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model(**one)
            sync(s.device)
        except Exception as exc:
            sec[f"error_fullgraph_{fullgraph}"] = f"{type(exc).__name__}: {exc}"[:1000]
            b.log(f"compile fullgraph={fullgraph} failed: {type(exc).__name__}")
            torch._dynamo.reset()
            if fullgraph == attempts[-1]:
                raise
            continue
        sec.update(fullgraph=fullgraph, first_call_s=time.perf_counter() - t0)
        break
    sec["compile_s"] = sec["first_call_s"] - b.report.data["forward_bf16_1spk_s"]
    b.log(f"compile: first call {sec['first_call_s']:.1f}s")
    if b.ref_out is not None:
        sec["rel_err_vs_eager"] = rel_l2(out.float(), b.ref_out)
    del out
    b.report.save()
    stats, unfused = b.timed_forward(model, one, "forward bf16 1spk compiled (no dit_fusion)", warm=True)
    sec["bf16_1spk_unfused"] = stats
    b.report.set(forward_bf16_1spk_compiled_unfused_s=stats["median_s"])

    # the production path: runtime.dit_fusion as Engine.load applies it, then the same compile
    from multitalk.runtime.dit_fusion import fuse_dit

    sec["dit_fusion"] = fuse_dit(model, device=s.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(**one)  # recompiles the block with the fused operations
    sync(s.device)
    sec["fused_first_call_s"] = time.perf_counter() - t0
    sec["fused_rel_err_vs_unfused"] = rel_l2(out.float(), unfused.float())
    if b.ref_out is not None:
        sec["fused_rel_err_vs_eager"] = rel_l2(out.float(), b.ref_out)
    del out, unfused
    stats, out = b.timed_forward(model, one, "forward bf16 1spk compiled", warm=True)
    b.compiled_ref = out.float()
    del out
    sec["bf16_1spk"] = stats
    b.report.set(forward_bf16_1spk_compiled_s=stats["median_s"],
                 compiled_over_eager=ratio(stats["median_s"], b.report.data["forward_bf16_1spk_s"]),
                 fused_over_unfused=ratio(stats["median_s"], sec["bf16_1spk_unfused"]["median_s"]))
