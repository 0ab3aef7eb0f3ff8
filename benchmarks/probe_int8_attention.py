"""GPU probe: the 8-bit Triton attention (``runtime.attention_int8``) at the DiT's shape, and the DiT with it.

    PYTHONPATH=/tmp/site python benchmarks/probe_int8_attention.py --out-dir "$OUT" [--parts ...] [--budget-s 300]

Parts (in this order; each records its error and time, one failure keeps the rest):

* ``env``          GPU, torch, Triton, SM count.
* ``correctness``  fresh random inputs, small shapes with a partial last tile and batch 2: the
                   Triton quantisation against ``quantize_reference``; the kernel, run into a
                   NaN-poisoned output, against ``reference_attention_quantized`` (float64, same
                   quantisation) and against float64 attention; two runs bit-identical.
* ``errors``       33,600 tokens x 40 heads of 128, q/k RMS-normed over the width (as the DiT's),
                   scores of unit and 4x sharper spread: relative L2 error against float64
                   attention (heads 0 and 7) of cuDNN bf16 SDPA and of each kernel mode.
* ``tune``         each mode's block shapes / warps / stages at full size: kernel time and rate
                   (4 S^2 D H ops over the kernel's time), the quantisation pre-pass and the whole
                   op, against cuDNN bf16 SDPA timed before and after in the same process.
* ``dit``          the full-size random-weight DiT (the benchmark's builder and inputs): eager bf16,
                   compiled bf16 (``dit_fusion`` as the Engine applies it), compiled with the 8-bit
                   attention (the tuned bf16-P·V config), with it + the fp8 feed-forward (``--fp8``), and
                   with the fp8-P·V mode; medians and relative errors against eager and compiled bf16.

Writes ``probe_int8_attention.json`` after every step; prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import rel_l2 as rel  # noqa: E402
from ceilings import cuda_time  # noqa: E402
from probe import Probe  # noqa: E402

from multitalk.runtime import attention_int8 as A  # noqa: E402

P = Probe("probe_int8_attention")
R, log, save = P.data, P.log, P.save
S, H, D = 33600, 40, 128
OPS = 4 * S * S * D * H
BUDGET = {"deadline": float("inf")}
BEST: dict[str, A.KernelConfig] = {}

MODES = {  # label -> the default config of that mode; tune tries the shapes below for each
    "bf16_block": A.KernelConfig(pv="bf16", k_scale="block"),
    "bf16_token": A.KernelConfig(pv="bf16", k_scale="token"),
    "fp8_block": A.KernelConfig(pv="fp8", k_scale="block"),
}
SHAPES = {  # (block_m, block_n, num_warps, num_stages, maxnreg); H200 run 1 (2026-12-02) in the comments
    # 64x128 w4 s2: 649 TOPS (2 programs per multiprocessor); 128x128 w8 s3: 598; 128x64 w8 s3: 558
    "bf16_block": [(64, 128, 4, 2, 0), (64, 128, 4, 2, 0), (64, 64, 4, 2, 0), (64, 64, 4, 3, 0),
                   (64, 64, 4, 4, 0), (64, 64, 4, 2, 168), (128, 128, 8, 3, 0), (64, 128, 4, 3, 0)],
    # 128x128 w8 s2: 453 TOPS (the per-key scale costs a multiply per score)
    "bf16_token": [(64, 128, 4, 2, 0)],
    # 64x128 w4 s3: 696 TOPS
    "fp8_block": [(64, 128, 4, 3, 0), (64, 128, 4, 2, 0), (64, 128, 4, 2, 168), (64, 64, 4, 2, 0),
                  (64, 64, 4, 3, 0), (64, 64, 4, 4, 0)],
}


def left() -> float:
    return BUDGET["deadline"] - time.perf_counter()


def env():
    import triton

    p = torch.cuda.get_device_properties(0)
    R["env"] = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                    triton=triton.__version__, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    availability=A.availability())
    log(str(R["env"]))


def rms_all_heads(x):  # what rms_norm_across_heads gives: unit RMS over the whole width
    return x * torch.rsqrt(x.pow(2).mean(dim=(-2, -1), keepdim=True) + 1e-6)


def make_qkv(batch, seq, heads, temperature=1.0, seed=0, k_offset=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn():
        return torch.randn(batch, seq, heads, D, device="cuda", generator=g)

    q = (rms_all_heads(randn()) * temperature).bfloat16()
    k = (rms_all_heads(randn()) + k_offset).bfloat16()
    v = randn().bfloat16()
    return q, k, v


def correctness():
    sec = P.section("correctness")
    for label, cfg in MODES.items():
        for n, (batch, seq, heads) in enumerate(((2, 1000, 3), (1, 4133, 2))):
            q, k, v = make_qkv(batch, seq, heads, seed=100 + n, k_offset=0.3)
            qz, qr = A.quantize(q, k, v, cfg), A.quantize_reference(q, k, v, cfg)
            res = {"q8_equal": float((qz.q8 == qr.q8).float().mean()),
                   "k8_max_diff": int((qz.k8.int() - qr.k8.int()).abs().max()),
                   "q_scale_err": rel(qz.q_scale, qr.q_scale), "k_scale_err": rel(qz.k_scale, qr.k_scale)}
            if cfg.pv == "fp8":
                res["v_err"] = rel(qz.v.float(), qr.v.float())
            out = torch.full((batch, seq, heads, D), float("nan"), device="cuda", dtype=torch.bfloat16)
            A.attention_quantized(qz, tuple(q.shape), torch.bfloat16, cfg, out=out)
            again = A.int8_attention(q, k, v, *A.config_args(cfg))
            torch.cuda.synchronize()
            ref = A.reference_attention_quantized(qz, tuple(q.shape), torch.float64, cfg)
            exact = A.exact_attention(q, k, v)
            res.update(all_written=bool(torch.isfinite(out).all()), deterministic=bool(torch.equal(out, again)),
                       kernel_vs_reference=rel(out, ref), reference_vs_exact=rel(ref, exact),
                       kernel_vs_exact=rel(out, exact))
            sec[f"{label}_b{batch}_s{seq}_h{heads}"] = res
            log(f"correctness {label} {batch}x{seq}x{heads}: {json.dumps(res)}")
            save()


def reference_heads(q, k, v, heads=(0, 7)):
    return torch.stack([A.exact_attention(q[:, :, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1])[:, :, 0]
                        for h in heads], dim=2)


def errors():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sec = P.section("errors")
    heads = (0, 7)
    for temperature in (1.0, 4.0):
        q, k, v = make_qkv(1, S, H, temperature, seed=int(temperature))
        ref = reference_heads(q, k, v, heads)
        res = sec.setdefault(f"t{temperature:g}", {})
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        res["cudnn_bf16"] = rel(out[:, :, list(heads)], ref)
        for label, cfg in MODES.items():
            cfg = BEST.get(label, cfg)
            out = A.int8_attention(q, k, v, *A.config_args(cfg))
            res[label] = rel(out[:, :, list(heads)], ref)
            res[f"{label}_nan"] = bool(torch.isnan(out).any())
        log(f"errors t={temperature}: {json.dumps(res)}")
        del q, k, v, out, ref
        torch.cuda.empty_cache()
        save()


def cudnn_rate(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        t = cuda_time(lambda: F.scaled_dot_product_attention(qt, kt, vt), warmup=2, repeat=5)
    return t, OPS / t / 1e12


def tune():
    sec = P.section("tune")
    q, k, v = make_qkv(1, S, H, seed=11)
    t, tf = cudnn_rate(q, k, v)
    sec["cudnn_bf16_before"] = {"s": t, "tflops": tf}
    log(f"cuDNN bf16: {t * 1e3:.2f} ms, {tf:.0f} TFLOP/s")
    shape = tuple(q.shape)
    for label, base in MODES.items():
        rows = sec.setdefault(label, [])
        quantized = {}
        for bm, bn, warps, stages, maxnreg in SHAPES[label]:
            if left() < 40:
                rows.append({"skipped": "budget"})
                break
            cfg = replace(base, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, maxnreg=maxnreg)
            entry = {"config": asdict(cfg)}
            try:
                qz = quantized.get(bn)
                if qz is None:
                    qz = quantized[bn] = A.quantize(q, k, v, cfg)
                out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
                t0 = time.perf_counter()
                A.attention_quantized(qz, shape, torch.bfloat16, cfg, out=out)
                torch.cuda.synchronize()
                entry["first_call_s"] = time.perf_counter() - t0
                t = cuda_time(lambda: A.attention_quantized(qz, shape, torch.bfloat16, cfg, out=out), 2, 5)
                entry.update(kernel_s=t, kernel_tops=OPS / t / 1e12)
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"[:600]
            rows.append(entry)
            log(f"tune {label} {(bm, bn, warps, stages, maxnreg)}: "
                + (f"{entry['kernel_s'] * 1e3:.2f} ms, {entry['kernel_tops']:.0f} TOPS" if "kernel_s" in entry
                   else entry.get("error", "")[:200]))
            save()
        timed = [r for r in rows if "kernel_s" in r]
        if not timed:
            continue
        best = min(timed, key=lambda r: r["kernel_s"])
        cfg = A.KernelConfig(**best["config"])
        BEST[label] = cfg
        quantized.clear()
        pre = cuda_time(lambda: A.quantize(q, k, v, cfg), 2, 5)
        op = cuda_time(lambda: A.int8_attention(q, k, v, *A.config_args(cfg)), 2, 5)
        sec[f"{label}_best"] = dict(config=best["config"], kernel_s=best["kernel_s"], kernel_tops=best["kernel_tops"],
                                    quantize_s=pre, op_s=op, op_tops=OPS / op / 1e12)
        log(f"best {label}: {json.dumps(sec[f'{label}_best'])}")
        save()
    t, tf = cudnn_rate(q, k, v)
    sec["cudnn_bf16_after"] = {"s": t, "tflops": tf}
    R["best_configs"] = {k: asdict(v) for k, v in BEST.items()}


def dit():
    import builders
    import harness
    from multitalk.models.architecture import FULL_14B
    from multitalk.runtime.dit_fusion import fuse_dit
    from multitalk.runtime.fp8 import ffn_fp8_filter, quantize_linears_fp8

    sec = P.section("dit")
    for name in ("recompile_limit", "cache_size_limit"):  # one recompile per variant below
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    s = harness.Setting(FULL_14B, torch.device("cuda"), torch.bfloat16, text_tokens=200)
    model = builders.build_dit(s)
    one = builders.dit_inputs(s, 1)

    def fwd():
        with torch.no_grad():
            return model(**one)

    def timed(label, repeat=3):
        stats, out = harness.measure(fwd, s.device, warmup=0, repeat=repeat)
        sec[f"{label}_s"], sec[f"{label}_times"] = stats["median_s"], stats["times_s"]
        return out.float()

    fwd()
    ref = timed("eager_bf16", 1)
    fuse_dit(model, device=s.device)
    model.compile_repeated_blocks(fullgraph=True, dynamic=False)
    fwd()
    cref = timed("compiled_bf16")
    sec["compiled_bf16_vs_eager"] = rel(cref, ref)
    save()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ffn_fp8_filter(n, m)}
    variants = [("int8attn", "bf16_block", False), ("int8attn_fp8ffn", "bf16_block", True),
                ("int8attn_token", "bf16_token", False), ("int8attn_fp8pv", "fp8_block", False),
                ("int8attn_fp8pv_fp8ffn", "fp8_block", True)]
    for name, mode, fp8_ffn in variants:
        if left() < 35:
            sec[f"{name}_skipped"] = "budget"
            continue
        try:
            A.enable_int8_self_attention(model, BEST.get(mode, MODES[mode]))
            if fp8_ffn:
                quantize_linears_fp8(model, include=ffn_fp8_filter)
            t0 = time.perf_counter()
            fwd()
            sec[f"{name}_first_s"] = time.perf_counter() - t0
            out = timed(name)
            sec[f"{name}_vs_eager"] = rel(out, ref)
            sec[f"{name}_vs_compiled"] = rel(out, cref)
            sec[f"{name}_over_compiled_bf16"] = sec[f"{name}_s"] / sec["compiled_bf16_s"]
            log(f"dit {name}: {sec[f'{name}_s']:.3f} s, vs eager {sec[f'{name}_vs_eager']:.4f}, "
                f"vs compiled {sec[f'{name}_vs_compiled']:.4f}")
        except Exception as exc:
            sec[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:800]
            log(f"dit {name} failed: {exc}")
        finally:
            A.disable_int8_self_attention(model)
            harness.restore_modules(model, linears)
            save()
    if "int8attn_s" in sec and left() > 20:
        A.enable_int8_self_attention(model, BEST.get("bf16_block", MODES["bf16_block"]))
        try:
            with torch.no_grad():
                sec["breakdown_int8attn"] = harness.kernel_breakdown(lambda: model(**one))
        finally:
            A.disable_int8_self_attention(model)


def table():
    rows = []
    t = R.get("tune", {})
    for key in ("cudnn_bf16_before", "cudnn_bf16_after"):
        if key in t:
            rows.append((key, f"{t[key]['s'] * 1e3:.2f} ms  {t[key]['tflops']:.0f} TFLOP/s"))
    for label in MODES:
        b = t.get(f"{label}_best")
        if b:
            c = b["config"]
            rows.append((f"{label} {c['block_m']}x{c['block_n']} w{c['num_warps']} s{c['num_stages']} r{c['maxnreg']}",
                         f"kernel {b['kernel_s'] * 1e3:.2f} ms {b['kernel_tops']:.0f} TOPS; op {b['op_s'] * 1e3:.2f} ms "
                         f"{b['op_tops']:.0f}; quantize {b['quantize_s'] * 1e3:.2f} ms"))
    for tk, res in R.get("errors", {}).items():
        if isinstance(res, dict):
            rows.append((f"err {tk}", " ".join(f"{k}={v:.4f}" for k, v in res.items() if isinstance(v, float))))
    d = R.get("dit", {})
    for k, v in d.items():
        if isinstance(v, float) and not k.endswith("first_s"):
            rows.append((f"dit {k}", f"{v:.4f}"))
    print("\n" + "\n".join(f"{k:<44} {v}" for k, v in rows), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--parts", default="env,correctness,tune,errors,dit")
    p.add_argument("--budget-s", type=float, default=300.0)
    args = p.parse_args()
    BUDGET["deadline"] = time.perf_counter() + args.budget_s
    parts = {"env": env, "correctness": correctness, "errors": errors, "tune": tune, "dit": dit}
    P.run(args.out_dir, parts, args.parts, hide=("tune", "dit", "correctness", "errors", "env"))
    table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
