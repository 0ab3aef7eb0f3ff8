"""GPU benchmark of the MultiTalk DiT and of one clip end to end, on random weights.

    python benchmarks/bench.py --out-dir benchmarks/results [--sections ceilings,forward,...] [--tiny-cpu]

Everything is built with random weights (no checkpoint is needed): official-key tensors are drawn
on the device and streamed through the project's own loaders (``load_converted`` with the DiT,
umT5, CLIP, VAE and wav2vec2 converters), so dtypes and layouts are those of a real load. One
invocation runs the sections in this order, each in its own try/except (an error is recorded in
the report and the run goes on), and rewrites the JSON report after every measurement:

* ``ceilings``  matmul bf16/fp8 rates, SDPA rate per backend, H2D copy (``ceilings.py``)
* ``forward``   DiT forward at 640x640x81 (33600 tokens), 1 and 2 speakers, FLOPs + MFU,
                plus one timing per ``--attention-backends`` variant
* ``teacache``  forwards TeaCache skips over a 40-step schedule (shift 7) at 0.2 / 0.3
* ``fp8``       row-wise fp8 linears: time and relative L2 error against the bf16 output
* ``baseline``  diffusers' plain ``WanTransformer3DModel`` (Wan2.1 I2V-14B config), same inputs
* ``compile``   regional ``compile_repeated_blocks``: compile time and compiled forward
* ``compiled_extra``  the compiled model: 2 speakers, kernel breakdown, fp8 variants
* ``vae``       full-size VAE encode (81 frames) and chunked decode (21 latent frames): as loaded,
                channels-last probe, ``runtime.vae_fusion``; times, kernel breakdowns, relative error
* ``clip4``     one 81-frame clip at 4 steps through ``pipeline.generate`` (+ mp4), per stage

``--tiny-cpu`` runs the same code on CPU with the TINY architecture and a 9-frame 32x32 video in seconds
(CUDA-only figures stay NaN). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import multitalk  # noqa: F401
except ImportError:  # a bare checkout (the GPU image): use the source tree
    sys.path.insert(0, str(HERE.parent / "src"))
import flops as flop_count  # noqa: E402  (benchmarks/flops.py)

from multitalk.models.architecture import FULL_14B, TINY, Architecture  # noqa: E402

SECTIONS = ("ceilings", "forward", "teacache", "fp8", "baseline", "compile", "compiled_extra", "vae", "clip4")
NAN = float("nan")
GIB = 2**30

# Every top-level figure the report always carries (NaN until measured).
HEADLINE_KEYS = (
    "forward_bf16_1spk_s", "forward_bf16_2spk_s", "forward_fp8_1spk_s", "fp8_rel_err", "floor_bf16_1spk_s",
    "diffusers_base_forward_s", "clip4_total_s", "clip4_dit_s", "peak_mem_gib_1spk",
    "forward_over_floor", "forward_over_diffusers", "spk2_over_spk1", "fp8_over_bf16", "clip4_non_dit_share",
)


class Skipped(Exception):
    """A section (or variant) left out, e.g. for lack of time; recorded, not an error."""


# ----------------------------------------------------------------------------------------------
# Setting and report


@dataclass
class Setting:
    """What one run measures: architecture, device, dtype and the video geometry."""

    arch: Architecture
    device: torch.device
    dtype: torch.dtype
    height: int = 640
    width: int = 640
    frames: int = 81
    text_tokens: int = 200
    tiny: bool = False

    @property
    def latent_grid(self) -> tuple[int, int, int]:
        t, h, w = self.arch.vae_stride
        return (self.frames - 1) // t + 1, self.height // h, self.width // w

    @property
    def tokens(self) -> int:
        t, h, w = self.latent_grid
        _, ph, pw = self.arch.dit.patch_size
        return t * (h // ph) * (w // pw)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


class Report:
    """The JSON report, rewritten atomically after every measurement (a timeout keeps the data)."""

    def __init__(self, out_dir: Path, device_name: str):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"{dt.date.today().isoformat()}_{slug(device_name)}.json"
        self.data: dict = {"gpu": device_name, "tokens": None, **{k: NAN for k in HEADLINE_KEYS},
                           "sections": {}, "errors": {}, "skipped": {}}

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {})

    def set(self, **values) -> None:
        self.data.update(values)
        self.save()

    def save(self) -> None:
        self._derive()
        tmp = self.path.with_suffix(".json.part")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, self.path)

    def _derive(self) -> None:
        """Floor and ratios from whatever has been measured so far."""
        d = self.data
        sec = d["sections"]
        # counted by the forward section; without it (a run of chosen sections) the analytic count,
        # which matches the counted one to 1e-6 (flops_1spk vs flops_1spk_analytic in any full run)
        counted = sec.get("forward", {}).get("flops_1spk")
        fl = counted or d.get("flops_1spk_analytic", {})
        d["floor_flops_from"] = "counted" if counted else "analytic"
        ceil = sec.get("ceilings", {})
        sdpa, mm = ceil.get("sdpa_best_tflops", NAN), ceil.get("matmul_bf16_tflops", NAN)
        if fl and isinstance(sdpa, float) and isinstance(mm, float):
            d["floor_bf16_1spk_s"] = fl["attention"] / (sdpa * 1e12) + fl["other"] / (mm * 1e12)
        if fl and isinstance(mm, float):
            d["mfu_bf16_1spk"] = fl["total"] / d["forward_bf16_1spk_s"] / (mm * 1e12)
        d["forward_over_floor"] = _ratio(d["forward_bf16_1spk_s"], d["floor_bf16_1spk_s"])
        d["forward_over_diffusers"] = _ratio(d["forward_bf16_1spk_s"], d["diffusers_base_forward_s"])
        d["spk2_over_spk1"] = _ratio(d["forward_bf16_2spk_s"], d["forward_bf16_1spk_s"])
        d["fp8_over_bf16"] = _ratio(d["forward_fp8_1spk_s"], d["forward_bf16_1spk_s"])
        d["clip4_non_dit_share"] = 1.0 - _ratio(d["clip4_dit_s"], d["clip4_total_s"])
        # the production path (compiled; --fp8 is measured compiled): the same ratios
        comp1, comp2 = d.get("forward_bf16_1spk_compiled_s", NAN), d.get("forward_bf16_2spk_compiled_s", NAN)
        d["compiled_over_floor"] = _ratio(comp1, d["floor_bf16_1spk_s"])
        d["compiled_over_diffusers"] = _ratio(comp1, d["diffusers_base_forward_s"])
        d["compiled_spk2_over_spk1"] = _ratio(comp2, comp1)
        d["fp8_over_compiled_bf16"] = _ratio(d["forward_fp8_1spk_s"], comp1)


def _ratio(a, b) -> float:
    try:
        return float(a) / float(b)
    except (TypeError, ZeroDivisionError):
        return NAN


def _jsonable(obj):
    if isinstance(obj, torch.dtype | torch.device):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return repr(obj)


def environment(setting: Setting) -> dict:
    import diffusers
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "arch": setting.arch.name, "device": str(setting.device), "dtype": str(setting.dtype),
           "video": [setting.frames, setting.height, setting.width], "latent_grid": list(setting.latent_grid),
           "text_tokens": setting.text_tokens, "torch_threads": torch.get_num_threads()}
    if setting.device.type == "cuda":
        p = torch.cuda.get_device_properties(setting.device)
        env.update(gpu_memory_gib=p.total_memory / GIB, sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}")
    return env


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeat: int = 3
            ) -> tuple[dict, object]:
    """Median/min seconds of ``fn()`` after ``warmup`` calls (CUDA events on GPU); also the last output."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}, out


