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
    attention: str = "auto"            # DiT self-attention: "sdpa" (the attention backend, bf16), "int8"
                                       # (runtime.attention_int8, Hopper), "auto": int8 on Hopper in bf16
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
    attention: str = "sdpa"            # the self-attention installed: "sdpa" or "int8"
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
        from multitalk.models.transformer import load_transformer
        from multitalk.models.vae import WanVAE
        from multitalk.runtime.attention_int8 import select_self_attention

        device = device if device is not None else resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        select_self_attention(config.attention, device, dtype)  # a bad choice fails before any file is touched
        ckpt_dir, w2v_dir, mt_dir = config.resolved_dirs()
        vae_dtype = resolve_dtype(config.vae_dtype, device)
        arch = detect_architecture(ckpt_dir)
        # With offload, models live on the CPU and are onloaded per use.
        home = torch.device("cpu") if config.offload and device.type != "cpu" else device
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
        dit = timed("transformer", lambda: load_transformer(ckpt_dir, mt_dir, arch, device=home, dtype=dtype))
        return cls.from_components(arch, text_encoder=text, image_encoder=image, vae=vae, audio_encoder=audio,
                                   transformer=dit, config=config, load_seconds=timings, device=device)

    @classmethod
    def from_components(cls, arch: Architecture, *, text_encoder, image_encoder, vae, audio_encoder,
                        transformer: torch.nn.Module, config: EngineConfig | None = None,
                        load_seconds: dict | None = None, device: torch.device | None = None) -> "Engine":
        """An engine around models already built (by :meth:`load`, or the benchmark's random
        full-size ones), with ``config``'s runtime choices applied as :meth:`load` applies them:
        device placement, backend settings, fp8, attention backend, the 8-bit self-attention
        (``config.attention``), and on CUDA (or with
        ``compile=True``) the fused DiT / VAE operations and the DiT blocks' regional compile.
        Each of these is skipped where the model already has it (a DiT compiled beforehand is not
        compiled again). ``device`` overrides ``config.device`` (rank 0 of a multi-GPU engine)."""
        config = config or EngineConfig()
        device = device if device is not None else resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        placement = Placement(device, offload=config.offload)
        configure_backends(device)
        dit, attention = prepare_dit(transformer, config, device, dtype)
        if compiles(config, device):
            from multitalk.runtime.vae_fusion import fuse_vae

            fuse_vae(vae, device=device)  # norm -> SiLU -> causal pad as one Triton kernel each (CUDA)
        return cls(arch, text_encoder, image_encoder, vae, audio_encoder, dit, device, dtype, placement,
                   load_seconds if load_seconds is not None else {}, attention)


def compiles(config: EngineConfig, device: torch.device) -> bool:
    return bool(config.compile or (config.compile is None and device.type == "cuda"))


def prepare_dit(transformer: torch.nn.Module, config: EngineConfig, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """The DiT's runtime choices of ``config`` (fp8, attention backend, 8-bit self-attention, fused
    ops, regional compile), as the engine runs it; also what each servant process of a multi-GPU
    engine applies to its own DiT. Returns ``(dit, self-attention installed)``."""
    from multitalk.runtime.attention_int8 import select_self_attention

    attention = select_self_attention(config.attention, device, dtype)
    dit = transformer.eval().requires_grad_(False)
    if config.fp8:
        from multitalk.runtime.fp8 import quantize_linears_fp8

        quantize_linears_fp8(dit)
    if config.attention_backend:
        dit.set_attention_backend(config.attention_backend)
    if attention == "int8":
        from multitalk.runtime.attention_int8 import enable_int8_self_attention

        enable_int8_self_attention(dit, device=device)  # int8 Q·Kᵀ + bf16 P·V Triton kernel in every block's self-attention
    if compiles(config, device):
        from multitalk.runtime.dit_fusion import fuse_dit

        fuse_dit(dit, device=device)  # GELU in the GEMM epilogue, q/k norm + RoPE kernel (CUDA)
        if not _blocks_compiled(dit):
            dit.compile_repeated_blocks(fullgraph=False, dynamic=False)
    return dit, attention


def load_dit(config: EngineConfig, ckpt_dir, mt_dir, arch: Architecture, device: torch.device,
             dtype: torch.dtype) -> torch.nn.Module:
    """The DiT streamed onto ``device`` and prepared as the engine runs it (a servant's load)."""
    from multitalk.models.transformer import load_transformer

    return prepare_dit(load_transformer(ckpt_dir, mt_dir, arch, device=device, dtype=dtype), config, device, dtype)[0]


def _blocks_compiled(dit: torch.nn.Module) -> bool:
    """Whether the DiT's blocks are already compiled (``nn.Module.compile`` keeps the compiled call)."""
    return any(getattr(block, "_compiled_call_impl", None) is not None for block in getattr(dit, "blocks", []))
