"""MultiTalk audio projection: per-frame wav2vec2 windows -> audio context tokens per latent frame.

The DiT ``audio`` input is ``[H, F, audio_window, L, C]``: for each of ``H`` speakers and ``F`` video
frames, a window of ``audio_window`` (5) wav2vec2 frames, each with the hidden states of ``L``
encoder layers of width ``C``. The VAE compresses time by ``vae_scale`` (4): latent frame 0 is video
frame 0, latent frame ``t >= 1`` covers video frames ``4t-3 .. 4t``. :func:`select_audio_windows`
picks, per latent frame, the audio rows the official model feeds to :class:`AudioProjModel`:

* frame 0: its full 5-row window (``proj1``);
* each group of 4 later frames: rows ``[w0[0:3], w1[2], w2[2], w3[2:5]]`` (8 rows, ``proj1_vf``),
  i.e. the first frame's past context, the centre rows, and the last frame's future context.

:class:`AudioProjModel` then maps each latent frame to ``context_tokens`` (32) tokens of
``output_dim`` (768), the keys/values of the blocks' audio cross-attention.
"""

from __future__ import annotations

import torch
from torch import nn

from multitalk.errors import UserInputError


def select_audio_windows(audio: torch.Tensor, vae_scale: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[H, F, w, L, C]`` audio windows into ``(first [H, 1, w, L, C], later [H, T-1, w+vae_scale-1, L, C])``.

    ``F`` must be ``1 + vae_scale * k`` (the video frames of one clip).
    """
    if audio.ndim != 5:
        raise UserInputError("audio", f"expected [speakers, frames, window, layers, channels], got shape "
                             f"{tuple(audio.shape)}", "stack the per-speaker audio windows")
    frames, window = audio.shape[1], audio.shape[2]
    if (frames - 1) % vae_scale != 0:
        raise UserInputError("audio", f"{frames} video frames is not 1 + {vae_scale}*k",
                             f"use a frame count like {1 + vae_scale * max(1, (frames - 1) // vae_scale)}")
    middle = window // 2
    first = audio[:, :1]
    later = audio[:, 1:].unflatten(1, (-1, vae_scale))            # [H, T-1, vae_scale, w, L, C]
    head = later[:, :, 0, : middle + 1]                              # first frame: rows 0..middle
    centre = later[:, :, 1:-1, middle]                               # inner frames: centre row
    tail = later[:, :, -1, middle:]                                  # last frame: rows middle..w-1
    return first, torch.cat([head, centre, tail], dim=2)


class AudioProjModel(nn.Module):
    """Audio windows -> ``context_tokens`` tokens of ``output_dim`` per latent frame (official ``AudioProjModel``).

    Weights: ``proj1`` (first frame, ``window*blocks*channels`` inputs), ``proj1_vf`` (later frames,
    ``(window+vae_scale-1)*blocks*channels`` inputs), ``proj2``, ``proj3`` and the output ``norm``.
    """

    def __init__(self, window: int = 5, vae_scale: int = 4, blocks: int = 12, channels: int = 768,
                 intermediate_dim: int = 512, output_dim: int = 768, context_tokens: int = 32,
                 norm_output_audio: bool = True):
        super().__init__()
        self.window, self.vae_scale = window, vae_scale
        self.blocks, self.channels = blocks, channels
        self.context_tokens, self.output_dim = context_tokens, output_dim
        self.proj1 = nn.Linear(window * blocks * channels, intermediate_dim)
        self.proj1_vf = nn.Linear((window + vae_scale - 1) * blocks * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim) if norm_output_audio else nn.Identity()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio [H, F, window, blocks, channels]`` -> ``[H, T_lat, context_tokens, output_dim]``."""
        if tuple(audio.shape[2:]) != (self.window, self.blocks, self.channels):
            raise UserInputError(
                "audio", f"audio windows of shape {tuple(audio.shape)} do not match the model "
                f"(expected [speakers, frames, {self.window}, {self.blocks}, {self.channels}])",
                "use the wav2vec2 model that belongs to this checkpoint")
        first, later = select_audio_windows(audio.to(self.proj1.weight.dtype), self.vae_scale)
        first = torch.relu(self.proj1(first.flatten(2)))             # [H, 1, inter]
        later = torch.relu(self.proj1_vf(later.flatten(2)))          # [H, T-1, inter]
        hidden = torch.relu(self.proj2(torch.cat([first, later], dim=1)))
        tokens = self.proj3(hidden).unflatten(-1, (self.context_tokens, self.output_dim))
        return self.norm(tokens)