class StageTimer:
    """Accumulates wall seconds per stage; each timed call is synchronised on both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)
        return timed

    def wrap_iter(self, name: str, fn: Callable) -> Callable:
        """Time the production of each item of the iterator ``fn`` returns (not the consumer's work)."""
        def timed(*args, **kwargs):
            it = iter(fn(*args, **kwargs))
            while True:
                with self.stage(name):
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                yield item
        return timed

    @contextlib.contextmanager
    def module(self, name: str, module: torch.nn.Module) -> Iterator[None]:
        """Time every forward of ``module`` (forward pre/post hooks) while inside the block."""
        starts: list[float] = []

        def pre(*_):
            sync(self.device)
            starts.append(time.perf_counter())

        def post(*_):
            sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - starts.pop()
            self.calls[name] = self.calls.get(name, 0) + 1

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Random weights through the real loaders


def random_items(component: str, shapes: dict, device: torch.device, seed: int,
                 keep: Callable[[str], bool] = lambda key: True) -> Iterator[tuple[str, torch.Tensor, str]]:
    """``(official key, random float32 tensor, "<random>")`` one at a time, drawn on ``device``.

    Small tensors follow the golden tiny scheme exactly (``tiny.init_tensor``, CPU); large ones
    (weights / embeddings) are ``N(0, 1/fan_in)`` (embeddings ``N(0, 1/width)``) drawn on the device,
    which keeps activations of the deep random model in range.
    """
    from multitalk.models.tiny import init_tensor

    cpu_gen = torch.Generator(device="cpu").manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)
    for key, shape in shapes.items():
        if not keep(key):
            continue
        shape = tuple(shape)
        if math.prod(shape) <= 2_000_000:
            value = init_tensor(component, key, shape, cpu_gen).to(device)
        else:
            last = shape[-1] if ("embedding" in key or key.endswith("modulation")) else math.prod(shape[1:])
            value = torch.randn(shape, generator=dev_gen, device=device, dtype=torch.float32)
            value.mul_(1.0 / math.sqrt(last))
        yield key, value, "<random>"


def check_full_size_layouts() -> dict[str, str]:
    """Dry-run the full-size random key streams through the loaders on ``meta`` (no memory, CPU).

    Catches a key/shape disagreement between ``tiny.*_key_shapes(FULL_14B)`` and the loaders
    before any GPU time is spent; returns ``{component: load summary}``, raises on a mismatch.
    """
    from multitalk.models import tiny
    from multitalk.models.audio_encoder import build_wav2vec2_on_meta, full_size_config, load_wav2vec2_weights
    from multitalk.models.checkpoint import build_on_meta, load_converted, meta_items
    from multitalk.models.image_encoder import build_clip_on_meta, load_clip_weights
    from multitalk.models.text_encoder import build_umt5_on_meta, load_t5_weights
    from multitalk.models.transformer import build_transformer_on_meta, convert_dit_key
    from multitalk.models.vae import build_vae_model, load_vae_weights

    arch = FULL_14B
    clip = {k: v for k, v in tiny.clip_key_shapes(arch.clip, tiny.CLIPTextTower()).items() if k.startswith("visual.")}
    reports = [
        load_converted(build_transformer_on_meta(arch.dit), meta_items(tiny.dit_key_shapes(arch.dit)), convert_dit_key,
                       component="transformer", dry_run=True),
        load_t5_weights(build_umt5_on_meta(arch.t5), meta_items(tiny.t5_key_shapes(arch.t5)), dry_run=True),
        load_clip_weights(build_clip_on_meta(arch.clip), meta_items(clip), arch.clip, dry_run=True),
        load_vae_weights(build_on_meta(lambda: build_vae_model(arch.vae)), meta_items(tiny.vae_key_shapes(arch.vae)),
                         arch.vae, dry_run=True),
        load_wav2vec2_weights(build_wav2vec2_on_meta(full_size_config()),
                              meta_items(tiny.wav2vec2_key_shapes(tiny.Wav2Vec2Numbers())), dry_run=True),
    ]
    bad = [r.summary() for r in reports if not r.ok]
    if bad:
        raise RuntimeError("full-size random layouts do not load: " + "; ".join(bad))
    return {r.component: r.summary() for r in reports}


def restore_modules(model: torch.nn.Module, originals: dict[str, torch.nn.Module]) -> None:
    """Put back modules replaced in place (e.g. by ``quantize_linears_fp8``), by qualified name."""
    for name, module in originals.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module)


def assert_materialized(model: torch.nn.Module, what: str) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"{what}: tensors left on meta after the random load: {left[:5]}")


def build_dit(s: Setting, seed: int = 1):
    """The MultiTalk DiT with random weights, loaded like ``load_transformer`` does."""
    from multitalk.models.checkpoint import load_converted
    from multitalk.models.tiny import dit_key_shapes
    from multitalk.models.transformer import build_transformer_on_meta, convert_dit_key, keep_fp32

    model = build_transformer_on_meta(s.arch.dit)
    load_converted(model, random_items("dit", dit_key_shapes(s.arch.dit), s.device, seed), convert_dit_key,
                   component="transformer", dtype=s.dtype, keep_fp32=keep_fp32, device=s.device)
    model.rope.reset_tables(s.device)
    assert_materialized(model, "transformer")
    return model.eval().requires_grad_(False)


