"""Conditioning image: loading, aspect-ratio buckets, resize + centre crop (the official PIL path).

The official pipeline (``MultiTalkPipeline.generate``) picks the bucket whose height/width ratio is
closest to the source image, resizes with Pillow's bilinear filter so that the image covers the
bucket, and centre-crops it. Every function here reproduces that bit for bit (golden README,
"Image"); the same scale and crop are reused for the speaker masks (``pipeline/speakers.py``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from multitalk.errors import UserInputError

# Bucket tables of the official wan/utils/multitalk_utils.py: ratio key (h / w) -> (h, w).
# (The official values are ``([h, w], 1)``; the trailing 1 is unused.)
ASPECT_RATIO_627: dict[str, tuple[int, int]] = {
    "0.26": (320, 1216), "0.38": (384, 1024), "0.50": (448, 896), "0.67": (512, 768),
    "0.82": (576, 704), "1.00": (640, 640), "1.22": (704, 576), "1.50": (768, 512),
    "1.86": (832, 448), "2.00": (896, 448), "2.50": (960, 384), "2.83": (1088, 384),
    "3.60": (1152, 320), "3.80": (1216, 320), "4.00": (1280, 320),
}
ASPECT_RATIO_960: dict[str, tuple[int, int]] = {
    "0.22": (448, 2048), "0.29": (512, 1792), "0.36": (576, 1600), "0.45": (640, 1408),
    "0.55": (704, 1280), "0.63": (768, 1216), "0.76": (832, 1088), "0.88": (896, 1024),
    "1.00": (960, 960), "1.14": (1024, 896), "1.31": (1088, 832), "1.50": (1152, 768),
    "1.58": (1216, 768), "1.82": (1280, 704), "1.91": (1344, 704), "2.20": (1408, 640),
    "2.30": (1472, 640), "2.67": (1536, 576), "2.89": (1664, 576), "3.62": (1856, 512),
    "3.75": (1920, 512),
}
# ``size_buckget`` names of the official CLI.
# The project's own small table for CPU previews, demos and service tests (not an official size):
# the 480p buckets at a quarter of their height and width (still multiples of 16, as the DiT needs).
ASPECT_RATIO_PREVIEW: dict[str, tuple[int, int]] = {k: (h // 4, w // 4) for k, (h, w) in ASPECT_RATIO_627.items()}
assert all(h % 16 == 0 and w % 16 == 0 for h, w in ASPECT_RATIO_PREVIEW.values())

BUCKETS: dict[str, dict[str, tuple[int, int]]] = {
    "multitalk-480": ASPECT_RATIO_627,
    "multitalk-720": ASPECT_RATIO_960,
    "preview": ASPECT_RATIO_PREVIEW,
}


def load_image(path: str | os.PathLike, field: str = "cond_image") -> Image.Image:
    """Open an image file as RGB, upright (an alpha channel is dropped, not composited, as the official
    code does). The EXIF orientation is applied (``ImageOps.exif_transpose``): a portrait phone
    photo stored sideways comes out as it is displayed. The official code ignores it."""
    p = Path(path)
    if not p.exists():
        raise UserInputError(field, f"image file not found: {p}", "check the path of the conditioning image")
    if not p.is_file():
        raise UserInputError(field, f"{p} is not a file", "pass the path of an image file (PNG, JPEG, ...)")
    try:
        with Image.open(p) as img:
            if img.width == 0 or img.height == 0:
                raise UserInputError(field, f"{p.name} has zero size ({img.width}x{img.height})",
                                     "use a non-empty image")
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except UserInputError:
        raise
    except UnidentifiedImageError as exc:
        raise UserInputError(field, f"{p.name} is not a readable image",
                             "use a PNG, JPEG or WebP image") from exc
    except Image.DecompressionBombError as exc:
        raise UserInputError(field, f"{p.name} is too large to decode safely ({exc})",
                             "downscale the image below ~89 megapixels") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise UserInputError(field, f"{p.name} cannot be decoded ({exc})",
                             "re-export the image; the file looks truncated or corrupt") from exc
    return rgb


def _check_size(src_h, src_w, what: str = "image") -> None:
    for name, v in (("height", src_h), ("width", src_w)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise UserInputError("cond_image", f"{what} {name} must be a positive integer, got {v!r}",
                                 "use a non-empty image")


def bucket_table(size: str) -> dict[str, tuple[int, int]]:
    """The bucket table of a ``size`` name (``multitalk-480``, ``multitalk-720`` or ``preview``)."""
    if size not in BUCKETS:
        raise UserInputError("size", f"unknown size bucket {size!r}",
                             f"use one of {', '.join(sorted(BUCKETS))}")
    return BUCKETS[size]


def bucket_key(src_h: int, src_w: int, size: str = "multitalk-480") -> str:
    """The bucket key closest to ``src_h / src_w`` (first of ``sorted(keys)`` on ties)."""
    _check_size(src_h, src_w)
    table = bucket_table(size)
    ratio = src_h / src_w
    return min(sorted(table), key=lambda k: abs(float(k) - ratio))


def choose_bucket(src_h: int, src_w: int, size: str = "multitalk-480") -> tuple[int, int]:
    """Target ``(height, width)`` of the generated video for a source image of ``src_h x src_w``."""
    key = bucket_key(src_h, src_w, size)
    return bucket_table(size)[key]


def resize_scale_for(src_h: int, src_w: int, th: int, tw: int) -> float:
    """Scale that makes a ``src_h x src_w`` image cover ``th x tw`` (``max`` of the two ratios)."""
    _check_size(src_h, src_w)
    _check_size(th, tw, "target")
    return max(th / src_h, tw / src_w)


def resized_size(src_h: int, src_w: int, th: int, tw: int) -> tuple[int, int]:
    """``(height, width)`` of the resized image before the crop: ``ceil(scale * side)``."""
    scale = resize_scale_for(src_h, src_w, th, tw)
    return math.ceil(scale * src_h), math.ceil(scale * src_w)


def center_crop_offsets(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """``(top, left)`` of a ``th x tw`` centre crop of ``h x w`` (torchvision rule, Python rounding)."""
    if th > h or tw > w:
        raise ValueError(f"crop {th}x{tw} larger than {h}x{w}")
    return int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))


def center_crop(x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """Centre crop of the last two dimensions of ``x`` to ``th x tw``."""
    top, left = center_crop_offsets(x.shape[-2], x.shape[-1], th, tw)
    return x[..., top:top + th, left:left + tw]


def resize_and_center_crop(img: Image.Image, th: int, tw: int) -> torch.Tensor:
    """Bucketed conditioning frame: uint8 ``[3, th, tw]``.

    Pillow bilinear resize (antialiased when downscaling) to ``resized_size`` so the image covers
    the target, then a centre crop, exactly as the official ``resize_and_centercrop``.
    """
    if not isinstance(img, Image.Image):
        raise UserInputError("cond_image", f"expected a PIL image, got {type(img).__name__}",
                             "load the file with media.image.load_image")
    if img.mode != "RGB":
        img = img.convert("RGB")
    rh, rw = resized_size(img.height, img.width, th, tw)
    resized = np.asarray(img.resize((rw, rh), resample=Image.BILINEAR))
    pixels = torch.from_numpy(resized.copy()).permute(2, 0, 1)  # [3, rh, rw]
    return center_crop(pixels, th, tw).contiguous()


def cond_image_from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in ``[-1, 1]`` as ``(u8 / 255 - 0.5) * 2`` (same shape)."""
    if pixels.dtype != torch.uint8:
        raise UserInputError("cond_image", f"expected uint8 pixels, got {pixels.dtype}",
                             "pass the output of resize_and_center_crop")
    return (pixels / 255 - 0.5) * 2


__all__ = [
    "ASPECT_RATIO_627", "ASPECT_RATIO_960", "ASPECT_RATIO_PREVIEW", "BUCKETS", "bucket_key", "bucket_table", "center_crop",
    "center_crop_offsets", "choose_bucket", "cond_image_from_uint8", "load_image",
    "resize_and_center_crop", "resize_scale_for", "resized_size",
]
