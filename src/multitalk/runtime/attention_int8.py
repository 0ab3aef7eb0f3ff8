"""8-bit self-attention for the DiT on Hopper: int8 Q·Kᵀ with smoothed K (SageAttention's scheme), in Triton.

The DiT's self-attention (33,600 tokens at 640x640x81, 40 heads of 128) is half of its FLOPs.
cuDNN's fp8 attention (``benchmarks/attention_fp8.py``) is fast but quantises q, k, v, P and O to e4m3
with one scale each and is off by 6e-2 to 1.1e-1; PyTorch has no 8-bit attention. This module is
SageAttention's recipe (Zhang et al., "SageAttention", ICLR 2025; "SageAttention2", ICML 2025)
written for this shape as Triton kernels:

* **K smoothing.** ``k - mean_tokens(k)`` per head and channel: softmax is invariant to adding a
  constant to a row of scores, so ``q·(k - k̄)`` gives the same probabilities while the int8 range
  is spent on what differs between keys (real checkpoints have a large shared K component).
* **int8 Q and K with fine scales.** q per token (one scale per row of 128 values, with the softmax
  scale and log2(e) folded in), k per block of ``BLOCK_N`` keys (the kernel's tile) or per token.
  Q·Kᵀ runs on the int8 tensor cores (exact int32 accumulation).
* **P·V in bf16** (``pv="bf16"``, the offered mode): the probabilities rounded to bf16, V as the
  model gives it, fp32 accumulation. ``pv="fp8"`` (SageAttention2's fp8 P·V: P scaled by 448 to
  e4m3, V in e4m3 with a scale per channel, promoted to fp32 after every tile) is kept for
  measurement: e4m3 has 3 mantissa bits, and on inputs with flat attention (random weights) the
  rounding of P and V alone costs about 2.7e-2 relative error (``benchmarks/results``).

The int32 scores become floats without a conversion instruction: for ``|s| < 2^22`` (here
``|s| <= 128·127·127``) the bit pattern ``s + 0x4B400000`` is the float ``1.5·2^23 + s``, and the
constant is folded into the softmax's per-row offset, so a score costs one integer add, one FMA
and one exp2. :func:`reference_int8_attention` computes the same quantisation in PyTorch (the
tests hold the kernel to it) and :func:`exact_attention` the float64 attention it approximates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from multitalk.models.transformer import self_attention_processors

LOG2E = 1.4426950408889634
INT8_MAX = 127.0
E4M3_MAX = 448.0
MAGIC = 0x4B400000            # bit pattern of 12582912.0 = 1.5 * 2^23: float(MAGIC + s) = 12582912 + s
MAGIC_F = 12582912.0
MODES = ("bf16", "fp8")
K_SCALES = ("block", "token")


@dataclass(frozen=True)
class KernelConfig:
    """One compiled variant of the attention kernel.

    ``pv``: precision of P·V (``"bf16"`` or ``"fp8"``); ``k_scale``: one int8 scale per ``block_n``
    keys (``"block"``) or per key (``"token"``); the rest are Triton's launch parameters
    (``maxnreg``: a register cap per thread, 0 for none).
    """

    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2
    pv: str = "bf16"
    k_scale: str = "block"
    maxnreg: int = 0           # register cap per thread (0: the compiler's choice)

    def __post_init__(self):
        if self.pv not in MODES:
            raise ValueError(f"pv must be one of {MODES}, got {self.pv!r}")
        if self.k_scale not in K_SCALES:
            raise ValueError(f"k_scale must be one of {K_SCALES}, got {self.k_scale!r}")


# The H200's fastest shape (benchmarks/probe_int8_attention.py, 2026-12-02: 649 TOPS against cuDNN
# bf16's 576 TFLOP/s; one warpgroup of 64 query rows per program, two programs per multiprocessor)
DEFAULT_CONFIG = KernelConfig()


def config_args(c: KernelConfig) -> tuple:
    """``c`` as the positional arguments of :func:`int8_attention` after q, k, v."""
    return (c.block_m, c.block_n, c.num_warps, c.num_stages, c.pv, c.k_scale, c.maxnreg)


# ----------------------------------------------------------------------------------------------
# Triton kernels

try:  # a test dependency and part of the CUDA stack; the PyTorch reference needs none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _kernels() -> dict[str, object]:
    if triton is None:
        raise RuntimeError("int8 attention needs Triton")
    return {"quantize_int8": _quantize_int8, "attention_fwd": _attention_fwd}


if triton is not None:
    @triton.jit
    def _quantize_int8(x_ptr, mean_ptr, out_ptr, scale_ptr, S, H, stride_b, stride_s, scale_mul,
                      BLK: tl.constexpr, D: tl.constexpr, PER_TOKEN: tl.constexpr, SMOOTH: tl.constexpr):
        # one program: BLK tokens of one (batch, head) of x [B, S, H, D] -> int8 [B, H, S, D] + scales
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = blk * BLK + tl.arange(0, BLK)
        cols = tl.arange(0, D)
        valid = rows < S
        src = x_ptr + b.to(tl.int64) * stride_b + rows[:, None].to(tl.int64) * stride_s + h * D + cols[None, :]
        x = tl.load(src, mask=valid[:, None], other=0.0).to(tl.float32)
        if SMOOTH:
            x = x - tl.load(mean_ptr + bh * D + cols)[None, :]
            x = tl.where(valid[:, None], x, 0.0)
        if PER_TOKEN:
            amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-30)             # [BLK]
            inv = 127.0 / amax
            y = x * inv[:, None]
            tl.store(scale_ptr + bh * S + rows, amax / 127.0 * scale_mul, mask=valid)
        else:
            amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-30)
            inv = 127.0 / amax
            y = x * inv
            tl.store(scale_ptr + bh * tl.num_programs(0) + blk, amax / 127.0 * scale_mul)
        y = y + tl.where(y >= 0, 0.5, -0.5)                                  # round half away from 0
        dst = out_ptr + (bh.to(tl.int64) * S + rows[:, None]) * D + cols[None, :]
        tl.store(dst, y.to(tl.int8), mask=valid[:, None])

    @triton.jit
    def _attention_tiles(acc, l_i, m_i, q, qs, k_desc, v_desc, ks_ptr, kv_row, v_row, v_col, lo, hi, S,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                        PV_FP8: tl.constexpr, K_TOKEN: tl.constexpr, MASK: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            start = tl.multiple_of(start, BLOCK_N)
            k = k_desc.load([kv_row + start, 0])                              # int8 [BLOCK_N, D]
            s = tl.dot(q, k.T)                                                # int32 [BLOCK_M, BLOCK_N]
            x = (s + 0x4B400000).to(tl.float32, bitcast=True)                      # 1.5*2^23 + s, exact
            if K_TOKEN:
                ks = tl.load(ks_ptr + start + offs_n, mask=(start + offs_n) < S, other=0.0)
                x = x * ks[None, :] - (12582912.0 * ks)[None, :]                 # s * ks
                if MASK:
                    x = tl.where((start + offs_n)[None, :] < S, x, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(x, axis=1) * qs)
                p = tl.math.exp2(x * qs[:, None] - m_new[:, None])
            else:
                r = qs * tl.load(ks_ptr + start // BLOCK_N)                   # [BLOCK_M]
                if MASK:
                    x = tl.where((start + offs_n)[None, :] < S, x, float("-inf"))
                m_new = tl.maximum(m_i, (tl.max(x, axis=1) - 12582912.0) * r)
                p = tl.math.exp2(x * r[:, None] - (12582912.0 * r + m_new)[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            if PV_FP8:
                vt = v_desc.load([v_row, start])                              # e4m3 [D, BLOCK_N]
                acc = tl.dot((p * 448.0).to(tl.float8e4nv), vt.T, acc, max_num_imprecise_acc=BLOCK_N)
            else:
                v = v_desc.load([v_row + start, v_col])                       # bf16 [BLOCK_N, D]
                acc = tl.dot(p.to(tl.bfloat16), v, acc)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attention_fwd(q_desc, k_desc, v_desc, qs_ptr, ks_ptr, vs_ptr, o_ptr, S, H, o_stride_b, o_stride_s,
                      o_stride_h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                      PV_FP8: tl.constexpr, K_TOKEN: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < S
        q = q_desc.load([bh * S + pid_m * BLOCK_M, 0])                        # int8 [BLOCK_M, D]
        qs = tl.load(qs_ptr + bh * S + offs_m, mask=row_ok, other=1.0)       # dequant * sm_scale * log2(e)
        if K_TOKEN:
            ks_ptr = ks_ptr + bh * S
        else:
            ks_ptr = ks_ptr + bh * tl.cdiv(S, BLOCK_N)
        if PV_FP8:
            v_row = bh * D
            v_col = 0
        else:
            v_row = b * S
            v_col = h * D
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        full = (S // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attention_tiles(acc, l_i, m_i, q, qs, k_desc, v_desc, ks_ptr, bh * S, v_row, v_col, 0,
                                         full, S, BLOCK_M, BLOCK_N, D, PV_FP8, K_TOKEN, False)
        acc, l_i, m_i = _attention_tiles(acc, l_i, m_i, q, qs, k_desc, v_desc, ks_ptr, bh * S, v_row, v_col, full,
                                         S, S, BLOCK_M, BLOCK_N, D, PV_FP8, K_TOKEN, True)
        cols = tl.arange(0, D)
        out = acc / l_i[:, None]
        if PV_FP8:
            out = out * (tl.load(vs_ptr + bh * D + cols) / 448.0)[None, :]
        dst = (o_ptr + b.to(tl.int64) * o_stride_b + offs_m[:, None].to(tl.int64) * o_stride_s + h * o_stride_h
               + cols[None, :])
        tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])



# ----------------------------------------------------------------------------------------------
# Quantisation (kernel and PyTorch reference share the layout and the arithmetic)


@dataclass
class Quantized:
    """q/k in int8 ``[B, H, S, D]`` with their scales, and V as the P·V product reads it."""

    q8: torch.Tensor
    q_scale: torch.Tensor      # [B, H, S]: amax/127 * sm_scale * log2(e)
    k8: torch.Tensor
    k_scale: torch.Tensor      # [B, H, S] (per token) or [B, H, ceil(S / block_n)]
    v: torch.Tensor            # bf16 [B, S, H, D] (pv="bf16") or e4m3 V^T [B, H, D, S_pad] (pv="fp8")
    v_scale: torch.Tensor | None  # [B, H, D] per-channel amax / 448 (pv="fp8")


def _round_half_away(y: torch.Tensor) -> torch.Tensor:
    return torch.trunc(y + torch.where(y >= 0, 0.5, -0.5)).to(torch.int8)


def _pad16(n: int) -> int:
    return (n + 15) // 16 * 16


def quantize_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KernelConfig) -> Quantized:
    """The quantisation of :func:`int8_attention` in PyTorch (``[B, S, H, D]`` inputs, any device)."""
    batch, seq, heads, dim = q.shape
    sm = LOG2E / math.sqrt(dim)
    qf = q.float().transpose(1, 2)                                            # [B, H, S, D]
    kf = k.float().transpose(1, 2)
    kf = kf - k.float().mean(dim=1).unsqueeze(2)
    amax_q = qf.abs().amax(dim=-1).clamp_min(1e-30)
    q8 = _round_half_away(qf * (INT8_MAX / amax_q)[..., None])
    q_scale = amax_q / INT8_MAX * sm
    if config.k_scale == "token":
        amax_k = kf.abs().amax(dim=-1).clamp_min(1e-30)
        k8 = _round_half_away(kf * (INT8_MAX / amax_k)[..., None])
        k_scale = amax_k / INT8_MAX
    else:
        n = config.block_n
        blocks = -(-seq // n)
        padded = torch.nn.functional.pad(kf, (0, 0, 0, blocks * n - seq)).reshape(batch, heads, blocks, n, dim)
        amax_k = padded.abs().amax(dim=(-2, -1)).clamp_min(1e-30)             # [B, H, blocks]
        inv = (INT8_MAX / amax_k).repeat_interleave(n, dim=-1)[..., :seq]
        k8 = _round_half_away(kf * inv[..., None])
        k_scale = amax_k / INT8_MAX
    if config.pv == "fp8":
        vt = v.float().permute(0, 2, 3, 1)                                    # [B, H, D, S]
        amax_v = vt.abs().amax(dim=-1).clamp_min(1e-30)                       # [B, H, D]
        v8 = (vt * (E4M3_MAX / amax_v)[..., None]).to(torch.float8_e4m3fn)
        v_out = torch.zeros(batch, heads, dim, _pad16(seq), dtype=torch.float8_e4m3fn, device=v.device)
        v_out[..., :seq] = v8
        v_scale = amax_v / E4M3_MAX
    else:
        v_out, v_scale = v.to(torch.bfloat16), None
    return Quantized(q8.contiguous(), q_scale.contiguous(), k8.contiguous(), k_scale.contiguous(), v_out, v_scale)


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KernelConfig) -> Quantized:
    """:func:`quantize_reference` with the int8 rounding in one Triton kernel per tensor."""
    kernels = _kernels()
    batch, seq, heads, dim = q.shape
    dev = q.device
    q, k = (t if t.stride(-1) == 1 and t.stride(2) == dim else t.contiguous() for t in (q, k))
    k_mean = k.mean(dim=1, dtype=torch.float32).contiguous()                  # [B, H, D]
    q8 = torch.empty(batch, heads, seq, dim, dtype=torch.int8, device=dev)
    k8 = torch.empty_like(q8)
    q_scale = torch.empty(batch, heads, seq, dtype=torch.float32, device=dev)
    blk = 64
    kernels["quantize_int8"][(-(-seq // blk), batch * heads)](
        q, q, q8, q_scale, seq, heads, q.stride(0), q.stride(1), LOG2E / math.sqrt(dim),
        BLK=blk, D=dim, PER_TOKEN=True, SMOOTH=False, num_warps=4)
    if config.k_scale == "token":
        k_scale = torch.empty(batch, heads, seq, dtype=torch.float32, device=dev)
        kblk, per_token = blk, True
    else:
        kblk, per_token = config.block_n, False
        k_scale = torch.empty(batch, heads, -(-seq // kblk), dtype=torch.float32, device=dev)
    kernels["quantize_int8"][(-(-seq // kblk), batch * heads)](
        k, k_mean, k8, k_scale, seq, heads, k.stride(0), k.stride(1), 1.0,
        BLK=kblk, D=dim, PER_TOKEN=per_token, SMOOTH=True, num_warps=4 if kblk <= 64 else 8)
    if config.pv == "fp8":
        vt = v.permute(0, 2, 3, 1)                                            # [B, H, D, S] view
        amax_v = vt.abs().amax(dim=-1).float().clamp_min(1e-30)
        v_out = torch.zeros(batch, heads, dim, _pad16(seq), dtype=torch.float8_e4m3fn, device=dev)
        v_out[..., :seq] = (vt.float() * (E4M3_MAX / amax_v)[..., None]).to(torch.float8_e4m3fn)
        v_scale = amax_v / E4M3_MAX
    else:
        v_out = v.to(torch.bfloat16)
        v_out = v_out if _tma_rows_ok(v_out) else v_out.contiguous()
        v_scale = None
    return Quantized(q8, q_scale, k8, k_scale, v_out, v_scale)


def _tma_rows_ok(v: torch.Tensor) -> bool:
    """V [B, S, H, D] readable as one 2-D [B*S, H*D] matrix with 16-byte aligned rows."""
    batch, seq, heads, dim = v.shape
    return (v.stride(3) == 1 and v.stride(2) == dim and v.stride(1) == heads * dim
            and (batch == 1 or v.stride(0) == seq * heads * dim) and (heads * dim * v.element_size()) % 16 == 0
            and v.data_ptr() % 16 == 0)


# ----------------------------------------------------------------------------------------------
# Attention: kernel, PyTorch reference of the same arithmetic, float64 exact


def attention_quantized(qz: Quantized, shape: tuple, out_dtype: torch.dtype, config: KernelConfig,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton attention kernel on quantised inputs -> ``[B, S, H, D]`` in ``out_dtype`` (or into ``out``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, seq, heads, dim = shape
    bm, bn = config.block_m, config.block_n
    if out is None:
        out = torch.empty(batch, seq, heads, dim, dtype=out_dtype, device=qz.q8.device)
    q_desc = TensorDescriptor(qz.q8, [batch * heads * seq, dim], [dim, 1], [bm, dim])
    k_desc = TensorDescriptor(qz.k8, [batch * heads * seq, dim], [dim, 1], [bn, dim])
    if config.pv == "fp8":
        v_desc = TensorDescriptor(qz.v, [batch * heads * dim, qz.v.shape[-1]], [qz.v.shape[-1], 1], [dim, bn])
        v_scale = qz.v_scale
    else:
        v_desc = TensorDescriptor(qz.v, [batch * seq, heads * dim], [heads * dim, 1], [bn, dim])
        v_scale = qz.q_scale                                                   # unused
    grid = (-(-seq // bm), batch * heads)
    extra = {"maxnreg": config.maxnreg} if config.maxnreg else {}
    _kernels()["attention_fwd"][grid](
        q_desc, k_desc, v_desc, qz.q_scale, qz.k_scale, v_scale, out, seq, heads,
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=bm, BLOCK_N=bn, D=dim, PV_FP8=config.pv == "fp8", K_TOKEN=config.k_scale == "token",
        num_warps=config.num_warps, num_stages=config.num_stages, **extra)
    return out


def reference_attention_quantized(qz: Quantized, shape: tuple, out_dtype: torch.dtype, config: KernelConfig,
                                  chunk: int = 1024, compute: torch.dtype = torch.float64) -> torch.Tensor:
    """What :func:`attention_quantized` computes, in PyTorch (``compute``: float64, or float32 as the kernel).

    Scores are the exact int8 products times the scales. The kernel's online softmax is reproduced
    tile by tile: tile ``j`` (``block_n`` keys) gets the probabilities ``exp2(s - m_j)``, ``m_j`` the
    running row maximum after that tile, rounded to bf16 (or to e4m3 after x448) for the P·V
    product; the kernel's rescaling of its accumulator by ``exp2(m_{j-1} - m_j)`` after each tile
    multiplies up to ``exp2(m_j - m_last)``, which is applied here directly. The row sum uses the
    unrounded probabilities, as the kernel does.
    """
    batch, seq, heads, dim = shape
    bn = config.block_n
    tiles = -(-seq // bn)
    q = qz.q8.to(compute) * qz.q_scale.to(compute)[..., None]                      # [B, H, S, D], log2 units
    k = qz.k8.to(compute)
    if config.k_scale == "token":
        k = k * qz.k_scale.to(compute)[..., None]
    else:
        k = k * qz.k_scale.to(compute).repeat_interleave(bn, dim=-1)[..., :seq, None]
    if config.pv == "fp8":
        v = qz.v[..., :seq].to(compute).transpose(-1, -2)                        # [B, H, S, D] in e4m3 units
    else:
        v = qz.v.to(compute).transpose(1, 2)
    v = torch.nn.functional.pad(v, (0, 0, 0, tiles * bn - seq))
    out = torch.empty(batch, heads, seq, dim, dtype=compute, device=q.device)
    for i in range(0, seq, chunk):
        s = q[:, :, i:i + chunk] @ k.transpose(-1, -2)                         # [B, H, c, S]
        s = torch.nn.functional.pad(s, (0, tiles * bn - seq), value=float("-inf")).unflatten(-1, (tiles, bn))
        m = s.amax(dim=-1).cummax(dim=-1).values                              # running max after each tile
        p = torch.exp2(s - m[..., None])                                      # [B, H, c, tiles, bn]
        l = (p.sum(dim=-1) * torch.exp2(m - m[..., -1:])).sum(dim=-1, keepdim=True)
        if config.pv == "fp8":
            p = (p * E4M3_MAX).float().to(torch.float8_e4m3fn).to(compute)
        else:
            p = p.to(torch.bfloat16).to(compute)
        p = (p * torch.exp2(m - m[..., -1:])[..., None]).flatten(-2)
        out[:, :, i:i + chunk] = (p @ v) / l
    if config.pv == "fp8":
        out = out * (qz.v_scale.to(compute) / E4M3_MAX)[:, :, None, :]
    return out.transpose(1, 2).to(out_dtype)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Softmax attention of ``[B, S, H, D]`` inputs in float64 (scale 1/sqrt(D)), chunked over queries."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    rows = [torch.softmax(qd[:, :, i:i + chunk] @ kd.transpose(-1, -2) * scale, dim=-1) @ vd
            for i in range(0, qd.shape[2], chunk)]
    return torch.cat(rows, dim=2).transpose(1, 2)


@torch.library.custom_op("multitalk::int8_attention", mutates_args=())
def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int = 64, block_n: int = 128,
                   num_warps: int = 4, num_stages: int = 2, pv: str = "bf16", k_scale: str = "block",
                   maxnreg: int = 0) -> torch.Tensor:
    """Self-attention of ``q, k, v [B, S, H, D]`` (unit last stride) through the 8-bit Triton kernel.

    Returns a new ``[B, S, H, D]`` tensor in q's dtype. Softmax scale ``1/sqrt(D)``, no mask.
    """
    config = KernelConfig(block_m, block_n, num_warps, num_stages, pv, k_scale, maxnreg)
    return attention_quantized(quantize(q, k, v, config), tuple(q.shape), q.dtype, config)


@int8_attention.register_fake
def _(q, k, v, block_m=64, block_n=128, num_warps=4, num_stages=2, pv="bf16", k_scale="block", maxnreg=0):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def reference_int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             config: KernelConfig = DEFAULT_CONFIG, compute: torch.dtype = torch.float64
                             ) -> torch.Tensor:
    """:func:`int8_attention`'s arithmetic in PyTorch alone (any device; CPU tests, the tiny pipeline)."""
    return reference_attention_quantized(quantize_reference(q, k, v, config), tuple(q.shape), q.dtype, config,
                                         compute=compute)


