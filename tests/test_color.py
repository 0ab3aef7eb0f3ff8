"""Colour correction vs the official match_and_blend_colors output, and the torch Lab conversions vs skimage."""

import warnings

import numpy as np
import pytest
import torch
from skimage import color as skcolor

from conftest import rel_l2
from multitalk.errors import UserInputError
from multitalk.pipeline.color import ColorMatcher, match_and_blend_colors
from multitalk.pipeline.color_space import RGB_FROM_XYZ, XYZ_FROM_RGB, lab_to_rgb, rgb_to_lab

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ----------------------------------------------------------------------------------------------
# The oracle: the official match_and_blend_colors (numpy + skimage)


def _to_unit_rgb(x: torch.Tensor) -> np.ndarray:
    """``[3, ..., H, W]`` in [-1, 1] -> ``[..., H, W, 3]`` numpy in [0, 1] (clipped), same dtype."""
    arr = x.detach().cpu().movedim(0, -1).numpy()
    return np.clip((arr + 1.0) / 2.0, 0.0, 1.0)


def match_and_blend_colors_reference(source: torch.Tensor, reference: torch.Tensor,
                                     strength: float) -> torch.Tensor:
    """The official numpy/skimage implementation (CPU, in the input dtype), with the contract of
    ``match_and_blend_colors``: the oracle the torch path is held to; bit-exact with the golden vector."""
    if strength == 0.0:
        return source
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



def _golden_inputs(golden_vectors):
    ref = golden_vectors("color_correction")
    return golden_vectors("e2e_single_clip")["video_ds8"][None], ref["reference"], ref["output"]


def test_matches_golden(golden_vectors):
    source, reference, expected = _golden_inputs(golden_vectors)
    out = match_and_blend_colors(source, reference, 0.7)  # torch path, float64
    assert out.shape == source.shape and out.dtype == torch.float32
    err = rel_l2(out, expected)
    print(f"color_correction rel_l2={err:.3g}")
    assert err < 1e-5


def test_float32_compute_and_reference_match_golden(golden_vectors):
    source, reference, expected = _golden_inputs(golden_vectors)
    err32 = rel_l2(match_and_blend_colors(source, reference, 0.7, compute_dtype=torch.float32), expected)
    err_ref = rel_l2(match_and_blend_colors_reference(source, reference, 0.7), expected)
    print(f"color_correction float32 rel_l2={err32:.3g} skimage reference rel_l2={err_ref:.3g}")
    assert err32 < 1e-5 and err_ref < 1e-5


def test_torch_path_matches_skimage_reference_in_float64():
    g = torch.Generator().manual_seed(3)
    source = torch.rand(2, 3, 3, 20, 28, generator=g, dtype=torch.float64) * 2.4 - 1.2  # some clipped
    reference = torch.rand(2, 3, 1, 20, 28, generator=g, dtype=torch.float64) * 2 - 1
    out = match_and_blend_colors(source, reference, 0.8)
    assert (out - match_and_blend_colors_reference(source, reference, 0.8)).abs().max() < 1e-10


def _random_rgb(rng: np.random.Generator) -> np.ndarray:
    rgb = rng.random((40, 50, 3))
    rgb[0, 0], rgb[0, 1] = 0.0, 1.0                     # pure black / white
    rgb[1, :6] = [[0.04045] * 3, [np.nextafter(0.04045, 1)] * 3, [0.0] * 3, [1.0] * 3,
                  [0.0031308] * 3, [1e-9, 0.5, 1.0]]    # companding thresholds
    rgb[2, :] = rng.random((50, 1))                     # grays
    return rgb


def test_rgb_to_lab_matches_skimage():
    rng = np.random.default_rng(0)
    rgb = _random_rgb(rng)
    expected = skcolor.rgb2lab(rgb)
    got = rgb_to_lab(torch.from_numpy(rgb))
    assert got.dtype == torch.float64
    err = np.abs(got.numpy() - expected).max()
    print(f"rgb_to_lab max abs err={err:.3g}")
    assert err < 1e-10
    # black and white exactly where skimage puts them (L=0 / L=100)
    assert np.allclose(got[0, :2].numpy(), expected[0, :2], atol=1e-12, rtol=0)
    # channel_dim / device-agnostic layout
    got_cf = rgb_to_lab(torch.from_numpy(rgb).movedim(-1, 0), channel_dim=0)
    assert torch.equal(got_cf.movedim(0, -1), got)


