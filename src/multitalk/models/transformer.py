"""The MultiTalk DiT: diffusers ``WanTransformer3DModel`` (Wan2.1 I2V) plus MultiTalk's audio path.

Structure (official ``wan.modules.multitalk_model.WanModel``, numerically faithful in float32):

* :class:`MultiTalkTransformerBlock` = ``WanTransformerBlock`` (self-attention with 3-D RoPE, I2V
  cross-attention to 257 image + 512 text tokens, FFN, ``scale_shift_table`` modulation) with an
  audio cross-attention between the text cross-attention and the FFN:
  ``x += audio_cross_attn(norm_x(x), audio tokens of the same latent frame)``.
* Model-level ``audio_proj`` (:mod:`multitalk.models.audio_projection`) turns the audio windows into
  ``context_tokens`` tokens per latent frame and speaker.
* Two speakers: the self-attention hands its rotated q/k to :mod:`multitalk.models.speaker_routing`,
  which gives every visual token a 1-D RoPE position for the audio attention (one speaker: no map).
* Differences to stock diffusers that the official numbers need: the timestep sinusoid is computed
  in float64 and the time embedding / projection stay in float32 (``e``, ``e0`` are never cast to
  the compute dtype); the head's linear runs in float32 (official autocast); the trimmed T5 context
  is zero-padded to ``text_len`` (512) and attended unmasked.

The forward is split into :meth:`~MultiTalkTransformer3DModel.prepare`,
:meth:`~MultiTalkTransformer3DModel.run_blocks` and :meth:`~MultiTalkTransformer3DModel.finish` so a
sampler (TeaCache) can skip the blocks and reuse a residual.

Loading: :func:`load_transformer` builds the model on ``meta`` and streams the official shards
through :func:`convert_dit_key` (official key -> this model's key) with
:func:`multitalk.models.checkpoint.load_converted`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models._modeling_parallel import ContextParallelInput
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import _templated_context_parallel_attention, dispatch_attention_fn
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (WanAttention, WanRotaryPosEmbed,
                                                           WanTimeTextImageEmbedding,
                                                           WanTransformer3DModel, WanTransformerBlock,
                                                           _get_qkv_projections)
from torch import nn

from multitalk.errors import UserInputError
from multitalk.models import speaker_routing
from multitalk.models.architecture import Architecture, DiTConfig, detect_architecture
from multitalk.models.audio_projection import AudioProjModel
from multitalk.models.checkpoint import LoadReport, build_on_meta, load_converted
from multitalk.models.sequence_shard import SplitPoint, TokenShard, frame_segments

# ----------------------------------------------------------------------------------------------
# Embeddings


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Official ``sinusoidal_embedding_1d``: ``[cos(t f_k), sin(t f_k)]``, ``f_k = 10000^(-k/(dim/2))``, float64."""
    half = dim // 2
    t = timestep.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class MultiTalkConditionEmbedding(WanTimeTextImageEmbedding):
    """Wan time/text/image embedding with the official float64 sinusoid and float32 ``e``/``e0``."""

    def time_embedding(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``timestep [B]`` -> ``(e [B, dim], e0 [B, 6*dim])``, both float32."""
        freq_dim = self.time_embedder.linear_1.in_features
        sinusoid = sinusoidal_embedding(timestep, freq_dim).float()
        weight_dtype = self.time_embedder.linear_1.weight.dtype
        temb = self.time_embedder(sinusoid.to(weight_dtype)).float()
        timestep_proj = self.time_proj(self.act_fn(temb).to(self.time_proj.weight.dtype)).float()
        return temb, timestep_proj

    def forward(self, timestep, encoder_hidden_states, encoder_hidden_states_image=None, timestep_seq_len=None):
        if timestep_seq_len is not None:
            raise NotImplementedError("per-token timesteps (Wan2.2 TI2V) are not used by MultiTalk")
        temb, timestep_proj = self.time_embedding(timestep)
        text = self.text_embedder(encoder_hidden_states.to(self.text_embedder.linear_1.weight.dtype))
        image = None
        if encoder_hidden_states_image is not None:
            image = self.image_embedder(encoder_hidden_states_image.to(self.image_embedder.ff.net[0].proj.weight.dtype))
        return temb, timestep_proj, text, image


class CachedWanRotaryPosEmbed(WanRotaryPosEmbed):
    """Wan 3-D RoPE (float64 tables -> float32 cos/sin) with the per-shape cos/sin cached."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset_tables(self, device: str | torch.device = "cpu") -> None:
        """Recompute the (non-persistent) tables, e.g. after building on ``meta``."""
        with torch.device("cpu"):
            fresh = WanRotaryPosEmbed(self.attention_head_dim, self.patch_size, self.max_seq_len)
        self.freqs_cos = fresh.freqs_cos.to(device)
        self.freqs_sin = fresh.freqs_sin.to(device)
        self._cache.clear()

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(hidden_states.shape[2:]), self.freqs_cos.device)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= 8:
                self._cache.clear()
            cached = super().forward(hidden_states)
            self._cache[key] = cached
        return cached


