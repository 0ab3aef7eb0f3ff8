"""The loaded model stack: text, image and audio encoders, VAE and the MultiTalk DiT.

``Engine.load(...)`` takes the model folders as the official README downloads them (or
``preset="tiny"``, the project's own small random weights in the same layout) and loads every
component through its streaming loader. An engine is loaded once and reused for many generations
(the CLI loads one per run; the service's worker keeps one for its lifetime).

LoRAs (``EngineConfig.loras``) are merged into the DiT right after it is loaded and before fp8
quantisation, compile and offload (:func:`prepare_dit`), so they cost nothing per step.
:meth:`Engine.use_loras` switches a loaded engine to another LoRA set (the service, per job).

The memory plan (``runtime.memory_plan``) is made before anything is loaded: the DiT blocks it
streams load into host memory, the rest onto the GPU, models it keeps off the GPU onto the CPU;
``--weights fp8`` quantises the block weights as they are read (after a LoRA merge when there are
LoRAs); :meth:`Engine.apply_plan` installs the placement, :meth:`Engine.fit` re-plans for a job.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from multitalk.errors import UserInputError
from multitalk.models.architecture import Architecture, detect_architecture
from multitalk.models.lora import LoraReport, LoraSpec, check_loras, lora_signature
from multitalk.runtime.memory_plan import MemoryPlan, Workload
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
    vae_dtype: str = "auto"            # "auto": the same as ``dtype`` (float32 with --dtype float32)
    offload: bool = False              # onload each model only while it runs (the official --offload_model)
    fp8: bool = False                  # fp8 compute: row-wise fp8 feed-forward linears in the DiT blocks
    weights: str = "auto"              # DiT block storage: "auto"/"bf16" (the compute dtype) or "fp8" (e4m3)
    fp8_matmul: bool | None = None     # stored fp8 linears through _scaled_mm (None: where the GPU has it)
    max_vram_gib: float | None = None  # memory budget; None: the device's free memory
    num_persistent_param_in_dit: int | None = None  # official: DiT parameters kept on the GPU (0: stream all)
    workload: Workload | None = None   # the clip to plan memory for (None: the largest 480p clip)
    plan_memory: bool | None = None    # None: on CUDA, or when max_vram / num_persistent is given
    compile: bool | None = None        # regional torch.compile of the DiT blocks + fused VAE element-wise
                                       # chains (runtime.vae_fusion); None: on for CUDA
    attention_backend: str | None = None  # diffusers attention backend name, e.g. "_native_cudnn"
    attention: str = "auto"            # DiT self-attention: "sdpa" (the attention backend, bf16), "int8"
                                       # (runtime.attention_int8, Hopper), "auto": int8 on Hopper in bf16
    loras: tuple[LoraSpec, ...] = ()   # merged into the DiT at load, in this order (before fp8/compile)
    gpus: int = 1                      # processes (one GPU each) for the DiT; >1: pipeline.parallel
    parallel: str = "auto"             # with gpus > 1: "auto", "ulysses" or "cfg" (runtime.parallel.plan)

    def check(self) -> tuple[torch.device, torch.dtype, torch.dtype]:
        """Everything that can be checked without loading (folders, device, dtypes, attention), as
        one-line :class:`UserInputError` s; returns ``(device, dtype, vae_dtype)``."""
        from multitalk.runtime.attention_int8 import select_self_attention

        folders = (("ckpt_dir", self.ckpt_dir), ("wav2vec_dir", self.wav2vec_dir),
                   ("multitalk_dir", self.multitalk_dir))
        if self.preset is not None:
            if self.preset != "tiny":
                raise UserInputError("preset", f"unknown preset {self.preset!r}", "use --preset tiny")
            given = [name for name, p in folders if p is not None]
            if given:
                raise UserInputError("preset", f"--preset tiny brings its own weights, so --{given[0]} would be "
                                     "ignored", f"drop --preset to load the folders, or drop --{given[0]}")
        else:
            for name, p in folders:
                if p is not None and not Path(p).is_dir():
                    raise UserInputError(name, f"folder {p} does not exist", "check the path")
            if self.ckpt_dir is None:
                raise UserInputError("ckpt_dir", "no model folder given",
                                     "pass --ckpt-dir Wan2.1-I2V-14B-480P (and --wav2vec-dir), or --preset tiny")
            if self.wav2vec_dir is None:
                raise UserInputError("wav2vec_dir", "no wav2vec2 folder given",
                                     "pass --wav2vec-dir chinese-wav2vec2-base")
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        vae_dtype = (dtype if self.vae_dtype in (None, "", "auto")
                     else resolve_dtype(self.vae_dtype, device, field="vae_dtype"))
        select_self_attention(self.attention, device, dtype)
        return device, dtype, vae_dtype

    def resolved_dirs(self) -> tuple[Path, Path, Path | None]:
        self.check()
        return self._folders()

    def _folders(self) -> tuple[Path, Path, Path | None]:
        """The model folders (the tiny ones written once), for a config already :meth:`check` ed."""
        if self.preset is not None:
            from multitalk.models.tiny import default_tiny_dir, write_tiny_checkpoints

            ckpt, w2v = write_tiny_checkpoints(default_tiny_dir())
            return Path(ckpt), Path(w2v), None
        return Path(self.ckpt_dir), Path(self.wav2vec_dir), (
            Path(self.multitalk_dir) if self.multitalk_dir else None)

    def check_loras(self, loras: Sequence[LoraSpec] | None = None, arch: Architecture | None = None) -> None:
        """Check LoRA files (keys, shapes; headers only) against this checkpoint's DiT, before loading it
        (``arch``: the checkpoint's architecture, when the caller has already detected it)."""
        from multitalk.models.transformer import build_transformer_on_meta

        loras = self.loras if loras is None else loras
        if loras:
            arch = arch or detect_architecture(self.resolved_dirs()[0])
            check_loras(build_transformer_on_meta(arch.dit), loras)


def load_dit(config: EngineConfig, ckpt_dir: Path, multitalk_dir: Path | None, arch: Architecture,
             device: torch.device, dtype: torch.dtype, home: torch.device,
             timings: dict | None = None, plan: MemoryPlan | None = None) -> tuple[torch.nn.Module, LoraReport, str]:
    """The DiT as the engine runs it: loaded on ``home`` (with a ``plan``: its streamed blocks into
    host memory, the rest onto ``device``), then :func:`prepare_dit`;
    ``(dit, LoRA report, self-attention installed)``."""
    from multitalk.models.transformer import load_transformer

    timings = {} if timings is None else timings
    quantizer = _load_quantizer(config)
    t0 = time.perf_counter()
    dit = load_transformer(ckpt_dir, multitalk_dir, arch, device=device if plan is not None else home, dtype=dtype,
                           host_blocks=plan.streamed if plan is not None else (), transform=quantizer)
    timings["transformer"] = time.perf_counter() - t0
    log.info("loaded transformer in %.1fs", timings["transformer"])
    report, attention = prepare_dit(dit, config, device, dtype, timings,
                                    fp8_scales=quantizer.scales if quantizer else None)
    return dit, report, attention


def _load_quantizer(config: EngineConfig):
    """``--weights fp8`` without LoRAs: quantise the block weights as they are read, so that neither
    host nor device memory ever holds the whole DiT in bf16. With LoRAs the merge needs the bf16
    weights: they load in bf16 and are quantised after the merge (:func:`prepare_dit`)."""
    if _weights_format(config.weights) != "fp8" or config.loras:
        return None
    from multitalk.runtime.fp8 import LoadQuantizer

    return LoadQuantizer()


def prepare_dit(dit: torch.nn.Module, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                timings: dict | None = None, fp8_scales: dict | None = None) -> tuple[LoraReport, str]:
    """What the engine does to a freshly built DiT, in this order: ``config.loras`` merged (float32
    sums on ``device``), fp8 weight storage (``config.weights``) or compute (``config.fp8``), the
    attention backend, the 8-bit self-attention (``config.attention``), and on CUDA (or with
    ``compile=True``) the fused DiT operations and the blocks' regional compile (skipped where
    already compiled). Merge first, quantise after: a LoRA costs nothing per step.
    Returns the LoRA report and the self-attention installed (``"sdpa"`` / ``"int8"``).
    """
    from multitalk.models.lora import apply_loras
    from multitalk.runtime.attention_int8 import select_self_attention

    attention = select_self_attention(config.attention, device, dtype)
    dit.eval().requires_grad_(False)
    report = apply_loras(dit, config.loras, compute_device=device)
    if config.loras and timings is not None:
        timings["lora_read"], timings["lora_merge"] = report.read_s, report.merge_s
    compiled = compiles(config, device)
    prepare_transformer(dit, device, dtype, weights=_weights_format(config.weights), fp8=config.fp8,
                        fp8_matmul=config.fp8_matmul, attention_backend=config.attention_backend,
                        attention=attention, compile=compiled, fp8_scales=fp8_scales)
    return report, attention


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
    config: EngineConfig | None = None      # the runtime choices it was built with
    lora_report: LoraReport = field(default_factory=LoraReport)  # the LoRAs merged into the DiT
    plan: MemoryPlan | None = None     # where each model lives (None: where it was loaded)
    sizes: object = None               # runtime.memory_plan.ModelSizes the plan was made with
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

        checked, dtype, vae_dtype = config.check()  # folders, device, dtypes, attention: before any file is touched
        device = device if device is not None else checked
        ckpt_dir, w2v_dir, mt_dir = config._folders()
        arch = detect_architecture(ckpt_dir)
        config.check_loras(arch=arch)  # a bad LoRA file fails before any model is read
        weights = _weights_format(config.weights)
        offload = config.offload and device.type != "cpu"
        compiled = compiles(config, device)
        # the memory plan decides where each model lives before anything is loaded, so that nothing
        # is loaded twice (streamed blocks go to host memory, resident ones straight to the GPU)
        sizes = None
        if _wants_plan(config, device):
            from multitalk.runtime.memory_plan import model_sizes

            sizes = model_sizes(arch, dtype, vae_dtype, _audio_config(w2v_dir))
        plan = _plan_for(config, arch, device, sizes, weights, compiled)
        if plan is not None:
            log.info(plan.summary())

        def home(component: str) -> torch.device:
            if plan is None:  # without a plan, --offload_model loads on the CPU and onloads per use
                return torch.device("cpu") if offload else device
            return device if plan.placement[component] == "gpu" else torch.device("cpu")

        timings = {}

        def timed(name, fn):
            t0 = time.perf_counter()
            out = fn()
            timings[name] = time.perf_counter() - t0
            log.info("loaded %s in %.1fs", name, timings[name])
            return out

        text = timed("text_encoder", lambda: TextEncoder.from_checkpoint(ckpt_dir, arch, device=home("text_encoder"),
                                                                         dtype=dtype))
        image = timed("image_encoder", lambda: ImageEncoder.from_checkpoint(ckpt_dir, arch, device=home("image_encoder"),
                                                                            dtype=dtype))
        vae = timed("vae", lambda: WanVAE.from_checkpoint(ckpt_dir, arch, device=home("vae"), dtype=vae_dtype))
        audio = timed("audio_encoder", lambda: AudioEncoder.from_pretrained(w2v_dir, device=home("audio_encoder"),
                                                                             dtype=torch.float32))
        dit_home = device if plan is not None or not offload else torch.device("cpu")
        quantizer = _load_quantizer(config)
        dit = timed("transformer", lambda: load_transformer(ckpt_dir, mt_dir, arch, device=dit_home, dtype=dtype,
                                                            host_blocks=plan.streamed if plan else (),
                                                            transform=quantizer))
        return cls.from_components(arch, text_encoder=text, image_encoder=image, vae=vae, audio_encoder=audio,
                                   transformer=dit, config=config, load_seconds=timings, plan=plan, sizes=sizes,
                                   fp8_scales=quantizer.scales if quantizer else None,
                                   device=device)

    @classmethod
    def from_components(cls, arch: Architecture, *, text_encoder, image_encoder, vae, audio_encoder,
                        transformer: torch.nn.Module, config: EngineConfig | None = None,
                        load_seconds: dict | None = None, plan: MemoryPlan | None = None, sizes=None,
                        fp8_scales: dict | None = None, device: torch.device | None = None) -> "Engine":
        """An engine around models already built (by :meth:`load`, or the benchmark's random
        full-size ones), with ``config``'s runtime choices applied as :meth:`load` applies them:
        backend settings, the DiT prepared by :func:`prepare_dit` (``config.loras`` merged, fp8
        weights or compute, attention backend, the 8-bit self-attention (``config.attention``), on
        CUDA or with ``compile=True`` the fused DiT operations and the blocks' regional compile), the
        fused VAE, then the memory ``plan``'s placement (none: every model stays where it is). Each
        of these is skipped where the model already has it (a DiT compiled beforehand is not
        compiled again). ``device`` overrides ``config.device`` (rank 0 of a multi-GPU engine)."""
        config = config or EngineConfig()
        device = device if device is not None else resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        placement = Placement(device, offload=config.offload)
        configure_backends(device, float32=torch.float32 in (dtype, _vae_dtype(vae)))
        load_seconds = load_seconds if load_seconds is not None else {}
        lora_report, attention = prepare_dit(transformer, config, device, dtype, load_seconds, fp8_scales=fp8_scales)
        if compiles(config, device):
            from multitalk.runtime.vae_fusion import fuse_vae

            fuse_vae(vae, device=device)  # norm -> SiLU -> causal pad as one Triton kernel each (CUDA)
        engine = cls(arch, text_encoder, image_encoder, vae, audio_encoder, transformer, device, dtype, placement,
                     load_seconds, attention=attention, config=config, lora_report=lora_report, plan=plan,
                     sizes=sizes)
        if plan is not None:
            engine.apply_plan(plan)
        return engine

    def use_loras(self, loras: Sequence[LoraSpec]) -> bool:
        """Make ``loras`` (files, scales, order) the LoRAs merged into the DiT; True if it was reloaded.

        The same set (by content hash and scale) as the one merged costs nothing. Another set
        reloads the DiT through :func:`load_dit`, as :meth:`load` did: a merge is not undone in
        place (a bf16 weight rounded after adding a delta is not restored by subtracting it, and an
        fp8-quantised one has no bf16 copy left), so the next job never inherits the previous
        job's merge. The new files are checked against the architecture first (a bad file keeps
        the current DiT), and the old DiT is freed before the new one loads (never two on the GPU).
        """
        loras = tuple(LoraSpec.of(x) for x in loras)
        wanted = lora_signature(loras)
        if self.transformer is not None and wanted == self.lora_report.signature:
            return False
        if self.parallel is not None:  # the servants' DiTs were prepared at start and are not reloaded
            raise UserInputError("loras", "a multi-GPU engine keeps the LoRAs it was started with "
                                 f"({len(self.lora_report.files)} file(s))",
                                 "start it with these LoRAs (--lora_dir), or run this job on one GPU")
        if self.config is None or (self.config.preset is None and self.config.ckpt_dir is None):
            raise RuntimeError("this engine was built from components and cannot reload its DiT for other LoRAs")
        config = replace(self.config, loras=loras)
        config.check_loras(arch=self.arch)
        ckpt_dir, _, mt_dir = config.resolved_dirs()
        home = torch.device("cpu") if self.placement.offload and self.device.type != "cpu" else self.device
        if self.transformer is not None:
            self.placement.forget(self.transformer)     # its pinned host copies and device slots go too
        self.transformer, self.lora_report = None, LoraReport()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        timings: dict = {}
        t0 = time.perf_counter()
        self.transformer, self.lora_report, self.attention = load_dit(config, ckpt_dir, mt_dir, self.arch,
                                                                      self.device, self.dtype, home, timings,
                                                                      plan=self.plan)
        self.config = config
        if self.plan is not None:
            self.apply_plan(self.plan)
        self.load_seconds.update({f"reload_{k}": v for k, v in timings.items()})
        log.info("DiT reloaded for %d LoRA file(s) in %.1fs", len(loras), time.perf_counter() - t0)
        return True

    # -- memory ----------------------------------------------------------------------------------

    def apply_plan(self, plan: MemoryPlan) -> None:
        """Place the models as ``plan`` says (moving blocks between the GPU and pinned host memory)."""
        t5 = self.text_encoder.model
        self.placement.apply(plan, dit=self.transformer, text_encoder=t5, image_encoder=self.image_encoder,
                             vae=self.vae, audio_encoder=self.audio_encoder.model,
                             text_blocks=(t5.encoder.block, "encoder.block."))
        self.plan = plan

    def fit(self, workload: Workload) -> MemoryPlan | None:
        """Before sampling: make sure ``workload`` fits the memory plan, re-planning (and moving
        blocks) when it needs more than the plan was made for; raises ``MemoryPlanError`` when no
        plan fits. Without a plan (CPU), nothing happens."""
        if self.plan is None or self.config is None:
            return None
        plan = self.plan
        if _covers(plan, workload):
            return plan
        new = _plan_for(self.config, self.arch, self.device, self.sizes, plan.weights, _blocks_compiled(self.transformer),
                        workload=workload, budget=plan.budget, source=plan.source)
        if new.streamed != plan.streamed or new.placement != plan.placement:
            log.info("re-planned for %s: %s", workload.describe(), new.summary())
            self.apply_plan(new)
        self.plan = new
        return new


def prepare_transformer(dit: torch.nn.Module, device: torch.device, dtype: torch.dtype, *, weights: str = "bf16",
                        fp8: bool = False, fp8_matmul: bool | None = None, attention_backend: str | None = None,
                        attention: str = "sdpa", compile: bool = False, fp8_scales: dict | None = None) -> None:
    """Everything ``Engine.load`` does to a loaded DiT: fp8 storage / compute, attention backend,
    fused operations and regional compile (the benchmark applies it to its random-weight DiT)."""
    from multitalk.runtime.fp8 import (block_linears_filter, ffn_fp8_filter, quantize_linears_fp8,
                                       scaled_mm_supported, set_fp8_matmul)

    if weights == "fp8" or fp8:
        # --weights fp8 stores every block linear in e4m3; --fp8 alone the feed-forward ones
        quantize_linears_fp8(dit, block_linears_filter if weights == "fp8" else ffn_fp8_filter, out_dtype=dtype,
                             scales=fp8_scales)
        use_mm = scaled_mm_supported(device) if fp8_matmul is None else bool(fp8_matmul)
        if use_mm and not scaled_mm_supported(device):
            raise UserInputError("fp8_matmul", f"{device} has no fp8 matmul (_scaled_mm needs CUDA compute "
                                 "capability 8.9+: Ada or Hopper)", "leave --fp8-matmul off (weights are "
                                 "dequantised per layer)")
        set_fp8_matmul(dit, "scaled_mm" if use_mm else "dequant")
    if attention_backend:
        dit.set_attention_backend(attention_backend)
    if attention == "int8":
        from multitalk.runtime.attention_int8 import enable_int8_self_attention

        enable_int8_self_attention(dit, device=device)  # int8 Q·Kᵀ + bf16 P·V Triton kernel in every block's self-attention
    if compile:
        from multitalk.runtime.dit_fusion import fuse_dit

        fuse_dit(dit, device=device)  # GELU in the GEMM epilogue, q/k norm + RoPE kernel (CUDA)
        if not _blocks_compiled(dit):
            dit.compile_repeated_blocks(fullgraph=False, dynamic=False)


def _weights_format(name: str | None) -> str:
    name = (name or "auto").lower()
    if name in ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"):
        return "bf16"   # the compute dtype (the plan's "bf16" means "not quantised")
    if name in ("fp8", "e4m3", "float8"):
        return "fp8"
    raise UserInputError("weights", f"unknown weight format {name!r}", "use --weights bf16 or --weights fp8")


def _vae_dtype(vae) -> torch.dtype | None:
    model = getattr(vae, "model", vae)
    return next(model.parameters()).dtype if isinstance(model, torch.nn.Module) else None


def compiles(config: EngineConfig, device: torch.device) -> bool:
    return bool(config.compile or (config.compile is None and device.type == "cuda"))


def _blocks_compiled(dit: torch.nn.Module) -> bool:
    """Whether the DiT's blocks are already compiled (``nn.Module.compile`` keeps the compiled call)."""
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in getattr(dit, "blocks", []))


