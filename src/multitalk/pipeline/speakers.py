"""Speaker masks (the official ``ref_target_masks``): where each person is in the reference frame.

Three masks ``[person 1, person 2, background]`` are drawn on the *source* image grid, then taken
through the same geometry as the image (nearest resize by the bucket scale, centre crop) and a
nearest resize to the latent grid (golden README, "Human masks"):

* 1 speaker: three all-ones masks.
* 2 speakers with ``bbox``: ``mask[int(a):int(c), int(b):int(d)] = 1`` for each person's
  ``[a, b, c, d]`` in the order given; the first pair indexes **rows** (``[top, left, bottom, right]``
  in source pixels). Background = where no person mask is set.
* 2 speakers without ``bbox``: the left / right halves with a ``face_scale`` (0.05) margin.

Nearest resizing is separable, so instead of resizing full-resolution masks this computes, per
axis, which source row / column every latent cell samples (using ``F.interpolate`` itself on an
index ramp, so the rounding is torch's own) and tests the rectangles there: exact and cheap for
any image size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from multitalk.errors import UserInputError
from multitalk.media.image import center_crop_offsets, resized_size
from multitalk.models.speaker_routing import token_masks

Box = tuple[int, int, int, int]  # row_min, col_min, row_max, col_max (end exclusive)

_BBOX_FIX = ("give one [row_min, col_min, row_max, col_max] box in source-image pixels per speaker, "
             "e.g. {\"person1\": [160, 120, 1280, 1080], \"person2\": [160, 1320, 1280, 2280]}")


def _nearest_source_index(in_size: int, out_size: int) -> torch.Tensor:
    """Source index sampled by each of ``out_size`` outputs of a nearest resize (torch's rounding)."""
    ramp = torch.arange(in_size, dtype=torch.float64).view(1, 1, in_size, 1)
    picked = F.interpolate(ramp, size=(out_size, 1), mode="nearest")
    return picked.view(out_size).long()


def _axis_samples(src: int, resized: int, crop_start: int, target: int, latent: int) -> torch.Tensor:
    """Source coordinate of every latent cell along one axis (resize -> crop -> resize)."""
    to_source = _nearest_source_index(src, resized)[crop_start:crop_start + target]
    return to_source[_nearest_source_index(target, latent)]


def validate_bbox(bbox, num_speakers: int, src_h: int, src_w: int) -> list[Box] | None:
    """Check a ``bbox`` input and return its boxes as ints (the official ``int()`` truncation).

    ``bbox`` is ``{name: [row_min, col_min, row_max, col_max], ...}`` (order = speaker order) or a
    list of such boxes; ``None`` means the default layout.
    """
    if bbox is None:
        return None
    if isinstance(bbox, Mapping):
        names, boxes = [str(k) for k in bbox], list(bbox.values())
    elif isinstance(bbox, Sequence) and not isinstance(bbox, (str, bytes)):
        names, boxes = [f"person{i + 1}" for i in range(len(bbox))], list(bbox)
    else:
        raise UserInputError("bbox", f"expected a mapping of speaker -> box, got {type(bbox).__name__}", _BBOX_FIX)
    if len(boxes) != num_speakers:
        raise UserInputError("bbox", f"{len(boxes)} boxes for {num_speakers} speaker(s)",
                             "give exactly one box per audio track (or no bbox at all)")
    out: list[Box] = []
    for name, box in zip(names, boxes):
        if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
            raise UserInputError("bbox", f"{name}: expected 4 numbers, got {box!r}", _BBOX_FIX)
        for v in box:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserInputError("bbox", f"{name}: {v!r} is not a finite number", _BBOX_FIX)
        if min(box) < 0:
            raise UserInputError("bbox", f"{name}: {list(box)} has a negative coordinate",
                                 "coordinates are pixels of the source image, from 0")
        r0, c0, r1, c1 = (int(v) for v in box)
        if r0 >= r1 or c0 >= c1:
            raise UserInputError("bbox", f"{name}: {list(box)} is empty (row_min >= row_max or col_min >= col_max)",
                                 "the order is [row_min, col_min, row_max, col_max] (top, left, bottom, right)")
        if r1 > src_h or c1 > src_w:
            raise UserInputError("bbox", f"{name}: {list(box)} lies outside the {src_h}x{src_w} (rows x columns) image",
                                 "the order is [row_min, col_min, row_max, col_max] in source-image pixels")
        out.append((r0, c0, r1, c1))
    return out


def default_boxes(src_h: int, src_w: int, face_scale: float = 0.05) -> list[Box]:
    """The official two-speaker layout without ``bbox``: left and right halves minus a margin."""
    r0, r1 = int(src_h * face_scale), int(src_h * (1 - face_scale))
    half = src_w // 2
    return [(r0, int(half * face_scale), r1, int(half * (1 - face_scale))),
            (r0, int(half * face_scale + half), r1, int(half * (1 - face_scale) + half))]


def speaker_masks(src_h: int, src_w: int, th: int, tw: int, num_speakers: int, bbox=None, *,
                  face_scale: float = 0.05, vae_stride: int = 8, patch: int = 2, clip_index: int = 0) -> torch.Tensor:
    """``ref_target_masks``: float32 0/1 ``[3, th // vae_stride, tw // vae_stride]``.

    ``src_h x src_w`` is the source image, ``th x tw`` its bucket. Rows: person 1, person 2,
    background. A person's box must cover at least one cell of the DiT's token grid (latent grid /
    ``patch``) after the bucket's resize and centre crop: the speaker routing divides by each
    region's area there, and an empty one would make every frame NaN (a black video). Such a box
    is refused, naming the smallest usable size and the area the crop keeps.

    ``clip_index`` reproduces an official quirk of the two-speaker layout *without* bbox:
    ``generate()`` halves its ``src_w`` every time it builds these masks, so clip ``k`` gets the
    masks of a ``src_h x (src_w >> k)`` grid (and a different resize scale). ``0`` (the first clip)
    is what the official code does once; pass the clip index to follow it on later clips.
    """
    if isinstance(num_speakers, bool) or num_speakers not in (1, 2):
        raise UserInputError("cond_audio", f"MultiTalk supports 1 or 2 speakers, got {num_speakers}",
                             "give one audio track per person (person1, optionally person2)")
    boxes = validate_bbox(bbox, num_speakers, src_h, src_w)
    lat_h, lat_w = th // vae_stride, tw // vae_stride
    if num_speakers == 1:
        return torch.ones(3, lat_h, lat_w, dtype=torch.float32)
    if boxes is None:
        if isinstance(clip_index, bool) or not isinstance(clip_index, int) or clip_index < 0:
            raise UserInputError("clip_index", f"expected a clip number >= 0, got {clip_index!r}")
        src_w = src_w >> clip_index
        if src_w < 1:
            raise UserInputError("clip_index", f"clip {clip_index} halves the {src_w << clip_index}-pixel "
                                 "width to zero (the official code fails here too)",
                                 "give a bbox for long two-speaker videos")
        boxes = default_boxes(src_h, src_w, face_scale)
    rh, rw = resized_size(src_h, src_w, th, tw)
    top, left = center_crop_offsets(rh, rw, th, tw)
    rows = _axis_samples(src_h, rh, top, th, lat_h)
    cols = _axis_samples(src_w, rw, left, tw, lat_w)
    people = [((rows >= r0) & (rows < r1))[:, None] & ((cols >= c0) & (cols < c1))[None, :]
              for r0, c0, r1, c1 in boxes]
    background = ~(people[0] | people[1])
    masks = torch.stack([*people, background]).float()
    grid = (lat_h // patch, lat_w // patch)
    covered = token_masks(masks, grid).sum(dim=1)                  # what the routing divides by
    for i, box in enumerate(boxes):
        if covered[i] == 0:
            _refuse_uncovered(f"person{i + 1}", box, bbox is None, rows, cols, grid, (th, tw))
    return masks


def _refuse_uncovered(name: str, box: Box, default: bool, rows: torch.Tensor, cols: torch.Tensor,
                      grid: tuple[int, int], bucket: tuple[int, int]) -> None:
    # the source rows / columns the token cells sample (the routing's nearest resize of the mask)
    rows, cols = rows[_nearest_source_index(len(rows), grid[0])], cols[_nearest_source_index(len(cols), grid[1])]
    cell_h = int((rows.diff().max() if len(rows) > 1 else 1)) + 1
    cell_w = int((cols.diff().max() if len(cols) > 1 else 1)) + 1
    what = "the default box" if default else "the box"
    raise UserInputError(
        "bbox", f"{name}: {what} {list(box)} covers no cell of the {grid[0]}x{grid[1]} grid that routes the "
        f"speech (after the {bucket[0]}x{bucket[1]} resize and crop, the cells are about {cell_h}x{cell_w} source "
        f"pixels apart and sample rows {int(rows.min())}-{int(rows.max())}, columns "
        f"{int(cols.min())}-{int(cols.max())})",
        f"give a bbox per speaker, each at least {cell_h}x{cell_w} pixels (rows x columns) within those rows and "
        "columns" if default else f"make it at least {cell_h}x{cell_w} pixels (rows x columns), within those rows "
        "and columns")

__all__ = ["default_boxes", "speaker_masks", "validate_bbox"]
