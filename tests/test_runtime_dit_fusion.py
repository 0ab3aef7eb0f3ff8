"""runtime.dit_fusion: the fused q/k norm + RoPE kernel and the GELU epilogue compute what the blocks compute.

The Triton kernel runs for real on CUDA and, on CPU machines (CI's included), through Triton's
interpreter (conftest.py selects it). It is held to the eager chain it replaces on random inputs
and RoPE tables of a real latent grid, and the fused tiny DiT must still reproduce the golden
forward vectors. The GPU benchmark measures the speed at full size (``compile`` section).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_l2
from diffusers.models.activations import GELU

from multitalk.models.transformer import CachedWanRotaryPosEmbed, load_transformer
from multitalk.runtime.dit_fusion import (FusedLinearGELU, fuse_dit, linear_gelu_tanh, qk_norm_rope,
                                          reference_qk_norm_rope, unfuse_dit)


def triton_runs() -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA: run with TRITON_INTERPRET=1 to check the kernel on CPU")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rope_tables(head_dim: int, grid=(3, 4, 6)):
    rope = CachedWanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    rope.reset_tables(_device())
    t, h, w = grid
    return rope(torch.zeros(1, 16, t, 2 * h, 2 * w, device=_device()))      # [1, L, 1, D] each


@pytest.mark.parametrize("dtype,heads,batch", [(torch.float32, 3, 2), (torch.bfloat16, 5, 1),
                                               (torch.float32, 8, 1)])
def test_qk_norm_rope_matches_the_eager_chain(dtype, heads, batch):
    triton_runs()
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("Triton's CPU interpreter does not round float32 -> bf16 as the GPU does")
    head_dim = 32
    cos, sin = _rope_tables(head_dim)
    length = cos.shape[1]
    g = torch.Generator().manual_seed(heads)
    norm = torch.nn.RMSNorm(heads * head_dim, eps=1e-6).to(_device(), dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(heads * head_dim, generator=g) * 2 + 0.1)
    # a strided input as the projections give it: every other row of a wider buffer
    wide = (torch.randn(batch, length, 2 * heads * head_dim, generator=g) * 3).to(_device(), dtype)
    x = wide[..., : heads * head_dim]
    with torch.no_grad():
        ref = reference_qk_norm_rope(x, norm, cos, sin, heads)
        out = qk_norm_rope(x, norm.weight, cos, sin, heads, 1e-6)
    assert out.shape == ref.shape == (batch, length, heads, head_dim) and out.dtype == dtype
    assert torch.isfinite(out).all()
    err = rel_l2(out, ref)
    # float32: summation order only; bf16: an occasional 1-ulp rounding flip (bf16 ulp: 2^-8 relative)
    assert err <= (1e-6 if dtype == torch.float32 else 1e-3), err


def test_linear_gelu_tanh_is_linear_then_tanh_gelu():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 7, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    assert torch.equal(linear_gelu_tanh(x, w, b), F.gelu(F.linear(x, w, b), approximate="tanh"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt epilogue needs CUDA")
def test_linear_gelu_epilogue_on_cuda_is_the_tanh_approximation():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 256, device="cuda", generator=g) * 2
    w = torch.randn(384, 256, device="cuda", generator=g) / 16
    b = torch.randn(384, device="cuda", generator=g)
    out = linear_gelu_tanh(x, w, b)
    tanh = F.gelu(F.linear(x, w, b), approximate="tanh")
    exact = F.gelu(F.linear(x, w, b))
    assert rel_l2(out, tanh) < 0.1 * rel_l2(exact, tanh)


def test_fused_tiny_dit_reproduces_the_golden_forward(tiny_ckpt_dir, golden_vectors):
    triton_runs()
    model = load_transformer(tiny_ckpt_dir)
    counts = fuse_dit(model, device="cuda")   # as Engine.load does on CUDA: GELU epilogue + q/k kernel
    assert counts == {"qk_norm_rope": len(model.blocks), "linear_gelu": len(model.blocks)}
    assert all(isinstance(b.ffn.net[0], FusedLinearGELU) for b in model.blocks)
    calls = []
    kernel = model.blocks[0].attn1.processor.qk_override

    def spy(*args):
        calls.append(1)
        return kernel(*args)

    # the Triton interpreter is slow on CPU: the q/k kernel in the first block only (the speaker
    # map of the two-speaker case reads that block's rotated q/k); the GELU epilogue everywhere
    for block in model.blocks:
        block.attn1.processor.qk_override = None
    model.blocks[0].attn1.processor.qk_override = spy
    for case in ("dit_2person_bbox",):   # the two-speaker case: also the speaker map's use of q/k
        v = golden_vectors(case)
        with torch.no_grad():
            out = model(v["x"][None], v["t"], [v["context"]], v["clip_fea"], v["y"], v["audio"],
                        v["ref_target_masks"])
        assert rel_l2(out[0], v["out"]) <= 1e-5
    assert len(calls) == 1
    unfuse_dit(model)
    assert all(isinstance(b.ffn.net[0], GELU) for b in model.blocks)
    assert all(b.attn1.processor.qk_override is None for b in model.blocks)


def test_fuse_dit_leaves_a_cpu_model_alone_and_defaults_to_both_fusions(tiny_ckpt_dir):
    model = load_transformer(tiny_ckpt_dir)
    assert fuse_dit(model) == {"qk_norm_rope": 0, "linear_gelu": 0}
    assert all(isinstance(b.ffn.net[0], GELU) for b in model.blocks)
    assert all(b.attn1.processor.qk_override is None for b in model.blocks)
    assert fuse_dit(model, device="cuda", qk=False) == {"qk_norm_rope": 0, "linear_gelu": len(model.blocks)}
    assert all(b.attn1.processor.qk_override is None for b in model.blocks)
    unfuse_dit(model)
    n = len(model.blocks)
    assert fuse_dit(model, device="cuda") == {"qk_norm_rope": n, "linear_gelu": n}
    assert all(b.attn1.processor.qk_override is not None for b in model.blocks)


def test_fp8_after_fusion_keeps_the_gelu(tiny_ckpt_dir):
    """--fp8 replaces the projection inside the fused module: the GELU must still be applied."""
    from multitalk.runtime.fp8 import quantize_linears_fp8

    model = load_transformer(tiny_ckpt_dir)
    fuse_dit(model, device="cuda")
    fused = model.blocks[0].ffn.net[0]
    x = torch.randn(2, 5, fused.proj.in_features)
    expected = F.gelu(fused.proj(x), approximate="tanh")
    replaced = quantize_linears_fp8(model, include=lambda name, m: name == "blocks.0.ffn.net.0.proj")
    assert replaced == 1 and type(fused.proj) is not torch.nn.Linear
    fused.proj = torch.nn.Identity()          # stand-in for the fp8 linear (fp8 matmuls need CUDA)
    assert torch.equal(fused(expected), F.gelu(expected, approximate="tanh"))


_COMPILE_FOR_SM90 = r"""
import json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from multitalk.runtime.dit_fusion import _norm_rope_kernel
signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16",
             "L": "i32", "x_row_stride": "i32", "out_row_stride": "i32", "cs_row_stride": "i32", "eps": "fp32",
             "HEADS": "constexpr", "HB": "constexpr", "D": "constexpr"}