# ----------------------------------------------------------------------------------------------
# Attention processors


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan 3-D RoPE on interleaved pairs of ``x [B, L, heads, D]`` (also the eager reference of
    ``runtime.dit_fusion``'s q/k kernel)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class MultiTalkSelfAttnProcessor:
    """Wan self-attention (RMS q/k norm over the full width, 3-D RoPE) that can return the rotated q and k.

    With ``return_qk=True`` the call returns ``(output, query, key)``, q/k as ``[B, L, heads, D]``
    (input of :func:`multitalk.models.speaker_routing.reference_attention_map`).
    """

    _attention_backend = None
    _parallel_config = None
    # ``(attn, q, k, v) -> out`` replacing the attention call, all ``[B, L, heads, D]``; installed by
    # ``runtime.attention_int8`` (and the benchmark's ``attention_fp8.py``), None: diffusers' attention dispatch
    sdpa_override = None
    # ``(attn, q, k, rotary_emb) -> (q, k)`` replacing norm_q/norm_k + RoPE (projections in, ``[B, L, heads,
    # D]`` out); installed by ``runtime.dit_fusion``, None: the eager operations below
    qk_override = None

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, rotary_emb=None, return_qk: bool = False):
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        value = value.unflatten(2, (attn.heads, -1))
        if self.qk_override is not None and rotary_emb is not None:
            query, key = self.qk_override(attn, query, key, rotary_emb)
        else:
            query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                query = apply_rotary(query, *rotary_emb)
                key = apply_rotary(key, *rotary_emb)
        if self.sdpa_override is not None and attention_mask is None:
            if self._parallel_config is None:
                out = self.sdpa_override(attn, query, key, value)
            else:  # the runtime kernel inside diffusers' Ulysses all-to-all (heads <-> tokens)
                out = _templated_context_parallel_attention(
                    query, key, value, None, 0.0, False, None, False, False,
                    forward_op=_override_op(self.sdpa_override, attn), backward_op=None,
                    _parallel_config=self._parallel_config)
        else:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
        out = attn.to_out[0](out.flatten(2, 3).type_as(query))
        out = attn.to_out[1](out)
        return (out, query, key) if return_qk else out


def _override_op(override, attn):
    """A runtime attention kernel (``sdpa_override``) as the ``forward_op`` of diffusers' templated
    context-parallel attention: it then runs on the full sequence of this process's heads."""
    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if return_lse:
            raise ValueError("the runtime attention kernel returns no log-sum-exp")
        return override(attn, query, key, value)

    return forward_op


def self_attention_processors(model: nn.Module) -> list[MultiTalkSelfAttnProcessor]:
    """Every MultiTalk block's self-attention processor (where the runtime layer installs its overrides)."""
    return [block.attn1.processor for block in getattr(model, "blocks", [])
            if isinstance(getattr(block.attn1, "processor", None), MultiTalkSelfAttnProcessor)]


@dataclass
class AudioContext:
    """Per-call audio conditioning shared by all blocks.

    ``tokens``: ``[T_lat, speakers*context_tokens, output_dim]`` (speaker-major per frame);
    ``masks``: ``[3, N_h*N_w]`` token-grid region masks (person 1, person 2, background) or None;
    ``grid``: ``(T_lat, N_h, N_w)``; ``debug``: when a dict, blocks append their reference map to
    ``debug["x_ref_attn_map"]`` (computed even for one speaker; this process's tokens only).
    ``shard``/``start``: the sequence split over processes (:mod:`multitalk.models.sequence_shard`)
    and the global index of this process's first token; None/0 on one process.
    """

    tokens: torch.Tensor
    speakers: int
    grid: tuple[int, int, int]
    masks: torch.Tensor | None = None
    debug: dict | None = None
    shard: TokenShard | None = None
    start: int = 0

    @property
    def frame_tokens(self) -> int:
        return self.grid[1] * self.grid[2]


