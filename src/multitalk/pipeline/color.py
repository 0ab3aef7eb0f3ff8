"""Colour correction of decoded clips toward the reference image (official ``match_and_blend_colors``).

Per frame, in CIE Lab (``skimage.color.rgb2lab``, D65): each channel is shifted and scaled to the
reference's mean and population std, converted back with ``lab2rgb``, clipped to [0, 1] and
blended ``(1-s)*frame + s*corrected``. It stops streamed clips from drifting in colour.

:func:`match_and_blend_colors` runs in torch on the tensors' device (``color_space``'s exact
re-implementation of skimage's conversions, float64 by default). The tests hold it to the
original numpy/skimage version (``tests/test_color.py``, the oracle), which computes in the
input's dtype (skimage keeps float32 float32), so for the float32 clips of the pipeline it is a
float32 computation; the torch path's float64 default differs from it by float32 rounding only
(~1e-6 relative L2 on the golden vector). One deliberate difference: a
channel whose values are all equal always takes the reference mean here (exact flatness test),
while numpy's rounded mean can leave the reference with a rounding-level std != 0 for such a
channel and output ``mean_ref +- std_ref`` instead (seen in float64 on constant frames).
"""

from __future__ import annotations

import math

import torch

from multitalk.errors import UserInputError
from multitalk.pipeline.color_space import lab_to_rgb3, rgb_to_lab3

# Work is split into frame chunks of at most _CHUNK_PIXELS pixels (bounds peak memory: a float64
# 3-channel buffer of that size is 96 MiB, ~10 are alive at once), and the elementwise colour
# conversions into blocks (the whole chunk on GPUs; on CPU, _CPU_BLOCK_PIXELS: cache-sized blocks
# are ~2x faster than whole-frame temporaries).
_CHUNK_PIXELS = 1 << 22
_CPU_BLOCK_PIXELS = 1 << 16


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise UserInputError("color_correction_strength", f"must be between 0 and 1, got {strength}",
                             "e.g. 1.0 (official CLI default) or 0 to disable")


def _validate(source: torch.Tensor, reference: torch.Tensor, strength: float) -> None:
    _check_strength(strength)
    if source.dim() != 5 or reference.dim() != 5 or source.shape[1] != 3 or reference.shape[2] != 1:
        raise ValueError(f"expected source [B,3,T,H,W] and reference [B,3,1,H,W], "
                         f"got {tuple(source.shape)} and {tuple(reference.shape)}")


