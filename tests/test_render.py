"""Generations in this process on the tiny preset (CPU): where the noise comes from, and a run that
goes wrong. One engine and one set of conditions serve every test; each run is a 5-frame preview
clip with one sampling step."""

from __future__ import annotations

import pytest
import torch

from multitalk.errors import GenerationError
from multitalk.pipeline.demo_inputs import write_demo_inputs
from multitalk.pipeline.engine import Engine, EngineConfig
from multitalk.pipeline.generate import generate, prepare_conditions
from multitalk.pipeline.inputs import GenerationParams, load_input_json
from multitalk.pipeline.render import render


def _params(**changes) -> GenerationParams:
    return GenerationParams.from_dict({"size": "preview", "mode": "clip", "frame_num": 5, "sample_steps": 1,
                                       "seed": 7, "color_correction_strength": 0.0, **changes})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    engine = Engine.load(EngineConfig(preset="tiny", device="cpu", compile=False))
    spec = load_input_json(write_demo_inputs(tmp_path_factory.mktemp("demo")))[0]
    conditions = prepare_conditions(engine, spec, _params())

    def video(**changes) -> torch.Tensor:
        frames: list[torch.Tensor] = []
        generate(engine, spec, _params(**changes), on_frames=frames.append, conditions=conditions)
        return torch.cat(frames, dim=1)

    video.engine, video.spec = engine, spec
    return video


def test_noise_comes_from_the_run_not_the_process(run):
    """A per-run generator: the process's RNG is untouched, and a seed gives the same video whatever
    ran before (a worker's jobs are reproducible one by one). ``cpu`` noise: the golden e2e (ii)."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = run()
    assert torch.equal(torch.get_rng_state(), state)
    torch.randn(1000)                              # whatever another job drew in between
    assert torch.equal(run(noise_device="cpu"), first)   # on a CPU engine, the same draws


def test_nan_stops_the_run_and_writes_nothing(run, tmp_path):
    head = run.engine.transformer.proj_out
    saved = head.bias.detach().clone()
    try:
        with torch.no_grad():
            head.bias[0] = float("nan")            # every prediction, hence the latent, holds NaN
        with pytest.raises(GenerationError, match="clip 1/1: the sampled latent hold NaN or Inf"):
            render(run.engine, run.spec, _params(), tmp_path)
    finally:
        with torch.no_grad():
            head.bias.copy_(saved)
    assert list(tmp_path.iterdir()) == []          # no black video, no partial file