# what a launch on the DiT's tensors specialises: 16-byte aligned pointers, strides divisible by 16
aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 6, 7, 8)}
try:
    compiled = triton.compile(ASTSource(fn=_norm_rope_kernel(), signature=signature, attrs=aligned,
                                        constexprs={"HEADS": 40, "HB": 8, "D": 128}),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
except Exception as exc:  # a Triton build without the NVIDIA backend
    print(json.dumps({"skip": f"{type(exc).__name__}: {str(exc)[:200]}"}))
    sys.exit(0)
ptx = compiled.asm["ptx"]
print(json.dumps({k: len(re.findall(p, ptx)) for k, p in (("ld_v4", r"ld\.global\.v4\.b32"),
      ("st_v4", r"st\.global\.v4\.b32"), ("scalar_b16", r"(ld|st)\.global\.b16"), ("local", r"\.local"))}))
"""


def test_qk_kernel_compiles_for_hopper_with_16_byte_accesses():
    """Compiled for sm_90 here (no GPU needed): every global access of the q/k kernel is a 16-byte
    vector and nothing goes to local memory. Its first version loaded and stored 2 bytes at a
    time (64 + 32 scalar accesses per thread) and ran at 200 GB/s on an H200. Compiled in a fresh
    process: Triton's interpreter (used by the other tests here) leaves its patches behind."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in counts:
        pytest.skip(f"cannot compile for sm_90 here: {counts['skip']}")
    assert counts["ld_v4"] >= 2 and counts["st_v4"] >= 1, counts   # the row, the weight; the output
    assert counts["scalar_b16"] == 0 and counts["local"] == 0, counts