class MultiTalkAudioAttnProcessor:
    """Audio cross-attention: the visual tokens of latent frame ``t`` attend to the audio tokens of frame ``t``.

    ``segments``: ``(lo, hi, first_frame, frames)`` parts of the (local) token sequence, each made of
    whole frames or of one partial frame (:func:`~multitalk.models.sequence_shard.frame_segments`;
    one part ``(0, L, 0, T)`` on one process). ``q_positions [B, L]`` / ``k_positions [N_a]`` (two
    speakers) rotate q and the audio keys with the 1-D label RoPE first; ``None`` (one speaker) is
    plain cross-attention. The audio attention is local to each process: it keeps no
    ``_parallel_config`` use (each query row needs only its own frame's audio keys).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: "MultiTalkAudioAttention", hidden_states: torch.Tensor, audio_tokens: torch.Tensor,
                 segments: list[tuple[int, int, int, int]], q_positions: torch.Tensor | None = None,
                 k_positions: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, dim = hidden_states.shape
        heads = attn.heads
        query = attn.q_linear(hidden_states).unflatten(2, (heads, -1))          # [B, L, H, D]
        if q_positions is not None:
            query = speaker_routing.apply_rope_1d(query, q_positions)
        kv = attn.kv_linear(audio_tokens.to(hidden_states.dtype))               # [T, N_a, 2*dim]
        key, value = kv.unflatten(-1, (2, heads, -1)).unbind(2)                 # [T, N_a, H, D]
        if k_positions is not None:
            key = speaker_routing.apply_rope_1d(key, k_positions[None].expand(key.shape[0], -1))
        n_audio = key.shape[1]
        outs = []
        for lo, hi, f0, frames in segments:
            q = query[:, lo:hi].reshape(batch * frames, (hi - lo) // frames, heads, -1)
            k = key[None, f0:f0 + frames].expand(batch, -1, -1, -1, -1).reshape(batch * frames, n_audio, heads, -1)
            v = value[None, f0:f0 + frames].expand(batch, -1, -1, -1, -1).reshape(batch * frames, n_audio, heads, -1)
            outs.append(dispatch_attention_fn(q, k, v, backend=self._attention_backend).reshape(batch, hi - lo, dim))
        out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).type_as(hidden_states)
        return attn.proj(out)


class MultiTalkAudioAttention(nn.Module, AttentionModuleMixin):
    """Official ``SingleStreamMutiAttention`` weights: ``q_linear``, ``kv_linear`` (k then v), ``proj``."""

    _default_processor_cls = MultiTalkAudioAttnProcessor
    _available_processors = [MultiTalkAudioAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, audio_dim: int, heads: int, processor=None):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.set_processor(processor or MultiTalkAudioAttnProcessor())

    def forward(self, hidden_states, audio_tokens, segments, q_positions=None, k_positions=None):
        return self.processor(self, hidden_states, audio_tokens, segments, q_positions, k_positions)


# ----------------------------------------------------------------------------------------------
# Block


class MultiTalkTransformerBlock(WanTransformerBlock):
    """``WanTransformerBlock`` + ``norm_x`` and ``audio_cross_attn`` (between text cross-attention and FFN)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: str = "rms_norm_across_heads",
                 cross_attn_norm: bool = True, eps: float = 1e-6, added_kv_proj_dim: int | None = None,
                 audio_dim: int = 768, norm_input_visual: bool = True, class_range: int = 24,
                 class_interval: int = 4):
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        self.attn1.set_processor(MultiTalkSelfAttnProcessor())
        self.audio_cross_attn = MultiTalkAudioAttention(dim, audio_dim, num_heads)
        self.norm_x = FP32LayerNorm(dim, eps, elementwise_affine=True) if norm_input_visual else nn.Identity()
        self.class_range, self.class_interval = class_range, class_interval

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: tuple[torch.Tensor, torch.Tensor], audio_context: AudioContext | None = None
                ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()).chunk(6, dim=1)

        # 1. self-attention (q/k kept for the speaker routing map)
        norm_hidden = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_output, query, key = self.attn1(norm_hidden, None, None, rotary_emb, return_qk=True)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        # 2. cross-attention to image + text
        norm_hidden = self.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn2(norm_hidden, encoder_hidden_states, None, None)

        # 3. audio cross-attention
        if audio_context is not None:
            hidden_states = hidden_states + self._audio_attention(hidden_states, query, key, audio_context)

        # 4. feed-forward
        norm_hidden = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(hidden_states)
        ff_output = self.ffn(norm_hidden)
        return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)

    def _audio_attention(self, hidden_states, query, key, ctx: AudioContext) -> torch.Tensor:
        frame_tokens = ctx.frame_tokens
        q_pos = k_pos = None
        routed = ctx.speakers > 1
        if (routed or ctx.debug is not None) and ctx.masks is not None:
            with torch.no_grad():
                # the first latent frame's keys (on the first process(es) when the sequence is split)
                ref_key = key if ctx.shard is None else ctx.shard.reference_keys(key, frame_tokens)
                ref_map = speaker_routing.reference_attention_map(
                    query, ref_key, ctx.masks, frame_tokens, backend=self.attn1.processor._attention_backend)
            if ctx.debug is not None:
                ctx.debug.setdefault("x_ref_attn_map", []).append(ref_map)
            if routed:
                extrema = None if ctx.shard is None else ctx.shard.row_extrema(ref_map[:, :2])
                q_pos = speaker_routing.speaker_positions(ref_map, self.class_range, self.class_interval,
                                                          extrema=extrema)
                k_pos = speaker_routing.audio_key_positions(ctx.tokens.shape[1], self.class_range,
                                                            self.class_interval, device=hidden_states.device)
        norm_hidden = self.norm_x(hidden_states.float()).type_as(hidden_states)
        segments = frame_segments(ctx.start, hidden_states.shape[1], frame_tokens)
        return self.audio_cross_attn(norm_hidden, ctx.tokens, segments, q_pos, k_pos)