def _unit_rgb(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (clipped) in ``dtype``."""
    return ((x.to(dtype) + 1.0) / 2.0).clamp_(0.0, 1.0)


def match_and_blend_colors(source: torch.Tensor, reference: torch.Tensor, strength: float, *,
                           compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Colour-match ``source`` ``[B, 3, T, H, W]`` to ``reference`` ``[B, 3, 1, H, W]`` (both in [-1, 1]).

    ``strength`` in [0, 1]: 0 returns ``source`` unchanged, 1 is the full correction. Returns a
    tensor like ``source`` (dtype and device); the work runs on ``source``'s device in
    ``compute_dtype`` (float64 default; float32 is faster on GPUs, ~1e-6 relative from float64).
    Frames with a flat Lab channel (std 0) get the reference mean in that channel, as the official.
    """
    return ColorMatcher(reference, strength, compute_dtype=compute_dtype)(source)


class ColorMatcher:
    """:func:`match_and_blend_colors` against one reference, its Lab statistics computed once.

    The pipeline corrects every decoded chunk of every clip against the same reference image; the
    result is the same as calling :func:`match_and_blend_colors` on each chunk (per-frame maths).
    """

    def __init__(self, reference: torch.Tensor, strength: float, *,
                 compute_dtype: torch.dtype = torch.float64):
        _check_strength(strength)
        self.reference, self.strength, self.compute_dtype = reference, float(strength), compute_dtype
        self._stats: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _reference_stats(self, dev: torch.device, block: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if dev not in self._stats:
            stats = []
            for ref in self.reference:
                ref_lab = _to_lab(ref.to(dev).reshape(3, 1, -1), self.compute_dtype, block)  # [3, 1, H*W]
                ref_std, ref_mean, _ = _center_std(ref_lab)
                stats.append((ref_std, ref_mean))
            self._stats[dev] = stats
        return self._stats[dev]

    def __call__(self, source: torch.Tensor) -> torch.Tensor:
        if self.strength == 0.0:
            return source
        _validate(source, self.reference, self.strength)
        if source.shape[0] != self.reference.shape[0]:
            raise ValueError(f"source batch {source.shape[0]} != reference batch {self.reference.shape[0]}")
        B, _, T, H, W = source.shape
        dev, cd, s = source.device, self.compute_dtype, self.strength
        block = _CPU_BLOCK_PIXELS if dev.type == "cpu" else _CHUNK_PIXELS
        out = torch.empty_like(source)
        step = max(1, _CHUNK_PIXELS // max(1, H * W))
        for bi, (ref_std, ref_mean) in enumerate(self._reference_stats(dev, block)):
            for t0 in range(0, T, step):
                frames = source[bi, :, t0:t0 + step]
                t = frames.shape[1]
                flat_src = frames.reshape(3, -1)
                lab = _to_lab(flat_src.view(3, t, H * W), cd, block)                    # [3, t, H*W]
                std, _, flat = _center_std(lab)                                          # lab -= mean
                # (v - mean) * (std_ref / std) + mean_ref; a flat channel gets mean_ref (as the
                # official's std == 0 branch), which a zero scale gives exactly
                scale = torch.where(flat, torch.zeros_like(std), ref_std / std)
                lab.mul_(scale).add_(ref_mean)
                lab = lab.view(3, -1)
                res = torch.empty(flat_src.shape, dtype=source.dtype, device=dev)
                for i in range(0, lab.shape[1], block):
                    sl = slice(i, i + block)
                    rgb = lab_to_rgb3(*lab[:, sl])                                        # clipped to [0, 1]
                    src = _unit_rgb(flat_src[:, sl], cd)
                    for c in range(3):
                        res[c, sl] = ((1 - s) * src[c] + s * rgb[c]).mul_(2.0).sub_(1.0)
                out[bi, :, t0:t0 + t] = res.view(3, t, H, W)
        return out


def _to_lab(rgb: torch.Tensor, dtype: torch.dtype, block: int) -> torch.Tensor:
    """``[3, t, N]`` in [-1, 1] -> Lab of ``clip((x + 1) / 2, 0, 1)`` in ``dtype``, ``[3, t, N]``."""
    lab = torch.empty(rgb.shape, dtype=dtype, device=rgb.device)
    flat_in, flat_out = rgb.reshape(3, -1), lab.view(3, -1)
    for i in range(0, flat_in.shape[1], block):
        sl = slice(i, i + block)
        for c, v in enumerate(rgb_to_lab3(*_unit_rgb(flat_in[:, sl], dtype))):
            flat_out[c, sl] = v
    return lab


def _center_std(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per ``[3, t]`` row of ``lab`` ``[3, t, N]``: population std, mean, and whether the row is flat
    (all values equal; std is then 0 exactly, whatever the rounding of the mean). Subtracts the
    mean from ``lab`` in place. Two-pass like numpy's ``std``; results are ``[3, t, 1]``."""
    mean = lab.mean(dim=-1, keepdim=True)
    lo, hi = torch.aminmax(lab, dim=-1, keepdim=True)
    lab.sub_(mean)
    std = torch.linalg.vector_norm(lab, dim=-1, keepdim=True) / math.sqrt(lab.shape[-1])
    flat = lo == hi
    return torch.where(flat, torch.zeros_like(std), std), mean, flat
