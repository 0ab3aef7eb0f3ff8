"""Writes the ``tiny`` random-weight checkpoint folders in the official on-disk layout.

:func:`write_tiny_checkpoints` produces two folders that load through exactly the same code as
the real ones (only :data:`~multitalk.models.architecture.TINY` differs):

* ``Wan2.1-I2V-tiny/``: DiT ``config.json``, two base shards + ``multitalk.safetensors`` + index,
  ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
  ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` and a ``google/umt5-xxl/``
  tokenizer (a small sentencepiece unigram model trained here from
  ``multitalk/assets/tokenizer_corpus.txt``);
* ``chinese-wav2vec2-tiny/``: HF ``Wav2Vec2ForPreTraining``-style ``model.safetensors`` + configs.

Every key name and shape comes from the ``*_key_shapes`` functions below, which derive the
official listing from the architecture numbers (the same functions give the full-size listing).
Weights follow the golden initialisation scheme: matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2),
norm scales ~ 1 + N(0, 0.1^2), plus a few exceptions that keep generated videos in range. Random
numbers are drawn in float64 from a per-component CPU ``torch.Generator`` (the float64 normal
sampler has no vectorised variant, so the bytes are the same on every CPU) and stored as float32.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

from multitalk.models.architecture import (TINY, Architecture, CLIPVisionConfig, DiTConfig,
                                           T5Config, VAEConfig)

#: Bump when the written bytes change; a folder whose stamp differs is rewritten.
WRITER_VERSION = 1
STAMP_NAME = ".multitalk-tiny.json"
CKPT_FOLDER = "Wan2.1-I2V-tiny"
WAV2VEC_FOLDER = "chinese-wav2vec2-tiny"
TOKENIZER_SUBDIR = "google/umt5-xxl"

DIT_SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors",
              "diffusion_pytorch_model-00002-of-00002.safetensors")
MULTITALK_FILE = "multitalk.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"

# Per-component generator offsets: generator seed = seed * 256 + offset.
_SEED_OFFSETS = {"dit": 1, "vae": 2, "t5": 3, "clip": 4, "wav2vec2": 5}

Shape = tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Numbers the architecture table does not hold (towers MultiTalk never runs, wav2vec2 details)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CLIPTextTower:
    """XLM-RoBERTa text tower stored in the CLIP file (unused by MultiTalk, but in the file)."""
    vocab_size: int = 250002
    dim: int = 1024
    num_heads: int = 16
    num_layers: int = 24
    max_text_len: int = 514
    type_size: int = 1


@dataclass(frozen=True)
class Wav2Vec2Numbers:
    """Hyper-parameters of a chinese-wav2vec2 ``Wav2Vec2ForPreTraining`` checkpoint."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    num_codevector_groups: int = 2
    num_codevectors_per_group: int = 320
    codevector_dim: int = 256
    proj_codevector_dim: int = 256


TINY_CLIP_TEXT = CLIPTextTower(vocab_size=64, dim=16, num_heads=2, num_layers=1)
TINY_WAV2VEC2 = Wav2Vec2Numbers(
    hidden_size=TINY.dit.audio_channels, num_hidden_layers=TINY.dit.audio_blocks,
    num_attention_heads=2, intermediate_size=2 * TINY.dit.audio_channels,
    conv_dim=(TINY.dit.audio_channels,) * 7, num_codevectors_per_group=8, codevector_dim=16,
    proj_codevector_dim=16)


# ---------------------------------------------------------------------------------------------
# Official key -> shape listings (module order of the official code)
# ---------------------------------------------------------------------------------------------

def _linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.weight", (out_f, in_f)
    if bias:
        yield f"{prefix}.bias", (out_f,)


def _norm(prefix: str, dim: int, bias: bool = True) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.weight", (dim,)
    if bias:
        yield f"{prefix}.bias", (dim,)


def is_multitalk_key(key: str) -> bool:
    """Keys of ``multitalk.safetensors`` (the audio adapter); the rest are base Wan keys."""
    return "audio_cross_attn" in key or "norm_x" in key or "audio_proj" in key