TransformerBlockRegistry.register(
    MultiTalkTransformerBlock,
    TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
)

# ----------------------------------------------------------------------------------------------
# Model


@dataclass
class DiTState:
    """Everything the blocks need for one forward (output of :meth:`MultiTalkTransformer3DModel.prepare`).

    ``timestep_proj`` is the official ``e0`` ``[B, 6, dim]`` (TeaCache's modulated input), ``temb``
    the official ``e`` ``[B, dim]``; ``hidden_states`` the patch tokens ``[B, L, dim]`` (this
    process's slice when the sequence is split over processes).
    """

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor
    temb: torch.Tensor
    timestep_proj: torch.Tensor
    rotary_emb: tuple[torch.Tensor, torch.Tensor]
    audio: AudioContext
    grid: tuple[int, int, int]
    debug: dict | None = field(default=None)


class MultiTalkTransformer3DModel(WanTransformer3DModel):
    """Wan2.1 I2V DiT with MultiTalk's audio cross-attention (see the module docstring).

    Keys: diffusers Wan names, plus ``blocks.N.norm_x``, ``blocks.N.audio_cross_attn.{q_linear,
    kv_linear,proj}`` and ``audio_proj.{proj1,proj1_vf,proj2,proj3,norm}`` (official names).
    """

    _no_split_modules = ["MultiTalkTransformerBlock"]
    _repeated_blocks = ["MultiTalkTransformerBlock"]
    _keep_in_fp32_modules = ["rope", "time_embedder", "time_proj", "scale_shift_table", "norm1", "norm2",
                             "norm3", "norm_x", "norm_out"]
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm", "rope"]
    # Context parallelism (diffusers' hooks, installed by ``runtime.parallel``): the patch tokens and
    # the RoPE tables are split after the patch embedding. The explicit split point (an identity)
    # keeps the split ahead of the blocks, so ``prepare`` returns this process's tokens and
    # TeaCache's residual stays local. The head's output is gathered by ``token_shard.gather``
    # before the unpatchify (diffusers' gather of uneven slices hands unequal tensors to
    # ``all_gather``, which gloo refuses), and the MultiTalk parts that need more than local tokens
    # use ``token_shard`` too (see :mod:`multitalk.models.sequence_shard`).
    _cp_plan = {
        "rope": {
            0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
            1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        },
        "split_tokens": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
    }
    # ``before_block(i)`` / ``after_block(i)`` around each block call (``runtime.block_streaming``)
    block_streamer = None

    @register_to_config
    def __init__(self, patch_size: tuple[int, ...] = (1, 2, 2), num_attention_heads: int = 40,
                 attention_head_dim: int = 128, in_channels: int = 36, out_channels: int = 16,
                 text_dim: int = 4096, freq_dim: int = 256, ffn_dim: int = 13824, num_layers: int = 40,
                 cross_attn_norm: bool = True, qk_norm: str | None = "rms_norm_across_heads", eps: float = 1e-6,
                 image_dim: int | None = 1280, added_kv_proj_dim: int | None = 5120, rope_max_seq_len: int = 1024,
                 pos_embed_seq_len: int | None = None, text_len: int = 512, image_tokens: int = 257,
                 audio_window: int = 5, vae_scale: int = 4, audio_blocks: int = 12, audio_channels: int = 768,
                 audio_intermediate_dim: int = 512, audio_output_dim: int = 768, audio_context_tokens: int = 32,
                 norm_input_visual: bool = True, norm_output_audio: bool = True, class_range: int = 24,
                 class_interval: int = 4):
        if text_len != 512:
            raise ValueError("the Wan I2V cross-attention splits image/text assuming text_len == 512")
        # Build the Wan parts without blocks, then add the MultiTalk blocks.
        super().__init__(patch_size, num_attention_heads, attention_head_dim, in_channels, out_channels, text_dim,
                         freq_dim, ffn_dim, 0, cross_attn_norm, qk_norm, eps, image_dim, added_kv_proj_dim,
                         rope_max_seq_len, pos_embed_seq_len)
        self.register_to_config(num_layers=num_layers)
        inner = num_attention_heads * attention_head_dim
        self.rope = CachedWanRotaryPosEmbed(attention_head_dim, patch_size, rope_max_seq_len)
        self.condition_embedder = MultiTalkConditionEmbedding(
            dim=inner, time_freq_dim=freq_dim, time_proj_dim=inner * 6, text_embed_dim=text_dim,
            image_embed_dim=image_dim, pos_embed_seq_len=pos_embed_seq_len)
        self.blocks = nn.ModuleList([
            MultiTalkTransformerBlock(inner, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps,
                                      added_kv_proj_dim, audio_output_dim, norm_input_visual, class_range,
                                      class_interval)
            for _ in range(num_layers)])
        self.audio_proj = AudioProjModel(audio_window, vae_scale, audio_blocks, audio_channels,
                                         audio_intermediate_dim, audio_output_dim, audio_context_tokens,
                                         norm_output_audio)
        self.split_tokens = SplitPoint()
        self.token_shard: TokenShard | None = None   # set by runtime.parallel with a sequence split

    @classmethod
    def from_dit_config(cls, cfg: DiTConfig) -> "MultiTalkTransformer3DModel":
        """Construct from :class:`~multitalk.models.architecture.DiTConfig` (use under ``torch.device('meta')``)."""
        return cls(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads,
                   attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                   text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                   eps=cfg.eps, image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim, text_len=cfg.text_len,
                   image_tokens=cfg.image_tokens, audio_window=cfg.audio_window, vae_scale=cfg.vae_scale,
                   audio_blocks=cfg.audio_blocks, audio_channels=cfg.audio_channels,
                   audio_intermediate_dim=cfg.intermediate_dim, audio_output_dim=cfg.output_dim,
                   audio_context_tokens=cfg.context_tokens, norm_input_visual=cfg.norm_input_visual,
                   norm_output_audio=cfg.norm_output_audio, class_range=cfg.class_range,
                   class_interval=cfg.class_interval)

    # -- inputs -----------------------------------------------------------------------------------

    def _text_context(self, encoder_hidden_states, batch: int) -> torch.Tensor:
        text_len, text_dim = self.config.text_len, self.config.text_dim
        if isinstance(encoder_hidden_states, torch.Tensor) and encoder_hidden_states.ndim == 3:
            contexts = list(encoder_hidden_states)
        elif isinstance(encoder_hidden_states, (list, tuple)):
            contexts = list(encoder_hidden_states)
        else:
            raise UserInputError("encoder_hidden_states", "expected a list of [L, text_dim] T5 contexts or a "
                                 "[B, L, text_dim] tensor", "pass the trimmed T5 outputs")
        if len(contexts) != batch:
            raise UserInputError("encoder_hidden_states", f"{len(contexts)} text contexts for a batch of {batch}",
                                 "give one context per latent")
        padded = []
        for c in contexts:
            if c.ndim != 2 or c.shape[1] != text_dim or c.shape[0] > text_len:
                raise UserInputError("encoder_hidden_states", f"text context of shape {tuple(c.shape)}; expected "
                                     f"[<= {text_len}, {text_dim}]", "use the T5 encoder of this checkpoint")
            padded.append(torch.cat([c, c.new_zeros(text_len - c.shape[0], text_dim)]))
        return torch.stack(padded)

    @staticmethod
    def _batched(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
        if t.shape[0] == batch:
            return t
        if t.shape[0] == 1:
            return t.expand(batch, *t.shape[1:])
        raise UserInputError(name, f"batch {t.shape[0]} does not match the latent batch {batch}",
                             "give one entry per latent (or one for all)")

    # -- forward in three parts -------------------------------------------------------------------

    def prepare(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states,
                encoder_hidden_states_image: torch.Tensor, y: torch.Tensor, audio: torch.Tensor,
                ref_target_masks: torch.Tensor | None = None, debug: dict | None = None) -> DiTState:
        """Patchify ``cat([latent, y])`` and compute the time, text, image and audio embeddings and the RoPE."""
        if hidden_states.ndim != 5:
            raise UserInputError("hidden_states", f"expected [B, C, T, h, w], got {tuple(hidden_states.shape)}",
                                 "pass a batch of latents")
        batch = hidden_states.shape[0]
        p_t, p_h, p_w = self.config.patch_size
        _, _, frames, height, width = hidden_states.shape
        grid = (frames // p_t, height // p_h, width // p_w)
        y = self._batched(y, batch, "y")
        if y.shape[2:] != hidden_states.shape[2:] or y.shape[1] + hidden_states.shape[1] != self.config.in_channels:
            raise UserInputError("y", f"y {tuple(y.shape)} does not fit the latent {tuple(hidden_states.shape)} "
                                 f"({self.config.in_channels} channels together)", "build y from the same clip")
        dtype = self.patch_embedding.weight.dtype
        shard = self.token_shard
        # this process's tokens (all of them on one process); asked before the split hooks run
        start = 0 if shard is None else shard.span(grid[0] * grid[1] * grid[2])[0]
        x = torch.cat([hidden_states, y.to(hidden_states.dtype)], dim=1).to(dtype)
        rotary_emb = self.rope(x)
        tokens = self.split_tokens(self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous())

        timestep = torch.as_tensor(timestep, device=tokens.device).reshape(-1)
        timestep = self._batched(timestep, batch, "timestep")
        text = self._text_context(encoder_hidden_states, batch).to(tokens.device)
        image = self._batched(encoder_hidden_states_image, batch, "encoder_hidden_states_image")
        temb, timestep_proj, text_emb, image_emb = self.condition_embedder(timestep, text, image)
        context = torch.cat([image_emb, text_emb], dim=1).to(dtype)

        audio_proj = self.audio_proj(audio.to(tokens.device))                     # [H, T_lat, 32, C]
        if audio_proj.shape[1] != grid[0]:
            raise UserInputError("audio", f"{audio.shape[1]} audio frames give {audio_proj.shape[1]} latent "
                                 f"frames, the latent has {grid[0]}", "use the audio windows of this clip")
        speakers = audio_proj.shape[0]
        audio_tokens = audio_proj.permute(1, 0, 2, 3).flatten(1, 2).to(dtype)      # [T_lat, H*32, C]
        masks = None
        if ref_target_masks is not None:
            masks = speaker_routing.token_masks(ref_target_masks.to(tokens.device), grid[1:]).to(dtype)
        elif speakers > 1:
            raise UserInputError("ref_target_masks", "two speakers need the person/background masks",
                                 "pass the [3, h_lat, w_lat] ref_target_masks")
        if speakers > 2:
            raise UserInputError("audio", f"{speakers} speakers; MultiTalk supports 1 or 2", "use at most 2")

        if debug is not None:
            debug.update(time_e=temb, time_e0=timestep_proj.unflatten(1, (6, -1)), text_emb=text_emb,
                         img_emb=image_emb, audio_proj=audio_proj)
        return DiTState(hidden_states=tokens, encoder_hidden_states=context, temb=temb,
                        timestep_proj=timestep_proj.unflatten(1, (6, -1)), rotary_emb=rotary_emb,
                        audio=AudioContext(audio_tokens, speakers, grid, masks, debug, shard, start), grid=grid,
                        debug=debug)

    def run_blocks(self, state: DiTState) -> torch.Tensor:
        """All transformer blocks on ``state.hidden_states``; returns the block output ``[B, L, dim]``.

        ``block_streamer`` (set by the runtime layer, ``runtime.block_streaming``; None: every block
        resident) is told before and after each block call, outside the (compiled) block itself.
        """
        hidden = state.hidden_states
        streamer = self.block_streamer
        for i, block in enumerate(self.blocks):
            args = (hidden, state.encoder_hidden_states, state.timestep_proj, state.rotary_emb, state.audio)
            if streamer is not None:
                streamer.before_block(i)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden = self._gradient_checkpointing_func(block, *args)
            else:
                hidden = block(*args)
            if streamer is not None:
                streamer.after_block(i)
            if state.debug is not None:
                state.debug.setdefault("blocks_out", []).append(hidden)
        return hidden

    def finish(self, state: DiTState, hidden: torch.Tensor) -> torch.Tensor:
        """Output norm + head (float32, like the official autocast) and unpatchify -> ``[B, 16, T, h, w]`` float32."""
        shift, scale = (self.scale_shift_table.float() + state.temb.float().unsqueeze(1)).chunk(2, dim=1)
        hidden = self.norm_out(hidden.float()) * (1 + scale.to(hidden.device)) + shift.to(hidden.device)
        if isinstance(self.proj_out, nn.Linear):
            bias = None if self.proj_out.bias is None else self.proj_out.bias.float()
            hidden = F.linear(hidden, self.proj_out.weight.float(), bias)
        else:  # replaced (e.g. quantised) projection
            hidden = self.proj_out(hidden.to(self.patch_embedding.weight.dtype)).float()
        if state.audio.shard is not None:                   # all tokens again (sequence parallelism)
            hidden = state.audio.shard.gather(hidden)
        batch = hidden.shape[0]
        p_t, p_h, p_w = self.config.patch_size
        f, h, w = state.grid
        hidden = hidden.reshape(batch, f, h, w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states,
                encoder_hidden_states_image: torch.Tensor, y: torch.Tensor, audio: torch.Tensor,
                ref_target_masks: torch.Tensor | None = None, debug: dict | None = None) -> torch.Tensor:
        """One DiT call -> noise prediction ``[B, 16, T, h, w]`` (float32).

        Args:
            hidden_states: noisy latent ``[B, 16, T_lat, h, w]``.
            timestep: ``[B]`` (or one value) float timesteps in ``[0, 1000]``.
            encoder_hidden_states: list of B trimmed T5 contexts ``[L_i, text_dim]``, or a
                ``[B, <=512, text_dim]`` tensor; zero-padded to 512 rows, attended unmasked.
            encoder_hidden_states_image: CLIP features ``[B or 1, 257, clip_dim]``.
            y: ``[B or 1, 20, T_lat, h, w]`` (4 mask + 16 reference-latent channels).
            audio: ``[H, F, 5, L, C]`` audio windows of H = 1 or 2 speakers, ``F = 1 + 4 (T_lat - 1)``.
            ref_target_masks: ``[3, h, w]`` person 1 / person 2 / background masks (needed for H = 2).
            debug: optional dict filled with ``time_e``, ``time_e0``, ``text_emb``, ``img_emb``,
                ``audio_proj``, ``x_ref_attn_map`` (list per block) and ``blocks_out`` (list per block).
        """
        state = self.prepare(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, y,
                             audio, ref_target_masks, debug)
        return self.finish(state, self.run_blocks(state))


# ----------------------------------------------------------------------------------------------
# Checkpoint conversion and loading

_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
    "audio_proj.proj1": "audio_proj.proj1",
    "audio_proj.proj1_vf": "audio_proj.proj1_vf",
    "audio_proj.proj2": "audio_proj.proj2",
    "audio_proj.proj3": "audio_proj.proj3",
    "audio_proj.norm": "audio_proj.norm",
}
_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",                                   # official cross-attention norm
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "audio_cross_attn.q_linear": "audio_cross_attn.q_linear",
    "audio_cross_attn.kv_linear": "audio_cross_attn.kv_linear",
    "audio_cross_attn.proj": "audio_cross_attn.proj",
    "norm_x": "norm_x",
}
_PARAMS = {"head.modulation": "scale_shift_table"}


