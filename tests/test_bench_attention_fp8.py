"""benchmarks/attention_fp8.py: cuDNN's fp8 self-attention (measured, not offered) and its PyTorch reference.

The cuDNN kernel needs a Hopper GPU; it is held to :func:`reference_sdpa_fp8` there (two e4m3
roundings of the same values apart, so the tolerance is an fp8 one). On any machine the reference
path checks the scales (nothing overflows e4m3), the wiring into the blocks and a clear refusal
where cuDNN's fp8 attention cannot run. The benchmark measures speed and the DiT's error at full
size (``compiled_extra``, variant ``attention``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_l2

from multitalk.models.transformer import load_transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from attention_fp8 import (E4M3_MAX, Fp8SelfAttention, availability, cudnn_sdpa_fp8,  # noqa: E402
                           disable_fp8_self_attention, enable_fp8_self_attention, fp8_scales, quantized_attention,
                           reference_sdpa_fp8)


def _qkv(batch=1, length=256, heads=4, dim=64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, length, heads, dim, generator=g).to(device) for _ in range(3))
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(dim=(-2, -1), keepdim=True))  # noqa: E731
    return rms(q), rms(k), v


def _attn(width, device="cpu"):
    ones = torch.ones(width, device=device)
    return SimpleNamespace(norm_q=SimpleNamespace(weight=ones), norm_k=SimpleNamespace(weight=ones))


def test_reference_fp8_attention_is_attention_within_fp8_precision():
    q, k, v = _qkv()
    out = Fp8SelfAttention(reference_sdpa_fp8)(_attn(4 * 64), q, k, v)
    exact = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert out.shape == q.shape and torch.isfinite(out).all()
    err = rel_l2(out, exact)
    assert 1e-3 < err < 0.1, err        # e4m3 has 3 mantissa bits: a few percent, never exact


def test_scales_never_overflow_e4m3():
    """The scales Fp8SelfAttention uses keep q/k at their worst case (an RMS norm's output with all
    the energy in one channel, under the largest weight) and v at its amax inside e4m3's range
    before any clamp, and use that range fully."""
    heads, dim = 4, 64
    width = heads * dim
    g = torch.Generator().manual_seed(0)
    w_q, w_k = torch.rand(width, generator=g) * 3, torch.rand(width, generator=g) * 2
    norm = lambda x, w: torch.nn.functional.rms_norm(x, (width,), w)  # noqa: E731  the blocks' q/k norm
    spike = torch.zeros(1, 8, width)
    spike[..., int(w_q.argmax())] = 5.0                 # all energy in the channel of the largest weight
    q = norm(spike, w_q).unflatten(-1, (heads, dim))
    spike_k = torch.zeros(1, 8, width)
    spike_k[..., int(w_k.argmax())] = -2.0
    k = norm(spike_k, w_k).unflatten(-1, (heads, dim))
    v = torch.randn(1, 8, heads, dim, generator=g) * 7
    attn = SimpleNamespace(norm_q=SimpleNamespace(weight=w_q), norm_k=SimpleNamespace(weight=w_k))
    scale_q, scale_k, scale_v = fp8_scales(attn, q, v)
    for x, scale in ((q, scale_q), (k, scale_k), (v, scale_v)):
        peak = float((x.float() * scale).abs().max())   # what e4m3 receives, unclamped
        assert peak <= E4M3_MAX * (1 + 1e-6) and peak == pytest.approx(E4M3_MAX, rel=1e-5)
    # any q an RMS norm can produce stays inside: random rows, rotated pairs
    q_rand = norm(torch.randn(1, 64, width, generator=g), w_q)
    assert float((q_rand * scale_q).abs().max()) < E4M3_MAX


def test_blocks_use_the_override_and_can_switch_back(tiny_ckpt_dir, golden_vectors):
    model = load_transformer(tiny_ckpt_dir)
    v = golden_vectors("dit_1person")

    def run():
        with torch.no_grad():
            return model(v["x"][None], v["t"], [v["context"]], v["clip_fea"], v["y"], v["audio"],
                         v["ref_target_masks"])

    assert enable_fp8_self_attention(model, kernel=reference_sdpa_fp8) == len(model.blocks)
    quantized = run()
    assert disable_fp8_self_attention(model) == len(model.blocks)
    assert rel_l2(run()[0], v["out"]) <= 1e-5                      # back to the exact path
    err = rel_l2(quantized[0], v["out"])
    assert 1e-4 < err < 0.1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_kernel_is_refused_with_the_reason_on_cpu(tiny_ckpt_dir):
    ok, why = availability()
    assert not ok and "CUDA" in why
    with pytest.raises(RuntimeError, match="fp8 attention unavailable: needs a CUDA GPU"):
        enable_fp8_self_attention(load_transformer(tiny_ckpt_dir))


@pytest.mark.skipif(not availability()[0], reason="needs a Hopper GPU with cuDNN's fp8 attention")
@pytest.mark.parametrize("length,heads", [(1600, 8), (4096, 4)])
def test_cudnn_kernel_matches_the_reference(length, heads):
    q, k, v = (t * 2 for t in _qkv(2, length, heads, 128, seed=length, device="cuda"))
    sq = torch.tensor(E4M3_MAX / 8.0, device="cuda")
    sv = E4M3_MAX / v.abs().amax()
    out = quantized_attention(q, k, v, sq, sq, sv, cudnn_sdpa_fp8)
    ref = quantized_attention(q, k, v, sq, sq, sv, reference_sdpa_fp8)
    assert torch.isfinite(out).all()
    # measured on an H200: 3.6e-2 / 3.8e-2 (fp8 rounding of P and O on either side)
    assert rel_l2(out, ref) < 6e-2
