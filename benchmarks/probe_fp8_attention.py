"""GPU probe: cuDNN fp8 self-attention (rate, error), the DiT with it, and a fused GELU epilogue.

    PYTHONPATH=/tmp/site python benchmarks/probe_fp8_attention.py --out-dir "$OUT"

Writes ``probe_fp8_attention.json`` (rewritten after every step; a failing step records its error and
the probe goes on) and prints a short table. Sizes are the benchmark's: 33,600 tokens, 40 heads of 128.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import rel_l2 as rel  # noqa: E402
from ceilings import cuda_time  # noqa: E402
from probe import Probe  # noqa: E402

P = Probe("probe_fp8_attention")
R, log, save = P.data, P.log, P.save


S, H, D = 33600, 40, 128


def env():
    import cudnn

    R["env"] = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                    torch_cudnn=torch.backends.cudnn.version(), frontend=getattr(cudnn, "__version__", "?"),
                    frontend_backend=int(cudnn.backend_version()))
    from multitalk.runtime.attention_fp8 import availability
    R["env"]["fp8_available"] = availability()
    log(str(R["env"]))


def make_qkv(temperature: float, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn():
        return torch.randn(1, S, H, D, device="cuda", generator=g)

    def rms_all_heads(x):  # what rms_norm_across_heads gives: unit RMS over the whole width
        return x * torch.rsqrt(x.pow(2).mean(dim=(-2, -1), keepdim=True) + 1e-6)

    q = (rms_all_heads(randn()) * temperature).bfloat16()
    k = rms_all_heads(randn()).bfloat16()
    v = randn().bfloat16()
    return q, k, v


def reference_heads(q, k, v, heads=(0, 7), chunk=4096):
    """float32 exact attention for a few heads: ``[S, len(heads), D]``."""
    outs = []
    for h in heads:
        qh, kh, vh = q[0, :, h].float(), k[0, :, h].float(), v[0, :, h].float()
        rows = []
        for i in range(0, S, chunk):
            p = torch.softmax(qh[i:i + chunk] @ kh.T / math.sqrt(D), dim=-1)
            rows.append(p @ vh)
        outs.append(torch.cat(rows))
    return torch.stack(outs, dim=1)


def attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from multitalk.runtime.attention_fp8 import E4M3_MAX, Fp8SelfAttention, _quantize, cudnn_sdpa_fp8

    sec = R.setdefault("attention", {})
    flops = 4 * S * S * D * H
    ones = torch.ones(H * D, device="cuda", dtype=torch.float32)
    attn = SimpleNamespace(norm_q=SimpleNamespace(weight=ones), norm_k=SimpleNamespace(weight=ones))
    fp8 = Fp8SelfAttention()
    for temperature in (1.0, 4.0):
        q, k, v = make_qkv(temperature)
        key = f"t{temperature:g}"
        res = sec.setdefault(key, {})

        def bf16():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)

        out_bf16 = bf16()
        out_fp8 = fp8(attn, q, k, v)
        torch.cuda.synchronize()
        heads = (0, 7)
        ref = reference_heads(q, k, v, heads)
        res["err_bf16_vs_fp32"] = rel(out_bf16[0, :, list(heads)], ref)
        res["err_fp8_vs_fp32"] = rel(out_fp8[0, :, list(heads)], ref)
        res["err_fp8_vs_bf16_all_heads"] = rel(out_fp8, out_bf16)
        res["nan_fp8"] = bool(torch.isnan(out_fp8).any())
        del ref
        if temperature == 1.0:
            t = cuda_time(bf16, warmup=2, repeat=5)
            res["bf16_cudnn_s"], res["bf16_cudnn_tflops"] = t, flops / t / 1e12
            scale_q = E4M3_MAX / (ones.abs().amax() * math.sqrt(H * D))
            amax_v = v.abs().amax().float()
            scale_v = E4M3_MAX / amax_v
            q8, k8, v8 = _quantize(q, scale_q), _quantize(k, scale_q), _quantize(v, scale_v)
            s448 = torch.full_like(scale_v, E4M3_MAX)
            scales = torch.stack([1 / scale_q, 1 / scale_q, 1 / scale_v, 1 / s448, s448, scale_v])
            t = cuda_time(lambda: cudnn_sdpa_fp8(q8, k8, v8, scales), warmup=2, repeat=5)
            res["fp8_kernel_s"], res["fp8_kernel_tflops"] = t, flops / t / 1e12
            t = cuda_time(lambda: fp8(attn, q, k, v), warmup=2, repeat=5)
            res["fp8_eager_with_quant_s"] = t
            compiled = torch.compile(lambda a, b, c: fp8(attn, a, b, c), fullgraph=True, dynamic=False)
            compiled(q, k, v)
            t = cuda_time(lambda: compiled(q, k, v), warmup=2, repeat=5)
            res["fp8_compiled_with_quant_s"] = t
            res["fp8_compiled_err_vs_eager"] = rel(compiled(q, k, v), out_fp8)
        log(f"attention {key}: {json.dumps(res)}")
        del q, k, v, out_bf16, out_fp8
        torch.cuda.empty_cache()
        save()


def kernel_vs_reference():
    """The cuDNN fp8 kernel against runtime.attention_fp8.reference_sdpa_fp8 (the tests' reference)."""
    from multitalk.runtime.attention_fp8 import E4M3_MAX, cudnn_sdpa_fp8, quantized_attention, reference_sdpa_fp8

    sec = R.setdefault("kernel_vs_reference", {})
    g = torch.Generator(device="cuda").manual_seed(5)
    for seq, heads in ((4096, 4), (1600, 8)):
        q, k, v = (torch.randn(2, seq, heads, D, device="cuda", generator=g) for _ in range(3))
        sq = torch.tensor(E4M3_MAX / 6.0, device="cuda")
        sv = E4M3_MAX / v.abs().amax()
        out = quantized_attention(q, k, v, sq, sq, sv, cudnn_sdpa_fp8)
        ref = quantized_attention(q, k, v, sq, sq, sv, reference_sdpa_fp8)
        exact = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        sec[f"s{seq}_h{heads}"] = dict(kernel_vs_reference=rel(out, ref), kernel_vs_exact=rel(out, exact),
                                       reference_vs_exact=rel(ref, exact))
    log(f"kernel vs reference: {json.dumps(sec)}")


def gelu_epilogue():
    sec = R.setdefault("gelu_epilogue", {})
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(S, 5120, device="cuda", generator=g).bfloat16()
    w = (torch.randn(13824, 5120, device="cuda", generator=g) / math.sqrt(5120)).bfloat16()
    b = (torch.randn(13824, device="cuda", generator=g) * 0.1).bfloat16()
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    sep = lambda: F.gelu(F.linear(x, w, b), approximate="tanh")  # noqa: E731
    fused = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)  # noqa: E731
    plain = lambda: F.linear(x, w, b)  # noqa: E731
    comp = torch.compile(sep, fullgraph=True)
    comp()
    for name, fn in (("linear_only", plain), ("separate_eager", sep), ("separate_compiled", comp),
                     ("addmm_activation", fused)):
        sec[f"{name}_s"] = cuda_time(fn, warmup=3, repeat=10)
        if name != "linear_only":
            sec[f"{name}_err"] = rel(fn(), ref)
    exact = F.gelu(F.linear(x.float(), w.float(), b.float()))
    sec["addmm_activation_err_vs_exact_gelu"] = rel(fused(), exact)
    log(f"gelu: {json.dumps(sec)}")