def build_wan_baseline(s: Setting, seed: int = 7):
    """diffusers' plain ``WanTransformer3DModel`` with the Wan2.1 I2V config of ``s.arch``, random weights."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformer3DModel

    from multitalk.models.checkpoint import build_on_meta, load_converted

    d = s.arch.dit
    kwargs = dict(patch_size=tuple(d.patch_size), num_attention_heads=d.num_heads,
                  attention_head_dim=d.dim // d.num_heads, in_channels=d.in_dim, out_channels=d.out_dim,
                  text_dim=d.text_dim, freq_dim=d.freq_dim, ffn_dim=d.ffn_dim, num_layers=d.num_layers,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=d.eps, image_dim=d.clip_dim,
                  added_kv_proj_dim=d.dim, rope_max_seq_len=1024)
    model = build_on_meta(lambda: WanTransformer3DModel(**kwargs))
    keep = tuple(model._keep_in_fp32_modules or ())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    load_converted(model, random_items("baseline", shapes, s.device, seed), lambda k, t: [(k, t)],
                   component="wan baseline", dtype=s.dtype, keep_fp32=lambda n: any(p in n for p in keep),
                   device=s.device)
    with torch.device("cpu"):
        rope = WanRotaryPosEmbed(d.dim // d.num_heads, tuple(d.patch_size), 1024)
    model.rope = rope.to(s.device)
    assert_materialized(model, "wan baseline")
    return model.eval().requires_grad_(False), kwargs


def build_engine(s: Setting, dit, seed: int = 11):
    """A pipeline ``Engine`` of random-weight encoders + VAE around ``dit`` (tiny tokenizer: offline)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

    from multitalk.models import tiny
    from multitalk.models.audio_encoder import (AudioEncoder, build_wav2vec2_on_meta, full_size_config,
                                                load_wav2vec2_weights)
    from multitalk.models.checkpoint import build_on_meta
    from multitalk.models.image_encoder import ImageEncoder, build_clip_on_meta, load_clip_weights
    from multitalk.models.text_encoder import TextEncoder, build_umt5_on_meta, load_t5_tokenizer, load_t5_weights
    from multitalk.pipeline.engine import Engine
    from multitalk.runtime.placement import Placement, configure_backends
    from multitalk.runtime.vae_fusion import fuse_vae

    arch, dev = s.arch, s.device
    seconds = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        seconds[name] = time.perf_counter() - t0
        return out

    def text():
        # The umT5 tokenizer is not available offline; the tiny one is a T5 sentencepiece
        # tokenizer too (ids < vocab), and the encoder always runs all 512 positions.
        with tempfile.TemporaryDirectory(prefix="multitalk-bench-tok-") as tok_root:
            ckpt_dir, _ = tiny.write_tiny_checkpoints(tok_root)
            tokenizer = load_t5_tokenizer(ckpt_dir / tiny.TOKENIZER_SUBDIR)
        model = build_umt5_on_meta(arch.t5)
        load_t5_weights(model, random_items("t5", tiny.t5_key_shapes(arch.t5), dev, seed), dtype=s.dtype,
                        device=dev)
        return TextEncoder(model, tokenizer, text_len=arch.t5.text_len)

    def image():
        text_tower = tiny.TINY_CLIP_TEXT if s.tiny else tiny.CLIPTextTower()
        shapes = tiny.clip_key_shapes(arch.clip, text_tower)
        model = build_clip_on_meta(arch.clip)
        load_clip_weights(model, random_items("clip", shapes, dev, seed + 2, keep=lambda k: k.startswith("visual.")),
                          arch.clip, dtype=s.dtype, device=dev)
        return ImageEncoder(model, arch.clip).to(dev)

    def vae():
        wan_vae = build_vae(s, seed + 4)
        if dev.type == "cuda":  # what Engine.load does with compile on (the CUDA default)
            fuse_vae(wan_vae)
        return wan_vae

    def audio():
        numbers = tiny.TINY_WAV2VEC2 if s.tiny else tiny.Wav2Vec2Numbers()
        config = Wav2Vec2Config(**tiny.wav2vec2_config(numbers)) if s.tiny else full_size_config()
        model = build_wav2vec2_on_meta(config)
        load_wav2vec2_weights(model, random_items("wav2vec2", tiny.wav2vec2_key_shapes(numbers), dev, seed + 6),
                              dtype=torch.float32, device=dev)
        return AudioEncoder(model, Wav2Vec2FeatureExtractor(**tiny.WAV2VEC2_PREPROCESSOR))

    configure_backends(dev)  # what Engine.load sets (cuDNN autotuning of the VAE's convolutions)
    engine = Engine(arch=arch, text_encoder=timed("text_encoder", text), image_encoder=timed("image_encoder", image),
                    vae=timed("vae", vae), audio_encoder=timed("audio_encoder", audio), transformer=dit,
                    device=dev, dtype=s.dtype, placement=Placement(dev), load_seconds=seconds)
    return engine


def build_vae(s: Setting, seed: int):
    """The Wan VAE with random weights through the official-key loader, in the Engine's default dtype."""
    from multitalk.models import tiny
    from multitalk.models.checkpoint import build_on_meta
    from multitalk.models.vae import WanVAE, build_vae_model, load_vae_weights
    from multitalk.runtime.placement import resolve_dtype

    model = build_on_meta(lambda: build_vae_model(s.arch.vae))
    load_vae_weights(model, random_items("vae", tiny.vae_key_shapes(s.arch.vae), s.device, seed), s.arch.vae,
                     device=s.device, dtype=resolve_dtype("auto", s.device))
    return WanVAE(model, s.arch.vae)


# ----------------------------------------------------------------------------------------------
# Inputs


def dit_inputs(s: Setting, speakers: int, seed: int = 0) -> dict:
    """DiT keyword inputs as ``pipeline.generate`` passes them (trimmed text, speaker masks, bf16)."""
    from multitalk.pipeline.conditioning import frame_mask
    from multitalk.pipeline.speakers import speaker_masks

    d, dev, dtype = s.arch.dit, s.device, s.dtype
    t_lat, h, w = s.latent_grid
    g = torch.Generator(device=dev).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=dev, dtype=torch.float32)

    y = torch.cat([frame_mask(s.frames, 1, h, w, device=dev), randn(1, d.out_dim, t_lat, h, w)], dim=1)
    return dict(
        hidden_states=randn(1, d.out_dim, t_lat, h, w).to(dtype),
        timestep=torch.tensor([900.0], device=dev),
        encoder_hidden_states=[randn(s.text_tokens, d.text_dim).to(dtype)],
        encoder_hidden_states_image=randn(1, d.image_tokens, d.clip_dim).to(dtype),
        y=y.to(dtype),
        audio=randn(speakers, s.frames, d.audio_window, d.audio_blocks, d.audio_channels).to(dtype),
        ref_target_masks=speaker_masks(s.height, s.width, s.height, s.width, num_speakers=speakers).to(dev),
    )


