"""Fused element-wise chains in the Wan VAE: normalise -> SiLU -> causal padding as one kernel.

In diffusers' ``AutoencoderKLWan`` every half of a residual block runs a chain of element-wise
kernels over the whole activation before its 3-D convolution: ``WanRMS_norm`` (cast to float32,
L2 norm over channels, divide, cast back, x scale, x gamma, + bias), SiLU, then two copies to build
the causal convolution's input (``torch.cat`` with the cached frames and ``F.pad``). At 640x640 one
4-frame activation of the top level is 300 MB in bf16; the VAE spends more time in these ~15 passes
over memory than in its convolutions.

:func:`fuse_vae` rewrites, on a loaded model, each residual block's forward so that
:func:`norm_silu_causal_pad` builds the padded convolution input (and the next chunk's cache) in one
call, and replaces the encoder's and decoder's output norm + SiLU and the 2x nearest upsampling by
their one-call equivalents. Compiled with ``torch.compile`` those calls become one fused kernel each
(inductor computes the chain in float32 and rounds once, so results differ from the eager chain by
bf16 rounding only); uncompiled they run the same operations in the same order as diffusers and give
bit-identical results, which is what the CPU tests check. The convolutions themselves still run as
cuDNN kernels with the same weights and the same (zero) padding.

Apply it once, after loading and before the first encode/decode; the caller decides whether to
compile (the engine does on CUDA, together with the DiT's regional compile).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders import autoencoder_kl_wan as wan_vae
from torch import nn

CACHE_T = 2  # frames of each activation kept for the next chunk's causal convolution (diffusers' CACHE_T)


def norm_silu(x: torch.Tensor, gamma: torch.Tensor, bias, scale: float) -> torch.Tensor:
    """``WanRMS_norm`` (channel-first) followed by SiLU, operation for operation as diffusers runs them."""
    if x.dtype in (torch.float16, torch.bfloat16):
        normalized = F.normalize(x.float(), dim=1).to(x.dtype)
    else:
        normalized = F.normalize(x, dim=1)
    return F.silu(normalized * scale * gamma + bias)


def norm_silu_causal_pad(x: torch.Tensor, gamma: torch.Tensor, bias, scale: float,
                         prev: torch.Tensor | None, padding: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`norm_silu`, then the causal convolution's padded input and the cache for the next chunk.

    ``prev`` is the cache this convolution kept from the previous chunk (``None`` on the first);
    ``padding`` the convolution's ``_padding`` (W, W, H, H, T-front, T-back). Returns
    ``(padded input, new cache)`` exactly as ``WanResidualBlock`` + ``WanCausalConv3d`` build them.
    """
    y = norm_silu(x, gamma, bias, scale)
    cache = y[:, :, -CACHE_T:].clone()
    if cache.shape[2] < CACHE_T and prev is not None:
        cache = torch.cat([prev[:, :, -1:], cache], dim=2)
    pad = list(padding)
    if prev is not None and pad[4] > 0:
        y = torch.cat([prev, y], dim=2)
        pad[4] -= prev.shape[2]
    return F.pad(y, pad), cache


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """``WanUpsample(scale_factor=2, mode="nearest-exact")``: a pure copy, computed as diffusers does."""
    return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class _Kernels:
    """The three fused calls, eager or compiled (one compiled object each, shared by all blocks)."""

    def __init__(self, compile: bool):
        wrap = _compiled if compile else (lambda fn: fn)
        self.compiled = compile
        self.norm_silu = wrap(norm_silu)
        self.norm_silu_causal_pad = wrap(norm_silu_causal_pad)
        self.upsample_nearest2x = wrap(upsample_nearest2x)

    def norm_args(self, norm: nn.Module) -> tuple:
        """``(weight, bias, scale)`` for a ``WanRMS_norm``. Compiled, the scale is folded into a float32
        weight (``scale * gamma``, kept beside gamma) so that one graph serves every channel width
        instead of one per ``sqrt(dim)`` constant; the fused kernel computes in float32 either way."""
        if not self.compiled:
            return norm.gamma, norm.bias, norm.scale
        return norm.fused_weight, norm.bias, 1.0


