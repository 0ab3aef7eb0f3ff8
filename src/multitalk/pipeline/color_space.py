"""sRGB <-> CIE Lab in pure torch, reproducing ``skimage.color.rgb2lab`` / ``lab2rgb`` (0.26 defaults).

Runs on whatever device the input is on, so colour correction needs no round trip through numpy.
Every constant and branch is skimage's (``skimage/color/colorconv.py``):

* ``rgb2xyz``: sRGB companding ``((c + 0.055) / 1.055) ** 2.4`` where ``c > 0.04045``, else
  ``c / 12.92``; then skimage's sRGB -> XYZ matrix (``xyz_from_rgb``).
* ``xyz2lab``: divide by the D65 2-degree white ``(0.95047, 1.0, 1.08883)``; ``f(t) = cbrt(t)``
  where ``t > 0.008856``, else ``7.787 * t + 16 / 116``; ``L = 116 fy - 16``,
  ``a = 500 (fx - fy)``, ``b = 200 (fy - fz)``.
* ``lab2xyz``: ``fy = (L + 16) / 116``, ``fx = a / 500 + fy``, ``fz = fy - b / 200``; negative
  ``fz`` is clipped to 0 (skimage also warns; this module does not, since counting would need a
  device sync); ``t ** 3`` where ``t > 0.2068966``, else ``(t - 16 / 116) / 7.787``; times the white.
* ``xyz2rgb``: ``rgb_from_xyz = inv(xyz_from_rgb)`` (the float64 values of skimage's
  ``scipy.linalg.inv``, copied exactly); ``1.055 * c ** (1 / 2.4) - 0.055`` where
  ``c > 0.0031308``, else ``12.92 * c``; clipped to [0, 1].

Precision: the default ``dtype=torch.float64`` agrees with skimage on float64 input to ~1e-13
(differences are last-bit rounding: float64 powers as ``exp(p * log(t))`` rather than ``pow`` / ``cbrt``,
summation order of the 3x3 products). ``dtype=torch.float32`` is faster (notably on GPUs, whose float64 throughput is lower) and
behaves like skimage on float32 input up to float32 rounding (~1e-6 relative); skimage multiplies
by the white point in float64 in ``lab2xyz`` even for float32 arrays, this module does it in the
compute dtype.

Inputs are floating tensors (RGB nominally in [0, 1]; no integer rescaling as skimage's
``img_as_float`` would do - integer input raises). Out-of-range values follow skimage's branches.
"""

from __future__ import annotations

import torch

__all__ = ["rgb_to_lab", "lab_to_rgb", "rgb_to_lab3", "lab_to_rgb3", "XYZ_FROM_RGB", "RGB_FROM_XYZ", "D65_WHITE"]

# skimage.color.colorconv.xyz_from_rgb (sRGB specification)
XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
# skimage.color.colorconv.rgb_from_xyz = scipy.linalg.inv(xyz_from_rgb), exact float64 values
RGB_FROM_XYZ = (
    (3.2404813432005266, -1.5371515162713183, -0.4985363261688878),
    (-0.9692549499965682, 1.8759900014898907, 0.04155592655829284),
    (0.055646639135177166, -0.20404133836651123, 1.0573110696453443),
)
# skimage xyz_tristimulus_values(illuminant="D65", observer="2")
D65_WHITE = (0.95047, 1.0, 1.08883)

_SRGB_DECODE_T = 0.04045
_SRGB_ENCODE_T = 0.0031308
_LAB_EPS = 0.008856        # f(t) threshold in xyz2lab
_LAB_KAPPA = 7.787         # slope of the linear segment
_LAB_INV_T = 0.2068966     # inverse-f threshold in lab2xyz
_LAB_OFFSET = 16.0 / 116.0


def _prepare(x: torch.Tensor, dtype: torch.dtype, channel_dim: int) -> tuple[torch.Tensor, ...]:
    if not x.is_floating_point():
        raise TypeError(f"expected a floating tensor, got {x.dtype} (rescale integer images first)")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be floating, got {dtype}")
    if x.dim() == 0 or x.shape[channel_dim] != 3:
        raise ValueError(f"expected 3 channels along dim {channel_dim}, got shape {tuple(x.shape)}")
    return x.to(dtype).unbind(channel_dim)


