"""The memory plan: where each model lives, chosen at load from the device's free memory (or
``--max-vram``), the video to make and the weight format.

:func:`plan_memory` is a pure function of (budget, :class:`ModelSizes`, :class:`Workload`, options)
that returns a :class:`MemoryPlan` or raises :class:`~multitalk.errors.MemoryPlanError` (the memory
needed, the memory available and a setting to try). Tiers, fastest first:

1. everything resident on the GPU;
2. the encoders and the VAE leave the GPU between uses (CLIP, VAE, wav2vec2 copied in for each use
   from pinned host memory: 1.3 / 0.25 / 0.4 GB); the umT5 text encoder, run once per generation,
   is copied in whole when that fits beside the resident DiT, else streamed block by block, else
   run on the CPU; the whole DiT stays resident;
3. the same, with the DiT's blocks streamed from pinned host memory (``runtime.block_streaming``):
   as many blocks resident as fit (spread evenly), the rest copied in one at a time while the
   block before computes.

fp8 weight storage (``--weights fp8``) halves every block; it is chosen by the user, never by the
planner (it changes the output, 2-6e-2 relative at full size, see benchmarks/README.md). The
official ``--num_persistent_param_in_dit N`` (a parameter count) fixes the resident blocks to
``N // parameters per block``, ``--offload_model`` skips tier 1.

Working memory (activations) is estimated per phase from the H200 measurements in
``benchmarks/results`` (constants below, with the run that measured them); a phase's peak is the
resident weights + what that phase adds, and the plan must keep the largest phase under the budget
less a reserve (allocator fragmentation, cuBLAS/cuDNN workspaces).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace

import torch

from multitalk.errors import MemoryPlanError
from multitalk.models.architecture import FULL_14B
from multitalk.runtime.block_streaming import spread

GIB = 2**30

# --- working memory, bytes (bf16 compute; float32 doubles them) ---------------------------------
# Measured on the H200 (benchmarks/results/2026-12-02_nvidia-h200_probe_memory.json, "activations"
# and "vae"), each with about 10 % added. DiT forward, per token, in model widths of 2 bytes:
# (compiled, speakers) -> widths. Eager: 14.1 / 15.1 widths at 33,600 tokens (1 / 2 speakers),
# 15.2 at 75,600; regionally compiled (inductor fuses the float32 residual updates): 7.7 for both,
# with cuDNN attention. The 8-bit attention (runtime.attention_int8, the default on Hopper) adds
# its int8 copies of q and k (1 width; not measured here): 9.5 covers both.
DIT_WIDTHS_PER_TOKEN = {(False, 1): 15.5, (False, 2): 16.5, (True, 1): 9.5, (True, 2): 9.5}
# fp8 compute quantises each linear's input (an e4m3 copy; eager also a float32 one)
FP8_EXTRA_WIDTHS = {False: 6.0, True: 1.0}
DIT_FIXED = int(0.35 * GIB)            # contexts, RoPE tables, latents, guidance branches (at width 5120)
# Wan VAE (base width 96, bf16, fused): 81-frame encode / chunked decode, bytes per pixel of one
# frame: measured 8,330 / 10,600 at 640x640 and 960x960 alike.
VAE_ENCODE_PER_PIXEL = 9_200
VAE_DECODE_PER_PIXEL = 11_700
# ... and while a clip decodes, its frames gather on the GPU in float32 (the chunks, then their
# concatenation): 3 channels x 4 bytes x 2 per pixel and frame
VIDEO_BYTES_PER_PIXEL_FRAME = 24
TEXT_WORK = int(0.6 * GIB)             # umT5-XXL (width 4096) on 2 x 512 tokens: measured 0.48 GiB
CLIP_WORK = int(0.3 * GIB)             # ViT-H (width 1280)
AUDIO_WORK = int(0.25 * GIB)           # wav2vec2-base on a few seconds ...
AUDIO_WORK_PER_S = 24 * 2**20          # ... plus its convolution stack per second of speech
# the widths the constants above were taken at (smaller models scale down with their width)
REFERENCE_WIDTHS = {"dit": 5120, "vae": 96, "text": 4096, "clip": 1280}
AUDIO_REFERENCE_BYTES = 377_486_848    # chinese-wav2vec2-base in float32
RESERVE = int(0.5 * GIB)               # + RESERVE_FRACTION of the budget: fragmentation, workspaces
RESERVE_FRACTION = 0.04

COMPONENTS = ("text_encoder", "image_encoder", "vae", "audio_encoder")
SHORT = {"text_encoder": "text encoder", "image_encoder": "CLIP", "vae": "VAE", "audio_encoder": "wav2vec2"}


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of every component's weights as the engine holds them (compute dtype, float32-kept
    parameters in float32), and the numbers the working-memory estimates need."""

    dit_blocks: int
    dit_block: int                 # one block, linears in the compute dtype
    dit_block_fp8: int             # one block, linears in e4m3 (+ one float32 scale per row)
    dit_other: int                 # everything outside the blocks (embeddings, audio projection, head)
    dit_block_params: int          # parameters per block (``--num_persistent_param_in_dit``)
    dit_dim: int
    text_encoder: int
    text_blocks: int
    text_block: int
    image_encoder: int
    vae: int
    audio_encoder: int
    act_itemsize: int = 2          # bytes of the compute dtype
    vae_width: int = 96            # VAE base channels, umT5 and CLIP widths (working-memory scale)
    text_width: int = 4096
    clip_width: int = 1280

    def scale(self, part: str) -> float:
        width = {"dit": self.dit_dim, "vae": self.vae_width, "text": self.text_width, "clip": self.clip_width}[part]
        return width / REFERENCE_WIDTHS[part] * self.act_itemsize / 2

    def block(self, weights: str) -> int:
        return self.dit_block_fp8 if weights == "fp8" else self.dit_block

    @property
    def text_other(self) -> int:
        return self.text_encoder - self.text_blocks * self.text_block


