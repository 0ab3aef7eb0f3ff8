"""A generation that goes wrong, in this process on the tiny preset (CPU): a 5-frame preview clip
with one sampling step. (Where the noise comes from: the golden e2e runs and the benchmark smoke
test's clip4, which runs ``generate`` twice and checks the process RNG.)"""

from __future__ import annotations

import pytest
import torch

from multitalk.errors import GenerationError
from multitalk.pipeline.demo_inputs import write_demo_inputs
from multitalk.pipeline.engine import Engine, EngineConfig
from multitalk.pipeline.inputs import GenerationParams, load_input_json
from multitalk.pipeline.render import render


def test_nan_stops_the_run_and_writes_nothing(tmp_path):
    engine = Engine.load(EngineConfig(preset="tiny", device="cpu", compile=False))
    spec = load_input_json(write_demo_inputs(tmp_path / "inputs"))[0]
    params = GenerationParams.from_dict({"size": "preview", "mode": "clip", "frame_num": 5, "sample_steps": 1,
                                         "color_correction_strength": 0.0})
    out = tmp_path / "videos"                      # an existing folder: the mp4 would go inside it
    out.mkdir()
    with torch.no_grad():
        engine.transformer.proj_out.bias[0] = float("nan")   # every prediction, hence the latent, holds NaN
    with pytest.raises(GenerationError, match="clip 1/1: the sampled latent hold NaN or Inf"):
        render(engine, spec, params, out)
    assert list(out.iterdir()) == []               # no black video, no partial file
