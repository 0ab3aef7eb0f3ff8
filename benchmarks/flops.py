"""FLOPs of one DiT forward: counted by ``torch.utils.flop_counter`` and estimated analytically.

:func:`count_flops` runs a callable under ``FlopCounterMode`` and splits the count into attention
(every ``scaled_dot_product`` / fused attention op) and the rest (``mm``/``addmm``/``bmm``/conv/
``_scaled_mm``). :func:`dit_forward_flops` is the closed-form count of the same forward, used as a
cross-check (and as the fallback when the counter does not know an attention op).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_mapping() -> dict:
    """Attention ops the counter does not register itself (the CPU flash kernel)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _cpu_sdpa_flop} if op is not None else {}


def is_attention_op(op) -> bool:
    name = str(op)
    return "attention" in name or "scaled_dot_product" in name


def count_flops(fn: Callable[[], object]) -> dict:
    """Run ``fn()`` once under the counter; ``{total, attention, other, by_op}`` (FLOPs, ints)."""
    with FlopCounterMode(display=False, custom_mapping=_extra_mapping()) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    attention = sum(n for op, n in by_op.items() if is_attention_op(op))
    total = int(counter.get_total_flops())
    return {"total": total, "attention": attention, "other": total - attention, "by_op": by_op}


def dit_forward_flops(dim: int, ffn_dim: int, num_layers: int, tokens: int, latent_frames: int,
                      text_len: int = 512, image_tokens: int = 257, audio_tokens_per_frame: int = 32,
                      audio_dim: int = 768, in_channels: int = 36, patch: int = 4, out_channels: int = 16,
                      text_dim: int = 4096, clip_dim: int = 1280) -> dict:
    """Closed-form multiply-add FLOPs (x2) of one MultiTalk DiT forward (batch 1).

    Per block: self-attention (q, k, v, o projections + ``QK^T`` and ``PV``), I2V cross-attention
    (q, o on the video tokens, k/v on 512 text + 257 image tokens, attention to both), audio
    cross-attention (q, proj on the video tokens, kv on the audio tokens, per-frame attention) and
    the FFN. Embeddings and the head are added once; norms, RoPE and elementwise ops are ignored.
    Setting ``audio_tokens_per_frame=0`` gives the plain Wan I2V forward.
    """
    L, D = tokens, dim
    linear = 0
    attention = 0
    # self-attention
    linear += 4 * 2 * L * D * D
    attention += 4 * L * L * D
    # I2V cross-attention
    linear += 2 * 2 * L * D * D + 2 * 2 * (text_len + image_tokens) * D * D
    attention += 4 * L * (text_len + image_tokens) * D
    # audio cross-attention
    if audio_tokens_per_frame:
        linear += 2 * 2 * L * D * D + 2 * latent_frames * audio_tokens_per_frame * audio_dim * 2 * D
        attention += 4 * L * audio_tokens_per_frame * D
    # FFN
    linear += 2 * 2 * L * D * ffn_dim
    linear *= num_layers
    attention *= num_layers
    # patch embedding, head, text and image embedders
    linear += 2 * L * in_channels * patch * D + 2 * L * D * out_channels * patch
    linear += 2 * text_len * (text_dim * D + D * D) + 2 * image_tokens * (clip_dim * clip_dim + clip_dim * D)
    return {"total": linear + attention, "attention": attention, "other": linear}