def baseline_inputs(s: Setting, inputs: dict) -> dict:
    """The same tensors in diffusers' Wan I2V form: ``cat([x, y])``, text zero-padded to 512."""
    text = inputs["encoder_hidden_states"][0]
    padded = torch.cat([text, text.new_zeros(s.arch.dit.text_len - text.shape[0], text.shape[1])])
    return dict(hidden_states=torch.cat([inputs["hidden_states"], inputs["y"]], dim=1),
                timestep=inputs["timestep"], encoder_hidden_states=padded[None],
                encoder_hidden_states_image=inputs["encoder_hidden_states_image"], return_dict=False)


# ----------------------------------------------------------------------------------------------
# The run: shared state + sections


@dataclass
class Bench:
    setting: Setting
    args: argparse.Namespace
    report: Report
    started: float = field(default_factory=time.perf_counter)
    dit: torch.nn.Module | None = None
    ref_out: torch.Tensor | None = None      # bf16 1-speaker output, for the fp8 / compile errors
    compiled_ref: torch.Tensor | None = None  # the same from the compiled (production) model
    fwd_estimate_s: float = NAN

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {msg}", flush=True)

    def remaining_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def forward_s(self) -> float:
        """Best guess of one forward (measured once available)."""
        if self.fwd_estimate_s == self.fwd_estimate_s:
            return self.fwd_estimate_s
        return 8.0 if self.setting.device.type == "cuda" else 0.5

    def require(self, seconds: float, what: str) -> None:
        if seconds > self.remaining_s():
            raise Skipped(f"{what}: needs ~{seconds:.0f}s, {self.remaining_s():.0f}s of the budget left")

    def get_dit(self):
        if self.dit is None:
            t0 = time.perf_counter()
            self.dit = build_dit(self.setting)
            sync(self.setting.device)
            self.report.section("build")["dit_s"] = time.perf_counter() - t0
            if self.setting.device.type == "cuda":
                self.report.section("build")["dit_weights_gib"] = torch.cuda.memory_allocated() / GIB
            self.log(f"built MultiTalk DiT in {time.perf_counter() - t0:.1f}s")
        self.dit.set_attention_backend(self.args.backend)
        return self.dit

    def drop_dit(self) -> None:
        self.dit = None
        free_memory(self.setting.device)

    def timed_forward(self, model, inputs: dict, label: str, warm: bool = False) -> tuple[dict, torch.Tensor]:
        """Median forward time (``warm``: the model already ran these shapes, no extra warm-up)."""
        warmup = 0 if warm else self.args.warmup
        self.require((warmup + self.args.repeats) * self.forward_s() * 1.2, label)
        with torch.no_grad():
            stats, out = measure(lambda: model(**inputs), self.setting.device, warmup, self.args.repeats)
        self.log(f"{label}: median {stats['median_s']:.3f}s over {self.args.repeats}")
        return stats, out


def section_ceilings(b: Bench) -> None:
    if b.setting.device.type != "cuda":
        raise Skipped("ceilings need CUDA")
    import ceilings

    sec = b.report.section("ceilings")
    sec.update(ceilings.measure_all(b.setting.tokens))
    b.report.save()
    b.log(f"ceilings: bf16 {sec['matmul_bf16_tflops']:.0f} TFLOP/s, fp8 {sec['matmul_fp8_tflops']:.0f}, "
          f"best SDPA {sec['sdpa_best_backend']} {sec['sdpa_best_tflops']:.0f}")


