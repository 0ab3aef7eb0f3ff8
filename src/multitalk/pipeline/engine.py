"""The loaded model stack: text, image and audio encoders, VAE and the MultiTalk DiT.

``Engine.load(...)`` takes the model folders as the official README downloads them (or
``preset="tiny"``, the project's own small random weights in the same layout) and loads every
component through its streaming loader. An engine is loaded once and reused for many generations
(the CLI loads one per run; the service's worker keeps one for its lifetime).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from multitalk.errors import UserInputError
from multitalk.models.architecture import Architecture, detect_architecture
from multitalk.runtime.placement import Placement, configure_backends, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    ckpt_dir: Path | None = None
    wav2vec_dir: Path | None = None
    multitalk_dir: Path | None = None
    preset: str | None = None          # "tiny": write (once) and load the project's tiny weights
    device: str = "auto"
    dtype: str = "auto"                # DiT / T5 / CLIP compute dtype; "auto": bf16 on CUDA, fp32 on CPU
    vae_dtype: str = "auto"            # "auto": bf16 on CUDA (like the DiT), fp32 on CPU
    offload: bool = False              # onload each model only while it runs
    fp8: bool = False                  # fp8 row-wise linears in the DiT blocks (Hopper)
    compile: bool | None = None        # regional torch.compile of the DiT blocks + fused VAE element-wise
                                       # chains (runtime.vae_fusion); None: on for CUDA
    attention_backend: str | None = None  # diffusers attention backend name, e.g. "_native_cudnn"
    gpus: int = 1                      # processes (one GPU each) for the DiT; >1: pipeline.parallel
    parallel: str = "auto"             # with gpus > 1: "auto", "ulysses" or "cfg" (runtime.parallel.plan)

    def resolved_dirs(self) -> tuple[Path, Path, Path | None]:
        if self.preset is not None:
            if self.preset != "tiny":
                raise UserInputError("preset", f"unknown preset {self.preset!r}", "use --preset tiny")
            from multitalk.models.tiny import default_tiny_dir, write_tiny_checkpoints

            ckpt, w2v = write_tiny_checkpoints(default_tiny_dir())
            return Path(ckpt), Path(w2v), None
        if self.ckpt_dir is None:
            raise UserInputError("ckpt_dir", "no model folder given",
                                 "pass --ckpt-dir Wan2.1-I2V-14B-480P (and --wav2vec-dir), or --preset tiny")
        if self.wav2vec_dir is None:
            raise UserInputError("wav2vec_dir", "no wav2vec2 folder given",
                                 "pass --wav2vec-dir chinese-wav2vec2-base")
        for name, p in (("ckpt_dir", self.ckpt_dir), ("wav2vec_dir", self.wav2vec_dir),
                        ("multitalk_dir", self.multitalk_dir)):
            if p is not None and not Path(p).is_dir():
                raise UserInputError(name, f"folder {p} does not exist", "check the path")
        return Path(self.ckpt_dir), Path(self.wav2vec_dir), (
            Path(self.multitalk_dir) if self.multitalk_dir else None)


@dataclass
class Engine:
    arch: Architecture
    text_encoder: object
    image_encoder: object
    vae: object
    audio_encoder: object
    transformer: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    placement: Placement
    load_seconds: dict = field(default_factory=dict)
    parallel: object | None = None     # pipeline.parallel.ParallelRuntime with several processes

    def close(self) -> None:
        """Stop the other processes of a multi-GPU engine (nothing to do on one process)."""
        if self.parallel is not None:
            self.parallel.close()

    @classmethod
    def load(cls, config: EngineConfig) -> "Engine":
        """Load every component; with ``config.gpus > 1`` (or under ``torchrun``) this process becomes
        rank 0 of a multi-process engine (:func:`multitalk.pipeline.parallel.load_parallel_engine`)."""
        from multitalk.runtime.parallel.group import under_torchrun

        if config.gpus > 1 or (under_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1):
            from multitalk.pipeline.parallel import load_parallel_engine

            return load_parallel_engine(config)
        return cls.load_local(config)

    @classmethod
    def load_local(cls, config: EngineConfig, device: torch.device | None = None) -> "Engine":
        """Every component on this process (``device``: overrides ``config.device``)."""
        from multitalk.models.audio_encoder import AudioEncoder
        from multitalk.models.image_encoder import ImageEncoder
        from multitalk.models.text_encoder import TextEncoder
        from multitalk.models.vae import WanVAE

        ckpt_dir, w2v_dir, mt_dir = config.resolved_dirs()
        device = device if device is not None else resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        vae_dtype = resolve_dtype(config.vae_dtype, device)
        arch = detect_architecture(ckpt_dir)
        placement = Placement(device, offload=config.offload)
        configure_backends(device)
        # With offload, models live on the CPU and are onloaded per use.
        home = torch.device("cpu") if placement.offload else device
        timings = {}

        def timed(name, fn):
            t0 = time.perf_counter()
            out = fn()
            timings[name] = time.perf_counter() - t0
            log.info("loaded %s in %.1fs", name, timings[name])
            return out

        text = timed("text_encoder", lambda: TextEncoder.from_checkpoint(ckpt_dir, arch, device=home, dtype=dtype))
        image = timed("image_encoder", lambda: ImageEncoder.from_checkpoint(ckpt_dir, arch, device=home, dtype=dtype))
        vae = timed("vae", lambda: WanVAE.from_checkpoint(ckpt_dir, arch, device=home, dtype=vae_dtype))
        audio = timed("audio_encoder", lambda: AudioEncoder.from_pretrained(w2v_dir, device=home, dtype=torch.float32))
        dit = timed("transformer", lambda: load_dit(config, ckpt_dir, mt_dir, arch, home, device, dtype))
        if compiles(config, device):
            from multitalk.runtime.vae_fusion import fuse_vae

            fuse_vae(vae, device=device)  # norm -> SiLU -> causal pad as one Triton kernel each (CUDA)
        return cls(arch, text, image, vae, audio, dit, device, dtype, placement, timings)


def compiles(config: EngineConfig, device: torch.device) -> bool:
    return bool(config.compile or (config.compile is None and device.type == "cuda"))


def load_dit(config: EngineConfig, ckpt_dir, mt_dir, arch: Architecture, home: torch.device, device: torch.device,
             dtype: torch.dtype) -> torch.nn.Module:
    """The DiT as the engine runs it: streamed onto ``home``, fp8 / attention backend / fusions /
    regional compile as ``config`` asks (also what each servant process of a multi-GPU engine loads)."""
    from multitalk.models.transformer import load_transformer

    dit = load_transformer(ckpt_dir, mt_dir, arch, device=home, dtype=dtype)
    dit.eval().requires_grad_(False)
    if config.fp8:
        from multitalk.runtime.fp8 import quantize_linears_fp8

        quantize_linears_fp8(dit)
    if config.attention_backend:
        dit.set_attention_backend(config.attention_backend)
    if compiles(config, device):
        from multitalk.runtime.dit_fusion import fuse_dit

        fuse_dit(dit, device=device)  # GELU in the GEMM epilogue, q/k norm + RoPE kernel (CUDA)
        dit.compile_repeated_blocks(fullgraph=False, dynamic=False)
    return dit
