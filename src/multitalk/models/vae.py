"""Wan 2.1 video VAE: diffusers ``AutoencoderKLWan`` loaded from the official ``Wan2.1_VAE.pth``.

The official file holds the state dict of ``wan.modules.vae.WanVAE_`` (``encoder.*``, ``conv1.*``,
``conv2.*``, ``decoder.*``). :func:`convert_vae_key` maps each of its keys to the diffusers name;
:meth:`WanVAE.from_checkpoint` builds the model on ``meta`` and streams the file into it.

Conventions (same as the official ``WanVAE`` wrapper, verified against the golden vectors):

* ``encode(video [3, T, H, W] in [-1, 1])``, ``T = 1 + 4k``: causal chunks of 1, 4, 4, ... frames
  with the feature cache; returns the posterior *mean* (no sampling), normalised per channel as
  ``(mu - mean) * (1 / std)`` -> ``[16, 1 + (T-1)/4, H/8, W/8]``.
* ``decode(latent [16, T', h, w])``: ``z / (1 / std) + mean``, one latent frame at a time with the
  cache -> ``[3, 1 + 4(T'-1), 8h, 8w]``, clamped to ``[-1, 1]``.

diffusers differs only in where the normalisation lives: ``AutoencoderKLWan.encode`` returns the
*un-normalised* posterior and ``decode`` expects un-normalised latents (the diffusers pipelines apply
``latents_mean`` / ``latents_std`` outside the model). This wrapper applies it, with ``1/std``
computed in float32 exactly as the official code does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from multitalk.errors import CheckpointError, UserInputError
from multitalk.models.architecture import Architecture, VAEConfig, detect_architecture
from multitalk.models.checkpoint import (
    Converter,
    LoadReport,
    SourceItem,
    build_on_meta,
    iter_torch_file,
    load_converted,
)
from multitalk.models.official_files import VAE_FILE


# Sub-module renames inside one official ResidualBlock (nn.Sequential indices -> diffusers names).
_RESIDUAL_LEAVES = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}
# Encoder / decoder children that only change name.
_CHILDREN = {
    "conv1.": "conv_in.",
    "middle.0.": "mid_block.resnets.0.",
    "middle.1.": "mid_block.attentions.0.",
    "middle.2.": "mid_block.resnets.1.",
    "head.0.": "norm_out.",
    "head.2.": "conv_out.",
}
_TOP_LEVEL = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
_FLAT_INDEX = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(.*)$")


def build_vae_model(cfg: VAEConfig) -> AutoencoderKLWan:
    """An ``AutoencoderKLWan`` with the official Wan 2.1 VAE layout (built on the current device)."""
    return AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=[],
        temperal_downsample=list(cfg.temperal_downsample),
        dropout=0.0,
        latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
    )


def _decoder_blocks(cfg: VAEConfig) -> list[str]:
    """diffusers module path of each entry of the official flat ``decoder.upsamples`` list."""
    names = []
    levels = len(cfg.dim_mult)
    for i in range(levels):
        names += [f"up_blocks.{i}.resnets.{j}" for j in range(cfg.num_res_blocks + 1)]
        if i != levels - 1:
            names.append(f"up_blocks.{i}.upsamplers.0")
    return names


def convert_vae_key(key: str, cfg: VAEConfig) -> str | None:
    """diffusers name of an official ``WanVAE_`` key, or ``None`` if the key has no known place.

    Encoder ``downsamples.N`` keep their flat index (diffusers' ``down_blocks`` is flat too); decoder
    ``upsamples.N`` are regrouped into ``up_blocks.<level>.resnets.<j>`` / ``.upsamplers.0``.
    """
    for old, new in _TOP_LEVEL.items():
        if key.startswith(old):
            return new + key[len(old):]
    part, dot, rest = key.partition(".")
    if part not in ("encoder", "decoder") or not dot:
        return None
    m = _FLAT_INDEX.match(key)
    if m:
        index, leaf = int(m.group(2)), m.group(3)
        if part == "encoder":
            module = f"down_blocks.{index}"
        else:
            blocks = _decoder_blocks(cfg)
            if index >= len(blocks):
                return None
            module = blocks[index]
        rest = f"{module}.{leaf}"
    else:
        for old, new in _CHILDREN.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        else:
            return None
    for old, new in _RESIDUAL_LEAVES.items():
        if f".{old}" in rest:
            rest = rest.replace(f".{old}", f".{new}", 1)
            break
    return f"{part}.{rest}"


def vae_converter(cfg: VAEConfig) -> Converter:
    """A ``checkpoint.load_converted`` converter for ``Wan2.1_VAE.pth``.

    Unknown keys come back under their own name so that the loader reports them as unexpected.
    """

    def convert(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        new = convert_vae_key(key, cfg)
        return [(new if new is not None else key, tensor)]

    return convert


def load_vae_weights(model: AutoencoderKLWan, items: Iterable[SourceItem], cfg: VAEConfig, *, device="cpu",
                     dtype: torch.dtype = torch.float32, dry_run: bool = False) -> LoadReport:
    """Stream official VAE tensors ``items`` into ``model`` (strict: every key must match)."""
    return load_converted(model, items, vae_converter(cfg), component="vae", dtype=dtype,
                          device=device, dry_run=dry_run)


class WanVAE(torch.nn.Module):
    """The Wan 2.1 VAE with the official latent normalisation; unbatched ``encode`` / ``decode``.

    ``model`` is the diffusers ``AutoencoderKLWan``. ``mean`` and ``inv_std`` (``1/std``) are
    float32 buffers; inputs are cast to the model dtype, outputs are float32.
    """

    def __init__(self, model: AutoencoderKLWan, cfg: VAEConfig):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        self.temporal_stride = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.spatial_stride = 2 ** (len(cfg.dim_mult) - 1)
        device = next(model.parameters()).device
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=device)
        inv_std = 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32, device=device)
        self.register_buffer("mean", mean.view(-1, 1, 1, 1), persistent=False)
        self.register_buffer("inv_std", inv_std.view(-1, 1, 1, 1), persistent=False)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, arch: Architecture | None = None,
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "WanVAE":
        """Load ``<ckpt_dir>/Wan2.1_VAE.pth`` (architecture detected from ``config.json`` if not given)."""
        ckpt_dir = Path(ckpt_dir)
        if arch is None:
            arch = detect_architecture(ckpt_dir)
        path = ckpt_dir / VAE_FILE
        if not path.is_file():
            raise CheckpointError(f"VAE weights not found: the checkpoint folder has no {VAE_FILE}",
                                  file=str(path))
        model = build_on_meta(lambda: build_vae_model(arch.vae))
        load_vae_weights(model, iter_torch_file(path), arch.vae, device=device, dtype=dtype)
        return cls(model, arch.vae)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[3, T, H, W]`` in ``[-1, 1]`` -> normalised latent ``[16, 1+(T-1)/4, H/8, W/8]`` (float32)."""
        _check_video(video, self.temporal_stride, self.spatial_stride)
        x = video.to(device=self.device, dtype=self.dtype).unsqueeze(0)
        mu = self.model.encode(x).latent_dist.mean[0].float()
        return (mu - self.mean) * self.inv_std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent ``[16, T', h, w]`` -> video ``[3, 1+4(T'-1), 8h, 8w]`` in ``[-1, 1]`` (float32)."""
        video = self.model.decode(self._denormalise(latent)).sample[0].float()
        return video.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def decode_chunks(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        """:meth:`decode` as it goes: ``[3, n, 8h, 8w]`` float32 chunks of 1, 4, 4, ... frames.

        The same computation as ``AutoencoderKLWan._decode`` (one latent frame at a time with the
        causal feature cache), so the concatenated chunks equal :meth:`decode` exactly; a caller
        can colour-correct, copy and encode the first frames while the GPU decodes the next ones.
        Tiled or patchified models (not Wan 2.1's) fall back to one chunk.
        """
        m = self.model
        if m.use_tiling or m.config.patch_size is not None:
            yield self.decode(latent)
            return
        z = self._denormalise(latent)
        m.clear_cache()
        try:
            x = m.post_quant_conv(z)
            for i in range(x.shape[2]):
                m._conv_idx = [0]
                out = m.decoder(x[:, :, i:i + 1], feat_cache=m._feat_map, feat_idx=m._conv_idx,
                                first_chunk=i == 0)
                yield out.clamp(-1.0, 1.0)[0].float()
        finally:
            m.clear_cache()

    def _denormalise(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised ``[16, T', h, w]`` -> the diffusers decoder's input ``[1, 16, T', h, w]`` (model dtype)."""
        _check_latent(latent, self.z_dim)
        z = latent.to(device=self.device, dtype=torch.float32) / self.inv_std + self.mean
        return z.to(self.dtype).unsqueeze(0)


def _check_video(video, temporal_stride: int, spatial_stride: int) -> None:
    if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[0] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise UserInputError("video", f"expected a [3, T, H, W] tensor, got {shape}",
                             "pass one RGB video, channels first, without a batch dimension")
    _, t, h, w = video.shape
    if t < 1 or (t - 1) % temporal_stride:
        raise UserInputError("video", f"{t} frames cannot be encoded",
                             f"use 1 + {temporal_stride}k frames (1, 5, 9, ..., 81)")
    if h % spatial_stride or w % spatial_stride or h == 0 or w == 0:
        raise UserInputError("video", f"size {h}x{w} is not a multiple of {spatial_stride}",
                             f"resize or crop to a multiple of {spatial_stride} pixels")
    if not video.is_floating_point():
        raise UserInputError("video", f"dtype {video.dtype} is not floating point",
                             "convert uint8 pixels with u8 / 127.5 - 1")


def _check_latent(latent, z_dim: int) -> None:
    if (not isinstance(latent, torch.Tensor) or latent.dim() != 4 or latent.shape[0] != z_dim
            or latent.shape[1] < 1):
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise UserInputError("latent", f"expected a [{z_dim}, T, h, w] tensor, got {shape}",
                             "pass one latent video without a batch dimension")


__all__: list[str] = ["WanVAE", "build_vae_model", "convert_vae_key", "load_vae_weights",
                      "vae_converter"]