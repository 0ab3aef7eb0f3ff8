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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import rel_l2 as rel  # noqa: E402
from ceilings import cuda_time  # noqa: E402
from probe import Probe  # noqa: E402

P = Probe("probe_dit_fusion")
log = P.log


def micro():
    import multitalk.runtime.dit_fusion as fusion
    from multitalk.models.transformer import CachedWanRotaryPosEmbed

    sec = P.section("micro")
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


def model_variants():
    import builders
    import harness
    import multitalk.runtime.dit_fusion as fusion
    from multitalk.models.architecture import FULL_14B

    sec = P.section("model")
    s = harness.Setting(FULL_14B, torch.device("cuda"), torch.bfloat16, text_tokens=200)
    model = builders.build_dit(s)
    one = builders.dit_inputs(s, 1)
    model.compile_repeated_blocks(fullgraph=True, dynamic=False)
    ref = None
    for label, qk, gelu in (("none", False, False), ("gelu", False, True), ("qk", True, False),
                            ("both", True, True), ("none_again", False, False)):
        fusion.unfuse_dit(model)
        fusion.fuse_dit(model, qk=qk, gelu=gelu)
        with torch.no_grad():
            stats, out = harness.measure(lambda: model(**one), s.device, warmup=1, repeat=3)
        out = out.float()
        ref = out if ref is None else ref
        entry = dict(median_s=stats["median_s"], times=stats["times_s"], err_vs_none=rel(out, ref))
        if label in ("none", "both"):
            with torch.no_grad():
                bd = harness.kernel_breakdown(lambda: model(**one))
            entry["breakdown"] = {k: v for k, v in bd.items() if k != "top"}
            entry["top"] = bd["top"][:14]
        sec[label] = entry
        log(f"{label}: {entry['median_s']:.3f}s err {entry['err_vs_none']:.2e}")
        P.save()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--parts", default="micro,model")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    P.data["gpu"] = torch.cuda.get_device_name()
    P.run(args.out_dir, {"micro": micro, "model": model_variants}, args.parts, hide=("top",))


if __name__ == "__main__":
    main()