@dataclass(frozen=True)
class Workload:
    """What one generation puts on the GPU: the clip's size and speakers."""

    height: int = 640
    width: int = 640
    frames: int = 81
    speakers: int = 2
    audio_seconds: float = 10.0
    vae_stride: tuple[int, int, int] = FULL_14B.vae_stride
    patch: tuple[int, int] = FULL_14B.dit.patch_size[1:]

    @property
    def tokens(self) -> int:
        t, h, w = self.vae_stride
        return ((self.frames - 1) // t + 1) * (self.height // h // self.patch[0]) * (self.width // w // self.patch[1])

    def describe(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}, {self.speakers} speaker{'s' * (self.speakers > 1)}"


# The service plans for the largest clip of the 480p buckets until a job asks for more.
DEFAULT_WORKLOAD = Workload()


@dataclass(frozen=True)
class MemoryPlan:
    budget: int                    # bytes the plan may use
    weights: str                   # DiT block storage: "bf16" (the compute dtype) or "fp8"
    num_blocks: int
    streamed: tuple[int, ...]      # DiT blocks streamed from pinned host memory
    prefetch: int                  # streamed blocks copied ahead (device slots = prefetch + 1)
    placement: dict                # component -> "gpu" | "per_use" | "streamed" | "cpu"
    phases: dict                   # phase -> estimated peak bytes
    workload: Workload
    host_bytes: int                # weights the plan keeps in (pinned) host memory
    source: str = "free memory"    # where the budget came from

    @property
    def resident_blocks(self) -> int:
        return self.num_blocks - len(self.streamed)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def all_resident(self) -> bool:
        return not self.streamed and all(v == "gpu" for v in self.placement.values())

    def summary(self) -> str:
        """The one line the CLI prints and the service logs."""
        if self.streamed:
            dit = (f"DiT {self.weights}: {self.resident_blocks}/{self.num_blocks} blocks resident, "
                   f"{len(self.streamed)} streamed")
        else:
            dit = f"DiT {self.weights}: all {self.num_blocks} blocks resident"
        groups: dict[str, list[str]] = {}
        for comp in COMPONENTS:
            groups.setdefault(self.placement[comp], []).append(SHORT[comp])
        where = {"gpu": "resident", "per_use": "per use", "streamed": "streamed", "cpu": "on the CPU"}
        others = "; ".join(f"{'/'.join(names)} {where[p]}" for p, names in groups.items())
        return (f"memory plan: {_gib(self.budget)} GiB ({self.source}) -> {dit}; {others}; "
                f"peak ~{_gib(self.peak)} GiB ({self.workload.describe()})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["workload"] = asdict(self.workload)
        d["resident_blocks"] = self.resident_blocks
        d["peak"] = self.peak
        return d


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}" if n >= 10 * GIB else f"{n / GIB:.2f}"


# --- working memory -----------------------------------------------------------------------------

def dit_work(sizes: ModelSizes, w: Workload, compiled: bool = False, fp8: bool = False) -> int:
    widths = DIT_WIDTHS_PER_TOKEN[(bool(compiled), min(max(w.speakers, 1), 2))]
    widths += FP8_EXTRA_WIDTHS[bool(compiled)] if fp8 else 0.0
    return int((w.tokens * REFERENCE_WIDTHS["dit"] * 2 * widths + DIT_FIXED) * sizes.scale("dit"))


def vae_work(sizes: ModelSizes, w: Workload, decode: bool) -> int:
    per_pixel = VAE_DECODE_PER_PIXEL if decode else VAE_ENCODE_PER_PIXEL
    video = VIDEO_BYTES_PER_PIXEL_FRAME * w.frames * w.height * w.width if decode else 0
    return int(w.height * w.width * per_pixel * sizes.scale("vae")) + video


def audio_work(sizes: ModelSizes, w: Workload) -> int:
    scale = min(1.0, sizes.audio_encoder / AUDIO_REFERENCE_BYTES) if sizes.audio_encoder else 1.0
    return int((AUDIO_WORK + AUDIO_WORK_PER_S * w.audio_seconds) * scale)


# --- the planner --------------------------------------------------------------------------------

def _phases(sizes: ModelSizes, w: Workload, weights: str, resident: int, streamed: int, prefetch: int,
            place: dict, compiled: bool = False) -> dict:
    block = sizes.block(weights)
    # what stays on the GPU through every phase
    base = sizes.dit_other + resident * block
    base += sum(getattr(sizes, c) for c in COMPONENTS if place[c] == "gpu")

    def visiting(comp: str) -> int:        # a per-use model's own weights while it runs
        return getattr(sizes, comp) if place[comp] == "per_use" else 0

    text = {"gpu": 0, "per_use": sizes.text_encoder, "cpu": 0,
            "streamed": sizes.text_other + 2 * sizes.text_block}[place["text_encoder"]]
    slots = min(prefetch + 1, streamed) * block
    return {
        "audio": base + visiting("audio_encoder") + (audio_work(sizes, w) if place["audio_encoder"] != "cpu" else 0),
        "text": base + text + (int(TEXT_WORK * sizes.scale("text")) if place["text_encoder"] != "cpu" else 0),
        "clip": base + visiting("image_encoder") + int(CLIP_WORK * sizes.scale("clip")),
        "vae_encode": base + visiting("vae") + vae_work(sizes, w, decode=False),
        "sampling": base + slots + dit_work(sizes, w, compiled, fp8=weights == "fp8"),
        "vae_decode": base + visiting("vae") + vae_work(sizes, w, decode=True),
    }


def _host_bytes(sizes: ModelSizes, weights: str, streamed: int, place: dict) -> int:
    host = streamed * sizes.block(weights)
    for comp in COMPONENTS:
        if place[comp] in ("per_use", "cpu"):
            host += getattr(sizes, comp)
        elif place[comp] == "streamed":
            host += sizes.text_encoder
    return host


def usable(budget: int) -> int:
    """What a plan may fill of ``budget``: less the reserve for fragmentation and workspaces."""
    return int(budget - RESERVE - RESERVE_FRACTION * budget)


def plan_memory(budget: int, sizes: ModelSizes, workload: Workload = DEFAULT_WORKLOAD, *, weights: str = "bf16",
                persistent_params: int | None = None, offload: bool = False, prefetch: int = 1,
                compiled: bool = False, source: str = "free memory") -> MemoryPlan:
    """The fastest plan that fits ``budget`` bytes (see the module docstring), or a
    :class:`MemoryPlanError` saying what is needed, what is available and what to try."""
    if weights not in ("bf16", "fp8"):
        raise ValueError(f"weights must be bf16 or fp8, got {weights!r}")
    limit = usable(budget)
    n = sizes.dit_blocks
    fixed = None
    if persistent_params is not None:
        fixed = max(0, min(n, int(persistent_params) // max(1, sizes.dit_block_params)))

    def attempt(place: dict, resident: int) -> MemoryPlan | None:
        streamed = n - resident
        phases = _phases(sizes, workload, weights, resident, streamed, prefetch, place, compiled)
        if max(phases.values()) > limit:
            return None
        return MemoryPlan(budget, weights, n, tuple(spread(n, streamed)), prefetch, dict(place), phases,
                          workload, _host_bytes(sizes, weights, streamed, place), source)

    candidates = []
    if not offload:
        candidates.append({c: "gpu" for c in COMPONENTS})
    for text in ("per_use", "streamed", "cpu"):
        candidates.append({"text_encoder": text, "image_encoder": "per_use", "vae": "per_use",
                           "audio_encoder": "per_use"})
    # most resident blocks first; among equal, the earlier (faster) placement
    for resident in ([fixed] if fixed is not None else range(n, -1, -1)):
        for place in candidates:
            plan = attempt(place, resident)
            if plan is not None:
                return plan
    raise _too_small(budget, sizes, workload, weights, fixed, prefetch, candidates[-1], source, compiled)


def _too_small(budget: int, sizes: ModelSizes, w: Workload, weights: str, fixed: int | None, prefetch: int,
               smallest: dict, source: str, compiled: bool) -> MemoryPlanError:
    resident = fixed or 0
    phases = _phases(sizes, w, weights, resident, sizes.dit_blocks - resident, prefetch, smallest, compiled)
    phase = max(phases, key=phases.get)
    needed = phases[phase] + (budget - usable(budget))

    def fits(**kw) -> bool:
        args = {"w": w, "weights": weights, "prefetch": prefetch, "place": smallest, "compiled": compiled, **kw}
        return _fits(budget, sizes, **args)

    if fixed:
        fix = "lower --num_persistent_param_in_dit (0 streams every block)"
        if fits(resident=0):
            fix = f"--num_persistent_param_in_dit 0 (or below {resident * sizes.dit_block_params:,})"
    elif weights == "bf16" and fits(weights="fp8"):
        fix = "--weights fp8 (half the DiT's bytes)"
    else:
        fix = _smaller_clip(budget, sizes, w, weights, prefetch, smallest, compiled)
        if fix is None:
            fix = (f"--max-vram {-(-needed // GIB)} or more" if source == "--max-vram" else
                   "a GPU with more free memory (nothing else running on it)")
    return MemoryPlanError(needed=needed, available=budget, phase=phase, fix=fix, source=source,
                           workload=w.describe())


def _fits(budget, sizes, w, weights, prefetch, place, compiled, resident=0) -> bool:
    phases = _phases(sizes, w, weights, resident, sizes.dit_blocks - resident, prefetch, place, compiled)
    return max(phases.values()) <= usable(budget)


def _smaller_clip(budget, sizes, w, weights, prefetch, place, compiled) -> str | None:
    for frames in (61, 41, 21):
        for wts in dict.fromkeys((weights, "fp8")):
            if frames < w.frames and _fits(budget, sizes, replace(w, frames=frames), wts, prefetch, place, compiled):
                extra = " and --weights fp8" if wts != weights else ""
                return f"--frame_num {frames}{extra} (shorter clips; --mode streaming keeps the whole audio)"
    if w.height * w.width > 640 * 640:
        return "--size multitalk-480"
    return None


# --- sizes of the real models ----------------------------------------------------------------------

def _bytes(named, itemsize_of) -> int:
    total, seen = 0, set()
    for name, t in named:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * itemsize_of(name, t)
    return total


def model_sizes(arch, dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype | None = None,
                audio_config=None) -> ModelSizes:
    """:class:`ModelSizes` of ``arch``'s components as ``Engine.load`` holds them (built on ``meta``:
    no memory, a few seconds); ``audio_config``: the wav2vec2 folder's ``Wav2Vec2Config`` (default:
    chinese-wav2vec2-base's)."""
    from multitalk.models.audio_encoder import build_wav2vec2_on_meta, full_size_config

    sizes = _model_sizes(arch, dtype, vae_dtype)
    audio = build_wav2vec2_on_meta(audio_config or full_size_config())
    return replace(sizes, audio_encoder=_bytes(audio.named_parameters(), lambda n, t: 4))


@functools.lru_cache(maxsize=8)
def _model_sizes(arch, dtype: torch.dtype, vae_dtype: torch.dtype | None) -> ModelSizes:
    from torch import nn

    from multitalk.models.image_encoder import build_clip_on_meta
    from multitalk.models.text_encoder import build_umt5_on_meta
    from multitalk.models.transformer import build_transformer_on_meta, keep_fp32
    from multitalk.models.vae import build_vae_model

    size = dtype.itemsize
    vae_size = (vae_dtype or dtype).itemsize
    dit = build_transformer_on_meta(arch.dit)

    def dit_item(name, t):
        return 4 if keep_fp32(name) else size

    def dit_block_named(i):
        return [(f"blocks.{i}.{n}", t) for n, t in [*dit.blocks[i].named_parameters(), *dit.blocks[i].named_buffers()]]

    block = _bytes(dit_block_named(0), dit_item)
    fp8 = block
    for name, m in dit.blocks[0].named_modules():
        if isinstance(m, nn.Linear):
            fp8 -= m.weight.numel() * size - (m.weight.numel() + 4 * m.out_features)
    everything = _bytes([*dit.named_parameters(), *dit.named_buffers()], dit_item)
    t5 = build_umt5_on_meta(arch.t5)
    t5_total = _bytes([*t5.named_parameters(), *t5.named_buffers()], lambda n, t: size)
    t5_block = _bytes([*t5.encoder.block[0].named_parameters()], lambda n, t: size)
    clip = build_clip_on_meta(arch.clip)
    clip_bytes = _bytes(clip.named_parameters(), lambda n, t: size)
    with torch.device("meta"):
        vae = build_vae_model(arch.vae)
    vae_bytes = _bytes(vae.named_parameters(), lambda n, t: vae_size)
    return ModelSizes(
        dit_blocks=len(dit.blocks), dit_block=block, dit_block_fp8=fp8,
        dit_other=everything - len(dit.blocks) * block,
        dit_block_params=sum(p.numel() for p in dit.blocks[0].parameters()), dit_dim=arch.dit.dim,
        text_encoder=t5_total, text_blocks=len(t5.encoder.block), text_block=t5_block,
        image_encoder=clip_bytes, vae=vae_bytes, audio_encoder=0, act_itemsize=size,
        vae_width=arch.vae.base_dim, text_width=arch.t5.dim, clip_width=arch.clip.dim)


def device_budget(device: torch.device, max_vram_gib: float | None = None) -> tuple[int, str]:
    """``(bytes, source)``: ``--max-vram`` when given (capped by what the device has free), else the
    device's free memory. CPU without ``--max-vram``: unlimited."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # memory this process already holds in its cache is free for the plan too
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if max_vram_gib is not None:
            asked = int(max_vram_gib * GIB)
            return (min(asked, free), "--max-vram") if asked <= free else (free, "free memory, below --max-vram")
        return free, "free memory"
    if max_vram_gib is not None:
        return int(max_vram_gib * GIB), "--max-vram"
    return 1 << 62, "no limit"


__all__ = ["DEFAULT_WORKLOAD", "GIB", "MemoryPlan", "ModelSizes", "Workload", "device_budget", "model_sizes",
           "plan_memory", "usable"]
