"""Colour correction vs the official match_and_blend_colors output."""

import pytest
import torch

from conftest import rel_l2
from multitalk.errors import UserInputError
from multitalk.pipeline.color import match_and_blend_colors


def test_matches_golden(golden_vectors):
    ref = golden_vectors("color_correction")
    source = golden_vectors("e2e_single_clip")["video_ds8"][None]
    out = match_and_blend_colors(source, ref["reference"], 0.7)
    assert out.shape == source.shape and out.dtype == torch.float32
    err = rel_l2(out, ref["output"])
    print(f"color_correction rel_l2={err:.3g}")
    assert err < 1e-5


def test_strength_zero_is_identity_and_full_strength_matches_reference_stats():
    g = torch.Generator().manual_seed(0)
    source = torch.rand(1, 3, 2, 16, 24, generator=g) * 0.6 - 0.8  # dark
    reference = torch.rand(1, 3, 1, 16, 24, generator=g) * 0.6 + 0.2  # bright
    assert match_and_blend_colors(source, reference, 0.0) is source
    full = match_and_blend_colors(source, reference, 1.0)
    half = match_and_blend_colors(source, reference, 0.5)
    # full correction moves each frame's mean brightness to the reference's
    assert torch.allclose(full.mean(dim=(1, 3, 4)), reference.mean().expand(1, 2), atol=0.05)
    # blend is linear in [0, 1] space (no clipping for these values)
    assert torch.allclose(half, (source + full) / 2, atol=1e-5)


def test_strength_out_of_range():
    x = torch.zeros(1, 3, 1, 4, 4)
    with pytest.raises(UserInputError) as e:
        match_and_blend_colors(x, x, 1.5)
    assert e.value.field == "color_correction_strength"