def _covers(plan: MemoryPlan, w: Workload) -> bool:
    """Does the plan's workload need at least as much as ``w`` in every phase that depends on it?"""
    p = plan.workload
    return (w.tokens <= p.tokens and w.height * w.width <= p.height * p.width and w.speakers <= p.speakers
            and w.audio_seconds <= p.audio_seconds)


def _wants_plan(config: EngineConfig, device: torch.device) -> bool:
    if config.plan_memory is not None:
        return config.plan_memory
    return device.type == "cuda" or config.max_vram_gib is not None or config.num_persistent_param_in_dit is not None


def _plan_for(config: EngineConfig, arch: Architecture, device: torch.device, sizes, weights: str, compiled: bool,
              *, workload: Workload | None = None, budget: int | None = None, source: str | None = None
              ) -> MemoryPlan | None:
    from multitalk.runtime.memory_plan import DEFAULT_WORKLOAD, device_budget, plan_memory

    if sizes is None:
        return None
    if budget is None:
        budget, source = device_budget(device, config.max_vram_gib)
    workload = workload or config.workload or DEFAULT_WORKLOAD
    workload = Workload(workload.height, workload.width, workload.frames, workload.speakers, workload.audio_seconds,
                        tuple(arch.vae_stride), tuple(arch.dit.patch_size[1:]))
    return plan_memory(budget, sizes, workload, weights=weights, persistent_params=config.num_persistent_param_in_dit,
                       offload=config.offload, compiled=compiled, source=source or "free memory")


def _audio_config(w2v_dir: Path | None):
    if w2v_dir is None:
        return None
    try:
        from transformers import Wav2Vec2Config

        return Wav2Vec2Config.from_pretrained(str(w2v_dir))
    except Exception:  # the load itself reports a broken folder
        return None