def test_lab_to_rgb_matches_skimage_including_out_of_gamut():
    rng = np.random.default_rng(1)
    n = (60, 70)
    lab = np.stack([rng.uniform(-10, 110, n), rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)], -1)
    lab[0, :4] = [[0, 0, 0], [100, 0, 0], [50, 0, 300], [20, 0, 120]]  # black, white, negative z
    lab[1, :50] = skcolor.rgb2lab(_random_rgb(rng))[0]                  # in-gamut values
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        expected = skcolor.lab2rgb(lab)
    assert any("negative Z values" in str(x.message) for x in w)      # the z clipping branch is hit
    got = lab_to_rgb(torch.from_numpy(lab))
    err = np.abs(got.numpy() - expected).max()
    print(f"lab_to_rgb max abs err={err:.3g}")
    assert err < 1e-10
    assert got.min() >= 0 and got.max() <= 1
    # round trip of in-gamut values: like skimage's (whose f / f^-1 thresholds 0.008856 / 0.2068966
    # are not exactly consistent, so values at the sRGB threshold come back ~3e-8 off)
    rgb = _random_rgb(np.random.default_rng(2))
    back = lab_to_rgb(rgb_to_lab(torch.from_numpy(rgb))).numpy()
    assert np.abs(back - skcolor.lab2rgb(skcolor.rgb2lab(rgb))).max() < 1e-10
    assert np.abs(back - rgb).max() < 1e-7


def test_conversion_constants_are_skimages():
    from skimage.color import colorconv
    assert np.array_equal(np.array(XYZ_FROM_RGB), colorconv.xyz_from_rgb)
    assert np.array_equal(np.array(RGB_FROM_XYZ), colorconv.rgb_from_xyz)


def test_float32_conversions_close_to_skimage_float32():
    rgb = _random_rgb(np.random.default_rng(4)).astype(np.float32)
    lab = rgb_to_lab(torch.from_numpy(rgb), dtype=torch.float32)
    assert lab.dtype == torch.float32
    assert np.abs(lab.numpy() - skcolor.rgb2lab(rgb)).max() < 1e-3           # Lab spans ~100
    assert np.abs(lab_to_rgb(lab, dtype=torch.float32).numpy() - rgb).max() < 1e-5


def test_inputs_are_not_modified():
    g = torch.Generator().manual_seed(8)
    rgb = torch.rand(5, 7, 3, generator=g, dtype=torch.float64)
    lab = rgb_to_lab(rgb) * 1.3
    source = torch.rand(1, 3, 2, 5, 7, generator=g) * 2 - 1
    reference = torch.rand(1, 3, 1, 5, 7, generator=g) * 2 - 1
    copies = [t.clone() for t in (rgb, lab, source, reference)]
    rgb_to_lab(rgb), lab_to_rgb(lab), match_and_blend_colors(source, reference, 0.5)
    assert all(torch.equal(a, b) for a, b in zip((rgb, lab, source, reference), copies))


