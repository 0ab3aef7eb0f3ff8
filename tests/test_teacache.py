"""TeaCache state machine: the official skip pattern of e2e(ii), reproduced from the tiny DiT's e0."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from conftest import rel_l2
from multitalk.pipeline.schedule import sample_timesteps
from multitalk.pipeline.teacache import COEFFICIENTS, TeaCache, relative_l1


@pytest.fixture(scope="module")
def time_weights(tiny_ckpt_dir):
    """The tiny DiT's time_embedding / time_projection weights (read directly, no model)."""
    out = {}
    for f in sorted(tiny_ckpt_dir.glob("diffusion_pytorch_model*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys() if k.startswith("time_")})
    return out


def _e0(w, t: torch.Tensor) -> torch.Tensor:
    """Official: float64 sinusoid (256) -> float32 -> Linear, SiLU, Linear -> SiLU, Linear -> [1, 6, dim]."""
    pos = t.double()
    freqs = torch.pow(10000, -torch.arange(128, dtype=torch.float64) / 128)
    x = torch.outer(pos, freqs)
    x = torch.cat([torch.cos(x), torch.sin(x)], dim=1).float()
    e = F.linear(x, w["time_embedding.0.weight"], w["time_embedding.0.bias"])
    e = F.linear(F.silu(e), w["time_embedding.2.weight"], w["time_embedding.2.bias"])
    e0 = F.linear(F.silu(e), w["time_projection.1.weight"], w["time_projection.1.bias"])
    return e0.unflatten(1, (6, -1))


def test_e0_helper_matches_dit_golden(time_weights, golden_vectors):
    ref = golden_vectors("dit_2person_bbox")
    assert rel_l2(_e0(time_weights, ref["t"]), ref["dbg_time_e0"]) < 1e-5


def test_reproduces_official_skip_pattern(time_weights, golden_scalars):
    run = golden_scalars["e2e"]["e2e_multi_add_bbox_stream"]
    p = run["params"]
    steps = p["sampling_steps"]
    timesteps = sample_timesteps(steps, p["shift"])
    cache = TeaCache(steps, p["teacache_thresh"], p["size"])
    accumulated, ran = [], []
    for _clip in range(run["n_clips"]):
        cache.start_clip()
        for i in range(steps):
            e0 = _e0(time_weights, timesteps[i])
            for branch in range(3):
                compute = cache.should_compute(branch, e0)
                if compute:
                    cache.store_residual(branch, torch.zeros(1))
                ran.append(compute)
                accumulated.append(cache.accumulated[branch])
    assert cache.skipped_calls == run["teacache_skipped_calls"]
    assert ran == [c["blocks_ran"] for c in run["dit_calls"]]
    ref = np.array([c["teacache_accumulated"] for c in run["dit_calls"]])
    err = np.abs(np.array(accumulated) - ref).max() / np.abs(ref).max()
    print(f"teacache_accumulated max rel err={err:.3g}")
    assert err < 5e-5  # float32 e0 noise amplified by the degree-4 rescale polynomial


def test_residual_is_added_on_skip():
    cache = TeaCache(steps=6, thresh=1e9)  # huge threshold: skip whenever allowed
    x = torch.randn(1, 10, 4)
    outputs = []
    for i in range(6):
        e0 = torch.full((1, 6, 4), 1000.0 - i)
        for b in range(3):
            if cache.should_compute(b, e0):
                out = x * (b + 2)
                cache.store_residual(b, out - x)
            else:
                out = cache.apply(b, x)
            outputs.append(out)
    # first 5 steps forced, step 5 skipped for every branch and reuses its own residual
    assert cache.skipped_calls == [15, 16, 17]
    for b in range(3):
        assert torch.allclose(outputs[15 + b], x * (b + 2))
    assert cache.counter == 0  # wrapped: the next clip starts over


def test_branch_order_is_enforced():
    cache = TeaCache(steps=4)
    with pytest.raises(ValueError):
        cache.should_compute(1, torch.ones(1, 6, 2))


def test_threshold_decision_and_reset():
    e0_prev, e0 = torch.ones(1, 6, 4), torch.full((1, 6, 4), 1.001)
    rel = relative_l1(e0, e0_prev)
    assert rel == pytest.approx(1e-3, rel=1e-4)
    step_value = float(np.polyval(COEFFICIENTS[("multitalk-480", True)], rel))
    cache = TeaCache(steps=10, thresh=2.5 * step_value)
    for _step in range(5):  # forced region: the first 5 steps always compute
        for b in range(3):
            assert cache.should_compute(b, e0_prev)
            cache.store_residual(b, torch.zeros(1))
    decisions = []
    prev = e0_prev
    for _ in range(4):  # steps 5..8, each moving by rel 1e-3 relative to the previous one
        cur = prev * 1.001
        decisions.append([cache.should_compute(b, cur) for b in range(3)])
        prev = cur
    # acc: 1x (skip), 2x (skip), 3x >= 2.5x (compute, reset), 1x (skip)
    assert [d[0] for d in decisions] == [False, False, True, False]


def test_non_ret_mode_forces_first_and_last_step():
    cache = TeaCache(steps=5, thresh=1e9, use_ret_steps=False)
    pattern = []
    for i in range(5):
        for b in range(3):
            c = cache.should_compute(b, torch.full((1, 4), 10.0 - i))
            if c:
                cache.store_residual(b, torch.zeros(1))
            pattern.append(c)
    assert pattern == [True] * 3 + [False] * 9 + [True] * 3
    assert cache.coefficients == COEFFICIENTS[("multitalk-480", False)]
