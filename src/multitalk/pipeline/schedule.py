"""Flow-matching sampling timesteps of MultiTalk (shifted linear schedule)."""

from __future__ import annotations

import numpy as np
import torch

from multitalk.errors import UserInputError


def shift_timestep(t: torch.Tensor, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``t' = shift*s / (1 + (shift-1)*s) * N`` with ``s = t/N`` (the official ``timestep_transform``)."""
    s = t / num_train_timesteps
    return shift * s / (1 + (shift - 1) * s) * num_train_timesteps


def sample_timesteps(steps: int, shift: float, num_train_timesteps: int = 1000) -> list[torch.Tensor]:
    """``steps + 1`` float32 tensors of shape ``[1]``, from ``N`` down to 0, shifted.

    As the official sampler: ``np.linspace(N, 1, steps, float32)`` followed by ``0``, each wrapped
    in a float32 tensor, then :func:`shift_timestep` (computed in float32). Step ``i`` runs the
    model at ``t[i]`` and moves the latent by ``(t[i] - t[i+1]) / N``.
    """
    if int(steps) != steps or steps < 1:
        raise UserInputError("sample_steps", f"must be a positive integer, got {steps}", "e.g. 40")
    if not shift > 0:
        raise UserInputError("sample_shift", f"must be > 0, got {shift}", "e.g. 7 for multitalk-480")
    raw = list(np.linspace(num_train_timesteps, 1, int(steps), dtype=np.float32)) + [0.0]
    return [shift_timestep(torch.tensor([t], dtype=torch.float32), shift, num_train_timesteps) for t in raw]
