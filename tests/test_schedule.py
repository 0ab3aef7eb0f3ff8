"""Sampling timesteps vs the official values recorded for every end-to-end run."""

import pytest
import torch

from multitalk.errors import UserInputError
from multitalk.pipeline.schedule import sample_timesteps, shift_timestep

CASES = ["e2e_single_clip", "e2e_multi_add_bbox_stream", "e2e_multi_para_stream"]


@pytest.mark.parametrize("case", CASES)
def test_timesteps_match_official(golden_scalars, case):
    run = golden_scalars["e2e"][case]
    p = run["params"]
    ts = sample_timesteps(p["sampling_steps"], p["shift"])
    assert all(t.dtype == torch.float32 and t.shape == (1,) for t in ts)
    assert [float(t) for t in ts] == run["timesteps"]  # bit-exact float32


def test_schedule_shape_and_endpoints():
    ts = sample_timesteps(40, 7.0)
    assert len(ts) == 41
    assert float(ts[0]) == 1000.0 and float(ts[-1]) == 0.0
    values = [float(t) for t in ts]
    assert values == sorted(values, reverse=True)


def test_shift_one_is_identity_and_shift_bends_up():
    t = torch.tensor([250.0, 500.0, 750.0])
    assert torch.equal(shift_timestep(t, 1.0), t)
    assert torch.all(shift_timestep(t, 7.0) > t)
    # s' = 7*0.5/(1+6*0.5) = 0.875
    assert float(shift_timestep(torch.tensor([500.0]), 7.0)) == pytest.approx(875.0)


@pytest.mark.parametrize("steps,shift,field", [(0, 7.0, "sample_steps"), (10, 0.0, "sample_shift")])
def test_bad_schedule_inputs(steps, shift, field):
    with pytest.raises(UserInputError) as e:
        sample_timesteps(steps, shift)
    assert e.value.field == field
