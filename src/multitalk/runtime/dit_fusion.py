"""Fused operations for the DiT blocks on CUDA: tanh-GELU in the GEMM epilogue; q/k RMS norm + RoPE kernel.

A compiled block (regional ``torch.compile``) still spends time between its matrix products. At
640x640x81 (``benchmarks/results``) the feed-forward's tanh-GELU is its own pass over the
33,600 x 13,824 activation (26 ms per forward), and inductor's q/k ``RMSNorm`` + RoPE kernel runs at
about a quarter of the memory floor (51 ms). :func:`fuse_dit` replaces, on a loaded model:

* each feed-forward's first linear + tanh-GELU with :func:`linear_gelu_tanh`: cuBLASLt's GELU
  epilogue (``torch._addmm_activation``) applies the activation to the float32 accumulator before
  the single rounding to bf16. On by default: H200 run 8 measured the epilogue GEMM at 0.251 s
  against 0.247 s + 0.026 s for the GEMM and the separate GELU (-22 ms per forward);
* each self-attention's ``norm_q`` / ``norm_k`` + RoPE with :func:`qk_norm_rope` (on by
  default; ``qk=False`` keeps inductor's): one Triton kernel per tensor that reads a token's row
  (5120 values) in tiles of 8 heads, a sum-of-squares pass and a normalise-weight-rotate pass, and
  writes it once. It rounds where the eager chain rounds (after the weighted norm and after the
  rotation, in the activation dtype), so it reproduces the eager operations up to float32
  summation order. Its first version (the whole row per program, even and odd elements loaded
  apart) compiled to scalar 2-byte accesses (64 loads and 32 stores per thread in its PTX), ran at
  200 GB/s on the H200 and made the forward 0.13 s slower. This one compiles to 16-byte vector
  accesses with no local memory (a CPU test compiles it for sm_90 and checks). H200
  (``benchmarks/probe_dit_fusion.py``, run 9): 0.26 ms per call at 33,600 x 5120 (2.6 TB/s)
  against inductor's 0.72 ms (0.96 TB/s); the compiled forward 3.295 s against 3.330 s without
  it, 3.279 s with both fusions (-1.5 %).

Both are registered custom ops, so a compiled block calls them as they are. Without CUDA the
model is left as it is; the CPU tests run the Triton kernel through Triton's interpreter against
the eager chain, and the fused tiny DiT against the golden forward vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from multitalk.models.transformer import apply_rotary, self_attention_processors

_KERNEL = None


def _norm_rope_kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def norm_rope_looped(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, L, x_row_stride, out_row_stride,
                         cs_row_stride, eps, HEADS: tl.constexpr, HB: tl.constexpr, D: tl.constexpr):
        # the row in tiles of HB heads: a sum-of-squares pass, then normalise + rotate + store
        # (the second read of the 10 KB row comes from cache); few registers per thread
        row = tl.program_id(0)
        pos = row % L
        hb = tl.arange(0, HB)[:, None]
        c = tl.arange(0, D)[None, :]
        x_row = x_ptr + row.to(tl.int64) * x_row_stride
        out_row = out_ptr + row.to(tl.int64) * out_row_stride
        acc = tl.zeros([HB, D], dtype=tl.float32)
        for h0 in range(0, HEADS, HB):
            m = ((h0 + hb) < HEADS) & (c >= 0)
            x = tl.load(x_row + (h0 + hb) * D + c, mask=m, other=0.0).to(tl.float32)
            acc += x * x
        r = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / (HEADS * D) + eps)
        dt = out_ptr.dtype.element_ty
        j = tl.arange(0, D // 2)[None, :]
        cos = tl.load(cos_ptr + pos * cs_row_stride + 2 * j).to(tl.float32)
        sin = tl.load(sin_ptr + pos * cs_row_stride + 2 * j + 1).to(tl.float32)
        for h0 in range(0, HEADS, HB):
            m = ((h0 + hb) < HEADS) & (c >= 0)
            at = (h0 + hb) * D + c
            x = tl.load(x_row + at, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + at, mask=m, other=0.0).to(tl.float32)
            n = (x * r * w).to(dt).to(tl.float32)
            even, odd = tl.split(tl.reshape(n, (HB, D // 2, 2)))
            out = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (HB, D))
            tl.store(out_row + at, out.to(dt), mask=m)

    _KERNEL = norm_rope_looped
    return _KERNEL


@torch.library.custom_op("multitalk::qk_norm_rope", mutates_args=())
def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                 eps: float) -> torch.Tensor:
    """``RMSNorm(x) -> [B, L, heads, D] -> Wan RoPE`` in one Triton kernel.

    ``x [B, L, heads*D]`` (unit last stride), ``weight [heads*D]``, ``cos``/``sin`` ``[1, L, 1, D]``
    (``CachedWanRotaryPosEmbed``'s tables). Returns a new contiguous ``[B, L, heads, D]`` tensor.
    """
    batch, length, width = x.shape
    d = width // heads
    if x.stride(-1) != 1 or (batch > 1 and x.stride(0) != length * x.stride(1)):
        x = x.contiguous()
    cos2 = cos.reshape(length, d)
    sin2 = sin.reshape(length, d)
    if cos2.stride(-1) != 1 or sin2.stride(-1) != 1 or cos2.stride(0) != sin2.stride(0):
        cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    out = torch.empty(batch, length, heads, d, device=x.device, dtype=x.dtype)
    _norm_rope_kernel()[(batch * length,)](
        x, weight.contiguous(), cos2, sin2, out, length, x.stride(1), width, cos2.stride(0), float(eps),
        HEADS=heads, HB=_head_tile(heads), D=d, num_warps=4)
    return out


@qk_norm_rope.register_fake
def _(x, weight, cos, sin, heads, eps):
    batch, length, width = x.shape
    return x.new_empty(batch, length, heads, width // heads)


def _head_tile(heads: int) -> int:
    """Largest power of two <= 8 that divides ``heads`` (40 -> 8), else 8 with a masked tail."""
    for tile in (8, 4, 2):
        if heads % tile == 0:
            return tile
    return 8 if heads > 8 else _next_pow2(heads)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def reference_qk_norm_rope(x: torch.Tensor, norm: nn.Module, cos: torch.Tensor, sin: torch.Tensor,
                           heads: int) -> torch.Tensor:
    """The eager chain :func:`qk_norm_rope` replaces (``MultiTalkSelfAttnProcessor``'s own code)."""
    return apply_rotary(norm(x).unflatten(2, (heads, -1)), cos, sin)


def _rms_eps(norm: nn.Module, dtype: torch.dtype) -> float:
    eps = getattr(norm, "eps", None)
    return float(eps) if eps is not None else float(torch.finfo(dtype).eps)


class FusedQKNormRope:
    """``MultiTalkSelfAttnProcessor.qk_override``: ``(attn, query, key, rotary_emb) -> (q, k)``, ``[B, L, H, D]``."""

    def __call__(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, rotary_emb):
        cos, sin = rotary_emb
        q = qk_norm_rope(query, attn.norm_q.weight, cos, sin, attn.heads, _rms_eps(attn.norm_q, query.dtype))
        k = qk_norm_rope(key, attn.norm_k.weight, cos, sin, attn.heads, _rms_eps(attn.norm_k, key.dtype))
        return q, k


# ----------------------------------------------------------------------------------------------
# Linear + tanh-GELU with the activation in the GEMM's epilogue


@torch.library.custom_op("multitalk::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x W^T + b, approximate="tanh")``; on CUDA through cuBLASLt's GELU epilogue."""
    shape = x.shape
    if x.is_cuda:
        out = torch._addmm_activation(bias, x.reshape(-1, shape[-1]), weight.t(), use_gelu=True)
        return out.reshape(*shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class FusedLinearGELU(nn.Module):
    """Drop-in for diffusers' ``GELU(approximate="tanh")`` projection module (keeps its ``proj``)."""

    def __init__(self, gelu: nn.Module):
        super().__init__()
        self.proj = gelu.proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if type(self.proj) is not nn.Linear:  # replaced afterwards (fp8): no epilogue for it
            return F.gelu(self.proj(hidden_states), approximate="tanh")
        return linear_gelu_tanh(hidden_states, self.proj.weight, self.proj.bias)


# ----------------------------------------------------------------------------------------------


def fuse_dit(model: nn.Module, device: torch.device | str | None = None, qk: bool = True, gelu: bool = True,
             ) -> dict[str, int]:
    """Install the fused operations on every MultiTalk block that runs on CUDA; returns counts.

    ``device``: where the model will run (default: where its parameters are). On other devices
    nothing changes. The GELU epilogue is skipped for a projection already replaced (fp8).
    """
    run_on = torch.device(device) if device is not None else next(model.parameters()).device
    counts = {"qk_norm_rope": 0, "linear_gelu": 0}
    if run_on.type != "cuda":
        return counts
    from diffusers.models.activations import GELU

    if qk:
        override = FusedQKNormRope()
        for processor in self_attention_processors(model):
            processor.qk_override = override
            counts["qk_norm_rope"] += 1
    for block in getattr(model, "blocks", []):
        first = block.ffn.net[0]
        if (gelu and isinstance(first, GELU) and first.approximate == "tanh" and type(first.proj) is nn.Linear
                and first.proj.bias is not None):
            block.ffn.net[0] = FusedLinearGELU(first)
            counts["linear_gelu"] += 1
    return counts


def unfuse_dit(model: nn.Module) -> None:
    """Undo :func:`fuse_dit` (the benchmark compares both on the same weights)."""
    from diffusers.models.activations import GELU

    for processor in self_attention_processors(model):
        processor.qk_override = None
    for block in getattr(model, "blocks", []):
        first = block.ffn.net[0]
        if isinstance(first, FusedLinearGELU):
            gelu = GELU(first.proj.in_features, first.proj.out_features, approximate="tanh")
            gelu.proj = first.proj
            block.ffn.net[0] = gelu
