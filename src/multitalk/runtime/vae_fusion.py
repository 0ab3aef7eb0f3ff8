"""Fused element-wise chains in the Wan VAE: normalise -> SiLU -> causal padding in one pass.

In diffusers' ``AutoencoderKLWan`` every half of a residual block runs a chain of element-wise
kernels over the whole activation before its 3-D convolution: ``WanRMS_norm`` (cast to float32,
L2 norm over channels, divide, cast back, x scale, x gamma, + bias), SiLU, then two copies to build
the causal convolution's input (``torch.cat`` with the cached frames and ``F.pad``). At 640x640 one
4-frame activation of the top level is 300 MB in bf16, and this chain passes over it about 15 times.

:func:`fuse_vae` rewrites, on a loaded model, each residual block's forward so that one call builds
the padded convolution input and the next chunk's cache, the encoder's and decoder's output
norm + SiLU become one call, and the 2x nearest upsampling copies in the activation's own dtype
(nearest neighbour selects values, so skipping diffusers' float32 round trip changes no bit).
Two implementations of the norm + SiLU call:

* ``"eager"``: the same PyTorch operations in the same order as diffusers (bit-identical; the
  reference the CPU tests hold the rewrite to);
* ``"triton"`` (CUDA): one Triton kernel per call that reads the activation twice (sum of squares
  over channels, then normalise x weight, SiLU) and writes straight into the padded buffer; it
  computes in float32 and rounds once, so bf16 results differ from the eager chain by bf16
  rounding only (measured by the GPU benchmark's ``vae`` section).

The convolutions still run as cuDNN kernels with the same weights and zero padding.
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders import autoencoder_kl_wan as wan_vae
from torch import nn

CACHE_T = 2  # frames of each activation kept for the next chunk's causal convolution (diffusers' CACHE_T)
EPS = 1e-12  # F.normalize's default


# --- the reference: diffusers' operations, in its order ---------------------------------------

def norm_silu(x: torch.Tensor, gamma: torch.Tensor, bias, scale: float) -> torch.Tensor:
    """``WanRMS_norm`` (channel-first) followed by SiLU, operation for operation as diffusers runs them."""
    if x.dtype in (torch.float16, torch.bfloat16):
        normalized = F.normalize(x.float(), dim=1).to(x.dtype)
    else:
        normalized = F.normalize(x, dim=1)
    return F.silu(normalized * scale * gamma + bias)


def causal_input(y: torch.Tensor, prev: torch.Tensor | None, padding: tuple[int, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal convolution's padded input and the next chunk's cache, as ``WanResidualBlock`` +
    ``WanCausalConv3d`` build them from the activation ``y`` and the previous chunk's cache ``prev``
    (``None`` on the first chunk). ``padding`` is the convolution's ``_padding`` (W, W, H, H, T, 0)."""
    cache = _next_cache(y, prev)
    pad = list(padding)
    if prev is not None and pad[4] > 0:
        y = torch.cat([prev, y], dim=2)
        pad[4] -= prev.shape[2]
    return F.pad(y, pad), cache


