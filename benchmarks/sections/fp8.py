"""Row-wise fp8 linears in every large block linear, eager: time and error against the bf16 output."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from builders import dit_inputs
from harness import Bench, free_memory, rel_l2, restore_modules, sync


def fp8_filter(tiny: bool) -> Callable:
    from multitalk.runtime.fp8 import all_blocks_fp8_filter

    if not tiny:
        return all_blocks_fp8_filter
    # TINY layers are narrower than the default's 1024 minimum: take the block linears the default
    # picks at full size, i.e. all but the audio kv projection (768 inputs there).
    return lambda name, m: (name.startswith("blocks.") and not name.endswith("kv_linear")
                            and m.in_features % 16 == 0 and m.out_features % 16 == 0)


def run(b: Bench) -> None:
    from multitalk.runtime.fp8 import quantize_linears_fp8

    s, sec = b.setting, b.report.section("fp8")
    model = b.get_dit()
    one = dit_inputs(s, 1)
    if b.ref_out is None:
        with torch.no_grad():
            b.ref_out = model(**one).float()
    include = fp8_filter(s.tiny)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and include(n, m)}
    t0 = time.perf_counter()
    try:
        sec["quantized_linears"] = quantize_linears_fp8(model, include=include, out_dtype=s.dtype)
        sync(s.device)
        sec["quantize_s"] = time.perf_counter() - t0
        stats, out = b.timed_forward(model, one, "forward fp8 1spk")
        sec["fp8_1spk"] = stats
        err = rel_l2(out.float(), b.ref_out)
        del out
        b.report.set(forward_fp8_1spk_s=stats["median_s"], fp8_rel_err=err)
        b.log(f"fp8 rel err vs bf16: {err:.4f}")
    finally:  # back to the bf16 linears for the later sections
        restore_modules(model, originals)
        free_memory(s.device)