def test_conversions_reject_bad_input():
    with pytest.raises(TypeError):
        rgb_to_lab(torch.zeros(2, 2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        lab_to_rgb(torch.zeros(2, 2, 4))


def test_strength_zero_returns_source_unchanged():
    x = torch.rand(1, 3, 2, 8, 8) * 2 - 1
    r = torch.rand(1, 3, 1, 8, 8) * 2 - 1
    for fn in (match_and_blend_colors, match_and_blend_colors_reference):
        assert fn(x, r, 0.0) is x


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


def test_flat_frame_gets_reference_mean():
    g = torch.Generator().manual_seed(5)
    source = torch.rand(1, 3, 2, 16, 24, generator=g, dtype=torch.float64) * 2 - 1
    source[:, :, 1] = torch.tensor([0.2, -0.5, 0.7], dtype=torch.float64)[:, None, None]  # flat frame
    reference = torch.rand(1, 3, 1, 16, 24, generator=g, dtype=torch.float64) * 2 - 1
    out = match_and_blend_colors(source, reference, 1.0)
    frame_lab = rgb_to_lab((out[0, :, 1] + 1) / 2, channel_dim=0)
    ref_mean = rgb_to_lab((reference[0, :, 0] + 1) / 2, channel_dim=0).mean(dim=(1, 2))
    assert torch.allclose(frame_lab, ref_mean[:, None, None].expand_as(frame_lab), atol=1e-8)


def test_chunking_does_not_change_result(monkeypatch):
    import multitalk.pipeline.color as color_mod
    g = torch.Generator().manual_seed(6)
    source = torch.rand(1, 3, 5, 8, 12, generator=g) * 2 - 1
    reference = torch.rand(1, 3, 1, 8, 12, generator=g) * 2 - 1
    whole = match_and_blend_colors(source, reference, 0.6)
    monkeypatch.setattr(color_mod, "_CHUNK_PIXELS", 2 * 8 * 12)  # chunks of 2 frames
    monkeypatch.setattr(color_mod, "_CPU_BLOCK_PIXELS", 50)  # blocks across frame boundaries
    assert torch.equal(match_and_blend_colors(source, reference, 0.6), whole)


@cuda
def test_cuda_matches_cpu_and_golden(golden_vectors):
    source, reference, expected = _golden_inputs(golden_vectors)
    out = match_and_blend_colors(source.cuda(), reference.cuda(), 0.7)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert rel_l2(out.cpu(), expected) < 1e-5
    assert rel_l2(out.cpu(), match_and_blend_colors(source, reference, 0.7)) < 1e-6
    out32 = match_and_blend_colors(source.cuda(), reference.cuda(), 0.7, compute_dtype=torch.float32)
    assert rel_l2(out32.cpu(), expected) < 1e-5
    src = source.cuda()
    assert match_and_blend_colors(src, reference.cuda(), 0.0) is src
    rgb = torch.from_numpy(_random_rgb(np.random.default_rng(7)))
    lab = rgb_to_lab(rgb.cuda())
    assert (lab.cpu() - torch.from_numpy(skcolor.rgb2lab(rgb.numpy()))).abs().max() < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_rgb = skcolor.lab2rgb(lab.cpu().numpy() * [1.0, 1.6, 1.6])
    got_rgb = lab_to_rgb(lab * torch.tensor([1.0, 1.6, 1.6], device="cuda", dtype=torch.float64))
    assert (got_rgb.cpu() - torch.from_numpy(expected_rgb)).abs().max() < 1e-10


def test_strength_out_of_range():
    x = torch.zeros(1, 3, 1, 4, 4)
    with pytest.raises(UserInputError) as e:
        match_and_blend_colors(x, x, 1.5)
    assert e.value.field == "color_correction_strength"


def test_color_matcher_on_chunks_equals_one_call_on_the_clip():
    """The pipeline corrects each decoded chunk (1, 4, 4 frames) with one ColorMatcher per video."""
    g = torch.Generator().manual_seed(3)
    clip = torch.rand(1, 3, 9, 16, 24, generator=g) * 2 - 1
    reference = torch.rand(1, 3, 1, 16, 24, generator=g) * 2 - 1
    matcher = ColorMatcher(reference, 0.8)
    chunks = [matcher(clip[:, :, a:b]) for a, b in ((0, 1), (1, 5), (5, 9))]
    assert torch.equal(torch.cat(chunks, dim=2), match_and_blend_colors(clip, reference, 0.8))
    assert ColorMatcher(reference, 0.0)(clip) is clip
    with pytest.raises(UserInputError) as err:
        ColorMatcher(reference, 1.5)
    assert err.value.field == "color_correction_strength"
