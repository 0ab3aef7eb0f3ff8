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
    again = Engine.from_components(TINY, **{**parts, "vae": engine.vae}, config=EngineConfig(device="cpu", compile=True))
    assert [block._compiled_call_impl for block in again.transformer.blocks] == compiled


def test_from_components_default_on_cpu_leaves_the_models_as_built():
    engine = Engine.from_components(TINY, **_parts(), config=EngineConfig(device="cpu"))
    assert all(getattr(block, "_compiled_call_impl", None) is None for block in engine.transformer.blocks)
    assert not getattr(engine.vae.model, "_multitalk_fused", None)