def _compiled(fn: Callable) -> Callable:
    # dynamic=True: one graph serves every resolution level and chunk length (sizes are symbolic);
    # what remains specialised is small (cache present or not, 1-frame chunks, the three channel
    # widths' scale constants), well inside the recompile limit raised below.
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A ``WanCausalConv3d`` on an input that already carries its padding (its own padding is 0)."""
    return conv._conv_forward(x, conv.weight, conv.bias)


def _residual_forward(kernels: _Kernels):
    def forward(self, x, feat_cache=None, feat_idx=[0]):  # noqa: B006 - diffusers' signature
        if isinstance(self.conv_shortcut, wan_vae.WanCausalConv3d) and not any(self.conv_shortcut._padding):
            h = _conv(self.conv_shortcut, x)  # 1x1x1: no padding, no copy
        else:
            h = self.conv_shortcut(x)
        for norm, conv in ((self.norm1, self.conv1), (self.norm2, self.conv2)):
            prev = feat_cache[feat_idx[0]] if feat_cache is not None else None
            x, cache = kernels.norm_silu_causal_pad(x, *kernels.norm_args(norm), prev, conv._padding)
            if feat_cache is not None:
                feat_cache[feat_idx[0]] = cache
                feat_idx[0] += 1
            x = _conv(conv, x)
        return x + h
    return forward


class _NormSiLU(nn.Module):
    """An output ``norm_out`` followed by the SiLU that the encoder/decoder would apply next."""

    def __init__(self, norm: nn.Module, kernels: _Kernels):
        super().__init__()
        self.norm = norm
        self._kernels = kernels

    def forward(self, x):
        return self._kernels.norm_silu(x, *self._kernels.norm_args(self.norm))


class _Upsample2x(nn.Module):
    def __init__(self, kernels: _Kernels):
        super().__init__()
        self._kernels = kernels

    def forward(self, x):
        return self._kernels.upsample_nearest2x(x)


def fuse_vae(model: nn.Module, compile: bool = True) -> int:
    """Rewrite ``model`` (an ``AutoencoderKLWan``, or a module holding one) in place; returns how many
    sites were fused. Idempotent. The model must be in eval mode (dropout is not applied)."""
    vae = model.model if hasattr(model, "model") and isinstance(model.model, wan_vae.AutoencoderKLWan) else model
    if not isinstance(vae, wan_vae.AutoencoderKLWan):
        raise TypeError(f"fuse_vae expects an AutoencoderKLWan, got {type(vae).__name__}")
    if vae.training:
        raise ValueError("fuse_vae needs the VAE in eval mode (call .eval() first)")
    if getattr(vae, "_multitalk_fused", False):
        return 0
    if compile:
        _raise_recompile_limit(32)
    kernels = _Kernels(compile)
    if compile:
        for norm in vae.modules():
            if _is_plain_rms(norm):
                norm.register_buffer("fused_weight", norm.gamma.detach().float() * norm.scale, persistent=False)
    fused = 0
    for module in vae.modules():
        if isinstance(module, wan_vae.WanResidualBlock) and _is_plain_rms(module.norm1) and _is_plain_rms(module.norm2):
            module.forward = types.MethodType(_residual_forward(kernels), module)
            fused += 1
        elif isinstance(module, wan_vae.WanResample) and module.mode.startswith("upsample"):
            if isinstance(module.resample[0], wan_vae.WanUpsample) and module.resample[0].mode == "nearest-exact" \
                    and tuple(module.resample[0].scale_factor) == (2.0, 2.0):
                module.resample[0] = _Upsample2x(kernels)
                fused += 1
    for coder in (vae.encoder, vae.decoder):
        if _is_plain_rms(coder.norm_out) and isinstance(coder.nonlinearity, nn.SiLU):
            coder.norm_out = _NormSiLU(coder.norm_out, kernels)
            coder.nonlinearity = nn.Identity()
            fused += 1
    vae._multitalk_fused = True
    return fused


def _is_plain_rms(norm: nn.Module) -> bool:
    return isinstance(norm, wan_vae.WanRMS_norm) and norm.channel_first


def _raise_recompile_limit(n: int) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            setattr(cfg, name, n)


__all__ = ["fuse_vae", "norm_silu", "norm_silu_causal_pad", "upsample_nearest2x"]
