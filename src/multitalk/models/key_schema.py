"""The official weight files' keys and shapes, derived from the architecture numbers.

``dit_key_shapes``, ``vae_key_shapes``, ``t5_key_shapes``, ``clip_key_shapes`` and
``wav2vec2_key_shapes`` list, in the official code's module order, every key of the official
files and its shape, for any architecture: the tiny writer (:mod:`multitalk.models.tiny`) writes
them, the benchmark draws random full-size weights from them, and the tests check the full-size
listings against the official manifest. The numbers :mod:`~multitalk.models.architecture` does
not hold (the CLIP text tower MultiTalk never runs, wav2vec2's pre-training heads) are here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from multitalk.models.architecture import TINY, CLIPVisionConfig, DiTConfig, T5Config, VAEConfig

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
