"""Colour correction of decoded clips toward the reference image (official ``match_and_blend_colors``).

Per frame, in CIE Lab (``skimage.color.rgb2lab``, D65): each channel is shifted and scaled to the
reference's mean and population std, converted back with ``lab2rgb``, clipped to [0, 1] and
blended ``(1-s)*frame + s*corrected``. It stops streamed clips from drifting in colour.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from skimage import color as skcolor

from multitalk.errors import UserInputError


def _to_unit_rgb(x: torch.Tensor) -> np.ndarray:
    """``[3, ..., H, W]`` in [-1, 1] -> ``[..., H, W, 3]`` numpy in [0, 1] (clipped), same dtype."""
    arr = x.detach().cpu().movedim(0, -1).numpy()
    return np.clip((arr + 1.0) / 2.0, 0.0, 1.0)


def match_and_blend_colors(source: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """Colour-match ``source`` ``[B, 3, T, H, W]`` to ``reference`` ``[B, 3, 1, H, W]`` (both in [-1, 1]).

    ``strength`` in [0, 1]: 0 returns ``source`` unchanged, 1 is the full correction. Returns a
    tensor like ``source`` (dtype and device). Frames with a flat Lab channel (std 0) get the
    reference mean in that channel, as the official.
    """
    if strength == 0.0:
        return source
    if not 0.0 <= strength <= 1.0:
        raise UserInputError("color_correction_strength", f"must be between 0 and 1, got {strength}",
                             "e.g. 1.0 (official CLI default) or 0 to disable")
    if source.dim() != 5 or reference.dim() != 5 or source.shape[1] != 3 or reference.shape[2] != 1:
        raise ValueError(f"expected source [B,3,T,H,W] and reference [B,3,1,H,W], "
                         f"got {tuple(source.shape)} and {tuple(reference.shape)}")
    out = [_match_one(s, r, strength) for s, r in zip(source, reference)]
    return torch.from_numpy(np.stack(out)).to(device=source.device, dtype=source.dtype)


def _match_one(source: torch.Tensor, reference: torch.Tensor, strength: float) -> np.ndarray:
    """One batch item: ``[3, T, H, W]`` and ``[3, 1, H, W]`` -> ``[3, T, H, W]`` numpy in [-1, 1]."""
    frames = _to_unit_rgb(source)                        # [T, H, W, 3]
    ref_lab = skcolor.rgb2lab(_to_unit_rgb(reference)[0])
    # per-channel 2-D reductions, in the official order (float32 sums depend on it)
    ref_mean = [ref_lab[..., c].mean() for c in range(3)]
    ref_std = [ref_lab[..., c].std() for c in range(3)]
    blended = []
    for frame in frames:
        lab = skcolor.rgb2lab(frame)
        corrected = lab.copy()
        for c in range(3):
            mean, std = lab[..., c].mean(), lab[..., c].std()
            if std == 0:
                corrected[..., c] = ref_mean[c]
            else:
                corrected[..., c] = (lab[..., c] - mean) * (ref_std[c] / std) + ref_mean[c]
        with warnings.catch_warnings():  # lab2rgb warns about clipped negative Z values
            warnings.simplefilter("ignore", UserWarning)
            rgb = np.clip(skcolor.lab2rgb(corrected), 0.0, 1.0)
        blended.append((1 - strength) * frame + strength * rgb)
    return np.moveaxis(np.stack(blended) * 2.0 - 1.0, -1, 0)