def dit_key_shapes(d: DiTConfig) -> OrderedDict[str, Shape]:
    """``WanModel`` (multitalk_model.py) state-dict keys and shapes, base and audio keys."""
    out: OrderedDict[str, Shape] = OrderedDict()

    def add(items):
        out.update(items)

    pt, ph, pw = d.patch_size
    add([("patch_embedding.weight", (d.dim, d.in_dim, pt, ph, pw)), ("patch_embedding.bias", (d.dim,))])
    add(_linear("text_embedding.0", d.dim, d.text_dim))
    add(_linear("text_embedding.2", d.dim, d.dim))
    add(_linear("time_embedding.0", d.dim, d.freq_dim))
    add(_linear("time_embedding.2", d.dim, d.dim))
    add(_linear("time_projection.1", 6 * d.dim, d.dim))
    for i in range(d.num_layers):
        b = f"blocks.{i}"
        out[f"{b}.modulation"] = (1, 6, d.dim)
        for name in ("q", "k", "v", "o"):
            add(_linear(f"{b}.self_attn.{name}", d.dim, d.dim))
        add(_norm(f"{b}.self_attn.norm_q", d.dim, bias=False))
        add(_norm(f"{b}.self_attn.norm_k", d.dim, bias=False))
        add(_norm(f"{b}.norm3", d.dim))
        for name in ("q", "k", "v", "o"):
            add(_linear(f"{b}.cross_attn.{name}", d.dim, d.dim))
        add(_norm(f"{b}.cross_attn.norm_q", d.dim, bias=False))
        add(_norm(f"{b}.cross_attn.norm_k", d.dim, bias=False))
        add(_linear(f"{b}.cross_attn.k_img", d.dim, d.dim))
        add(_linear(f"{b}.cross_attn.v_img", d.dim, d.dim))
        add(_norm(f"{b}.cross_attn.norm_k_img", d.dim, bias=False))
        add(_linear(f"{b}.ffn.0", d.ffn_dim, d.dim))
        add(_linear(f"{b}.ffn.2", d.dim, d.ffn_dim))
        add(_linear(f"{b}.audio_cross_attn.q_linear", d.dim, d.dim))
        add(_linear(f"{b}.audio_cross_attn.kv_linear", 2 * d.dim, d.output_dim))
        add(_linear(f"{b}.audio_cross_attn.proj", d.dim, d.dim))
        if d.norm_input_visual:
            add(_norm(f"{b}.norm_x", d.dim))
    out["head.modulation"] = (1, 2, d.dim)
    add(_linear("head.head", pt * ph * pw * d.out_dim, d.dim))
    add(_norm("img_emb.proj.0", d.clip_dim))
    add(_linear("img_emb.proj.1", d.clip_dim, d.clip_dim))
    add(_linear("img_emb.proj.3", d.dim, d.clip_dim))
    add(_norm("img_emb.proj.4", d.dim))
    per_frame = d.audio_blocks * d.audio_channels
    add(_linear("audio_proj.proj1", d.intermediate_dim, d.audio_window * per_frame))
    add(_linear("audio_proj.proj1_vf", d.intermediate_dim,
                (d.audio_window + d.vae_scale - 1) * per_frame))
    add(_linear("audio_proj.proj2", d.intermediate_dim, d.intermediate_dim))
    add(_linear("audio_proj.proj3", d.context_tokens * d.output_dim, d.intermediate_dim))
    if d.norm_output_audio:
        add(_norm("audio_proj.norm", d.output_dim))
    return out


