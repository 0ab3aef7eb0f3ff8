"""Per-clip conditioning: the reference frames' VAE latent and mask (``y``), CLIP features, audio.

Mirrors the official ``generate()``: the ``n_cond`` conditioning frames (1 for the first clip,
``motion_frame`` afterwards) are followed by black frames up to ``frame_num``, VAE-encoded, and
prefixed by a 4-channel mask that marks the conditioned frames (the first frame's mask repeated 4
times to fill the first latent frame).
"""

from __future__ import annotations

import torch


def frame_mask(frame_num: int, n_cond: int, lat_h: int, lat_w: int,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The official ``msk``: ``[1, 4, T_lat, lat_h, lat_w]``, 1 on conditioned frames."""
    msk = torch.ones(1, frame_num, lat_h, lat_w, device=device)
    msk[:, n_cond:] = 0
    msk = torch.cat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2).to(dtype)


def padded_condition_video(cond_frames: torch.Tensor, frame_num: int) -> torch.Tensor:
    """``[3, n_cond, H, W]`` conditioning frames followed by zeros up to ``frame_num`` frames."""
    c, n, h, w = cond_frames.shape
    zeros = torch.zeros(c, frame_num - n, h, w, dtype=cond_frames.dtype, device=cond_frames.device)
    return torch.cat([cond_frames, zeros], dim=1)


def motion_latent_frames(motion_frames: int) -> int:
    """Latent frames covered by ``motion_frames`` pixel frames (causal VAE: 1 + (n-1)//4)."""
    return 1 + (motion_frames - 1) // 4


def renoise(clean: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
            num_train_timesteps: int = 1000) -> torch.Tensor:
    """Flow-matching forward process ``(1 - s) x + s n`` with ``s = t / T``; ``n`` is drawn from
    ``generator`` (on its device, then moved to ``clean``'s)."""
    s = (t.float() / num_train_timesteps).reshape(-1)[0]
    noise = draw_noise(clean.shape, generator, clean.device)
    return (1 - s) * clean + s * noise


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise from ``generator``, drawn on the generator's device (so a CPU
    generator gives the same numbers whatever ``device`` the result goes to)."""
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device)
