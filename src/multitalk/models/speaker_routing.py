"""Speaker routing for two speakers: which visual token listens to which voice (MultiTalk "label RoPE").

For two speakers the audio cross-attention of every block gives each visual token a 1-D RoPE
position, and each speaker's audio tokens a fixed one, so that tokens showing person 1 attend to
person 1's audio and likewise for person 2:

1. :func:`reference_attention_map`: from the block's self-attention (q and k after the 3-D RoPE),
   each token's softmax attention to the keys of the *first latent frame* (the reference image),
   summed over each of the 3 region masks (person 1, person 2, background) and divided by the
   mask's area; heads are averaged in 2 groups, then the groups averaged -> ``[B, 3, L]``.
2. :func:`speaker_positions`: per token, class = argmax over the 3 rows; position = the person-1
   row min-max scaled to ``[0, interval]``, the person-2 row scaled to ``[range - interval, range]``,
   background ``range // 2`` (``class_range`` 24, ``class_interval`` 4 -> [0,4], [20,24], 12).
3. :func:`audio_key_positions`: speaker 1's tokens sit at the centre of its band (2), speaker 2's at
   22; :func:`apply_rope_1d` rotates q and the audio keys (theta 10000, interleaved pairs).

The masked sum of softmax weights is an attention whose values are the masks, so the map is
computed with the attention kernel (``dispatch_attention_fn``) without materialising the
``L x L_ref`` attention matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROPE_THETA = 10000.0


def token_masks(ref_target_masks: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """``[3, h_lat, w_lat]`` region masks -> ``[3, N_h*N_w]`` 0/1 float masks on the token grid (nearest)."""
    masks = F.interpolate(ref_target_masks[None].float(), size=tuple(grid_hw), mode="nearest")[0]
    return (masks > 0).flatten(1).float()


def reference_attention_map(query: torch.Tensor, key: torch.Tensor, masks: torch.Tensor, frame_tokens: int,
                            groups: int = 2, backend=None) -> torch.Tensor:
    """Region attention map ``[B, len(masks), L]``.

    ``query``/``key``: ``[B, L, heads, head_dim]`` after RoPE; ``masks``: ``[R, frame_tokens]``.
    Each token's attention to the first ``frame_tokens`` keys, mass per region divided by the region
    area, averaged over the heads of each of ``groups`` head groups, then over the groups.
    """
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    batch, _, heads, head_dim = query.shape
    regions = masks.shape[0]
    if regions > head_dim:
        raise ValueError(f"{regions} region masks exceed head_dim {head_dim}")
    ref_key = key[:, :frame_tokens]
    values = torch.zeros(frame_tokens, head_dim, dtype=query.dtype, device=query.device)
    values[:, :regions] = masks.t().to(query.dtype)
    values = values[None, :, None, :].expand(batch, frame_tokens, heads, head_dim)
    mass = dispatch_attention_fn(query, ref_key, values, backend=backend)[..., :regions]  # [B, L, heads, R]
    mass = mass.float() / masks.sum(dim=1).float().to(mass.device)
    chunk = heads // groups
    group_means = [mass[:, :, g * chunk:(g + 1) * chunk].mean(dim=2) for g in range(groups)]
    return (sum(group_means) / groups).transpose(1, 2)                # [B, R, L]


def speaker_positions(ref_map: torch.Tensor, class_range: int = 24, class_interval: int = 4,
                      eps: float = 1e-8, extrema: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``[B, 3, L]`` map -> ``[B, L]`` float RoPE positions of the visual tokens.

    ``extrema``: ``(min, max)`` ``[B, 2]`` of the two speaker rows over the whole sequence when
    ``ref_map`` holds only this process's tokens (sequence parallelism); None: over ``ref_map``.
    """
    ref_map = ref_map.float()
    out = []
    for b, m in enumerate(ref_map):
        bands = ((0.0, float(class_interval)), (float(class_range - class_interval), float(class_range)))
        scaled = []
        for r, (row, (lo, hi)) in enumerate(zip(m[:2], bands)):
            if extrema is None:
                rmin, rmax = row.min(), row.max()
            else:
                rmin, rmax = extrema[0][b, r].float(), extrema[1][b, r].float()
            scaled.append((row - rmin) / (rmax - rmin + eps) * (hi - lo) + lo)
        scaled.append(torch.full_like(m[0], float(class_range // 2)))
        choice = m.argmax(dim=0)                                      # [L] in {0, 1, 2}
        out.append(torch.stack(scaled, dim=0).gather(0, choice[None])[0])
    return torch.stack(out, dim=0)


def audio_key_positions(num_tokens: int, class_range: int = 24, class_interval: int = 4,
                        device=None) -> torch.Tensor:
    """Positions of one frame's audio tokens: first half speaker 1 (band centre 2), second half speaker 2 (22)."""
    pos = torch.empty(num_tokens, dtype=torch.float32, device=device)
    pos[: num_tokens // 2] = class_interval / 2
    pos[num_tokens // 2:] = (2 * class_range - class_interval) / 2
    return pos


def apply_rope_1d(x: torch.Tensor, positions: torch.Tensor, theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, S, heads, D]`` by ``positions [B, S]`` (float32 math)."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=x.device).float() / head_dim))
    angles = positions.float().to(x.device)[..., None] * inv_freq     # [B, S, D/2]
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]     # [B, S, 1, D/2]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.type_as(x)