def convert_dit_key(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Official MultiTalk/Wan DiT key -> ``[(model key, tensor)]``.

    Unknown keys are returned unchanged so that the strict loader reports them as unexpected.
    """
    if key in _PARAMS:
        return [(_PARAMS[key], tensor)]
    parts = key.split(".")
    if parts[0] == "blocks" and len(parts) >= 3 and parts[1].isdigit():
        prefix, rest = f"blocks.{parts[1]}", parts[2:]
        if rest == ["modulation"]:
            return [(f"{prefix}.scale_shift_table", tensor)]
        module, leaf = ".".join(rest[:-1]), rest[-1]
        if module in _BLOCK and leaf in ("weight", "bias"):
            return [(f"{prefix}.{_BLOCK[module]}.{leaf}", tensor)]
        return [(key, tensor)]
    module, _, leaf = key.rpartition(".")
    if module in _TOP_LEVEL and leaf in ("weight", "bias"):
        return [(f"{_TOP_LEVEL[module]}.{leaf}", tensor)]
    return [(key, tensor)]


_TOP_LEVEL_INV = {ours: official for official, ours in _TOP_LEVEL.items()}
_BLOCK_INV = {ours: official for official, ours in _BLOCK.items()}
_PARAMS_INV = {ours: official for official, ours in _PARAMS.items()}


def official_dit_key(key: str) -> str:
    """This model's key -> the official key (the inverse of :func:`convert_dit_key`).

    Keys without an official counterpart are returned unchanged.
    """
    if key in _PARAMS_INV:
        return _PARAMS_INV[key]
    parts = key.split(".")
    if parts[0] == "blocks" and len(parts) >= 3 and parts[1].isdigit():
        prefix, rest = f"blocks.{parts[1]}", parts[2:]
        if rest == ["scale_shift_table"]:
            return f"{prefix}.modulation"
        module, leaf = ".".join(rest[:-1]), rest[-1]
        if module in _BLOCK_INV and leaf in ("weight", "bias"):
            return f"{prefix}.{_BLOCK_INV[module]}.{leaf}"
        return key
    module, _, leaf = key.rpartition(".")
    if module in _TOP_LEVEL_INV and leaf in ("weight", "bias"):
        return f"{_TOP_LEVEL_INV[module]}.{leaf}"
    return key


def keep_fp32(name: str) -> bool:
    """Parameters kept in float32 when loading in bf16/fp16 (matches ``_keep_in_fp32_modules``)."""
    return any(p in name for p in MultiTalkTransformer3DModel._keep_in_fp32_modules)


def build_transformer_on_meta(dit_cfg: DiTConfig) -> MultiTalkTransformer3DModel:
    """The model for ``dit_cfg`` on the ``meta`` device (no memory)."""
    return build_on_meta(lambda: MultiTalkTransformer3DModel.from_dit_config(dit_cfg))


def _resolve_arch(ckpt_dir, arch: Architecture | DiTConfig | str | None) -> DiTConfig:
    if isinstance(arch, DiTConfig):
        return arch
    if isinstance(arch, Architecture):
        return arch.dit
    return detect_architecture(ckpt_dir, arch).dit


def load_transformer(ckpt_dir: str | Path, multitalk_dir: str | Path | None = None,
                     arch: Architecture | DiTConfig | str | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, host_blocks: Iterable[int] = (),
                     transform=None) -> MultiTalkTransformer3DModel:
    """Load the MultiTalk DiT from the official folders (see :func:`multitalk.models.layout.find_dit_files`).

    Built on ``meta`` and streamed tensor by tensor, cast to ``dtype`` (``keep_fp32`` ones float32)
    on ``device``, except the blocks in ``host_blocks``, which go to the CPU (the blocks a memory
    plan streams); the RoPE tables are then recomputed. ``transform(key, tensor)`` may replace each
    tensor as it is loaded (see ``load_converted``). Raises ``CheckpointError`` naming file, key and
    expected shape on any mismatch, missing or unexpected tensor.
    """
    on_host = {f"blocks.{i}." for i in host_blocks}

    def device_of(name: str) -> str | torch.device:
        return "cpu" if on_host and name[:name.find(".", 7) + 1] in on_host else device

    from multitalk.models.layout import find_dit_files, iter_dit_tensors

    dit_cfg = _resolve_arch(ckpt_dir, arch)
    files = find_dit_files(ckpt_dir, multitalk_dir)
    model = build_transformer_on_meta(dit_cfg)

    def dtype_for(official_key: str) -> torch.dtype:  # cast while reading: no fp32 copy of a bf16 load
        return torch.float32 if keep_fp32(convert_dit_key(official_key, None)[0][0]) else dtype

    load_converted(model, iter_dit_tensors(files, dtype_for), convert_dit_key, component="transformer", dtype=dtype,
                   keep_fp32=keep_fp32, device=device_of, transform=transform)
    model.rope.reset_tables(device)
    return model.eval().requires_grad_(False)


def check_transformer_keys(dit_cfg: DiTConfig, items) -> LoadReport:
    """Dry run: which converted source tensors miss / do not fit the model (nothing is loaded)."""
    model = build_transformer_on_meta(dit_cfg)
    return load_converted(model, items, convert_dit_key, component="transformer", dry_run=True)


__all__ = [
    "AudioContext", "DiTState", "MultiTalkTransformer3DModel", "MultiTalkTransformerBlock", "apply_rotary",
    "build_transformer_on_meta", "check_transformer_keys", "convert_dit_key", "keep_fp32", "load_transformer",
    "official_dit_key", "self_attention_processors", "sinusoidal_embedding",
]
