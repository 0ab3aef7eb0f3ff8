"""What every benchmark section shares: the setting, the JSON report, timing and the run's state.

``bench.py`` builds one :class:`Bench` (setting, arguments, report) and runs the chosen sections of
``sections/`` in their registered order through :func:`run_section`: each in its own try/except
(an error or a :class:`Skipped` goes into the report and the run goes on), the report rewritten
after every measurement so that a run that times out still leaves its data.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import flops as flop_count  # benchmarks/flops.py
from multitalk.models.architecture import Architecture

HERE = Path(__file__).resolve().parent
NAN = float("nan")
GIB = 2**30

# Every top-level figure the report always carries (NaN until measured).
HEADLINE_KEYS = (
    "forward_bf16_1spk_s", "forward_bf16_2spk_s", "forward_fp8_1spk_s", "fp8_rel_err", "floor_bf16_1spk_s",
    "diffusers_base_forward_s", "clip4_total_s", "clip4_dit_s", "peak_mem_gib_1spk",
    "forward_over_floor", "forward_over_diffusers", "spk2_over_spk1", "fp8_over_bf16", "clip4_non_dit_share",
    "forward_int8attn_1spk_s", "int8attn_rel_err", "int8attn_kernel_tops", "forward_best_1spk_s", "best_rel_err",
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
        d["forward_over_floor"] = ratio(d["forward_bf16_1spk_s"], d["floor_bf16_1spk_s"])
        d["forward_over_diffusers"] = ratio(d["forward_bf16_1spk_s"], d["diffusers_base_forward_s"])
        d["spk2_over_spk1"] = ratio(d["forward_bf16_2spk_s"], d["forward_bf16_1spk_s"])
        d["fp8_over_bf16"] = ratio(d["forward_fp8_1spk_s"], d["forward_bf16_1spk_s"])
        d["clip4_non_dit_share"] = 1.0 - ratio(d["clip4_dit_s"], d["clip4_total_s"])
        # the production path (compiled; --fp8 is measured compiled): the same ratios
        comp1, comp2 = d.get("forward_bf16_1spk_compiled_s", NAN), d.get("forward_bf16_2spk_compiled_s", NAN)
        d["compiled_over_floor"] = ratio(comp1, d["floor_bf16_1spk_s"])
        d["compiled_over_diffusers"] = ratio(comp1, d["diffusers_base_forward_s"])
        d["compiled_spk2_over_spk1"] = ratio(comp2, comp1)
        d["fp8_over_compiled_bf16"] = ratio(d["forward_fp8_1spk_s"], comp1)


def ratio(a, b) -> float:
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


def analytic_flops(s: Setting) -> dict:
    """The 1-speaker DiT forward's FLOPs from the architecture (``flops.dit_forward_flops``)."""
    d = s.arch.dit
    return flop_count.dit_forward_flops(d.dim, d.ffn_dim, d.num_layers, s.tokens, s.latent_grid[0], d.text_len,
                                        d.image_tokens, d.context_tokens, d.output_dim, d.in_dim,
                                        math.prod(d.patch_size), d.out_dim, d.text_dim, d.clip_dim)


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
    """Accumulates wall seconds per stage; each timed call is synchronised on both ends.

    ``stage`` is the hook ``pipeline.generate.generate(stages=...)`` takes."""

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


def timed_generate(s: Setting, engine, params, conditions: Callable[[StageTimer], object], audio: np.ndarray,
                   sec: dict, mp4_key: str, on_frames: Callable[[torch.Tensor], None] | None = None):
    """One ``pipeline.generate`` run timed per stage, its frames streamed to an mp4 as ``pipeline.render``
    does (``BackgroundWriter``; the file's size goes to ``sec[mp4_key]``, a missing encoder to
    ``sec["mp4_error"]``). ``conditions(timer)`` builds the ``Conditions`` inside the timed window;
    ``on_frames`` sees every delivered chunk first. Returns ``(total_s, stages_s + "other", timer, result)``."""
    from multitalk.media.video import BackgroundWriter
    from multitalk.pipeline.generate import generate

    timer = StageTimer(s.device)
    out_dir = Path(tempfile.mkdtemp(prefix="multitalk-bench-generate-"))
    writer = mp4 = None
    try:
        sync(s.device)
        t_start = time.perf_counter()
        cond = conditions(timer)
        mp4 = _mp4_writer(out_dir / "video.mp4", s, audio, sec)
        writer = BackgroundWriter(mp4) if mp4 is not None else None

        def deliver(frames: torch.Tensor) -> None:
            if on_frames is not None:
                on_frames(frames)
            if writer is not None:
                with timer.stage("mp4_write"):  # only a wait when the encoder thread falls behind
                    writer.write_frames(frames)

        # clip_encode, vae_encode, dit, vae_decode, color_correction: generate's own stage hook
        result = generate(engine, None, params, on_frames=deliver, conditions=cond, stages=timer.stage)
        if writer is not None:
            with timer.stage("mp4_write"):  # what is left to encode after the last frame
                writer.close()
                mp4.close()
            writer = None
            sec[mp4_key] = (out_dir / "video.mp4").stat().st_size
        sync(s.device)
        total = time.perf_counter() - t_start
    finally:
        if writer is not None:
            writer.abort()
            mp4.abort()
        shutil.rmtree(out_dir, ignore_errors=True)
    stages = dict(timer.seconds)
    stages["other"] = total - sum(stages.values())
    return total, stages, timer, result


def _mp4_writer(path: Path, s: Setting, audio: np.ndarray, sec: dict):
    try:
        from multitalk.media.video import Mp4Writer
    except ImportError as exc:
        sec["mp4_error"] = f"no multitalk.media.video.Mp4Writer: {exc}"
        return None
    try:
        return Mp4Writer(path, width=s.width, height=s.height, fps=25, audio=audio, sample_rate=16000)
    except Exception as exc:  # no H.264 encoder in this PyAV build, ...
        sec["mp4_error"] = f"{type(exc).__name__}: {exc}"[:500]
        return None


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


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def restore_modules(model: torch.nn.Module, originals: dict[str, torch.nn.Module]) -> None:
    """Put back modules replaced in place (e.g. by ``quantize_linears_fp8``), by qualified name."""
    for name, module in originals.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module)


# ----------------------------------------------------------------------------------------------
# The run: shared state between sections


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
            from builders import build_dit

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


def run_section(b: Bench, name: str) -> None:
    """Run ``sections/<name>.py``'s ``run(b)``; an error or a skip is recorded and the run goes on."""
    b.log(f"== {name}")
    t0 = time.perf_counter()
    try:
        importlib.import_module(f"sections.{name}").run(b)
        status = "ok"
    except Skipped as exc:
        b.report.data["skipped"][name] = str(exc)
        status = f"skipped ({exc})"
    except Exception as exc:  # record and go on: one failing section must not lose the others
        trace = traceback.format_exc().replace(str(HERE.parent), "<repo>")[-4000:]
        b.report.data["errors"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": trace}
        status = f"ERROR {type(exc).__name__}: {exc}"
        free_memory(b.setting.device)
    b.report.section(name)["section_s"] = time.perf_counter() - t0
    b.report.save()
    b.log(f"== {name}: {status} ({time.perf_counter() - t0:.1f}s)")