def dit():
    import builders
    import harness
    from multitalk.models.architecture import FULL_14B
    from multitalk.runtime.attention_fp8 import disable_fp8_self_attention, enable_fp8_self_attention
    from multitalk.runtime.fp8 import ffn_fp8_filter, quantize_linears_fp8

    sec = R.setdefault("dit", {})
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

    ref = fwd().float()                       # eager bf16 (warm-up)
    ref = timed("eager_bf16", 1)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ffn_fp8_filter(n, m)}

    def restore_linears():
        harness.restore_modules(model, linears)

    sec["fp8_attn_blocks"] = enable_fp8_self_attention(model)
    out = fwd().float()
    sec["eager_fp8attn_err"] = rel(out, ref)
    timed("eager_fp8attn", 1)
    quantize_linears_fp8(model, include=ffn_fp8_filter)
    out = fwd().float()
    sec["eager_fp8attn_ffn_err"] = rel(out, ref)
    disable_fp8_self_attention(model)
    out = fwd().float()
    sec["eager_fp8ffn_err"] = rel(out, ref)
    restore_linears()
    out = fwd().float()
    sec["eager_bf16_repeat_err"] = rel(out, ref)   # determinism of the reference
    log(f"dit eager: {json.dumps({k: v for k, v in sec.items() if not k.endswith('times')})}")
    save()

    model.compile_repeated_blocks(fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    cref = fwd().float()
    sec["compile_first_s"] = time.perf_counter() - t0
    cref = timed("compiled_bf16")
    sec["compiled_bf16_vs_eager_err"] = rel(cref, ref)
    save()

    enable_fp8_self_attention(model)
    t0 = time.perf_counter()
    fwd()
    sec["compile_fp8attn_first_s"] = time.perf_counter() - t0
    out = timed("compiled_fp8attn")
    sec["compiled_fp8attn_err_vs_compiled_bf16"] = rel(out, cref)
    sec["compiled_fp8attn_err_vs_eager_bf16"] = rel(out, ref)
    save()
    try:
        with torch.no_grad():
            sec["breakdown_fp8attn"] = harness.kernel_breakdown(lambda: model(**one))
    except Exception as exc:
        sec["breakdown_error"] = str(exc)[:300]
    save()

    quantize_linears_fp8(model, include=ffn_fp8_filter)
    fwd()
    out = timed("compiled_fp8attn_ffn")
    sec["compiled_fp8attn_ffn_err_vs_compiled_bf16"] = rel(out, cref)
    sec["compiled_fp8attn_ffn_err_vs_eager_bf16"] = rel(out, ref)
    save()

    disable_fp8_self_attention(model)
    fwd()
    out = timed("compiled_fp8ffn")
    sec["compiled_fp8ffn_err_vs_compiled_bf16"] = rel(out, cref)
    sec["compiled_fp8ffn_err_vs_eager_bf16"] = rel(out, ref)
    restore_linears()
    for k in ("compiled_fp8attn", "compiled_fp8attn_ffn", "compiled_fp8ffn"):
        sec[f"{k}_over_compiled_bf16"] = sec[f"{k}_s"] / sec["compiled_bf16_s"]
    log(f"dit compiled: {json.dumps({k: v for k, v in sec.items() if not k.endswith('times') and k != 'breakdown_fp8attn'})}")


def bf16_plans():
    """bf16 SDPA through the frontend: every execution plan cuDNN offers for this shape, timed."""
    import cudnn

    sec = R.setdefault("bf16_plans", {})
    q, k, v = make_qkv(1.0)
    o = torch.empty_like(q)
    views = [t.transpose(1, 2) for t in (q, k, v, o)]
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    tq, tk, tv = (graph.tensor(name=n, dim=list(t.shape), stride=list(t.stride()),
                               data_type=cudnn.data_type.BFLOAT16) for n, t in zip("qkv", views[:3]))
    kwargs = dict(q=tq, k=tk, v=tv, attn_scale=1 / math.sqrt(D), use_causal_mask=False, name="sdpa")
    try:
        to, _ = graph.sdpa(generate_stats=False, **kwargs)
    except TypeError:
        to, _ = graph.sdpa(is_inference=True, **kwargs)
    to.set_output(True).set_dim(list(views[3].shape)).set_stride(list(views[3].stride()))
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    sec["graph_methods"] = [m for m in dir(graph) if not m.startswith("_")]
    count = graph.get_execution_plan_count()
    sec["plan_count"] = count
    flops = 4 * S * S * D * H
    pack = {tq: views[0], tk: views[1], tv: views[2], to: views[3]}
    plans = []
    for i in range(count):
        entry = {"index": i}
        try:
            entry["name"] = graph.get_plan_name_at_index(i)
            graph.build_plan_at_index(i)
            ws = torch.empty(max(1, graph.get_workspace_size_plan_at_index(i)), device="cuda", dtype=torch.uint8)
            fn = lambda: graph.execute_plan_at_index(pack, ws, i, handle=handle)  # noqa: E731
            t = cuda_time(fn, warmup=1, repeat=3)
            entry.update(s=t, tflops=flops / t / 1e12)
        except Exception as exc:
            entry["error"] = str(exc)[:200]
        plans.append(entry)
        log(f"plan {entry}")
        sec["plans"] = plans
        save()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--steps", default="env,kernel_vs_reference,attention,gelu_epilogue,dit,bf16_plans")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    steps = {"env": env, "kernel_vs_reference": kernel_vs_reference, "attention": attention,
             "gelu_epilogue": gelu_epilogue, "dit": dit, "bf16_plans": bf16_plans}
    P.run(args.out_dir, steps, args.steps, hide=("bf16_plans",))
    return 0


if __name__ == "__main__":
    sys.exit(main())
