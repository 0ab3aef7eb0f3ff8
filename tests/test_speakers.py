"""Speaker masks (``ref_target_masks``) against golden section (e), an independent full-grid
reference of the official steps, and bbox validation."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from multitalk.errors import UserInputError
from multitalk.media.image import choose_bucket
from multitalk.pipeline.speakers import speaker_masks

MULTI1_HW = (1440, 2560)
SINGLE1_HW = (1318, 2366)


@pytest.fixture(scope="module")
def mask_vectors(golden_vectors):
    return golden_vectors("masks")


@pytest.fixture(scope="module")
def example1_bbox(examples) -> dict:
    return json.loads((examples / "multitalk_example_1.json").read_text())["bbox"]


def test_one_person_exact(mask_vectors):
    masks = speaker_masks(*SINGLE1_HW, *choose_bucket(*SINGLE1_HW), num_speakers=1)
    assert masks.dtype == torch.float32
    assert torch.equal(masks, mask_vectors["mask_1person"])


def test_two_persons_bbox_exact(mask_vectors, example1_bbox):
    masks = speaker_masks(*MULTI1_HW, *choose_bucket(*MULTI1_HW), num_speakers=2, bbox=example1_bbox)
    assert torch.equal(masks, mask_vectors["mask_2person_bbox"])


def test_two_persons_default_layout_exact(mask_vectors):
    masks = speaker_masks(*MULTI1_HW, *choose_bucket(*MULTI1_HW), num_speakers=2)
    assert torch.equal(masks, mask_vectors["mask_2person_nobbox"])


def test_dit_input_masks_are_these(golden_vectors, example1_bbox):
    # The masks the golden DiT forward received (f) are the e2e bbox masks.
    ref = golden_vectors("dit_2person_bbox")["ref_target_masks"]
    assert torch.equal(speaker_masks(*MULTI1_HW, 448, 896, 2, bbox=example1_bbox), ref)


def test_bbox_as_list_in_given_order(example1_bbox):
    as_list = [example1_bbox["person1"], example1_bbox["person2"]]
    assert torch.equal(speaker_masks(*MULTI1_HW, 448, 896, 2, bbox=as_list),
                       speaker_masks(*MULTI1_HW, 448, 896, 2, bbox=example1_bbox))
    swapped = speaker_masks(*MULTI1_HW, 448, 896, 2, bbox=as_list[::-1])
    assert torch.equal(swapped[0], speaker_masks(*MULTI1_HW, 448, 896, 2, bbox=as_list)[1])


# ----------------------------------------------------------------------------- full-grid reference

def _official_style(src_h, src_w, th, tw, boxes):
    """The official steps, done literally: full-resolution masks, nearest resize, crop, resize."""
    grid = torch.zeros(2, src_h, src_w)
    for i, (r0, c0, r1, c1) in enumerate(boxes):
        grid[i, int(r0):int(r1), int(c0):int(c1)] = 1
    background = torch.where(grid.sum(0) > 0, torch.tensor(0.0), torch.tensor(1.0))
    masks = torch.cat([grid, background[None]])
    scale = max(th / src_h, tw / src_w)
    rh, rw = math.ceil(scale * src_h), math.ceil(scale * src_w)
    resized = F.interpolate(masks[None], size=(rh, rw), mode="nearest")
    top, left = int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))
    cropped = resized[:, :, top:top + th, left:left + tw]
    return (F.interpolate(cropped, size=(th // 8, tw // 8), mode="nearest")[0] > 0).float()


def test_matches_full_grid_reference_on_random_layouts():
    rng = random.Random(7)
    for _ in range(25):
        src_h, src_w = rng.randint(40, 700), rng.randint(40, 700)
        th, tw = choose_bucket(src_h, src_w)
        boxes = []
        for _ in range(2):
            r0, c0 = rng.randint(0, src_h - 2), rng.randint(0, src_w - 2)
            r1, c1 = rng.randint(r0 + 1, src_h), rng.randint(c0 + 1, src_w)
            boxes.append([r0 + rng.random(), c0, r1, c1 + 0.5])  # fractional values truncate
        expected = _official_style(src_h, src_w, th, tw, boxes)
        tokens = F.interpolate(expected[None], size=(th // 16, tw // 16), mode="nearest")[0]
        if tokens[:2].flatten(1).sum(dim=1).min() == 0:    # a person the speech routing cannot see
            with pytest.raises(UserInputError, match="covers no cell"):
                speaker_masks(src_h, src_w, th, tw, 2, bbox=boxes)
            continue
        got = speaker_masks(src_h, src_w, th, tw, 2, bbox=boxes)
        assert torch.equal(got, expected), (src_h, src_w, boxes)


def test_default_layout_later_clips_follow_the_official_halving():
    # generate() halves src_w each time it builds the default two-speaker masks.
    src_h, src_w = 360, 640
    th, tw = choose_bucket(src_h, src_w)
    for k in range(4):
        w = src_w >> k
        half = w // 2
        rows = (int(src_h * 0.05), int(src_h * 0.95))
        boxes = [(rows[0], int(half * 0.05), rows[1], int(half * 0.95)),
                 (rows[0], int(half * 0.05 + half), rows[1], int(half * 0.95 + half))]
        got = speaker_masks(src_h, src_w, th, tw, 2, clip_index=k)
        assert torch.equal(got, _official_style(src_h, w, th, tw, boxes))
    # multi1.png: the int() truncation of the margins changes the masks from clip 7 on (width 20).
    first = speaker_masks(*MULTI1_HW, 448, 896, 2)
    assert torch.equal(speaker_masks(*MULTI1_HW, 448, 896, 2, clip_index=6), first)
    assert not torch.equal(speaker_masks(*MULTI1_HW, 448, 896, 2, clip_index=7), first)
    with pytest.raises(UserInputError):  # width 2560 >> 12 == 0: the official code divides by zero
        speaker_masks(*MULTI1_HW, 448, 896, 2, clip_index=12)


# ----------------------------------------------------------------------------- bad input

GOOD = [[160, 120, 1280, 1080], [160, 1320, 1280, 2280]]


@pytest.mark.parametrize("bbox, words", [
    ([[160, 120, 1500, 1080], GOOD[1]], "outside"),        # row_max beyond the 1440 rows
    ([GOOD[0], [160, 1320, 1280, 2600]], "outside"),       # col_max beyond the 2560 columns
    ([[1280, 120, 160, 1080], GOOD[1]], "empty"),          # row_min >= row_max
    ([GOOD[0], [160, 1320, 1280, 1320]], "empty"),         # col_min == col_max
    ([GOOD[0], [-5, 1320, 1280, 2280]], "negative"),
    ([GOOD[0]], "1 boxes for 2"),
    ([*GOOD, GOOD[0]], "3 boxes for 2"),
    ([GOOD[0], ["160", 1320, 1280, 2280]], "not a finite number"),
    ([GOOD[0], [160, 1320, float("nan"), 2280]], "not a finite number"),
    ([GOOD[0], [160, 1320, 1280]], "4 numbers"),
    ("160,120,1280,1080", "mapping"),
])
def test_bad_bbox(bbox, words):
    with pytest.raises(UserInputError) as e:
        speaker_masks(*MULTI1_HW, 448, 896, 2, bbox=bbox)
    assert e.value.field == "bbox"
    assert words in e.value.message
    assert e.value.fix


def test_box_the_routing_cannot_see_is_refused_with_the_usable_size():
    """multi1.png (1440x2560) in the 448x896 bucket: the token cells sample every ~46th source row
    and column, from row 80 on (the centre crop removes the top and bottom bands)."""
    for box in ([722, 1418, 760, 1460],     # between the sampled rows and columns
                [0, 1320, 70, 2280]):       # in the band the crop removes
        with pytest.raises(UserInputError) as e:
            speaker_masks(*MULTI1_HW, 448, 896, 2, bbox=[GOOD[0], box])
        assert e.value.field == "bbox" and f"person2: the box {box} covers no cell" in e.value.message
        assert "sample rows 80-1314" in e.value.message and "at least 47x47 pixels" in e.value.fix
    cell = speaker_masks(*MULTI1_HW, 448, 896, 2, bbox=[GOOD[0], [722, 1418, 769, 1465]])  # 47x47: accepted
    assert cell[1].sum() > 0
    # the default boxes of a very wide image (left / right halves) both fall outside the crop
    with pytest.raises(UserInputError, match="person1: the default box") as e:
        speaker_masks(100, 8000, *choose_bucket(100, 8000), 2)
    assert "give a bbox" in e.value.fix


def test_bbox_count_checked_for_one_speaker_too():
    with pytest.raises(UserInputError):
        speaker_masks(*MULTI1_HW, 448, 896, 1, bbox={"person1": GOOD[0], "person2": GOOD[1]})
    assert speaker_masks(*MULTI1_HW, 448, 896, 1, bbox={"person1": GOOD[0]}).eq(1).all()


@pytest.mark.parametrize("n", [0, 3, True])
def test_bad_speaker_count(n):
    with pytest.raises(UserInputError):
        speaker_masks(*MULTI1_HW, 448, 896, n)