# ----------------------------------------------------------------------------------------------
# The self-attention override


def hopper_problem(device: torch.device | str | None = None) -> str | None:
    """Why ``device`` is not a Hopper-or-newer CUDA GPU (None when it is)."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        return f"needs a CUDA device, got {dev}"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 9:
        return f"needs a Hopper or newer GPU (compute capability 9.0+), this one is {major}.{minor}"
    return None


def availability(device: torch.device | str | None = None) -> tuple[bool, str]:
    """``(True, "")`` when the Triton kernel can run on ``device``, else ``(False, why)``."""
    problem = hopper_problem(device)
    if problem is not None:
        return False, problem
    try:
        import triton  # noqa: F401
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False, "needs Triton with tensor descriptors (3.4 or newer)"
    return True, ""


class Int8SelfAttention:
    """Callable installed as ``MultiTalkSelfAttnProcessor.sdpa_override``: ``(attn, q, k, v) -> out``.

    ``reference=True`` runs :func:`reference_int8_attention` (PyTorch, any device) instead of the
    Triton kernel: the same quantisation, so CPU runs show the scheme's effect on a whole video.
    """

    def __init__(self, config: KernelConfig = DEFAULT_CONFIG, reference: bool = False):
        self.config = config
        self.reference = reference

    def __call__(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.reference:  # float32 arithmetic, as the kernel's
            return reference_int8_attention(query, key, value, self.config, compute=torch.float32)
        c = self.config
        return int8_attention(query, key, value, *config_args(c))


def enable_int8_self_attention(model: nn.Module, config: KernelConfig = DEFAULT_CONFIG,
                               reference: bool = False, device: torch.device | str | None = None) -> int:
    """Run every MultiTalk block's self-attention through :class:`Int8SelfAttention`; returns how many.

    With the Triton kernel (``reference=False``), raises ``RuntimeError`` naming the reason when
    ``device`` (default: where the model's parameters are) cannot run it (see :func:`availability`).
    """
    if not reference:
        ok, why = availability(device if device is not None else next(model.parameters()).device)
        if not ok:
            raise RuntimeError(f"int8 attention unavailable: {why}")
    processors = self_attention_processors(model)
    override = Int8SelfAttention(config, reference)
    for processor in processors:
        processor.sdpa_override = override
    return len(processors)


def disable_int8_self_attention(model: nn.Module) -> int:
    """Back to the model's own attention; returns how many blocks were switched."""
    switched = [p for p in self_attention_processors(model) if isinstance(p.sdpa_override, Int8SelfAttention)]
    for processor in switched:
        processor.sdpa_override = None
    return len(switched)


# ----------------------------------------------------------------------------------------------
# Choosing the self-attention of an engine

MODES_CLI = ("auto", "sdpa", "int8")


def select_self_attention(mode: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The DiT self-attention an engine runs: ``"int8"`` or ``"sdpa"``.

    ``auto``: the 8-bit kernel on a Hopper GPU (compute capability 9.x) in bf16/fp16, where it passed
    the issue's gates (H200: 1.13x cuDNN bf16's rate, DiT output 2.25e-2 from eager bf16 at full
    size, as close as the compiled bf16 forward itself); elsewhere ``sdpa``. ``int8`` where it
    cannot run, or an unknown mode, raises :class:`UserInputError` (exit 2 on the command line).
    """
    from multitalk.errors import UserInputError

    if mode not in MODES_CLI:
        raise UserInputError("attention", f"unknown attention {mode!r}", f"use one of {', '.join(MODES_CLI)}")
    if mode == "sdpa":
        return "sdpa"
    dev = torch.device(device)
    ok, why = availability(dev)
    if ok and torch.cuda.get_device_capability(dev)[0] != 9:
        ok, why = False, "the kernel is built and measured for Hopper (compute capability 9.x) only"
    if mode == "auto":
        return "int8" if ok and dtype in (torch.bfloat16, torch.float16) else "sdpa"
    if not ok:
        raise UserInputError("attention", f"the 8-bit attention cannot run here: {why} (device {dev})",
                             "use --attention sdpa (or auto)")
    return "int8"
