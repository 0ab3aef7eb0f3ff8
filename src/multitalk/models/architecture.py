"""Hyper-parameters of every component, for each known MultiTalk architecture.

The official folders carry a ``config.json`` only for the DiT; the official code hard-codes the
umT5-XXL, CLIP ViT-H/14 and Wan VAE hyper-parameters. We mirror that: an :class:`Architecture`
holds every number, and :func:`detect_architecture` picks it from the DiT ``config.json`` of a
checkpoint folder (its ``dim``). Loaders cross-check these numbers against tensor shapes and raise
a clear error on disagreement. ``wan2.1-i2v-14b`` is the real model; ``tiny`` is the small
random-weight model of the same classes (``multitalk weights make-tiny`` writes one), used for demos
and tests. There is no other difference between the two code paths.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from multitalk.errors import CheckpointError

LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]

SAMPLE_NEG_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
)


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    in_dim: int = 36
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    text_dim: int = 4096
    text_len: int = 512
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    clip_dim: int = 1280           # MLPProj input (CLIP vision width)
    image_tokens: int = 257
    # audio path
    audio_window: int = 5
    vae_scale: int = 4
    context_tokens: int = 32
    intermediate_dim: int = 512
    output_dim: int = 768
    audio_blocks: int = 12         # wav2vec2 layers stacked per frame
    audio_channels: int = 768      # wav2vec2 hidden size
    norm_input_visual: bool = True
    norm_output_audio: bool = True
    class_range: int = 24
    class_interval: int = 4


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    text_len: int = 512
    eps: float = 1e-6


@dataclass(frozen=True)
class CLIPVisionConfig:
    dim: int = 1280
    num_heads: int = 16
    num_layers: int = 32           # the checkpoint's blocks; the last one is not run
    mlp_ratio: int = 4
    patch_size: int = 14
    image_size: int = 224
    out_dim: int = 1024
    eps: float = 1e-5


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = tuple(LATENTS_MEAN)
    latents_std: tuple[float, ...] = tuple(LATENTS_STD)


@dataclass(frozen=True)
class Architecture:
    name: str
    dit: DiTConfig = field(default_factory=DiTConfig)
    t5: T5Config = field(default_factory=T5Config)
    clip: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    num_train_timesteps: int = 1000
    sample_neg_prompt: str = SAMPLE_NEG_PROMPT

    def to_dict(self) -> dict:
        return asdict(self)


FULL_14B = Architecture(name="wan2.1-i2v-14b")

TINY = Architecture(
    name="tiny",
    dit=DiTConfig(dim=64, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32, clip_dim=32,
                  intermediate_dim=64, output_dim=32, audio_blocks=2, audio_channels=32),
    t5=T5Config(vocab_size=448, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2),
    clip=CLIPVisionConfig(dim=32, num_heads=2, num_layers=2, out_dim=16),
    vae=VAEConfig(base_dim=8),
)

ARCHITECTURES = {a.name: a for a in (FULL_14B, TINY)}

# Width of the DiT -> architecture (the DiT config.json is the only config file the official
# base folder has; every other number follows from the architecture it belongs to).
_BY_DIT_DIM = {FULL_14B.dit.dim: FULL_14B, TINY.dit.dim: TINY}


def dit_config_from_json(cfg: dict, base: Architecture) -> DiTConfig:
    """Overlay a folder's DiT ``config.json`` on the architecture's DiT numbers."""
    d = base.dit
    updates = {}
    for key in ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers",
                "text_len", "eps", "audio_window", "vae_scale", "context_tokens",
                "intermediate_dim", "output_dim", "norm_input_visual", "norm_output_audio"):
        if key in cfg:
            updates[key] = type(getattr(d, key))(cfg[key])
    # Keys that the official code hard-codes but a non-14B folder records in its config.
    if "text_dim" in cfg:
        updates["text_dim"] = int(cfg["text_dim"])
    if "tiny_clip_vision_dim" in cfg:
        updates["clip_dim"] = int(cfg["tiny_clip_vision_dim"])
    if "tiny_audio_proj_blocks" in cfg:
        updates["audio_blocks"] = int(cfg["tiny_audio_proj_blocks"])
    if "tiny_audio_proj_channels" in cfg:
        updates["audio_channels"] = int(cfg["tiny_audio_proj_channels"])
    return replace(d, **updates)


def read_dit_config(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            "the checkpoint folder has no config.json (is this the Wan2.1-I2V-14B-480P folder?)",
            file=str(path))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"config.json is not valid JSON ({exc})", file=str(path)) from exc


def detect_architecture(ckpt_dir: str | Path, name: str | None = None) -> Architecture:
    """The architecture of a Wan/MultiTalk checkpoint folder, with its DiT config applied."""
    cfg = read_dit_config(ckpt_dir)
    if name is not None:
        if name not in ARCHITECTURES:
            raise CheckpointError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
        base = ARCHITECTURES[name]
    else:
        dim = cfg.get("dim")
        if dim not in _BY_DIT_DIM:
            raise CheckpointError(
                f"config.json has dim={dim}, which matches no known architecture "
                f"({', '.join(f'{a.name}: dim={a.dit.dim}' for a in ARCHITECTURES.values())})",
                file=str(Path(ckpt_dir) / "config.json"))
        base = _BY_DIT_DIM[dim]
    return replace(base, dit=dit_config_from_json(cfg, base))
