"""Classifier-free guidance and APG: formulas, call order and the APG math properties."""

from types import SimpleNamespace

import pytest
import torch

from multitalk.pipeline.guidance import (GuidanceState, MomentumBuffer, adaptive_projected_guidance,
                                         cfg_combine, project)


def _params(**kw):
    base = dict(text_guide_scale=5.0, audio_guide_scale=4.0, use_apg=False, apg_momentum=-0.75,
                apg_norm_threshold=55.0)
    base.update(kw)
    return SimpleNamespace(**base)


def _preds(n, seed=0, shape=(16, 3, 6, 8), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for _ in range(n)]


def test_three_branch_cfg_is_the_official_formula():
    cond, drop_text, uncond = _preds(3)
    got = cfg_combine([cond, drop_text, uncond], 5.0, 4.0)
    want = uncond + 5.0 * (cond - drop_text) + 4.0 * (drop_text - uncond)
    assert torch.allclose(got, want, atol=1e-6)
    # scale 1/1 collapses to the conditional prediction
    assert torch.allclose(cfg_combine([cond, drop_text, uncond], 1.0, 1.0), cond, atol=1e-6)


def test_text_scale_one_runs_two_branches():
    state = GuidanceState(_params(text_guide_scale=1.0))
    assert state.names == ("cond", "drop_audio")
    branches = state.branches("ctx", "null", "audio", "zero")
    assert branches == [("ctx", "audio"), ("ctx", "zero")]
    cond, drop_audio = _preds(2)
    assert torch.allclose(state.combine([cond, drop_audio]), drop_audio + 4.0 * (cond - drop_audio), atol=1e-6)
    with pytest.raises(ValueError):
        state.combine(_preds(3))


def test_three_branch_call_order():
    state = GuidanceState(_params())
    assert state.branches("ctx", "null", "audio", "zero") == [("ctx", "audio"), ("null", "audio"), ("null", "zero")]


def test_projection_is_orthogonal_and_complete():
    v0, v1 = _preds(2, seed=1)
    par, orth = project(v0, v1)
    assert par.dtype == torch.float32
    cos = (orth.double() * v1.double()).sum() / (orth.double().norm() * v1.double().norm())
    assert abs(float(cos)) < 1e-6
    assert torch.allclose(par + orth, v0, atol=1e-5)
    # the parallel part is a multiple of v1
    k = (par.double() * v1.double()).sum() / v1.double().norm() ** 2
    assert torch.allclose(par.double(), k * v1.double(), atol=1e-5)


def test_norm_clipping():
    diff, cond = _preds(2, seed=2, scale=10.0)       # ||diff|| ~ 10*sqrt(2304) = 480 > 55
    out = adaptive_projected_guidance(diff, cond, norm_threshold=55.0)
    _, orth = project(diff * (55.0 / diff.norm()), cond)
    assert torch.allclose(out, orth, atol=1e-5)
    assert float(out.norm()) <= 55.0 + 1e-3
    small = diff * (10.0 / diff.norm())               # below the threshold: not rescaled
    assert torch.allclose(adaptive_projected_guidance(small, cond), project(small, cond)[1], atol=1e-6)
    # threshold <= 0 disables the clipping
    assert torch.allclose(adaptive_projected_guidance(diff, cond, norm_threshold=0), project(diff, cond)[1], atol=1e-4)
    # eta keeps part of the parallel component
    par, orth = project(small, cond)
    assert torch.allclose(adaptive_projected_guidance(small, cond, eta=0.5), orth + 0.5 * par, atol=1e-6)


def test_momentum_recurrence():
    d1, d2, d3 = _preds(3, seed=3)
    buf = MomentumBuffer(-0.75)
    assert torch.equal(buf.update(d1), d1)
    r2 = buf.update(d2)
    assert torch.allclose(r2, d2 - 0.75 * d1, atol=1e-6)
    r3 = buf.update(d3)
    assert torch.allclose(r3, d3 - 0.75 * r2, atol=1e-6)


def test_apg_combination_uses_one_buffer_per_difference():
    state = GuidanceState(_params(use_apg=True))
    text_buf, audio_buf = MomentumBuffer(-0.75), MomentumBuffer(-0.75)
    for seed in range(3):  # three steps: the buffers carry over
        cond, drop_text, uncond = _preds(3, seed=10 + seed, scale=3.0)
        want = (cond + 4.0 * adaptive_projected_guidance(cond - drop_text, cond, text_buf, norm_threshold=55)
                + 3.0 * adaptive_projected_guidance(drop_text - uncond, cond, audio_buf, norm_threshold=55))
        got = state.combine([cond, drop_text, uncond])
        assert torch.allclose(got, want, atol=1e-5)
    assert len(state.diff_norms) == 6
    assert float(state.diff_norms[-1]) == pytest.approx(float(audio_buf.running_average.norm()), rel=1e-6)
    # the guidance added to cond is orthogonal to cond
    extra = (got - cond).double()
    assert abs(float((extra * cond.double()).sum() / (extra.norm() * cond.double().norm()))) < 1e-5


def test_both_scales_one_run_one_branch():
    from multitalk.pipeline.guidance import branch_names

    state = GuidanceState(_params(text_guide_scale=1.0, audio_guide_scale=1.0))
    assert state.names == ("cond",) and state.num_branches == 1
    assert state.branches("ctx", "null", "audio", "zero") == [("ctx", "audio")]
    (cond,) = _preds(1)
    assert torch.equal(state.combine([cond]), cond)
    assert torch.equal(GuidanceState(_params(text_guide_scale=1.0, audio_guide_scale=1.0, use_apg=True)).combine([cond]), cond)
    # the 2-branch formula at audio scale 1 is the same prediction up to rounding
    drop_audio = _preds(2)[1]
    assert torch.allclose(cfg_combine([cond, drop_audio], 1.0, 1.0), cond, atol=1e-6)
    assert branch_names(1.0, 2.0) == ("cond", "drop_audio") and branch_names(5.0, 1.0) == ("cond", "drop_text", "uncond")
    with pytest.raises(ValueError):
        state.combine(_preds(2))