def _next_cache(y: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    cache = y[:, :, -CACHE_T:].clone()
    if cache.shape[2] < CACHE_T and prev is not None:
        cache = torch.cat([prev[:, :, -1:], cache], dim=2)
    return cache


class EagerNormSiLU:
    """The reference implementation of the two fused calls."""

    name = "eager"

    def norm_silu(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return norm_silu(x, norm.gamma, norm.bias, norm.scale)

    def norm_silu_causal_pad(self, x, norm, prev, padding):
        return causal_input(self.norm_silu(x, norm), prev, padding)


# --- the Triton kernel ------------------------------------------------------------------------

_KERNEL = None


def _triton_kernel():
    """Compiled lazily: Triton is only needed (and present) on CUDA machines."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def norm_silu_kernel(x_ptr, w_ptr, out_ptr, C, S, H, W,
                         xs_b, xs_c, xs_t, xs_h, xs_w, os_b, os_c, os_t, os_h, os_w, eps,
                         BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        # one program: BLOCK_S positions (t, h, w) of one batch item, every channel
        b = tl.program_id(1)
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s < S
        w = s % W
        h = (s // W) % H
        t = s // (W * H)
        x_pos = (b * xs_b + t * xs_t + h * xs_h + w * xs_w)[None, :]
        o_pos = (b * os_b + t * os_t + h * os_h + w * os_w)[None, :]
        acc = tl.zeros([BLOCK_S], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = (c < C)[:, None] & s_ok[None, :]
            v = tl.load(x_ptr + x_pos + c[:, None] * xs_c, mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(v * v, axis=0)
        inv = 1.0 / tl.maximum(tl.sqrt(acc), eps)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = (c < C)[:, None] & s_ok[None, :]
            v = tl.load(x_ptr + x_pos + c[:, None] * xs_c, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(w_ptr + c, mask=c < C, other=0.0)
            y = v * inv[None, :] * g[:, None]
            y = y / (1.0 + tl.exp(-y))
            tl.store(out_ptr + o_pos + c[:, None] * os_c, y.to(out_ptr.dtype.element_ty), mask=ok)

    if os.environ.get("TRITON_INTERPRET") != "1":  # on a GPU: pick the tile per channel width once
        configs = [triton.Config({"BLOCK_S": bs, "BLOCK_C": bc}, num_warps=nw)
                   for bs, bc, nw in ((128, 16, 4), (256, 16, 4), (256, 8, 4), (512, 8, 8), (128, 32, 4),
                                      (64, 32, 4))]
        norm_silu_kernel = triton.autotune(configs=configs, key=["C"])(norm_silu_kernel)
    _KERNEL = norm_silu_kernel
    return _KERNEL


class TritonNormSiLU:
    """norm + SiLU as one Triton kernel, written into the padded causal-convolution buffer.

    The weight is ``scale * gamma`` in float32 (a buffer kept beside gamma, so it follows the model
    between devices); a norm with a learnt bias is left to the eager path (Wan 2.1 has none).
    """

    name = "triton"

    def _launch(self, x: torch.Tensor, norm: nn.Module, out: torch.Tensor) -> None:
        B, C, T, H, W = x.shape
        S = T * H * W
        kernel = _triton_kernel()
        tiles = {} if hasattr(kernel, "configs") else {"BLOCK_S": 128, "BLOCK_C": 16}  # autotuned on GPUs

        def grid(meta):
            return (-(-S // meta["BLOCK_S"]), B)

        kernel[grid](x, norm.fused_weight, out, C, S, H, W, *x.stride(), *out.stride(), EPS, **tiles)

    def norm_silu(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        self._launch(x, norm, out)
        return out

    def norm_silu_causal_pad(self, x, norm, prev, padding):
        pw, _, ph, _, pt, _ = padding
        B, C, T, H, W = x.shape
        front = min(prev.shape[2], pt) if prev is not None else 0
        zeros = pt - front  # causal zero frames that the cache does not cover
        buf = torch.empty((B, C, zeros + front + T, H + 2 * ph, W + 2 * pw), dtype=x.dtype, device=x.device)
        # the padding border and the leading zero frames; the cached frames; then the new activation
        if zeros:
            buf[:, :, :zeros].zero_()
        if ph:
            buf[:, :, zeros:, :ph].zero_()
            buf[:, :, zeros:, -ph:].zero_()
        if pw:
            buf[:, :, zeros:, ph:buf.shape[3] - ph, :pw].zero_()
            buf[:, :, zeros:, ph:buf.shape[3] - ph, -pw:].zero_()
        inner = buf[:, :, :, ph:buf.shape[3] - ph, pw:buf.shape[4] - pw]
        if front:
            inner[:, :, zeros:zeros + front].copy_(prev[:, :, prev.shape[2] - front:])
        y = inner[:, :, zeros + front:]
        self._launch(x, norm, y)
        return buf, _next_cache(y, prev)


def _default_impl(device: torch.device):
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
            return TritonNormSiLU()
        except ImportError:
            pass
    return EagerNormSiLU()


# --- rewriting a loaded model -----------------------------------------------------------------

def _conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A ``WanCausalConv3d`` on an input that already carries its padding (its own padding is 0)."""
    return conv._conv_forward(x, conv.weight, conv.bias)


def _residual_forward(impl):
    def forward(self, x, feat_cache=None, feat_idx=[0]):  # noqa: B006 - diffusers' signature
        if isinstance(self.conv_shortcut, wan_vae.WanCausalConv3d) and not any(self.conv_shortcut._padding):
            h = _conv(self.conv_shortcut, x)  # 1x1x1: no padding, so no copy
        else:
            h = self.conv_shortcut(x)
        for norm, conv in ((self.norm1, self.conv1), (self.norm2, self.conv2)):
            prev = feat_cache[feat_idx[0]] if feat_cache is not None else None
            x, cache = impl.norm_silu_causal_pad(x, norm, prev, conv._padding)
            if feat_cache is not None:
                feat_cache[feat_idx[0]] = cache
                feat_idx[0] += 1
            x = _conv(conv, x)
        return x + h
    return forward


class _NormSiLU(nn.Module):
    """An output ``norm_out`` followed by the SiLU that the encoder/decoder would apply next."""

    def __init__(self, norm: nn.Module, impl):
        super().__init__()
        self.norm = norm
        self._impl = impl

    def forward(self, x):
        return self._impl.norm_silu(x, self.norm)


class _Upsample2x(nn.Module):
    """``WanUpsample(2, "nearest-exact")`` without its float32 round trip (a copy either way)."""

    def forward(self, x):
        return F.interpolate(x, scale_factor=(2.0, 2.0), mode="nearest-exact")


def fuse_vae(model: nn.Module, impl: str = "auto", device: torch.device | str | None = None) -> int:
    """Rewrite ``model`` (an ``AutoencoderKLWan``, or a ``WanVAE`` holding one) in place and return
    how many sites were fused. ``impl``: ``"auto"`` (Triton when the model runs on CUDA and Triton is
    available, else eager), ``"triton"`` or ``"eager"``; ``device``: where the model will run (default:
    where it is now; an offloaded model is loaded on the CPU and runs on the GPU). Idempotent; the
    model must be in eval mode (dropout is not applied)."""
    vae = model.model if isinstance(getattr(model, "model", None), wan_vae.AutoencoderKLWan) else model
    if not isinstance(vae, wan_vae.AutoencoderKLWan):
        raise TypeError(f"fuse_vae expects an AutoencoderKLWan, got {type(vae).__name__}")
    if vae.training:
        raise ValueError("fuse_vae needs the VAE in eval mode (call .eval() first)")
    if getattr(vae, "_multitalk_fused", None):
        return 0
    run_on = torch.device(device) if device is not None else vae.device
    impls = {"auto": lambda: _default_impl(run_on), "triton": TritonNormSiLU, "eager": EagerNormSiLU}
    if impl not in impls:
        raise ValueError(f"unknown impl {impl!r}; use one of {sorted(impls)}")
    kernels = impls[impl]()
    if isinstance(kernels, TritonNormSiLU):  # the kernel's float32 weight, scale * gamma
        for norm in vae.modules():
            if _fusable_norm(norm):
                norm.register_buffer("fused_weight", norm.gamma.detach().float().flatten() * norm.scale,
                                     persistent=False)
    residual_forward = _residual_forward(kernels)
    fused = 0
    for module in list(vae.modules()):
        if isinstance(module, wan_vae.WanResidualBlock) and _fusable_norm(module.norm1) \
                and _fusable_norm(module.norm2):
            module.forward = types.MethodType(residual_forward, module)
            fused += 1
        elif isinstance(module, wan_vae.WanResample) and module.mode.startswith("upsample"):
            up = module.resample[0]
            if isinstance(up, wan_vae.WanUpsample) and up.mode == "nearest-exact" \
                    and tuple(up.scale_factor) == (2.0, 2.0):
                module.resample[0] = _Upsample2x()
                fused += 1
    for coder in (vae.encoder, vae.decoder):
        if _fusable_norm(coder.norm_out) and isinstance(coder.nonlinearity, nn.SiLU):
            coder.norm_out = _NormSiLU(coder.norm_out, kernels)
            coder.nonlinearity = nn.Identity()
            fused += 1
    vae._multitalk_fused = kernels.name
    return fused


def _fusable_norm(norm: nn.Module) -> bool:
    """A channel-first ``WanRMS_norm`` without a learnt bias (all of Wan 2.1's)."""
    return (isinstance(norm, wan_vae.WanRMS_norm) and norm.channel_first
            and not isinstance(norm.bias, torch.Tensor) and norm.bias == 0.0)


__all__ = ["EagerNormSiLU", "TritonNormSiLU", "causal_input", "fuse_vae", "norm_silu"]