def section_forward(b: Bench) -> None:
    s, sec = b.setting, b.report.section("forward")
    model = b.get_dit()
    sec["backend"] = b.args.backend
    one = dit_inputs(s, 1)

    with torch.no_grad():  # warm-up + FLOPs (the counter runs the real forward once)
        t0 = time.perf_counter()
        model(**one)
        sync(s.device)
        b.fwd_estimate_s = time.perf_counter() - t0
        counted = flop_count.count_flops(lambda: model(**one))
    analytic = analytic_flops(s)
    if s.device.type == "cuda" and counted["attention"] == 0:  # an attention op the counter does not know
        counted.update(attention=analytic["attention"], other=counted["total"],
                       total=counted["total"] + analytic["attention"], attention_from="analytic")
    sec["flops_1spk"] = counted
    sec["flops_1spk_analytic"] = analytic
    b.report.set(tokens=s.tokens)
    b.log(f"FLOPs 1spk: {counted['total'] / 1e9:.4g} GFLOP (attention {counted['attention'] / 1e9:.4g}), "
          f"analytic {analytic['total'] / 1e9:.4g}")

    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats, out = b.timed_forward(model, one, "forward bf16 1spk", warm=True)
    b.ref_out = out.float()
    b.fwd_estimate_s = stats["median_s"]
    sec["bf16_1spk"] = stats
    peak = torch.cuda.max_memory_allocated() / GIB if s.device.type == "cuda" else NAN
    b.report.set(forward_bf16_1spk_s=stats["median_s"], peak_mem_gib_1spk=peak)
    del out

    two = dit_inputs(s, 2)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats, out = b.timed_forward(model, two, "forward bf16 2spk")
    del out
    sec["bf16_2spk"] = stats
    peak = torch.cuda.max_memory_allocated() / GIB if s.device.type == "cuda" else NAN
    b.report.set(forward_bf16_2spk_s=stats["median_s"], peak_mem_gib_2spk=peak)

    variants = {b.args.backend: sec["bf16_1spk"]}
    sec["attention_backends"] = variants
    for name in b.args.attention_backends:
        if name == b.args.backend:
            continue
        try:
            model.set_attention_backend(name)
            stats, out = b.timed_forward(model, one, f"forward bf16 1spk [{name}]")
            variants[name] = dict(stats, rel_err_vs_main=rel_l2(out.float(), b.ref_out))
            del out
        except Skipped as exc:
            variants[name] = {"skipped": str(exc)}
        except Exception as exc:  # backend unavailable on this build
            variants[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            b.log(f"backend {name} failed: {exc}")
        finally:
            model.set_attention_backend(b.args.backend)
            free_memory(s.device)
        b.report.save()
    timed = {k: v["median_s"] for k, v in variants.items() if isinstance(v, dict) and "median_s" in v}
    if timed:
        best = min(timed, key=timed.get)
        b.report.set(best_attention_backend=best, forward_bf16_1spk_best_s=timed[best],
                     best_forward_over_floor=_ratio(timed[best], b.report.data["floor_bf16_1spk_s"]))


def section_teacache(b: Bench) -> None:
    from multitalk.pipeline.schedule import sample_timesteps
    from multitalk.pipeline.teacache import TeaCache

    s, sec = b.setting, b.report.section("teacache")
    model = b.get_dit()
    steps, branches = 40, 3
    timesteps = sample_timesteps(steps, 7.0, s.arch.num_train_timesteps)
    with torch.no_grad():  # e0 depends only on t: the same for the 3 branches of a step
        e0s = [model.condition_embedder.time_embedding(t.to(s.device))[1].unflatten(1, (6, -1))
               for t in timesteps[:steps]]
    fwd = b.report.data["forward_bf16_1spk_s"]
    sec.update(steps=steps, shift=7.0, branches=branches, forward_s=fwd)
    for thresh in (0.2, 0.3):
        cache = TeaCache(steps, thresh, "multitalk-480", branches=branches)
        for e0 in e0s:
            for branch in range(branches):
                if cache.should_compute(branch, e0):
                    cache.store_residual(branch, e0.new_zeros(1))
        skipped = len(cache.skipped_calls)
        sec[f"thresh_{thresh}"] = {"calls": cache.total_calls, "skipped": skipped,
                                   "skip_fraction": skipped / cache.total_calls,
                                   "dit_s_per_clip": cache.total_calls * fwd, "saved_s_per_clip": skipped * fwd}
        b.log(f"teacache {thresh}: {skipped}/{cache.total_calls} forwards skipped")
    b.report.save()


def fp8_filter(tiny: bool) -> Callable:
    from multitalk.runtime.fp8 import all_blocks_fp8_filter

    if not tiny:
        return all_blocks_fp8_filter
    # TINY layers are narrower than the default's 1024 minimum: take the block linears the default
    # picks at full size, i.e. all but the audio kv projection (768 inputs there).
    return lambda name, m: (name.startswith("blocks.") and not name.endswith("kv_linear")
                            and m.in_features % 16 == 0 and m.out_features % 16 == 0)


def section_fp8(b: Bench) -> None:
    from multitalk.runtime.fp8 import quantize_linears_fp8

    s, sec = b.setting, b.report.section("fp8")
    model = b.get_dit()
    one = dit_inputs(s, 1)
    if b.ref_out is None:
        with torch.no_grad():
            b.ref_out = model(**one).float()
    include = fp8_filter(s.tiny)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and include(n, m)}
    t0 = time.perf_counter()
    try:
        sec["quantized_linears"] = quantize_linears_fp8(model, include=include, out_dtype=s.dtype)
        sync(s.device)
        sec["quantize_s"] = time.perf_counter() - t0
        stats, out = b.timed_forward(model, one, "forward fp8 1spk")
        sec["fp8_1spk"] = stats
        err = rel_l2(out.float(), b.ref_out)
        del out
        b.report.set(forward_fp8_1spk_s=stats["median_s"], fp8_rel_err=err)
        b.log(f"fp8 rel err vs bf16: {err:.4f}")
    finally:  # back to the bf16 linears for the later sections
        restore_modules(model, originals)
        free_memory(s.device)


def section_baseline(b: Bench) -> None:
    s, sec = b.setting, b.report.section("baseline")
    one = dit_inputs(s, 1)
    b.drop_dit()  # two 14B models plus activations do not fit on one 80 GB card
    b.require(30 + (b.args.warmup + b.args.repeats + 1) * b.forward_s(), "baseline")
    t0 = time.perf_counter()
    model, config = build_wan_baseline(s)
    sync(s.device)
    sec.update(build_s=time.perf_counter() - t0, config=config)
    try:
        model.set_attention_backend(b.args.backend)
        inputs = baseline_inputs(s, one)
        with torch.no_grad():
            out = model(**inputs)[0]  # warm-up, and a shape check
        sec["output_shape"] = list(out.shape)
        stats, out = b.timed_forward(lambda **kw: model(**kw)[0], inputs, "diffusers Wan forward", warm=True)
        del out
        sec["forward"] = stats
        b.report.set(diffusers_base_forward_s=stats["median_s"])
    finally:
        del model
        free_memory(s.device)


def section_vae(b: Bench) -> None:
    """The VAE alone at the clip's size: encode of the 81-frame conditioning video (image + zeros, as
    the pipeline builds it) and chunked decode of a 21-frame latent. Variants on the same weights and
    inputs: ``loaded`` (diffusers as loaded; with a CUDA kernel breakdown), ``channels_last`` (the
    loaded model with channels-last 3-D weights, a probe of cuDNN's layout preference), ``fused``
    (``runtime.vae_fusion`` as the Engine applies it). Relative errors are against ``loaded``."""
    from multitalk.runtime.placement import configure_backends
    from multitalk.runtime.vae_fusion import fuse_vae

    s, sec = b.setting, b.report.section("vae")
    cuda = s.device.type == "cuda"
    b.require(60 if cuda else 20, "vae")
    configure_backends(s.device)
    vae = build_vae(s, seed=15)
    g = torch.Generator().manual_seed(3)
    video = torch.cat([torch.rand(3, 1, s.height, s.width, generator=g) * 2 - 1,
                       torch.zeros(3, s.frames - 1, s.height, s.width)], dim=1)
    t, h, w = s.latent_grid
    latent = torch.randn(vae.z_dim, t, h, w, generator=g)
    calls = {"encode": lambda: vae.encode(video),
             "decode": lambda: torch.cat(list(vae.decode_chunks(latent)), dim=1)}
    results = {}

    def run(label: str) -> None:
        for name, fn in calls.items():
            sync(s.device)
            t0 = time.perf_counter()
            fn()
            sync(s.device)
            first = time.perf_counter() - t0
            stats, out = measure(fn, s.device, warmup=0, repeat=2)
            sec[f"{name}_{label}"] = dict(stats, first_call_s=first)
            results[(name, label)] = out.float().cpu()
            if label != "loaded":
                sec[f"{name}_{label}_rel_err"] = rel_l2(results[(name, label)], results[(name, "loaded")])
                sec[f"{name}_{label}_over_loaded"] = _ratio(stats["median_s"], sec[f"{name}_loaded"]["median_s"])
            b.log(f"vae {name} {label}: first {first:.2f}s, median {stats['median_s']:.3f}s")
            b.report.save()

    try:
        run("loaded")
        if cuda:
            for name, fn in calls.items():
                sec[f"{name}_loaded_breakdown"] = kernel_breakdown(fn)
            conv3d = [m for m in vae.model.modules() if isinstance(m, torch.nn.Conv3d)]
            try:
                for m in conv3d:
                    m.weight.data = m.weight.data.to(memory_format=torch.channels_last_3d)
                run("channels_last")
            except Exception as exc:  # a probe: record and go on
                sec["channels_last_error"] = f"{type(exc).__name__}: {exc}"[:500]
            for m in conv3d:
                m.weight.data = m.weight.data.contiguous()
        sec["fused_sites"] = fuse_vae(vae)
        sec["fused_impl"] = vae.model._multitalk_fused
        run("fused")
        if cuda:
            for name, fn in calls.items():
                sec[f"{name}_fused_breakdown"] = kernel_breakdown(fn)
        b.log("vae fused/loaded: " + ", ".join(
            f"{n} {sec[f'{n}_fused_over_loaded']:.3f} (err {sec[f'{n}_fused_rel_err']:.2e})" for n in calls))
    finally:
        del vae
        free_memory(s.device)


