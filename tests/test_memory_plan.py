"""The memory planner: its choices for a table of (budget, clip, weights) cases on the real 14B sizes,
the official overrides, and the too-small error (what is needed, what is available, what to try)."""

from __future__ import annotations

import pytest
import torch

from multitalk.errors import MemoryPlanError
from multitalk.models.architecture import FULL_14B
from multitalk.runtime.memory_plan import (GIB, ModelSizes, Workload, model_sizes, plan_memory, spread,
                                           usable)

# the 14B model as Engine.load holds it in bf16 (checked against the meta-built model below)
SIZES = ModelSizes(dit_blocks=40, dit_block=928_427_008, dit_block_fp8=464_794_624, dit_other=1_001_908_864,
                   dit_block_params=464_162_304, dit_dim=5120, text_encoder=11_361_820_672, text_blocks=24,
                   text_block=385_896_448, image_encoder=1_222_172_160, vae=253_785_062,
                   audio_encoder=377_486_848, act_itemsize=2)
P480 = Workload(640, 640, 81, 2)
P720 = Workload(960, 960, 81, 2)
ONE_SPEAKER_SHORT = Workload(640, 640, 33, 1)
GPU, PER_USE, STREAMED = "gpu", "per_use", "streamed"


def plan(gib: float, workload: Workload = P480, **kw):
    return plan_memory(int(gib * GIB), SIZES, workload, compiled=True, **kw)


# (budget GiB, clip, weights) -> (resident DiT blocks: (low, high), text encoder, CLIP/VAE/wav2vec2)
TABLE = [
    (140, P480, "bf16", (40, 40), GPU, GPU),            # an H200: everything resident
    (80, P480, "bf16", (40, 40), GPU, GPU),             # an 80 GB card
    (80, P720, "bf16", (40, 40), GPU, GPU),
    (48, P480, "bf16", (40, 40), STREAMED, PER_USE),    # 48 GB: the DiT fits if the encoders leave
    (48, P480, "fp8", (40, 40), GPU, GPU),              # ... fp8 blocks leave room for everything
    (24, P480, "bf16", (17, 19), STREAMED, PER_USE),    # 24 GB: about half resident, half streamed
    (24, P720, "bf16", (10, 12), PER_USE, PER_USE),     # 720p: VAE decode 11 GiB, fewer resident
    (24, P480, "fp8", (36, 38), STREAMED, PER_USE),
    (24, ONE_SPEAKER_SHORT, "bf16", (18, 20), STREAMED, PER_USE),  # VAE decode bounds it, not the clip
    (16, P480, "bf16", (8, 10), STREAMED, PER_USE),
    (12, P480, "fp8", (9, 11), STREAMED, PER_USE),
    (12, P480, "bf16", (4, 6), STREAMED, PER_USE),
    (8, P480, "bf16", (0, 1), STREAMED, PER_USE),       # 8 GB: (almost) every block streamed
    (8, P480, "fp8", (0, 2), STREAMED, PER_USE),
]


@pytest.mark.parametrize("gib,workload,weights,resident,text,others", TABLE)
def test_planner_table(gib, workload, weights, resident, text, others):
    p = plan(gib, workload, weights=weights)
    assert resident[0] <= p.resident_blocks <= resident[1], p.summary()
    assert p.placement["text_encoder"] == text, p.summary()
    assert {p.placement[c] for c in ("image_encoder", "vae", "audio_encoder")} == {others}, p.summary()
    assert p.peak <= usable(p.budget)
    assert p.streamed == tuple(spread(40, 40 - p.resident_blocks))
    assert p.weights == weights and p.workload == workload
    line = p.summary()
    budget = f"{gib:.1f} GiB" if gib >= 10 else f"{gib:.2f} GiB"
    assert "\n" not in line and line.startswith(f"memory plan: {budget} (free memory) -> DiT {weights}: ")


def test_more_memory_never_means_fewer_resident_blocks():
    for weights in ("bf16", "fp8"):
        resident = [plan(g, weights=weights).resident_blocks for g in (12, 16, 20, 24, 32, 40, 48)]
        assert resident == sorted(resident), resident
    assert plan(24, weights="fp8").resident_blocks > plan(24, weights="bf16").resident_blocks
    assert plan(24, P720).resident_blocks < plan(24, P480).resident_blocks