def vae_key_shapes(v: VAEConfig) -> OrderedDict[str, Shape]:
    """``WanVAE_`` (vae.py) state-dict keys and shapes (no attention scales, as configured)."""
    out: OrderedDict[str, Shape] = OrderedDict()

    def conv3d(p, o, i, k=(3, 3, 3)):
        out[f"{p}.weight"] = (o, i, *k)
        out[f"{p}.bias"] = (o,)

    def residual(p, i, o):
        out[f"{p}.residual.0.gamma"] = (i, 1, 1, 1)
        conv3d(f"{p}.residual.2", o, i)
        out[f"{p}.residual.3.gamma"] = (o, 1, 1, 1)
        conv3d(f"{p}.residual.6", o, o)
        if i != o:
            conv3d(f"{p}.shortcut", o, i, (1, 1, 1))

    def attention(p, c):
        out[f"{p}.norm.gamma"] = (c, 1, 1)
        out[f"{p}.to_qkv.weight"] = (3 * c, c, 1, 1)
        out[f"{p}.to_qkv.bias"] = (3 * c,)
        out[f"{p}.proj.weight"] = (c, c, 1, 1)
        out[f"{p}.proj.bias"] = (c,)

    def resample(p, c, mode):
        o = c // 2 if mode.startswith("up") else c
        out[f"{p}.resample.1.weight"] = (o, c, 3, 3)
        out[f"{p}.resample.1.bias"] = (o,)
        if mode == "downsample3d":
            conv3d(f"{p}.time_conv", c, c, (3, 1, 1))
        elif mode == "upsample3d":
            conv3d(f"{p}.time_conv", 2 * c, c, (3, 1, 1))

    levels = len(v.dim_mult)
    # encoder
    dims = [v.base_dim * m for m in (1, *v.dim_mult)]
    conv3d("encoder.conv1", dims[0], 3)
    n = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(v.num_res_blocks):
            residual(f"encoder.downsamples.{n}", cin, cout)
            cin, n = cout, n + 1
        if i != levels - 1:
            resample(f"encoder.downsamples.{n}", cout,
                     "downsample3d" if v.temperal_downsample[i] else "downsample2d")
            n += 1
    top = dims[-1]
    residual("encoder.middle.0", top, top)
    attention("encoder.middle.1", top)
    residual("encoder.middle.2", top, top)
    out["encoder.head.0.gamma"] = (top, 1, 1, 1)
    conv3d("encoder.head.2", 2 * v.z_dim, top)
    conv3d("conv1", 2 * v.z_dim, 2 * v.z_dim, (1, 1, 1))
    conv3d("conv2", v.z_dim, v.z_dim, (1, 1, 1))
    # decoder
    dims = [v.base_dim * m for m in (v.dim_mult[-1], *reversed(v.dim_mult))]
    temporal_up = tuple(reversed(v.temperal_downsample))
    conv3d("decoder.conv1", dims[0], v.z_dim)
    residual("decoder.middle.0", dims[0], dims[0])
    attention("decoder.middle.1", dims[0])
    residual("decoder.middle.2", dims[0], dims[0])
    n = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i in (1, 2, 3):  # the previous upsample halved the channels
            cin //= 2
        for _ in range(v.num_res_blocks + 1):
            residual(f"decoder.upsamples.{n}", cin, cout)
            cin, n = cout, n + 1
        if i != levels - 1:
            resample(f"decoder.upsamples.{n}", cout,
                     "upsample3d" if temporal_up[i] else "upsample2d")
            n += 1
    out["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv3d("decoder.head.2", 3, dims[-1])
    return out


def t5_key_shapes(t: T5Config) -> OrderedDict[str, Shape]:
    """``T5Encoder`` (t5.py, umT5: per-layer relative position embedding) keys and shapes."""
    out: OrderedDict[str, Shape] = OrderedDict()
    out["token_embedding.weight"] = (t.vocab_size, t.dim)
    for i in range(t.num_layers):
        b = f"blocks.{i}"
        out[f"{b}.norm1.weight"] = (t.dim,)
        for name in ("q", "k", "v"):
            out[f"{b}.attn.{name}.weight"] = (t.dim_attn, t.dim)
        out[f"{b}.attn.o.weight"] = (t.dim, t.dim_attn)
        out[f"{b}.norm2.weight"] = (t.dim,)
        out[f"{b}.ffn.gate.0.weight"] = (t.dim_ffn, t.dim)
        out[f"{b}.ffn.fc1.weight"] = (t.dim_ffn, t.dim)
        out[f"{b}.ffn.fc2.weight"] = (t.dim, t.dim_ffn)
        out[f"{b}.pos_embedding.embedding.weight"] = (t.num_buckets, t.num_heads)
    out["norm.weight"] = (t.dim,)
    return out


def clip_key_shapes(c: CLIPVisionConfig, text: CLIPTextTower) -> OrderedDict[str, Shape]:
    """``XLMRobertaCLIP`` (clip.py) keys and shapes: ``log_scale``, ``visual.*``, ``textual.*``."""
    out: OrderedDict[str, Shape] = OrderedDict()
    out["log_scale"] = ()
    grid = (c.image_size // c.patch_size) ** 2
    out["visual.cls_embedding"] = (1, 1, c.dim)
    out["visual.pos_embedding"] = (1, grid + 1, c.dim)
    out["visual.head"] = (c.dim, c.out_dim)
    out["visual.patch_embedding.weight"] = (c.dim, 3, c.patch_size, c.patch_size)
    out.update(_norm("visual.pre_norm", c.dim))
    hidden = c.dim * c.mlp_ratio
    for i in range(c.num_layers):
        b = f"visual.transformer.{i}"
        out.update(_norm(f"{b}.norm1", c.dim))
        out.update(_linear(f"{b}.attn.to_qkv", 3 * c.dim, c.dim))
        out.update(_linear(f"{b}.attn.proj", c.dim, c.dim))
        out.update(_norm(f"{b}.norm2", c.dim))
        out.update(_linear(f"{b}.mlp.0", hidden, c.dim))
        out.update(_linear(f"{b}.mlp.2", c.dim, hidden))
    out.update(_norm("visual.post_norm", c.dim))
    out["textual.token_embedding.weight"] = (text.vocab_size, text.dim)
    out["textual.type_embedding.weight"] = (text.type_size, text.dim)
    out["textual.pos_embedding.weight"] = (text.max_text_len, text.dim)
    for i in range(text.num_layers):
        b = f"textual.blocks.{i}"
        for name in ("q", "k", "v", "o"):
            out.update(_linear(f"{b}.attn.{name}", text.dim, text.dim))
        out.update(_norm(f"{b}.norm1", text.dim))
        out.update(_linear(f"{b}.ffn.0", 4 * text.dim, text.dim))
        out.update(_linear(f"{b}.ffn.2", text.dim, 4 * text.dim))
        out.update(_norm(f"{b}.norm2", text.dim))
    out.update(_norm("textual.norm", text.dim))
    mid = (text.dim + c.out_dim) // 2
    out.update(_linear("textual.head.0", mid, text.dim, bias=False))
    out.update(_linear("textual.head.2", c.out_dim, mid, bias=False))
    return out


def wav2vec2_key_shapes(w: Wav2Vec2Numbers) -> OrderedDict[str, Shape]:
    """``Wav2Vec2ForPreTraining`` keys as stored by chinese-wav2vec2 (legacy weight-norm names)."""
    out: OrderedDict[str, Shape] = OrderedDict()
    p = "wav2vec2"
    cin = 1
    for i, (cout, k) in enumerate(zip(w.conv_dim, w.conv_kernel)):
        out[f"{p}.feature_extractor.conv_layers.{i}.conv.weight"] = (cout, cin, k)
        if i == 0:  # feat_extract_norm="group": GroupNorm on the first layer only
            out.update(_norm(f"{p}.feature_extractor.conv_layers.0.layer_norm", cout))
        cin = cout
    out.update(_norm(f"{p}.feature_projection.layer_norm", w.conv_dim[-1]))
    out.update(_linear(f"{p}.feature_projection.projection", w.hidden_size, w.conv_dim[-1]))
    out[f"{p}.masked_spec_embed"] = (w.hidden_size,)
    h, k = w.hidden_size, w.num_conv_pos_embeddings
    out[f"{p}.encoder.pos_conv_embed.conv.bias"] = (h,)
    out[f"{p}.encoder.pos_conv_embed.conv.weight_g"] = (1, 1, k)
    out[f"{p}.encoder.pos_conv_embed.conv.weight_v"] = (h, h // w.num_conv_pos_embedding_groups, k)
    out.update(_norm(f"{p}.encoder.layer_norm", h))
    for i in range(w.num_hidden_layers):
        b = f"{p}.encoder.layers.{i}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out.update(_linear(f"{b}.attention.{name}", h, h))
        out.update(_norm(f"{b}.layer_norm", h))
        out.update(_linear(f"{b}.feed_forward.intermediate_dense", w.intermediate_size, h))
        out.update(_linear(f"{b}.feed_forward.output_dense", h, w.intermediate_size))
        out.update(_norm(f"{b}.final_layer_norm", h))
    groups, per_group = w.num_codevector_groups, w.num_codevectors_per_group
    out["quantizer.codevectors"] = (1, groups * per_group, w.codevector_dim // groups)
    out.update(_linear("quantizer.weight_proj", groups * per_group, w.conv_dim[-1]))
    out.update(_linear("project_hid", w.proj_codevector_dim, h))
    out.update(_linear("project_q", w.proj_codevector_dim, w.codevector_dim))
    return out


def split_dit_shards(base: OrderedDict[str, Shape], n_shards: int, itemsize: int = 4
                     ) -> list[OrderedDict[str, Shape]]:
    """Split the base DiT keys (in module order) into shards of about equal byte size.

    A key goes to shard ``j`` when the bytes before it are in the ``j``-th ``1/n`` of the total.
    """
    sizes = [math.prod(s) * itemsize for s in base.values()]
    total = sum(sizes)
    shards: list[OrderedDict[str, Shape]] = [OrderedDict() for _ in range(n_shards)]
    before = 0
    for (key, shape), size in zip(base.items(), sizes):
        j = min(n_shards - 1, before * n_shards // total)
        shards[j][key] = shape
        before += size
    return shards


def tiny_file_layout(arch: Architecture = TINY, clip_text: CLIPTextTower = TINY_CLIP_TEXT,
                     wav2vec2: Wav2Vec2Numbers = TINY_WAV2VEC2) -> dict[str, OrderedDict[str, Shape]]:
    """Every weight file of the tiny folders (paths relative to ``out_dir``) -> key -> shape."""
    dit = dit_key_shapes(arch.dit)
    base = OrderedDict((k, s) for k, s in dit.items() if not is_multitalk_key(k))
    audio = OrderedDict((k, s) for k, s in dit.items() if is_multitalk_key(k))
    layout: dict[str, OrderedDict[str, Shape]] = {}
    for name, shard in zip(DIT_SHARDS, split_dit_shards(base, len(DIT_SHARDS))):
        layout[f"{CKPT_FOLDER}/{name}"] = shard
    layout[f"{CKPT_FOLDER}/{MULTITALK_FILE}"] = audio
    layout[f"{CKPT_FOLDER}/{VAE_FILE}"] = vae_key_shapes(arch.vae)
    layout[f"{CKPT_FOLDER}/{T5_FILE}"] = t5_key_shapes(arch.t5)
    layout[f"{CKPT_FOLDER}/{CLIP_FILE}"] = clip_key_shapes(arch.clip, clip_text)
    layout[f"{WAV2VEC_FOLDER}/model.safetensors"] = wav2vec2_key_shapes(wav2vec2)
    return layout


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

def _normal(gen: torch.Generator, shape: Shape, std: float, mean: float = 0.0) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x * std + mean).to(torch.float32)


def _fan_in(shape: Shape) -> int:
    return max(1, math.prod(shape[1:]))


def _is_scale(key: str, shape: Shape) -> bool:
    return key.endswith(".gamma") or key.endswith(".weight_g") or (
        len(shape) == 1 and key.endswith(".weight"))


def _smooth_time_embedding(w: torch.Tensor) -> torch.Tensor:
    """Scale column ``k`` of each sinusoid half by ``exp(-(half-1-k)/8)`` at equal total energy.

    The sinusoidal timestep embedding puts frequency ``10000**(-k/half)`` in column ``k`` (cos
    half, then sin half); damping the high frequencies makes ``e0`` vary smoothly with ``t``, so
    TeaCache sees small relative changes between steps (as the real model does).
    """
    half = w.shape[1] // 2
    k = torch.arange(w.shape[1], dtype=torch.float64) % half
    scaled = w.double() * torch.exp(-(half - 1 - k) / 8.0)
    # exactly rounded sums so the renormalisation is the same on every machine
    energy = math.fsum(v * v for v in w.double().flatten().tolist())
    energy_scaled = math.fsum(v * v for v in scaled.flatten().tolist())
    return (scaled * math.sqrt(energy / energy_scaled)).to(torch.float32)


def init_tensor(component: str, key: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
    """Draw one tensor following the golden scheme (see ``tiny_spec.json`` ``weight_init``)."""
    if key == "log_scale":
        return torch.tensor(math.log(1 / 0.07), dtype=torch.float32)
    if component == "vae" and key == "decoder.head.2.weight":
        return _normal(gen, shape, 0.35 / math.sqrt(_fan_in(shape)))
    if component == "vae" and key == "decoder.head.2.bias":
        return _normal(gen, shape, 0.02)
    if key.endswith(".bias"):
        return _normal(gen, shape, 0.1)
    if _is_scale(key, shape):
        return _normal(gen, shape, 0.1, mean=1.0)
    is_embedding = key.endswith("_embedding") or (
        "embedding.weight" in key and not key.endswith("patch_embedding.weight"))
    if key.endswith("modulation") or is_embedding:
        # per-vector draws: modulation, class/position/token embeddings ~ N(0, 1/width)
        return _normal(gen, shape, 1 / math.sqrt(shape[-1]))
    w = _normal(gen, shape, 1 / math.sqrt(_fan_in(shape)))
    if component == "dit" and key == "time_embedding.0.weight":
        w = _smooth_time_embedding(w)
    return w


def init_state_dict(component: str, shapes: OrderedDict[str, Shape], seed: int
                    ) -> OrderedDict[str, torch.Tensor]:
    """Random float32 state dict for ``shapes``, drawn in key order from one seeded generator."""
    gen = torch.Generator(device="cpu").manual_seed(seed * 256 + _SEED_OFFSETS[component])
    return OrderedDict((k, init_tensor(component, k, s, gen).contiguous()) for k, s in shapes.items())


# ---------------------------------------------------------------------------------------------
# Configs and tokenizer
# ---------------------------------------------------------------------------------------------

def dit_config(arch: Architecture = TINY) -> dict:
    """The DiT ``config.json`` (diffusers ``WanModel`` config plus the keys a non-14B model needs)."""
    d = arch.dit
    return dict(sorted({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "i2v",
        "dim": d.dim, "ffn_dim": d.ffn_dim, "freq_dim": d.freq_dim, "in_dim": d.in_dim,
        "num_heads": d.num_heads, "num_layers": d.num_layers, "out_dim": d.out_dim,
        "text_len": d.text_len, "eps": d.eps, "audio_window": d.audio_window,
        "intermediate_dim": d.intermediate_dim, "output_dim": d.output_dim,
        "context_tokens": d.context_tokens, "vae_scale": d.vae_scale,
        "norm_input_visual": d.norm_input_visual, "norm_output_audio": d.norm_output_audio,
        "text_dim": d.text_dim, "tiny_clip_vision_dim": d.clip_dim,
        "tiny_audio_proj_blocks": d.audio_blocks, "tiny_audio_proj_channels": d.audio_channels,
    }.items()))


def wav2vec2_config(w: Wav2Vec2Numbers = TINY_WAV2VEC2) -> dict:
    """``config.json`` of the wav2vec2 folder (transformers ``Wav2Vec2Config``, pre-training head)."""
    from transformers import Wav2Vec2Config

    cfg = Wav2Vec2Config(
        hidden_size=w.hidden_size, num_hidden_layers=w.num_hidden_layers,
        num_attention_heads=w.num_attention_heads, intermediate_size=w.intermediate_size,
        conv_dim=list(w.conv_dim), conv_kernel=list(w.conv_kernel), conv_stride=list(w.conv_stride),
        conv_bias=False, feat_extract_norm="group", do_stable_layer_norm=False,
        num_conv_pos_embeddings=w.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=w.num_conv_pos_embedding_groups,
        num_codevector_groups=w.num_codevector_groups,
        num_codevectors_per_group=w.num_codevectors_per_group, codevector_dim=w.codevector_dim,
        proj_codevector_dim=w.proj_codevector_dim, output_hidden_size=w.hidden_size,
        architectures=["Wav2Vec2ForPreTraining"])
    return dict(sorted(cfg.to_diff_dict().items()))


WAV2VEC2_PREPROCESSOR = {"do_normalize": False, "feature_size": 1, "padding_side": "right",
                         "padding_value": 0.0, "return_attention_mask": False,
                         "sampling_rate": 16000}
TOKENIZER_CONFIG = {"additional_special_tokens": [], "eos_token": "</s>", "extra_ids": 0,
                    "legacy": True, "model_max_length": 512, "pad_token": "<pad>",
                    "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}
SPECIAL_TOKENS_MAP = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer_model(vocab_size: int = TINY.t5.vocab_size) -> bytes:
    """Train the tiny sentencepiece unigram model (``spiece.model`` bytes) from the bundled corpus.

    Single thread, fixed seed, no input shuffling, in-memory input: the bytes are the same on
    every run. Ids: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, no ``<s>``; at most ``vocab_size`` pieces.
    """
    import sentencepiece as spm

    corpus = (files("multitalk") / "assets" / "tokenizer_corpus.txt").read_text(encoding="utf-8")
    lines = [ln for ln in corpus.splitlines() if ln.strip()]
    spm.set_random_generator_seed(20250101)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="unigram",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
        shuffle_input_sentence=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    return buf.getvalue()


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(train_tokenizer_model(vocab_size))
    _write_json(folder / "tokenizer_config.json", TOKENIZER_CONFIG)
    _write_json(folder / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    # tokenizer.json: the fast-tokenizer conversion of spiece.model, as HF ships it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    (folder / "tokenizer.json").write_text(tok.backend_tokenizer.to_str(pretty=True),
                                           encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------

def default_tiny_dir() -> Path:
    """``$MULTITALK_HOME/tiny``, else ``~/.cache/multitalk/tiny``."""
    home = os.environ.get("MULTITALK_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "multitalk"
    return base / "tiny"


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _stamp(seed: int) -> dict:
    return {"writer_version": WRITER_VERSION, "seed": seed}


def _is_current(out_dir: Path, seed: int) -> bool:
    try:
        stamp = json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp == _stamp(seed) and all((out_dir / f).is_dir() for f in (CKPT_FOLDER, WAV2VEC_FOLDER))


def _save_torch(path: Path, state: OrderedDict[str, torch.Tensor]) -> None:
    torch.save(state, str(path))


def _write_all(root: Path, seed: int) -> None:
    from safetensors.torch import save_file

    arch = TINY
    ckpt, w2v = root / CKPT_FOLDER, root / WAV2VEC_FOLDER
    ckpt.mkdir()
    w2v.mkdir()
    layout = tiny_file_layout(arch)

    # DiT: base shards + multitalk.safetensors + index
    dit = init_state_dict("dit", dit_key_shapes(arch.dit), seed)
    weight_map = {}
    for name in (*DIT_SHARDS, MULTITALK_FILE):
        keys = layout[f"{CKPT_FOLDER}/{name}"]
        save_file({k: dit[k] for k in keys}, str(ckpt / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = sum(t.numel() * t.element_size() for t in dit.values())
    _write_json(ckpt / INDEX_FILE, {"metadata": {"total_size": total},
                                    "weight_map": dict(sorted(weight_map.items()))})
    _write_json(ckpt / "config.json", dit_config(arch))

    _save_torch(ckpt / VAE_FILE, init_state_dict("vae", layout[f"{CKPT_FOLDER}/{VAE_FILE}"], seed))
    _save_torch(ckpt / T5_FILE, init_state_dict("t5", layout[f"{CKPT_FOLDER}/{T5_FILE}"], seed))
    _save_torch(ckpt / CLIP_FILE, init_state_dict("clip", layout[f"{CKPT_FOLDER}/{CLIP_FILE}"], seed))
    _write_tokenizer(ckpt / TOKENIZER_SUBDIR, arch.t5.vocab_size)

    # wav2vec2
    w2v_state = init_state_dict("wav2vec2", layout[f"{WAV2VEC_FOLDER}/model.safetensors"], seed)
    save_file(dict(w2v_state), str(w2v / "model.safetensors"), metadata={"format": "pt"})
    _write_json(w2v / "config.json", wav2vec2_config())
    _write_json(w2v / "preprocessor_config.json", WAV2VEC2_PREPROCESSOR)


def write_tiny_checkpoints(out_dir: str | os.PathLike | None = None, seed: int = 0,
                           force: bool = False) -> tuple[Path, Path]:
    """Write (or reuse) the tiny folders under ``out_dir``; returns ``(ckpt_dir, wav2vec_dir)``.

    Same bytes on every run and machine for a given ``seed``. The folders are built in a temporary
    directory beside ``out_dir`` and renamed into place; a stamp file (writer version + seed)
    written last marks a complete, up-to-date copy, which later calls reuse unless ``force``.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_tiny_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir, w2v_dir = out_dir / CKPT_FOLDER, out_dir / WAV2VEC_FOLDER
    with open(out_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent writers: the second one reuses the result
        try:
            if not force and _is_current(out_dir, seed):
                return ckpt_dir, w2v_dir
            (out_dir / STAMP_NAME).unlink(missing_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir))
            try:
                _write_all(tmp, seed)
                for name in (CKPT_FOLDER, WAV2VEC_FOLDER):
                    if (out_dir / name).exists():
                        shutil.rmtree(out_dir / name)
                    os.replace(tmp / name, out_dir / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _write_json(out_dir / STAMP_NAME, _stamp(seed))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return ckpt_dir, w2v_dir