def section_clip4(b: Bench) -> None:
    """One 81-frame clip end to end, twice on the same engine: cold (first use of every shape,
    cuDNN autotuning) and warm (what a service worker sees from its second job on)."""
    s, sec = b.setting, b.report.section("clip4")
    steps = b.args.clip_steps
    calls = steps * 3  # cond, drop_text, uncond per step (text scale 5)
    b.require(90 + 2 * calls * b.forward_s(), "clip4")
    dit = b.get_dit()
    t0 = time.perf_counter()
    engine = build_engine(s, dit)
    sec.update(build_s=time.perf_counter() - t0, build_stage_s=engine.load_seconds, steps=steps, dit_calls=calls)
    b.log(f"built encoders + VAE in {sec['build_s']:.1f}s")
    b.report.save()
    try:
        for label in ("cold", "warm"):
            total, stages = _clip4_once(b, engine, dit, steps, sec, label)
            sec[f"{label}_total_s"], sec[f"{label}_stages_s"] = total, stages
            b.log(f"clip4 {label}: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()) + f"; total {total:.1f}s")
            b.report.save()
    finally:
        del engine
        free_memory(s.device)
    sec["stages_s"] = sec["warm_stages_s"]
    b.report.set(clip4_total_s=sec["warm_total_s"], clip4_dit_s=sec["warm_stages_s"].get("dit", NAN),
                 clip4_cold_total_s=sec["cold_total_s"])


def _clip4_once(b: Bench, engine, dit, steps: int, sec: dict, label: str):
    import multitalk.pipeline.generate as gen_mod
    from multitalk.media.video import BackgroundWriter
    from multitalk.pipeline.generate import Conditions, generate
    from multitalk.pipeline.inputs import GenerationParams
    from multitalk.pipeline.speakers import speaker_masks

    s = b.setting
    params = GenerationParams(size="multitalk-480", frame_num=s.frames, mode="clip", sample_steps=steps, seed=42)
    timer = StageTimer(s.device)
    speech = (np.random.default_rng(0).standard_normal(int(3.3 * 16000)) * 0.1).astype(np.float32)
    out_dir = Path(tempfile.mkdtemp(prefix="multitalk-bench-clip4-"))
    restore, writer = [], None
    try:
        sync(s.device)
        t_start = time.perf_counter()
        with timer.stage("audio_features"):
            emb = engine.audio_encoder.embed(speech, fps=25)
        with timer.stage("text_encode"):
            context, context_null = engine.text_encoder.encode(["a person talking", s.arch.sample_neg_prompt])
        cond_image = torch.rand(3, 1, s.height, s.width, generator=torch.Generator().manual_seed(0)) * 2 - 1
        cond = Conditions(speech=[speech], mix=speech, audio_embs=[emb], num_audio_frames=emb.shape[0],
                          context=context, context_null=context_null, cond_image=cond_image,
                          ref_masks=speaker_masks(s.height, s.width, s.height, s.width, 1),
                          height=s.height, width=s.width)
        for obj, name, stage in ((engine.image_encoder, "encode", "clip_encode"), (engine.vae, "encode", "vae_encode")):
            setattr(obj, name, timer.wrap(stage, getattr(obj, name)))
            restore.append((obj, name))
        engine.vae.decode_chunks = timer.wrap_iter("vae_decode", engine.vae.decode_chunks)
        restore.append((engine.vae, "decode_chunks"))
        matcher = gen_mod.ColorMatcher

        class TimedColorMatcher(matcher):
            def __call__(self, source):
                with timer.stage("color_correction"):
                    return super().__call__(source)

        gen_mod.ColorMatcher = TimedColorMatcher
        restore.append((gen_mod, "ColorMatcher", matcher))
        mp4 = _mp4_writer(out_dir / "clip4.mp4", s, speech, sec)
        writer = BackgroundWriter(mp4) if mp4 is not None else None  # as pipeline.render does
        frames_seen = []

        def on_frames(frames: torch.Tensor) -> None:
            frames_seen.append(frames.shape[1])
            if writer is not None:
                with timer.stage("mp4_write"):  # only a wait when the encoder thread falls behind
                    writer.write_frames(frames)

        with timer.module("dit", dit):
            result = generate(engine, None, params, on_frames=on_frames, conditions=cond)
        if writer is not None:
            with timer.stage("mp4_write"):  # what is left to encode after the last frame
                writer.close()
                mp4.close()
            writer = None
            sec["mp4_bytes"] = (out_dir / "clip4.mp4").stat().st_size
        sync(s.device)
        total = time.perf_counter() - t_start
    finally:
        if writer is not None:
            writer.abort()
            mp4.abort()
        for item in restore:
            if len(item) == 3:
                setattr(item[0], item[1], item[2])
            else:
                delattr(item[0], item[1])
        shutil.rmtree(out_dir, ignore_errors=True)
    stages = dict(timer.seconds)
    stages["other"] = total - sum(stages.values())
    sec.update(stage_calls=timer.calls, frames=result.frames, frames_delivered=sum(frames_seen),
               generate_timings=result.timings)
    return total, stages


def _mp4_writer(path: Path, s: Setting, speech: np.ndarray, sec: dict):
    try:
        from multitalk.media.video import Mp4Writer
    except ImportError as exc:
        sec["mp4_error"] = f"no multitalk.media.video.Mp4Writer: {exc}"
        return None
    try:
        return Mp4Writer(path, width=s.width, height=s.height, fps=25, audio=speech, sample_rate=16000)
    except Exception as exc:  # no H.264 encoder in this PyAV build, ...
        sec["mp4_error"] = f"{type(exc).__name__}: {exc}"[:500]
        return None


def section_compile(b: Bench) -> None:
    s, sec = b.setting, b.report.section("compile")
    model = b.get_dit()
    one = dit_inputs(s, 1)
    attempts = (True, False) if b.args.fullgraph else (False,)
    for fullgraph in attempts:  # fullgraph first; on a graph-break error, the Engine's fullgraph=False
        b.require(120 + (b.args.repeats + 1) * b.forward_s(), f"compile (fullgraph={fullgraph})")
        try:
            model.compile_repeated_blocks(fullgraph=fullgraph, dynamic=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model(**one)
            sync(s.device)
        except Exception as exc:
            sec[f"error_fullgraph_{fullgraph}"] = f"{type(exc).__name__}: {exc}"[:1000]
            b.log(f"compile fullgraph={fullgraph} failed: {type(exc).__name__}")
            torch._dynamo.reset()
            if fullgraph == attempts[-1]:
                raise
            continue
        sec.update(fullgraph=fullgraph, first_call_s=time.perf_counter() - t0)
        break
    sec["compile_s"] = sec["first_call_s"] - b.report.data["forward_bf16_1spk_s"]
    b.log(f"compile: first call {sec['first_call_s']:.1f}s")
    if b.ref_out is not None:
        sec["rel_err_vs_eager"] = rel_l2(out.float(), b.ref_out)
    del out
    b.report.save()
    stats, unfused = b.timed_forward(model, one, "forward bf16 1spk compiled (no dit_fusion)", warm=True)
    sec["bf16_1spk_unfused"] = stats
    b.report.set(forward_bf16_1spk_compiled_unfused_s=stats["median_s"])

    # the production path: runtime.dit_fusion as Engine.load applies it, then the same compile
    from multitalk.runtime.dit_fusion import fuse_dit

    sec["dit_fusion"] = fuse_dit(model, device=s.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(**one)  # recompiles the block with the fused operations
    sync(s.device)
    sec["fused_first_call_s"] = time.perf_counter() - t0
    sec["fused_rel_err_vs_unfused"] = rel_l2(out.float(), unfused.float())
    if b.ref_out is not None:
        sec["fused_rel_err_vs_eager"] = rel_l2(out.float(), b.ref_out)
    del out, unfused
    stats, out = b.timed_forward(model, one, "forward bf16 1spk compiled", warm=True)
    b.compiled_ref = out.float()
    del out
    sec["bf16_1spk"] = stats
    b.report.set(forward_bf16_1spk_compiled_s=stats["median_s"],
                 compiled_over_eager=_ratio(stats["median_s"], b.report.data["forward_bf16_1spk_s"]),
                 fused_over_unfused=_ratio(stats["median_s"], sec["bf16_1spk_unfused"]["median_s"]))


def kernel_breakdown(fn: Callable[[], object]) -> dict:
    """CUDA kernel time of one call, by class: GEMM, attention, other (seconds)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = {"gemm_s": 0.0, "attention_s": 0.0, "other_s": 0.0}
    top = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0.0)) / 1e6
        if t <= 0:
            continue
        name = evt.key.lower()
        if any(k in name for k in ("gemm", "nvjet", "xmma", "cutlass", "scaled_mm", "matmul", "f8f8")):
            out["gemm_s"] += t
        elif any(k in name for k in ("cudnn", "fmha", "flash", "attention", "sdpa")):
            out["attention_s"] += t
        else:
            out["other_s"] += t
        top.append((t, evt.key[:120]))
    out["top"] = [{"s": round(t, 4), "kernel": k} for t, k in sorted(top, reverse=True)[:25]]
    return out


def section_compiled_extra(b: Bench) -> None:
    """After ``compile``: 2 speakers compiled, a kernel breakdown, and fp8 variants compiled.

    fp8 errors are taken against the compiled bf16 output (``rel_err``: same compiled path, so the
    difference is fp8's alone) and against the eager bf16 output (``rel_err_vs_eager``, which adds
    the compile's own rounding difference, ``compile.rel_err_vs_eager``)."""
    from multitalk.runtime.fp8 import ffn_cross_fp8_filter, ffn_fp8_filter, quantize_linears_fp8

    s, sec = b.setting, b.report.section("compiled_extra")
    model = b.get_dit()
    one, two = dit_inputs(s, 1), dit_inputs(s, 2)
    if s.device.type == "cuda":
        with torch.no_grad():
            sec["breakdown_1spk"] = kernel_breakdown(lambda: model(**one))
        b.report.save()
    with torch.no_grad():
        model(**two)  # compile the 2-speaker graph
    stats, out = b.timed_forward(model, two, "forward bf16 2spk compiled", warm=True)
    del out
    sec["bf16_2spk"] = stats
    b.report.set(forward_bf16_2spk_compiled_s=stats["median_s"])
    if b.ref_out is None:
        with torch.no_grad():
            b.ref_out = model(**one).float()
    if b.compiled_ref is None:
        with torch.no_grad():
            b.compiled_ref = model(**one).float()
    variants = {
        "ffn": (ffn_fp8_filter, False),
        "ffn_cross": (ffn_cross_fp8_filter, False),
        "all": (fp8_filter(s.tiny), False),
        "attention": (None, True),             # cuDNN fp8 self-attention (runtime.attention_fp8), linears bf16
    }
    for label, (include, fp8_attention) in variants.items():
        originals = ({n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and include(n, m)}
                     if include is not None else {})
        try:
            if include is not None:
                sec[f"fp8_{label}_quantized"] = quantize_linears_fp8(model, include=include, out_dtype=s.dtype)
            if fp8_attention:
                from multitalk.runtime.attention_fp8 import availability, enable_fp8_self_attention

                ok, why = availability(s.device)
                if not ok:
                    raise Skipped(f"fp8 attention: {why}")
                sec[f"fp8_{label}_blocks"] = enable_fp8_self_attention(model)
            with torch.no_grad():
                out = model(**one)  # recompile with the fp8 operations
            err = rel_l2(out.float(), b.compiled_ref)
            err_eager = rel_l2(out.float(), b.ref_out)
            del out
            stats, out = b.timed_forward(model, one, f"forward fp8[{label}] 1spk compiled", warm=True)
            del out
            sec[f"fp8_{label}_1spk"] = dict(stats, rel_err=err, rel_err_vs_eager=err_eager)
            b.log(f"fp8[{label}] compiled: {stats['median_s']:.3f}s, rel err {err:.4f} (vs eager {err_eager:.4f})")
            if label == "ffn":  # the production --fp8 default (runtime.fp8.default_fp8_filter)
                b.report.set(forward_fp8_1spk_s=stats["median_s"], fp8_rel_err=err, fp8_rel_err_vs_eager=err_eager)
            b.report.save()
        except Skipped as exc:
            sec[f"fp8_{label}_skipped"] = str(exc)
        except Exception as exc:
            sec[f"fp8_{label}_error"] = f"{type(exc).__name__}: {exc}"[:800]
        finally:
            restore_modules(model, originals)
            if fp8_attention:
                from multitalk.runtime.attention_fp8 import disable_fp8_self_attention

                disable_fp8_self_attention(model)
            free_memory(s.device)


SECTION_FUNCS = {"ceilings": section_ceilings, "forward": section_forward, "teacache": section_teacache,
                 "fp8": section_fp8, "baseline": section_baseline, "clip4": section_clip4,
                 "compile": section_compile, "compiled_extra": section_compiled_extra, "vae": section_vae}


def run_section(b: Bench, name: str) -> None:
    b.log(f"== {name}")
    t0 = time.perf_counter()
    try:
        SECTION_FUNCS[name](b)
        status = "ok"
    except Skipped as exc:
        b.report.data["skipped"][name] = str(exc)
        status = f"skipped ({exc})"
    except Exception as exc:  # record and go on: one failing section must not lose the others
        b.report.data["errors"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                         "traceback": traceback.format_exc().replace(str(HERE.parent), "<repo>")[-4000:]}
        status = f"ERROR {type(exc).__name__}: {exc}"
        free_memory(b.setting.device)
    b.report.section(name)["section_s"] = time.perf_counter() - t0
    b.report.save()
    b.log(f"== {name}: {status} ({time.perf_counter() - t0:.1f}s)")


# ----------------------------------------------------------------------------------------------
# CLI


def print_table(report: Report) -> None:
    d = report.data
    rows = [("gpu", d["gpu"]), ("tokens", d["tokens"])] + [(k, d.get(k)) for k in HEADLINE_KEYS] + [
        (k, d[k]) for k in ("mfu_bf16_1spk", "best_attention_backend", "forward_bf16_1spk_best_s",
                            "forward_bf16_1spk_compiled_s", "compiled_over_floor", "compiled_over_diffusers",
                            "compiled_spk2_over_spk1", "fp8_over_compiled_bf16") if k in d]
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * (width + 16))
    for k, v in rows:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        print(f"{k:<{width}}  {text}")
    for name, err in d["errors"].items():
        print(f"ERROR {name}: {err['error'][:200]}")
    for name, why in d["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"report: {report.path}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True, help="folder of the JSON report")
    p.add_argument("--sections", default=None,
                   help=f"comma list, run in the fixed order {','.join(SECTIONS)} (default: all; "
                        "--tiny-cpu: all but compile)")
    p.add_argument("--tiny-cpu", action="store_true", help="TINY architecture on CPU, 9 x 32x32 video (CI smoke)")
    p.add_argument("--backend", default="native", help="attention backend of every main measurement")
    p.add_argument("--attention-backends", default="_native_cudnn,_native_flash",
                   help="extra 1-speaker forwards, one per diffusers backend name ('' for none)")
    p.add_argument("--no-fullgraph", dest="fullgraph", action="store_false",
                   help="compile section: allow graph breaks")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per measurement (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clip-steps", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=200, help="trimmed T5 context length")
    p.add_argument("--budget-s", type=float, default=510.0,
                   help="wall-clock budget: later sections/variants that would not fit are skipped")
    args = p.parse_args(argv)
    default = [x for x in SECTIONS if not (args.tiny_cpu and x in ("compile", "compiled_extra"))]
    wanted = default if args.sections is None else [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    args.sections = [x for x in SECTIONS if x in wanted]
    args.attention_backends = [x.strip() for x in args.attention_backends.split(",") if x.strip()]
    return args


def analytic_flops(s: Setting) -> dict:
    """The 1-speaker DiT forward's FLOPs from the architecture (``flops.dit_forward_flops``)."""
    d = s.arch.dit
    return flop_count.dit_forward_flops(d.dim, d.ffn_dim, d.num_layers, s.tokens, s.latent_grid[0], d.text_len,
                                        d.image_tokens, d.context_tokens, d.output_dim, d.in_dim,
                                        math.prod(d.patch_size), d.out_dim, d.text_dim, d.clip_dim)


def make_setting(args: argparse.Namespace) -> Setting:
    if args.tiny_cpu:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        return Setting(TINY, torch.device("cpu"), torch.float32, height=32, width=32, frames=9,
                       text_tokens=min(args.text_tokens, 24), tiny=True)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny-cpu for the CPU smoke run")
    return Setting(FULL_14B, torch.device("cuda"), torch.bfloat16, text_tokens=args.text_tokens)


def main(argv: list[str] | None = None) -> int:
    from diffusers.utils import logging as diffusers_logging

    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # one "experimental backend" warning per switch hides the log
    setting = make_setting(args)
    name = torch.cuda.get_device_name(setting.device) if setting.device.type == "cuda" else "cpu-tiny"
    report = Report(args.out_dir, name)
    # the output folder is a path of the machine that ran it: recorded as a placeholder
    argv = ["<out-dir>" if Path(a) == Path(args.out_dir) else a for a in sys.argv[1:]]
    report.data.update(tokens=setting.tokens, environment=environment(setting), argv=argv,
                       flops_1spk_analytic=analytic_flops(setting),
                       started=dt.datetime.now().isoformat(timespec="seconds"))
    report.save()
    bench = Bench(setting, args, report)
    bench.log(f"{name}: {setting.arch.name}, {setting.tokens} tokens, sections {','.join(args.sections)}; "
              f"report {report.path}")
    torch.manual_seed(0)
    for section in args.sections:
        run_section(bench, section)
    report.data["total_s"] = time.perf_counter() - bench.started
    report.save()
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
