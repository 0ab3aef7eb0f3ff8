"""Same-run hardware ceilings on the GPU: bf16 / fp8 matmul rate, SDPA rate per backend, H2D copy.

Used by ``benchmarks/bench.py``; every rate is a median over repeats after warm-up, timed with CUDA
events, on random (never zero) data.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F


def cuda_time(fn, warmup: int = 3, repeat: int = 10) -> float:
    """Median seconds of ``fn()`` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def matmul_bf16_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b)
    return 2 * n**3 / t / 1e12


def matmul_fp8_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    sa = torch.ones(n, 1, device="cuda")
    sb = torch.ones(1, n, device="cuda")
    t = cuda_time(lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
    return 2 * n**3 / t / 1e12


def sdpa_tflops(tokens: int, heads: int = 40, head_dim: int = 128) -> dict[str, float]:
    """Self-attention rate at the benchmark's token count for each SDPA backend that runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * tokens * tokens * head_dim * heads
    out = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                t = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), warmup=2, repeat=5)
            out[name] = flops / t / 1e12
        except Exception as exc:  # backend not available for this shape/build
            out[name] = float("nan")
            out[f"{name}_error"] = str(exc)[:200]
    return out


def sdpa_in_context(tokens: int, heads: int = 40, head_dim: int = 128, blocks: int = 20) -> dict:
    """cuDNN self-attention rate when it runs the way it does inside the DiT, as a diagnostic of the gap
    between the isolated rate above and the model: q/k/v as [B, L, H, D] storage seen through a
    transposed view, and each call between one block's worth of bf16 matmuls (q, k, v, o projections and
    the feed-forward pair at the DiT's shapes), for ``blocks`` blocks back to back. Only the attention
    calls are timed (CUDA events around each); the SM clock (MHz, via NVML) is sampled after the run
    when ``torch.cuda.clock_rate`` works. Compare ``tflops`` with ``sdpa_tflops['cudnn']``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dim, ffn = heads * head_dim, 13824
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    q, k, v = (randn(1, tokens, heads, head_dim).transpose(1, 2) for _ in range(3))
    x, w_attn = randn(tokens, dim), randn(dim, dim) * dim ** -0.5
    w_up, w_down = randn(dim, ffn) * dim ** -0.5, randn(ffn, dim) * ffn ** -0.5
    flops = 4 * tokens * tokens * head_dim * heads

    def matmuls():
        for _ in range(4):
            x @ w_attn
        (x @ w_up) @ w_down

    out = {"blocks": blocks}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        for label, between in (("back_to_back", None), ("between_matmuls", matmuls)):
            F.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
            events = []
            for _ in range(blocks):
                if between is not None:
                    between()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                F.scaled_dot_product_attention(q, k, v)
                end.record()
                events.append((start, end))
            torch.cuda.synchronize()
            median = statistics.median(s.elapsed_time(e) / 1e3 for s, e in events)
            out[label] = {"median_s": median, "tflops": flops / median / 1e12,
                          "last_s": events[-1][0].elapsed_time(events[-1][1]) / 1e3}
            try:
                out[label]["sm_clock_mhz_after"] = torch.cuda.clock_rate()
            except Exception as exc:  # NVML not available
                out[label]["sm_clock_error"] = str(exc)[:120]
    return out


def h2d_pinned_gbps(mib: int = 1024) -> float:
    host = torch.empty(mib * 2**20, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    t = cuda_time(lambda: dev.copy_(host, non_blocking=True), warmup=2, repeat=5)
    return host.numel() / t / 1e9


def measure_all(tokens: int) -> dict:
    sd = sdpa_tflops(tokens)
    rates = {k: v for k, v in sd.items() if not k.endswith("_error") and v == v}
    return {
        "matmul_bf16_tflops": matmul_bf16_tflops(),
        "matmul_fp8_tflops": matmul_fp8_tflops(),
        "sdpa_tflops": sd,
        "sdpa_best_backend": max(rates, key=rates.get) if rates else None,
        "sdpa_best_tflops": max(rates.values()) if rates else float("nan"),
        "h2d_pinned_gbps": h2d_pinned_gbps(),
        "sdpa_cudnn_in_context": sdpa_in_context(tokens),
    }
