"""The random full-size (or TINY) models and inputs the benchmark sections measure.

Each component is built on ``meta`` and loaded through the project's own loader
(``models.checkpoint.load_converted`` with the DiT, umT5, CLIP, VAE and wav2vec2 converters) from
a stream of official-key random tensors drawn on the device, so dtypes, float32-kept modules and
layouts are exactly those of a real load (``benchmarks/README.md``, "How the random models are built").
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

from harness import Setting, sync
from multitalk.models.architecture import FULL_14B

def random_items(component: str, shapes: dict, device: torch.device, seed: int,
                 keep: Callable[[str], bool] = lambda key: True) -> Iterator[tuple[str, torch.Tensor, str]]:
    """``(official key, random float32 tensor, "<random>")`` one at a time, drawn on ``device``.

    Small tensors follow the golden tiny scheme exactly (``tiny.init_tensor``, CPU); large ones
    (weights / embeddings) are ``N(0, 1/fan_in)`` (embeddings ``N(0, 1/width)``) drawn on the device,
    which keeps activations of the deep random model in range.
    """
    from multitalk.models.tiny import init_tensor

    cpu_gen = torch.Generator(device="cpu").manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)
    for key, shape in shapes.items():
        if not keep(key):
            continue
        shape = tuple(shape)
        if math.prod(shape) <= 2_000_000:
            value = init_tensor(component, key, shape, cpu_gen).to(device)
        else:
            last = shape[-1] if ("embedding" in key or key.endswith("modulation")) else math.prod(shape[1:])
            value = torch.randn(shape, generator=dev_gen, device=device, dtype=torch.float32)
            value.mul_(1.0 / math.sqrt(last))
        yield key, value, "<random>"


def check_full_size_layouts() -> dict[str, str]:
    """Dry-run the full-size random key streams through the loaders on ``meta`` (no memory, CPU).

    Catches a key/shape disagreement between ``tiny.*_key_shapes(FULL_14B)`` and the loaders
    before any GPU time is spent; returns ``{component: load summary}``, raises on a mismatch.
    """
    from multitalk.models import tiny
    from multitalk.models.audio_encoder import build_wav2vec2_on_meta, full_size_config, load_wav2vec2_weights
    from multitalk.models.checkpoint import build_on_meta, load_converted, meta_items
    from multitalk.models.image_encoder import build_clip_on_meta, load_clip_weights
    from multitalk.models.text_encoder import build_umt5_on_meta, load_t5_weights
    from multitalk.models.transformer import build_transformer_on_meta, convert_dit_key
    from multitalk.models.vae import build_vae_model, load_vae_weights

    arch = FULL_14B
    clip = {k: v for k, v in tiny.clip_key_shapes(arch.clip, tiny.CLIPTextTower()).items() if k.startswith("visual.")}
    reports = [
        load_converted(build_transformer_on_meta(arch.dit), meta_items(tiny.dit_key_shapes(arch.dit)), convert_dit_key,
                       component="transformer", dry_run=True),
        load_t5_weights(build_umt5_on_meta(arch.t5), meta_items(tiny.t5_key_shapes(arch.t5)), dry_run=True),
        load_clip_weights(build_clip_on_meta(arch.clip), meta_items(clip), arch.clip, dry_run=True),
        load_vae_weights(build_on_meta(lambda: build_vae_model(arch.vae)), meta_items(tiny.vae_key_shapes(arch.vae)),
                         arch.vae, dry_run=True),
        load_wav2vec2_weights(build_wav2vec2_on_meta(full_size_config()),
                              meta_items(tiny.wav2vec2_key_shapes(tiny.Wav2Vec2Numbers())), dry_run=True),
    ]
    bad = [r.summary() for r in reports if not r.ok]
    if bad:
        raise RuntimeError("full-size random layouts do not load: " + "; ".join(bad))
    return {r.component: r.summary() for r in reports}


def assert_materialized(model: torch.nn.Module, what: str) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"{what}: tensors left on meta after the random load: {left[:5]}")


def build_dit(s: Setting, seed: int = 1):
    """The MultiTalk DiT with random weights, loaded like ``load_transformer`` does."""
    from multitalk.models.checkpoint import load_converted
    from multitalk.models.tiny import dit_key_shapes
    from multitalk.models.transformer import build_transformer_on_meta, convert_dit_key, keep_fp32

    model = build_transformer_on_meta(s.arch.dit)
    load_converted(model, random_items("dit", dit_key_shapes(s.arch.dit), s.device, seed), convert_dit_key,
                   component="transformer", dtype=s.dtype, keep_fp32=keep_fp32, device=s.device)
    model.rope.reset_tables(s.device)
    assert_materialized(model, "transformer")
    return model.eval().requires_grad_(False)


def build_wan_baseline(s: Setting, seed: int = 7):
    """diffusers' plain ``WanTransformer3DModel`` with the Wan2.1 I2V config of ``s.arch``, random weights."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformer3DModel

    from multitalk.models.checkpoint import build_on_meta, load_converted

    d = s.arch.dit
    kwargs = dict(patch_size=tuple(d.patch_size), num_attention_heads=d.num_heads,
                  attention_head_dim=d.dim // d.num_heads, in_channels=d.in_dim, out_channels=d.out_dim,
                  text_dim=d.text_dim, freq_dim=d.freq_dim, ffn_dim=d.ffn_dim, num_layers=d.num_layers,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=d.eps, image_dim=d.clip_dim,
                  added_kv_proj_dim=d.dim, rope_max_seq_len=1024)
    model = build_on_meta(lambda: WanTransformer3DModel(**kwargs))
    keep = tuple(model._keep_in_fp32_modules or ())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    load_converted(model, random_items("baseline", shapes, s.device, seed), lambda k, t: [(k, t)],
                   component="wan baseline", dtype=s.dtype, keep_fp32=lambda n: any(p in n for p in keep),
                   device=s.device)
    with torch.device("cpu"):
        rope = WanRotaryPosEmbed(d.dim // d.num_heads, tuple(d.patch_size), 1024)
    model.rope = rope.to(s.device)
    assert_materialized(model, "wan baseline")
    return model.eval().requires_grad_(False), kwargs


def build_engine(s: Setting, dit, seed: int = 11):
    """A pipeline ``Engine`` of random-weight encoders + VAE around ``dit`` (tiny tokenizer: offline),
    put together by ``Engine.from_components`` with the default configuration, as ``Engine.load``
    does: on CUDA the fused VAE, and the DiT fused and compiled unless an earlier section did it."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

    from multitalk.models import tiny
    from multitalk.models.audio_encoder import (AudioEncoder, build_wav2vec2_on_meta, full_size_config,
                                                load_wav2vec2_weights)
    from multitalk.models.image_encoder import ImageEncoder, build_clip_on_meta, load_clip_weights
    from multitalk.models.text_encoder import TextEncoder, build_umt5_on_meta, load_t5_tokenizer, load_t5_weights
    from multitalk.pipeline.engine import Engine, EngineConfig

    arch, dev = s.arch, s.device
    seconds = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        seconds[name] = time.perf_counter() - t0
        return out

    def text():
        # The umT5 tokenizer is not available offline; the tiny one is a T5 sentencepiece
        # tokenizer too (ids < vocab), and the encoder always runs all 512 positions.
        with tempfile.TemporaryDirectory(prefix="multitalk-bench-tok-") as tok_root:
            ckpt_dir, _ = tiny.write_tiny_checkpoints(tok_root)
            tokenizer = load_t5_tokenizer(ckpt_dir / tiny.TOKENIZER_SUBDIR)
        model = build_umt5_on_meta(arch.t5)
        load_t5_weights(model, random_items("t5", tiny.t5_key_shapes(arch.t5), dev, seed), dtype=s.dtype,
                        device=dev)
        return TextEncoder(model, tokenizer, text_len=arch.t5.text_len)

    def image():
        text_tower = tiny.TINY_CLIP_TEXT if s.tiny else tiny.CLIPTextTower()
        shapes = tiny.clip_key_shapes(arch.clip, text_tower)
        model = build_clip_on_meta(arch.clip)
        load_clip_weights(model, random_items("clip", shapes, dev, seed + 2, keep=lambda k: k.startswith("visual.")),
                          arch.clip, dtype=s.dtype, device=dev)
        return ImageEncoder(model, arch.clip).to(dev)

    def vae():
        return build_vae(s, seed + 4)

    def audio():
        numbers = tiny.TINY_WAV2VEC2 if s.tiny else tiny.Wav2Vec2Numbers()
        config = Wav2Vec2Config(**tiny.wav2vec2_config(numbers)) if s.tiny else full_size_config()
        model = build_wav2vec2_on_meta(config)
        load_wav2vec2_weights(model, random_items("wav2vec2", tiny.wav2vec2_key_shapes(numbers), dev, seed + 6),
                              dtype=torch.float32, device=dev)
        return AudioEncoder(model, Wav2Vec2FeatureExtractor(**tiny.WAV2VEC2_PREPROCESSOR))

    components = dict(text_encoder=timed("text_encoder", text), image_encoder=timed("image_encoder", image),
                      vae=timed("vae", vae), audio_encoder=timed("audio_encoder", audio), transformer=dit)
    return timed("engine", lambda: Engine.from_components(
        arch, **components, config=EngineConfig(device=str(dev), dtype=s.dtype), load_seconds=seconds))


def build_vae(s: Setting, seed: int):
    """The Wan VAE with random weights through the official-key loader, in the Engine's default dtype."""
    from multitalk.models import tiny
    from multitalk.models.checkpoint import build_on_meta
    from multitalk.models.vae import WanVAE, build_vae_model, load_vae_weights
    from multitalk.runtime.placement import resolve_dtype

    model = build_on_meta(lambda: build_vae_model(s.arch.vae))
    load_vae_weights(model, random_items("vae", tiny.vae_key_shapes(s.arch.vae), s.device, seed), s.arch.vae,
                     device=s.device, dtype=resolve_dtype("auto", s.device))
    return WanVAE(model, s.arch.vae)


# ----------------------------------------------------------------------------------------------
# Inputs


def dit_inputs(s: Setting, speakers: int, seed: int = 0) -> dict:
    """DiT keyword inputs as ``pipeline.generate`` passes them (trimmed text, speaker masks, bf16)."""
    from multitalk.pipeline.conditioning import frame_mask
    from multitalk.pipeline.speakers import speaker_masks

    d, dev, dtype = s.arch.dit, s.device, s.dtype
    t_lat, h, w = s.latent_grid
    g = torch.Generator(device=dev).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=dev, dtype=torch.float32)

    y = torch.cat([frame_mask(s.frames, 1, h, w, device=dev), randn(1, d.out_dim, t_lat, h, w)], dim=1)
    return dict(
        hidden_states=randn(1, d.out_dim, t_lat, h, w).to(dtype),
        timestep=torch.tensor([900.0], device=dev),
        encoder_hidden_states=[randn(s.text_tokens, d.text_dim).to(dtype)],
        encoder_hidden_states_image=randn(1, d.image_tokens, d.clip_dim).to(dtype),
        y=y.to(dtype),
        audio=randn(speakers, s.frames, d.audio_window, d.audio_blocks, d.audio_channels).to(dtype),
        ref_target_masks=speaker_masks(s.height, s.width, s.height, s.width, num_speakers=speakers).to(dev),
    )


def baseline_inputs(s: Setting, inputs: dict) -> dict:
    """The same tensors in diffusers' Wan I2V form: ``cat([x, y])``, text zero-padded to 512."""
    text = inputs["encoder_hidden_states"][0]
    padded = torch.cat([text, text.new_zeros(s.arch.dit.text_len - text.shape[0], text.shape[1])])
    return dict(hidden_states=torch.cat([inputs["hidden_states"], inputs["y"]], dim=1),
                timestep=inputs["timestep"], encoder_hidden_states=padded[None],
                encoder_hidden_states_image=inputs["encoder_hidden_states_image"], return_dict=False)