def test_streamed_blocks_are_spread_between_resident_ones():
    assert spread(40, 0) == [] and spread(40, 40) == list(range(40))
    s = spread(40, 10)
    assert len(s) == 10 and s[-1] == 39 and all(b - a == 4 for a, b in zip(s, s[1:]))
    half = spread(8, 4)
    assert half == [1, 3, 5, 7]


def test_official_num_persistent_param_in_dit():
    everything_streamed = plan(140, persistent_params=0)
    assert everything_streamed.resident_blocks == 0 and len(everything_streamed.streamed) == 40
    ten = plan(140, persistent_params=10 * SIZES.dit_block_params + 5)
    assert ten.resident_blocks == 10
    with pytest.raises(MemoryPlanError) as err:
        plan(16, persistent_params=30 * SIZES.dit_block_params)
    assert "--num_persistent_param_in_dit 0" in str(err.value)


def test_offload_model_takes_the_encoders_off_the_gpu():
    p = plan(140, offload=True)
    assert p.resident_blocks == 40
    assert {p.placement[c] for c in ("image_encoder", "vae", "audio_encoder")} == {PER_USE}
    assert p.host_bytes >= SIZES.image_encoder + SIZES.vae + SIZES.audio_encoder


def test_host_bytes_are_the_streamed_blocks_and_the_models_off_the_gpu():
    p = plan(24)
    streamed = len(p.streamed) * SIZES.dit_block
    assert p.host_bytes == streamed + SIZES.text_encoder + SIZES.image_encoder + SIZES.vae + SIZES.audio_encoder
    assert plan(140).host_bytes == 0


def test_too_small_says_needed_available_and_what_to_try():
    with pytest.raises(MemoryPlanError) as err:
        plan(6, P480, weights="bf16")
    e = err.value
    msg = str(e)
    assert e.available == 6 * GIB and e.needed > e.available
    assert msg.startswith("not enough GPU memory: this clip (640x640x81, 2 speakers) needs about ")
    assert "6.00 GiB available (free memory); try " in msg
    assert e.fix in msg
    # the suggestion, applied, fits
    if "--weights fp8" in e.fix and "--frame_num" not in e.fix:
        plan(6, P480, weights="fp8")
    # 720p on 12 GiB: the VAE decode alone (9 GiB at 960x960) does not fit, so the 480p buckets
    with pytest.raises(MemoryPlanError) as err:
        plan(12, P720)
    assert err.value.phase == "vae_decode" and err.value.fix == "--size multitalk-480"
    plan(12, P480)
    # bf16 at 10 GiB with 4 resident blocks forced: stream them all
    with pytest.raises(MemoryPlanError) as err:
        plan(9, persistent_params=8 * SIZES.dit_block_params)
    assert err.value.fix.startswith("--num_persistent_param_in_dit 0")
    plan(9, persistent_params=0)


def test_cpu_sized_models_fit_small_budgets():
    """Working memory scales with the model widths: the tiny model's plans need megabytes."""
    tiny = ModelSizes(dit_blocks=2, dit_block=352_768, dit_block_fp8=99_584, dit_other=1_033_856,
                      dit_block_params=88_192, dit_dim=64, text_encoder=140_416, text_blocks=2, text_block=41_472,
                      image_encoder=159_360, vae=3_697_964, audio_encoder=1_000_000, act_itemsize=4,
                      vae_width=8, text_width=32, clip_width=32)
    p = plan_memory(int(1.0 * GIB), tiny, Workload(160, 160, 5, 1, 1.0))
    assert p.all_resident
    with pytest.raises(MemoryPlanError):
        plan_memory(int(0.55 * GIB), tiny, Workload(960, 960, 81, 2))


def test_model_sizes_of_the_14b_model_match_the_table():
    sizes = model_sizes(FULL_14B, torch.bfloat16)
    assert sizes == SIZES
    assert sizes.dit_other + 40 * sizes.dit_block == 38_138_989_184   # 35.5 GiB
    assert sizes.dit_block_fp8 < 0.51 * sizes.dit_block