def _mat3(m, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(r[0] * c0 + r[1] * c1 + r[2] * c2 for r in m)


def _pow(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x ** p`` for ``x > 0``. In float64 as ``exp(p * log(x))``: within ~1e-15 relative of ``pow``
    (|p log x| < 10 here) and ~1.6x faster on CPU, where torch's float64 scalar-exponent ``pow`` is
    not vectorised. Other dtypes use ``pow`` (float32 rounding would cost ~1e-6 otherwise)."""
    if x.dtype == torch.float64:
        return x.log().mul_(p).exp_()
    return x.pow_(p)


# Branches: torch.where evaluates both sides; the clamps only give the unselected lanes a valid
# (positive) base, selected lanes are unchanged by them.
def _srgb_decode(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c > _SRGB_DECODE_T,
                       _pow(c.clamp_min(_SRGB_DECODE_T).add_(0.055).div_(1.055), 2.4),
                       c / 12.92)


def _srgb_encode(c: torch.Tensor) -> torch.Tensor:
    out = torch.where(c > _SRGB_ENCODE_T,
                      _pow(c.clamp_min(_SRGB_ENCODE_T), 1 / 2.4).mul_(1.055).sub_(0.055),
                      c * 12.92)
    return out.clamp_(0.0, 1.0)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > _LAB_EPS,
                       _pow(t.clamp_min(_LAB_EPS), 1.0 / 3.0),
                       (_LAB_KAPPA * t).add_(_LAB_OFFSET))


def _lab_f_inv(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > _LAB_INV_T, t * t * t, (t - _LAB_OFFSET).div_(_LAB_KAPPA))


def rgb_to_lab3(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Channel-wise core of :func:`rgb_to_lab`: R, G, B tensors (already in the compute dtype) -> L, a, b."""
    x, y, z = _mat3(XYZ_FROM_RGB, _srgb_decode(r), _srgb_decode(g), _srgb_decode(b))
    fx, fy, fz = _lab_f(x / D65_WHITE[0]), _lab_f(y / D65_WHITE[1]), _lab_f(z / D65_WHITE[2])
    return (116.0 * fy).sub_(16.0), (fx - fy).mul_(500.0), (fy - fz).mul_(200.0)


def lab_to_rgb3(L: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Channel-wise core of :func:`lab_to_rgb`: L, a, b tensors (in the compute dtype) -> R, G, B in [0, 1]."""
    fy = (L + 16.0).div_(116.0)
    fx = (a / 500.0).add_(fy)
    fz = fy - b / 200.0
    fz = torch.where(fz < 0, torch.zeros_like(fz), fz)  # skimage: negative z clipped to 0
    x, y, z = (_lab_f_inv(f).mul_(w) for f, w in zip((fx, fy, fz), D65_WHITE))
    return tuple(_srgb_encode(c) for c in _mat3(RGB_FROM_XYZ, x, y, z))


def rgb_to_lab(rgb: torch.Tensor, *, channel_dim: int = -1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``skimage.color.rgb2lab(rgb)`` (D65, 2-degree observer) in torch, on ``rgb``'s device.

    ``rgb``: floating tensor with 3 channels along ``channel_dim`` (default last, like skimage).
    Computes and returns in ``dtype`` (float64 by default; float32 for speed, see module notes).
    """
    return torch.stack(rgb_to_lab3(*_prepare(rgb, dtype, channel_dim)), dim=channel_dim)


def lab_to_rgb(lab: torch.Tensor, *, channel_dim: int = -1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``skimage.color.lab2rgb(lab)`` (D65, 2-degree observer) in torch, on ``lab``'s device.

    Negative ``z`` of out-of-gamut Lab values is clipped to 0 as in skimage (silently here); the
    result is clipped to [0, 1]. Computes and returns in ``dtype`` (float64 by default).
    """
    return torch.stack(lab_to_rgb3(*_prepare(lab, dtype, channel_dim)), dim=channel_dim)
