"""GPU probe: runtime.dit_fusion's operations in isolation and in the compiled DiT, variant by variant.

    PYTHONPATH=/tmp/site python benchmarks/probe_dit_fusion.py --out-dir "$OUT"

Writes ``probe_dit_fusion.json``: the q/k norm + RoPE kernel against inductor's compiled eager chain
at 33,600 x 5120, the GELU epilogue op against the compiled linear + GELU, and the compiled
1-speaker forward with none / each / both fusions (median of 3, kernel breakdowns). It decided
``fuse_dit``'s defaults (run 9-pre1: both fusions pay, so both are on).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import rel_l2 as rel  # noqa: E402
from ceilings import cuda_time  # noqa: E402

R: dict = {}
T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def micro(out_dir: Path):
    import multitalk.runtime.dit_fusion as fusion
    from multitalk.models.transformer import CachedWanRotaryPosEmbed

    sec = R.setdefault("micro", {})
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 33600, 5120, device="cuda", generator=g).bfloat16()
    norm = torch.nn.RMSNorm(5120, eps=1e-6).cuda().bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(5120, device="cuda", generator=g) + 0.5)
    rope = CachedWanRotaryPosEmbed(128, (1, 2, 2), 1024)
    rope.reset_tables("cuda")
    cos, sin = rope(torch.zeros(1, 16, 21, 80, 80, device="cuda"))
    with torch.no_grad():
        ref = fusion.reference_qk_norm_rope(x, norm, cos, sin, 40)
        compiled = torch.compile(lambda t: fusion.reference_qk_norm_rope(t, norm, cos, sin, 40), fullgraph=True)
        compiled(x)
        sec["inductor_s"] = cuda_time(lambda: compiled(x), warmup=3, repeat=20)
        sec["inductor_err"] = rel(compiled(x), ref)
        fn = lambda: fusion.qk_norm_rope(x, norm.weight, cos, sin, 40, 1e-6)  # noqa: E731
        sec["kernel_s"] = cuda_time(fn, warmup=3, repeat=20)
        sec["kernel_err"] = rel(fn(), ref)
    moved = 2 * x.numel() * 2
    for k in ("inductor", "kernel"):
        sec[f"{k}_gbps"] = moved / sec[f"{k}_s"] / 1e9
    w = (torch.randn(13824, 5120, device="cuda", generator=g) / math.sqrt(5120)).bfloat16()
    b = (torch.randn(13824, device="cuda", generator=g) * 0.1).bfloat16()
    x2 = x[0]
    sep = torch.compile(lambda t: F.gelu(F.linear(t, w, b), approximate="tanh"), fullgraph=True)
    sep(x2)
    op = torch.compile(lambda t: fusion.linear_gelu_tanh(t, w, b), fullgraph=True)
    op(x2)
    sec["gelu_compiled_separate_s"] = cuda_time(lambda: sep(x2), warmup=3, repeat=10)
    sec["gelu_custom_op_compiled_s"] = cuda_time(lambda: op(x2), warmup=3, repeat=10)
    sec["gelu_custom_op_err"] = rel(op(x2), F.gelu(F.linear(x2.float(), w.float(), b.float()), approximate="tanh"))
    log(f"micro: {json.dumps(sec)}")


def model_variants(out_dir: Path):
    import bench
    import multitalk.runtime.dit_fusion as fusion
    from multitalk.models.architecture import FULL_14B

    sec = R.setdefault("model", {})
    s = bench.Setting(FULL_14B, torch.device("cuda"), torch.bfloat16, text_tokens=200)
    model = bench.build_dit(s)
    one = bench.dit_inputs(s, 1)
    model.compile_repeated_blocks(fullgraph=True, dynamic=False)
    ref = None
    for label, qk, gelu in (("none", False, False), ("gelu", False, True), ("qk", True, False),
                            ("both", True, True), ("none_again", False, False)):
        fusion.unfuse_dit(model)
        fusion.fuse_dit(model, qk=qk, gelu=gelu)
        with torch.no_grad():
            stats, out = bench.measure(lambda: model(**one), s.device, warmup=1, repeat=3)
        out = out.float()
        ref = out if ref is None else ref
        entry = dict(median_s=stats["median_s"], times=stats["times_s"], err_vs_none=rel(out, ref))
        if label in ("none", "both"):
            with torch.no_grad():
                bd = bench.kernel_breakdown(lambda: model(**one))
            entry["breakdown"] = {k: v for k, v in bd.items() if k != "top"}
            entry["top"] = bd["top"][:14]
        sec[label] = entry
        log(f"{label}: {entry['median_s']:.3f}s err {entry['err_vs_none']:.2e}")
        (out_dir / "probe_dit_fusion.json").write_text(json.dumps(R, indent=1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", type=Path, required=True)
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    R["gpu"] = torch.cuda.get_device_name()
    for fn in (micro, model_variants):
        try:
            fn(args.out_dir)
        except Exception as exc:
            R[fn.__name__ + "_error"] = f"{type(exc).__name__}: {exc}\n" + traceback.format_exc()[-2500:]
            log(R[fn.__name__ + "_error"])
        (args.out_dir / "probe_dit_fusion.json").write_text(json.dumps(R, indent=1))
    R["total_s"] = time.perf_counter() - T0
    (args.out_dir / "probe_dit_fusion.json").write_text(json.dumps(R, indent=1))
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk not in ("top",)} if isinstance(v, dict) else v)
                      for k, v in R.items()}, indent=1)[-7000:])


if __name__ == "__main__":
    main()
