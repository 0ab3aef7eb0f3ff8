"""GPU benchmark of the memory tiers (issue 17): one full-size two-speaker 640x640x81 clip, 4 steps x 3
passes, with real-size random umT5-XXL / CLIP / Wan VAE / wav2vec2 around the random 14B DiT (the
builders of ``builders.py``), put together by ``Engine.from_components`` (fused and compiled), run
uncapped with every model resident and then under ``torch.cuda.set_per_process_memory_fraction``
caps that emulate smaller cards, each with the plan ``runtime.memory_plan`` chooses for that cap:

    PYTHONPATH=/tmp/site python benchmarks/bench_memory.py --out-dir "$OUT"
    python benchmarks/bench_memory.py --tiny-cpu --out-dir /tmp/benchmem   # CPU smoke (the tests run it)

Rows, in this order (any subset with ``--rows``): ``resident`` (uncapped, nothing planned: the
reference), ``cap24`` (24 GiB, bf16 weights), ``cap24_720p`` (24 GiB, the 960x960 bucket of
multitalk-720, ``--steps-720p`` steps), ``cap8`` (8 GiB, ``--cap8-weights``, bf16 by default),
``cap12`` (12 GiB, ``--cap12-weights``, fp8 by default; the fp8 rows come last because quantising
is one-way). Per row: the plan (its one line and its numbers), the clip's time and stages, the peak
``max_memory_allocated`` under the cap, the host RSS peak against the bytes the plan keeps in host
memory, the streamers' counters, the video's difference from the resident row's, and for streamed
rows a CUDA profile of one DiT forward reduced to what overlapped. Before a row is timed, a DiT
forward (and for a new size, a VAE encode + decode) runs once so compile and cuDNN autotuning stay
out of the time. Top-level keys: ``cap24_peak_gib``, ``cap24_over_resident``, ``cap12_peak_gib``,
``cap12_over_resident``, ``cap8_s``, ``cap24_720p_s``, ``host_rss_over_weights`` (cap24's), and
the same figures for every row (``<row>_s``, ``<row>_peak_gib``, ``<row>_over_resident``). One run
takes about 6 minutes on an H200.

``--tiny-cpu`` runs every row on the TINY architecture on the CPU (32x32, 9 frames; no caps: each
row's plan streams blocks through ``--num_persistent_param_in_dit``-style fixed counts instead).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import re
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import multitalk  # noqa: F401
except ImportError:  # a bare checkout (the GPU image): use the source tree
    sys.path.insert(0, str(HERE.parent / "src"))

from builders import build_dit, build_engine, dit_inputs  # noqa: E402
from harness import NAN, Setting, StageTimer, rel_l2, slug, sync  # noqa: E402

from multitalk.models.architecture import FULL_14B, TINY  # noqa: E402

GIB = 2**30
ROWS = ("resident", "cap24", "cap24_720p", "cap8", "cap12")
HEADLINE = ("cap24_peak_gib", "cap24_over_resident", "cap12_peak_gib", "cap12_over_resident", "cap8_s",
            "cap24_720p_s", "host_rss_over_weights")


# ----------------------------------------------------------------------------------------------
# host memory

def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM); False where this kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak() -> int:
    return _status("VmHWM")


# ----------------------------------------------------------------------------------------------


class MemoryBench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tiny = args.tiny_cpu
        if self.tiny:
            torch.set_num_threads(min(2, os.cpu_count() or 1))
            self.setting = Setting(TINY, torch.device("cpu"), torch.float32, height=32, width=32, frames=9,
                                   text_tokens=24, tiny=True)
        else:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device: run with --tiny-cpu for the CPU smoke run")
            self.setting = Setting(FULL_14B, torch.device("cuda"), torch.bfloat16)
        self.device = self.setting.device
        name = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu-tiny"
        args.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = args.out_dir / f"{dt.date.today().isoformat()}_{slug(name)}_memory.json"
        self.data: dict = {"gpu": name, **{k: NAN for k in HEADLINE}, "rows": {}, "errors": {},
                           "argv": ["<out-dir>" if Path(a) == Path(args.out_dir) else a for a in sys.argv[1:]],
                           "started": dt.datetime.now().isoformat(timespec="seconds")}
        self.started = time.perf_counter()
        self.engine = None
        self.reference = None          # the resident row's video
        self.warm: set = set()         # (height, weights) shapes already compiled / autotuned
        self.total_memory = torch.cuda.get_device_properties(self.device).total_memory \
            if self.device.type == "cuda" else 0

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        d = self.data
        rows = d["rows"]
        ref = rows.get("resident", {}).get("s", NAN)
        for name, row in rows.items():
            if "s" in row:
                row["over_resident"] = row["s"] / ref if ref == ref and ref > 0 else NAN
                d[f"{name}_s"], d[f"{name}_over_resident"] = row["s"], row["over_resident"]
                d[f"{name}_peak_gib"] = row.get("peak_gib", NAN)
        d["host_rss_over_weights"] = rows.get("cap24", {}).get("host_rss_over_weights", NAN)
        tmp = self.path.with_suffix(".json.part")
        tmp.write_text(json.dumps(d, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    # -- building ----------------------------------------------------------------------------------

    def build(self) -> None:
        from multitalk.pipeline.engine import EngineConfig
        from multitalk.runtime.memory_plan import model_sizes

        s = self.setting
        t0 = time.perf_counter()
        dit = build_dit(s)
        engine = build_engine(s, dit)      # Engine.from_components: fused and compiled on CUDA
        sizes = model_sizes(s.arch, s.dtype, engine.vae.dtype)
        audio = sum(t.numel() * t.element_size() for t in engine.audio_encoder.model.parameters())
        engine.sizes = replace(sizes, audio_encoder=audio)
        engine.config = EngineConfig(device=str(s.device), plan_memory=True)
        sync(s.device)
        self.engine = engine
        self.data["build_s"] = time.perf_counter() - t0
        self.data["sizes"] = vars(engine.sizes)
        self.log(f"built the engine in {self.data['build_s']:.1f}s")

    # -- one clip ----------------------------------------------------------------------------------

    def clip(self, height: int, width: int, steps: int, timer: StageTimer) -> tuple[float, torch.Tensor, int]:
        """One two-speaker clip through ``pipeline.generate`` (the conditioning as
        ``prepare_conditions`` does it, through the placement); returns (seconds, video, frames)."""
        from multitalk.pipeline.generate import Conditions, generate
        from multitalk.pipeline.inputs import GenerationParams
        from multitalk.pipeline.speakers import speaker_masks

        engine, s = self.engine, self.setting
        size = "preview" if self.tiny else ("multitalk-720" if height * width > 640 * 640 else "multitalk-480")
        params = GenerationParams(size=size, frame_num=s.frames, mode="clip",
                                  sample_steps=steps, seed=42, color_correction_strength=1.0)
        rng = np.random.default_rng(0)
        seconds = (s.frames - 1) / 25 + 0.1
        speech = [(rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32) for _ in range(2)]
        frames: list[torch.Tensor] = []
        sync(self.device)
        t0 = time.perf_counter()
        with timer.stage("audio_features"), engine.placement.use(engine.audio_encoder.model):
            embs = [engine.audio_encoder.embed(sp, fps=25).float().cpu() for sp in speech]
        with timer.stage("text_encode"), engine.placement.use(engine.text_encoder.model):
            context, context_null = engine.text_encoder.encode(["two people talking", s.arch.sample_neg_prompt])
        cond_image = torch.rand(3, 1, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
        cond = Conditions(speech=speech, mix=speech[0], audio_embs=embs, num_audio_frames=embs[0].shape[0],
                          context=context, context_null=context_null, cond_image=cond_image,
                          ref_masks=speaker_masks(height, width, height, width, 2), height=height, width=width)
        result = generate(engine, None, params, on_frames=frames.append, conditions=cond, stages=timer.stage)
        sync(self.device)
        total = time.perf_counter() - t0
        return total, torch.cat(frames, dim=1), result.frames

    def warm_up(self, height: int, width: int, weights: str) -> float:
        """Compile / autotune what a row's clip will run for the first time (outside its time)."""
        if (height, weights) in self.warm:
            return 0.0
        engine, s = self.engine, self.setting
        t0 = time.perf_counter()
        s2 = replace(s, height=height, width=width)
        inputs = dit_inputs(s2, speakers=2)
        with torch.no_grad(), engine.placement.use(engine.transformer):
            engine.transformer(**inputs)
        del inputs
        video = torch.rand(3, s.frames, height, width, device=self.device) * 2 - 1
        with torch.no_grad(), engine.placement.use(engine.vae):
            latent = engine.vae.encode(video)
            for _ in engine.vae.decode_chunks(latent):
                pass
        del video, latent
        sync(self.device)
        self.warm.add((height, weights))
        return time.perf_counter() - t0

    # -- rows ----------------------------------------------------------------------------------------

    def row_spec(self, name: str) -> dict:
        a = self.args
        size = 640 if not self.tiny else self.setting.height
        big = 960 if not self.tiny else 48
        specs = {
            "resident": dict(cap=None, size=size, weights="bf16", steps=a.steps, fixed=None),
            "cap24": dict(cap=24, size=size, weights="bf16", steps=a.steps, fixed=1),
            "cap24_720p": dict(cap=24, size=big, weights="bf16", steps=a.steps_720p, fixed=0),
            "cap8": dict(cap=8, size=size, weights=a.cap8_weights, steps=a.steps, fixed=0),
            "cap12": dict(cap=12, size=size, weights=a.cap12_weights, steps=a.steps, fixed=1),
        }
        return specs[name]

    def plan_for(self, spec: dict):
        from multitalk.runtime.memory_plan import Workload, plan_memory

        s, engine = self.setting, self.engine
        workload = Workload(spec["size"], spec["size"], s.frames, 2, (s.frames - 1) / 25 + 0.1,
                            tuple(s.arch.vae_stride), tuple(s.arch.dit.patch_size[1:]))
        if self.tiny:  # no caps on the CPU: fixed resident counts, encoders per use
            per_block = engine.sizes.dit_block_params
            return plan_memory(1 << 50, engine.sizes, workload, weights=spec["weights"], offload=True,
                               persistent_params=None if spec["fixed"] is None else spec["fixed"] * per_block,
                               compiled=False, source="tiny-cpu")
        return plan_memory(int(spec["cap"] * GIB), engine.sizes, workload, weights=spec["weights"], compiled=True,
                           source=f"cap {spec['cap']} GiB")

    def set_cap(self, gib: float | None) -> None:
        if self.device.type != "cuda":
            return
        gc.collect()
        torch.cuda.empty_cache()
        fraction = 1.0 if gib is None else min(1.0, gib * GIB / self.total_memory)
        torch.cuda.set_per_process_memory_fraction(fraction, self.device)

    def ensure_weights(self, weights: str) -> None:
        """fp8 rows: every block back on the GPU (uncapped), then quantised there, once."""
        from multitalk.runtime.fp8 import (block_linears_filter, quantize_linears_fp8, scaled_mm_supported,
                                           set_fp8_matmul)

        engine = self.engine
        if weights != "fp8" or getattr(engine, "_bench_fp8", False):
            return
        self.set_cap(None)
        dit = engine.transformer
        engine.placement.set_policy(dit, "gpu")   # every block back on the GPU; the encoders stay put
        # the full 40-block DiT's output error, fp8 against bf16, on the same random inputs
        inputs = dit_inputs(self.setting, speakers=2, seed=3)
        with torch.no_grad():
            ref = dit(**inputs).float()
        t0 = time.perf_counter()
        quantize_linears_fp8(dit, block_linears_filter, out_dtype=self.setting.dtype)
        mode = "scaled_mm" if scaled_mm_supported(self.device) and self.args.fp8_matmul != "dequant" else "dequant"
        set_fp8_matmul(dit, mode)
        sync(self.device)
        with torch.no_grad():
            out = dit(**inputs).float()
        self.data["fp8"] = {"matmul": mode, "quantize_s": time.perf_counter() - t0,
                            "dit_rel_err_vs_bf16": rel_l2(out, ref), "blocks": len(dit.blocks)}
        self.log(f"fp8 weights ({mode}): DiT output {self.data['fp8']['dit_rel_err_vs_bf16']:.2e} from bf16")
        engine._bench_fp8 = True
        self.data["fp8_matmul"] = mode
        del inputs, ref, out
        gc.collect()

    def run_row(self, name: str) -> None:
        spec = self.row_spec(name)
        engine = self.engine
        row = self.data["rows"].setdefault(name, {})
        row.update(spec=spec)
        self.ensure_weights(spec["weights"])
        plan = None
        t0 = time.perf_counter()
        self.set_cap(None)
        rss_reset = reset_rss_peak()
        if spec["cap"] is not None or (self.tiny and spec["fixed"] is not None):
            plan = self.plan_for(spec)
            engine.apply_plan(plan)
            row["plan"] = plan.summary()
            row["plan_detail"] = {k: v for k, v in plan.to_dict().items() if k != "workload"}
            self.log(plan.summary())
        row["apply_plan_s"] = time.perf_counter() - t0
        self.set_cap(spec["cap"])          # compile and autotuning too run under the cap, as on such a card
        row["warm_up_s"] = self.warm_up(spec["size"], spec["size"], spec["weights"])
        if self.device.type == "cuda":
            row["allocated_before_gib"] = torch.cuda.memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
        for st in engine.placement.streamers():
            st.stats = type(st.stats)()
        timer = StageTimer(self.device)
        seconds, video, frames = self.clip(spec["size"], spec["size"], spec["steps"], timer)
        row.update(s=seconds, frames=frames, stages_s=dict(timer.seconds), stage_calls=dict(timer.calls))
        if self.device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        row["host_rss_peak_gib"] = rss_peak() / GIB if rss_reset else NAN
        host = engine.placement.host_bytes if plan is not None else 0
        row["host_weights_gib"] = host / GIB
        row["host_rss_over_weights"] = rss_peak() / host if rss_reset and host else NAN
        row["streamers"] = [vars(st.stats).copy() for st in engine.placement.streamers()]
        if name == "resident":
            self.reference = video
        elif self.reference is not None and video.shape == self.reference.shape:
            row["video_bit_identical_to_resident"] = bool(torch.equal(video, self.reference))
            row["video_rel_err_vs_resident"] = rel_l2(video, self.reference)
        if plan is not None and self.args.profile and self.device.type == "cuda" and plan.streamed:
            row["profile"] = self.profile(spec)
        self.set_cap(None)
        self.log(f"{name}: {seconds:.1f}s, peak {row.get('peak_gib', NAN):.2f} GiB, "
                 f"host RSS {row['host_rss_peak_gib']:.1f} GiB for {row['host_weights_gib']:.1f} GiB of weights, "
                 f"stages " + ", ".join(f"{k} {v:.2f}" for k, v in timer.seconds.items()))
        del video

    def profile(self, spec: dict) -> dict:
        """One DiT forward under the row's plan, reduced to what overlapped (probe_memory's summary)."""
        from torch.profiler import ProfilerActivity, profile

        from probe_memory import overlap_summary

        engine, s = self.engine, self.setting
        inputs = dit_inputs(replace(s, height=spec["size"], width=spec["size"]), speakers=2)
        with torch.no_grad(), engine.placement.use(engine.transformer):
            engine.transformer(**inputs)
            sync(self.device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.transformer(**inputs)
                sync(self.device)
        return overlap_summary(prof)

    def run(self) -> None:
        try:
            self.build()
        except Exception as exc:
            self.data["errors"]["build"] = f"{type(exc).__name__}: {exc}"[:2000]
            self.save()
            raise
        self.save()
        for name in self.args.rows:
            t0 = time.perf_counter()
            try:
                self.run_row(name)
            except Exception as exc:  # record it and go on with the next row
                self.data["errors"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                             "traceback": traceback.format_exc().replace(str(HERE.parent),
                                                                                         "<repo>")[-4000:]}
                self.log(f"{name}: ERROR {type(exc).__name__}: {str(exc)[:300]}")
                self.set_cap(None)
            self.data["rows"].setdefault(name, {})["row_s"] = time.perf_counter() - t0
            self.save()
        self.data["total_s"] = time.perf_counter() - self.started
        self.save()
        print_table(self.data, self.path)


def print_table(d: dict, path: Path) -> None:
    print()
    for name, row in d["rows"].items():
        print(f"{name:<11} {row.get('s', NAN):7.1f}s  x{row.get('over_resident', NAN):.3f}  "
              f"peak {row.get('peak_gib', NAN):6.2f} GiB  host RSS/weights {row.get('host_rss_over_weights', NAN):.3f}"
              f"  {row.get('plan', 'everything resident')}")
    for key in HEADLINE:
        print(f"{key:<24} {d.get(key)}")
    for name, err in d["errors"].items():
        print(f"ERROR {name}: {str(err)[:300]}")
    print(f"report: {path}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list, run in the order {','.join(ROWS)}")
    p.add_argument("--steps", type=int, default=4, help="sampling steps of each 640x640 clip (3 passes each)")
    p.add_argument("--steps-720p", type=int, default=1, help="sampling steps of the 960x960 clip")
    p.add_argument("--cap8-weights", default="bf16", choices=("bf16", "fp8"))
    p.add_argument("--cap12-weights", default="fp8", choices=("bf16", "fp8"))
    p.add_argument("--fp8-matmul", default="auto", choices=("auto", "dequant"),
                   help="fp8 rows: _scaled_mm where the GPU has it (auto) or dequantised weights")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--tiny-cpu", action="store_true", help="TINY architecture on the CPU (the CI smoke run)")
    args = p.parse_args(argv)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    args.rows = [r for r in ROWS if r in wanted]
    if args.tiny_cpu:
        args.steps, args.steps_720p = min(args.steps, 2), 1
    return args


def main(argv: list[str] | None = None) -> int:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    args = parse_args(argv)
    MemoryBench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
