"""``Engine.from_components``: the runtime choices ``Engine.load`` applies, on models built elsewhere."""

from __future__ import annotations

import torch

from multitalk.models.architecture import TINY
from multitalk.models.checkpoint import build_on_meta
from multitalk.models.transformer import build_transformer_on_meta
from multitalk.models.vae import WanVAE, build_vae_model
from multitalk.pipeline.engine import Engine, EngineConfig


def _parts():
    dit = build_transformer_on_meta(TINY.dit)          # no weights needed: nothing runs
    vae = WanVAE(build_on_meta(lambda: build_vae_model(TINY.vae)).eval(), TINY.vae)
    return dict(text_encoder=None, image_encoder=None, vae=vae, audio_encoder=None, transformer=dit)


def test_from_components_applies_the_config_once():
    parts = _parts()
    engine = Engine.from_components(TINY, **parts, config=EngineConfig(device="cpu", dtype="float32", compile=True),
                                    load_seconds={"vae": 1.0})
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert engine.load_seconds == {"vae": 1.0}
    assert not engine.transformer.training
    compiled = [block._compiled_call_impl for block in engine.transformer.blocks]
    assert all(c is not None for c in compiled)
    assert engine.vae.model._multitalk_fused == "eager"   # the VAE rewrite (eager kernels on CPU)
    # a DiT compiled beforehand (the benchmark's compile section) keeps its compiled blocks
    again = Engine.from_components(TINY, **{**parts, "vae": engine.vae},
                                   config=EngineConfig(device="cpu", compile=True))
    assert [block._compiled_call_impl for block in again.transformer.blocks] == compiled


def test_from_components_default_on_cpu_leaves_the_models_as_built():
    engine = Engine.from_components(TINY, **_parts(), config=EngineConfig(device="cpu"))
    assert all(getattr(block, "_compiled_call_impl", None) is None for block in engine.transformer.blocks)
    assert not getattr(engine.vae.model, "_multitalk_fused", None)


def test_dtypes_and_tf32_follow_the_config():
    """``--dtype float32`` is float32 everywhere (the VAE too) with TF32 off; ``--vae-dtype`` overrides."""
    cpu = torch.device("cpu")
    def check(**fields):
        return EngineConfig(preset="tiny", device="cpu", **fields).check()  # no folder is read or written

    assert check(dtype="float32") == (cpu, torch.float32, torch.float32)
    assert check(dtype="bfloat16")[1:] == (torch.bfloat16, torch.bfloat16)
    assert check(dtype="float32", vae_dtype="bf16")[1:] == (torch.float32, torch.bfloat16)
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        bf16 = _parts()
        bf16["vae"].model.to(torch.bfloat16)
        Engine.from_components(TINY, **bf16, config=EngineConfig(device="cpu", dtype="bfloat16"))
        assert torch.backends.cudnn.allow_tf32                          # PyTorch's default for bf16 runs
        Engine.from_components(TINY, **_parts(), config=EngineConfig(device="cpu", dtype="float32"))
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
