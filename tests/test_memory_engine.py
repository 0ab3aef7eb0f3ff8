"""The memory plan through the real engine, CLI and service runner on the tiny weights (CPU, float32):
streamed blocks and per-use models give the resident engine's video bit for bit, fp8 weight storage
stays within its stated bound, and a plan that cannot fit is one line with exit code 2 before any
weight loads (the service: ``out_of_memory`` with the setting to try, and the next job runs)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import rel_l2
from multitalk.cli import app
from multitalk.errors import MemoryPlanError
from multitalk.pipeline.demo_inputs import write_demo_inputs
from multitalk.pipeline.engine import Engine, EngineConfig
from multitalk.pipeline.generate import prepare_media
from multitalk.pipeline.inputs import GenerationParams, load_input_json
from multitalk.pipeline.memory import workload_of
from multitalk.pipeline.render import render
from multitalk.runtime.memory_plan import GIB, plan_memory

# measured 0.125 here (4 steps x 3 passes, 9 frames, preview size, the demo's two speakers): the tiny
# DiT's own forward moves by 2.8e-2 / 3.4e-2 (1 / 2 speakers), and classifier-free guidance (text 5,
# audio 4) multiplies the difference between its passes; a wrong result is ~1
FP8_E2E_BOUND = 0.2
PARAMS = dict(size="preview", frame_num=9, mode="clip", sample_steps=4, seed=42, color_correction_strength=0.0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = write_demo_inputs(tmp_path_factory.mktemp("demo"))
    spec, _ = load_input_json(path)
    return {"path": path, "spec": spec}


def _config(golden, **kw) -> EngineConfig:
    return EngineConfig(ckpt_dir=golden / "weights" / "Wan2.1-I2V-tiny",
                        wav2vec_dir=golden / "weights" / "chinese-wav2vec2-tiny", device="cpu", dtype="float32",
                        compile=False, **kw)


def _video(engine, demo, tmp_path, name) -> torch.Tensor:
    from safetensors.torch import load_file

    params = GenerationParams(**PARAMS)
    render(engine, demo["spec"], params, tmp_path / f"{name}.mp4", save_tensor=tmp_path / f"{name}.safetensors")
    return load_file(str(tmp_path / f"{name}.safetensors"))["video"]


def test_streamed_and_per_use_engine_makes_the_resident_video_and_fp8_stays_close(golden, demo, tmp_path):
    engine = Engine.load(_config(golden))
    assert engine.plan is None                      # CPU, nothing asked: everything where it is
    resident = _video(engine, demo, tmp_path, "resident")

    # the same engine re-planned: every DiT block streamed, the encoders and VAE per use
    plan = plan_memory(1 << 50, engine.sizes or _sizes(engine), weights="bf16", offload=True, persistent_params=0,
                       source="test")
    engine.apply_plan(plan)
    assert engine.placement.kind(engine.transformer) == "streamed"
    assert engine.placement.kind(engine.vae) == "per_use"
    streamed = _video(engine, demo, tmp_path, "streamed")
    assert torch.equal(streamed, resident)
    assert engine.placement.streamers()[0].stats.blocks_streamed == 4 * 3 * 2   # steps x passes x blocks

    # fp8 weight storage, loaded as the CLI does (--weights fp8), dequantised per layer on the CPU
    fp8 = Engine.load(_config(golden, weights="fp8", num_persistent_param_in_dit=0))
    assert fp8.plan.weights == "fp8" and fp8.plan.resident_blocks == 0
    err = rel_l2(_video(fp8, demo, tmp_path, "fp8"), resident)
    print(f"fp8 weight storage, tiny e2e: {err:.2e}")
    assert 1e-4 < err < FP8_E2E_BOUND


def _sizes(engine):
    from multitalk.runtime.memory_plan import model_sizes

    return model_sizes(engine.arch, engine.dtype, engine.vae.dtype)


def test_cli_plan_that_cannot_fit_is_one_line_exit_2(golden, demo, tmp_path):
    result = CliRunner().invoke(app, [
        "generate", str(demo["path"]), "--ckpt-dir", str(golden / "weights" / "Wan2.1-I2V-tiny"),
        "--wav2vec-dir", str(golden / "weights" / "chinese-wav2vec2-tiny"), "--device", "cpu",
        "--max-vram", "0.05", "--size", "multitalk-480", "--out", str(tmp_path / "v.mp4"), "--quiet"])
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    line = errors[0]
    assert line.startswith("error: not enough GPU memory: this clip (")
    assert "needs about" in line and "0.05 GiB available (--max-vram); try --max-vram " in line
    assert not (tmp_path / "v.mp4").exists()


def test_service_runner_fails_a_job_that_cannot_fit_and_serves_the_next(golden, demo, tmp_path):
    from multitalk.pipeline.runner import PipelineRunner
    from multitalk.service.worker import Worker

    spec = json.loads(demo["path"].read_text())
    request = {"prompt": spec["prompt"], "cond_image": str(demo["path"].parent / spec["cond_image"]),
               "cond_audio": {k: str(demo["path"].parent / v) for k, v in spec["cond_audio"].items()},
               "audio_type": spec.get("audio_type", "add"), "bbox": spec.get("bbox")}
    small = {"size": "preview", "frame_num": 5, "sample_steps": 1, "mode": "clip"}
    big = {**small, "size": "multitalk-480", "frame_num": 81}
    # a budget that holds the small job but not the 480p one
    from transformers import Wav2Vec2Config

    from multitalk.models.architecture import detect_architecture
    from multitalk.runtime.memory_plan import model_sizes

    sizes = model_sizes(detect_architecture(golden / "weights" / "Wan2.1-I2V-tiny"), torch.float32, torch.float32,
                        Wav2Vec2Config.from_pretrained(str(golden / "weights" / "chinese-wav2vec2-tiny")))
    media = prepare_media(load_input_json(demo["path"])[0], GenerationParams(**small))
    needs_small = plan_memory(1 << 50, sizes, workload_of(media, GenerationParams(**small))).peak
    budget_gib = (needs_small + 0.6 * GIB + 0.05 * GIB) / 0.96 / GIB
    with pytest.raises(MemoryPlanError):
        plan_memory(int(budget_gib * GIB), sizes, workload_of(prepare_media(load_input_json(demo["path"])[0],
                                                                            GenerationParams(**big)),
                                                              GenerationParams(**big)))

    runner = PipelineRunner(ckpt_dir=str(golden / "weights" / "Wan2.1-I2V-tiny"),
                            wav2vec_dir=str(golden / "weights" / "chinese-wav2vec2-tiny"), device="cpu",
                            dtype="float32", compile=False, max_vram_gib=budget_gib)
    runner.load()                          # the 480p default does not fit: planned for small clips
    assert runner.engine.plan is not None
    with pytest.raises(MemoryPlanError) as err:
        runner.run({**request, "params": big}, tmp_path / "big", lambda p: None, lambda: False)
    error = Worker._error(object.__new__(Worker), "job-1", err.value)
    assert error["code"] == "out_of_memory" and error["hint"].startswith("try ")
    assert "not enough GPU memory" in error["message"]
    (tmp_path / "small").mkdir()
    out = runner.run({**request, "params": small}, tmp_path / "small", lambda p: None, lambda: False)
    assert out["frames"] == 5


def test_lora_switch_keeps_the_plan_and_frees_the_old_blocks(golden, tmp_path):
    """A job's LoRA set reloads the DiT: the new one is placed as the plan says (its blocks streamed
    again), the old one's pinned copies are let go, and it computes what an unplanned engine with the
    same LoRA computes, bit for bit."""
    from safetensors.torch import load_file, save_file

    from multitalk.models.lora import LoraSpec, random_official_lora

    lora = tmp_path / "lora.safetensors"
    save_file(random_official_lora(golden_dit_config(golden), rank=4, seed=5), str(lora))
    v = load_file(str(golden / "vectors" / "dit_1person.safetensors"))

    def forward(engine):
        with torch.no_grad(), engine.placement.use(engine.transformer):
            return engine.transformer(v["x"][None], v["t"], [v["context"]], v["clip_fea"], v["y"], v["audio"],
                                      v["ref_target_masks"])

    engine = Engine.load(_config(golden, num_persistent_param_in_dit=0))
    old = engine.transformer
    old_streamer = engine.placement.policy(old).streamer
    assert engine.use_loras([LoraSpec(lora, 0.8)]) is True
    assert engine.transformer is not old and engine.placement.policy(old) is None
    assert old_streamer.host == {} and old.block_streamer is None
    policy = engine.placement.policy(engine.transformer)
    assert policy.kind == "streamed" and sorted(policy.streamer.host) == [0, 1]
    streamed = forward(engine)
    reference = Engine.load(_config(golden, loras=(LoraSpec(lora, 0.8),)))
    assert reference.plan is None
    assert torch.equal(streamed, forward(reference))


def golden_dit_config(golden):
    from multitalk.models.architecture import detect_architecture

    return detect_architecture(golden / "weights" / "Wan2.1-I2V-tiny").dit
