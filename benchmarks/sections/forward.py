"""DiT forward at 640x640x81 (33,600 tokens), 1 and 2 speakers, FLOPs + MFU, one timing per
``--attention-backends`` variant."""

from __future__ import annotations

import time

import torch

import flops as flop_count
from builders import dit_inputs
from harness import GIB, NAN, Bench, Skipped, analytic_flops, free_memory, ratio, rel_l2, sync


def run(b: Bench) -> None:
    s, sec = b.setting, b.report.section("forward")
    model = b.get_dit()
    sec["backend"] = b.args.backend
    one = dit_inputs(s, 1)

    with torch.no_grad():  # warm-up + FLOPs (the counter runs the real forward once)
        t0 = time.perf_counter()
        model(**one)
        sync(s.device)
        b.fwd_estimate_s = time.perf_counter() - t0
        counted = flop_count.count_flops(lambda: model(**one))
    analytic = analytic_flops(s)
    if s.device.type == "cuda" and counted["attention"] == 0:  # an attention op the counter does not know
        counted.update(attention=analytic["attention"], other=counted["total"],
                       total=counted["total"] + analytic["attention"], attention_from="analytic")
    sec["flops_1spk"] = counted
    sec["flops_1spk_analytic"] = analytic
    b.report.set(tokens=s.tokens)
    b.log(f"FLOPs 1spk: {counted['total'] / 1e9:.4g} GFLOP (attention {counted['attention'] / 1e9:.4g}), "
          f"analytic {analytic['total'] / 1e9:.4g}")

    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats, out = b.timed_forward(model, one, "forward bf16 1spk", warm=True)
    b.ref_out = out.float()
    b.fwd_estimate_s = stats["median_s"]
    sec["bf16_1spk"] = stats
    peak = torch.cuda.max_memory_allocated() / GIB if s.device.type == "cuda" else NAN
    b.report.set(forward_bf16_1spk_s=stats["median_s"], peak_mem_gib_1spk=peak)
    del out

    two = dit_inputs(s, 2)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats, out = b.timed_forward(model, two, "forward bf16 2spk")
    del out
    sec["bf16_2spk"] = stats
    peak = torch.cuda.max_memory_allocated() / GIB if s.device.type == "cuda" else NAN
    b.report.set(forward_bf16_2spk_s=stats["median_s"], peak_mem_gib_2spk=peak)

    variants = {b.args.backend: sec["bf16_1spk"]}
    sec["attention_backends"] = variants
    for name in b.args.attention_backends:
        if name == b.args.backend:
            continue
        try:
            model.set_attention_backend(name)
            stats, out = b.timed_forward(model, one, f"forward bf16 1spk [{name}]")
            variants[name] = dict(stats, rel_err_vs_main=rel_l2(out.float(), b.ref_out))
            del out
        except Skipped as exc:
            variants[name] = {"skipped": str(exc)}
        except Exception as exc:  # backend unavailable on this build
            variants[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            b.log(f"backend {name} failed: {exc}")
        finally:
            model.set_attention_backend(b.args.backend)
            free_memory(s.device)
        b.report.save()
    timed = {k: v["median_s"] for k, v in variants.items() if isinstance(v, dict) and "median_s" in v}
    if timed:
        best = min(timed, key=timed.get)
        b.report.set(best_attention_backend=best, forward_bf16_1spk_best_s=timed[best],
                     best_forward_over_floor=ratio(timed[best], b.report.data["floor_bf16_1spk_s"]))
