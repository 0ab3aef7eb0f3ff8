"""Multi-GPU benchmark of the parallel DiT (issue 16): N processes against one GPU, same run, same machine.

    python benchmarks/parallel_bench.py --gpus 2 --out-dir benchmarks/results [--sections ...] [--tiny-cpu]

Random full-size weights (``builders.build_dit`` / ``build_engine``, the same seed on every rank),
bf16, the production path (compiled, fused, the 8-bit attention where ``auto`` picks it). This
process is rank 0 of ``--gpus`` processes started by the engine itself
(``pipeline.parallel.load_parallel_engine``); every figure is measured twice in the same run: on
rank 0 alone (the one-GPU path: the whole sequence, every branch in turn) and over all N
processes. NVLink multicast is off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1``), as the device README requires. Sections, in order:

* ``forward``  DiT forward at 640x640x81 (33,600 tokens), 1 and 2 speakers: one GPU vs Ulysses
               degree N -> ``x{N}_ulysses_speedup`` (1 speaker), ``..._2spk``
* ``step``     one 3-pass guidance step (cond / drop-text / uncond): one GPU vs ``--parallel cfg``
               (N=2: two branches side by side, the third split over both), ``auto`` and
               ``ulysses`` -> ``x{N}_cfg_speedup``
* ``profile``  kernel time of one N-process Ulysses forward on rank 0: the NCCL (all-to-all,
               gather) share
* ``clip720``  a 720p (``multitalk-720``, 704x1280) 81-frame clip at 4 steps through
               ``pipeline.generate``: wall time on N processes (and one GPU when the budget
               allows), peak memory per GPU
* ``video10s`` the 10-second two-speaker video with ``--video-params`` (default the
               ``lightx2v`` recipe): wall time on N processes and on one GPU, ratio

With ``--gpus 1`` only the one-GPU figures are measured (the ratios stay NaN): the single-GPU run
of the same script. ``--tiny-cpu`` runs everything on CPU with gloo, the TINY architecture and
small videos (the test suite's smoke run). The report's top-level keys ``x2_ulysses_speedup`` and
``x2_cfg_speedup`` are always present (NaN unless N=2 measured them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import traceback
from pathlib import Path

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in NCCL_ENV.items():      # before torch.distributed touches NCCL, inherited by every rank
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import multitalk  # noqa: F401
except ImportError:  # a bare checkout (the GPU image): use the source tree
    sys.path.insert(0, str(HERE.parent / "src"))

from builders import build_dit, build_engine, dit_inputs  # noqa: E402
from harness import GIB, NAN, Setting, environment, measure, rel_l2, slug, sync  # noqa: E402
from multitalk.models.architecture import FULL_14B, TINY  # noqa: E402

SECTIONS = ("forward", "step", "profile", "clip720", "video10s")
TINY_ENV = "MULTITALK_BENCH_TINY"


class Skipped(Exception):
    pass


def make_setting(tiny: bool, device: torch.device, **video) -> Setting:
    if tiny:
        return Setting(TINY, device, torch.float32, **({"height": 32, "width": 32, "frames": 9} | video),
                       text_tokens=24, tiny=True)
    return Setting(FULL_14B, device, torch.bfloat16, **video)


def servant_dit(config, device):
    """Each servant's DiT: the same random weights as rank 0's (same seed, drawn on its own GPU)."""
    return build_dit(make_setting(os.environ.get(TINY_ENV) == "1", device), seed=1)


# ----------------------------------------------------------------------------------------------
# report


class Run:
    def __init__(self, args, setting: Setting, engine, out_dir: Path, name: str):
        self.args, self.setting, self.engine = args, setting, engine
        self.n = args.gpus
        self.started = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"{dt.date.today().isoformat()}_{slug(name)}_x{self.n}_parallel.json"
        self.data = {"gpu": name, "gpus": self.n, "x2_ulysses_speedup": NAN, "x2_cfg_speedup": NAN,
                     "nccl_env": {k: os.environ.get(k) for k in NCCL_ENV}, "sections": {}, "errors": {},
                     "skipped": {}}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {msg}", flush=True)

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.part")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def remaining_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def require(self, seconds: float, what: str) -> None:
        if seconds > self.remaining_s():
            raise Skipped(f"{what}: needs ~{seconds:.0f}s, {self.remaining_s():.0f}s of the budget left")

    @property
    def dit(self):
        return self.engine.transformer

    def local(self, teacache=None):
        """The one-GPU path on rank 0: the whole sequence, every branch in turn."""
        from multitalk.pipeline.denoiser import LocalDenoiser
        from multitalk.runtime.parallel.sequence import install

        install(self.dit, None)
        return LocalDenoiser(self.dit, teacache)

    def parallel(self, mode: str, branches: int):
        from multitalk.pipeline.parallel import ParallelDenoiser
        from multitalk.runtime.parallel.plan import choose_plan

        runtime = self.engine.parallel
        return ParallelDenoiser(runtime, self.dit, choose_plan(mode, self.n, branches, runtime.heads), None)

    def timed(self, fn, label: str) -> tuple[dict, object]:
        with torch.no_grad():
            stats, out = measure(fn, self.setting.device, self.args.warmup, self.args.repeats)
        self.log(f"{label}: median {stats['median_s']:.3f}s")
        return stats, out


def ratio(a, b) -> float:
    try:
        return float(a) / float(b)
    except (TypeError, ZeroDivisionError):
        return NAN


# ----------------------------------------------------------------------------------------------
# sections


def _clip_args(inputs: dict) -> tuple:
    return inputs["encoder_hidden_states_image"], inputs["y"], inputs["ref_target_masks"]


def run_forward(r: Run) -> None:
    s, sec = r.setting, r.data["sections"].setdefault("forward", {})
    sec["tokens"] = s.tokens
    for spk in (1, 2):
        inputs = dit_inputs(s, spk)
        x, t = inputs["hidden_states"], inputs["timestep"]
        branch = [(inputs["encoder_hidden_states"][0], inputs["audio"])]
        one = r.local()
        one.start_clip(branch, *_clip_args(inputs))
        st1, out1 = r.timed(lambda: one.predict(x, t), f"forward {spk}spk, 1 GPU")
        sec[f"one_gpu_{spk}spk"] = st1
        if r.n > 1:
            den = r.parallel("ulysses", 1)
            den.start_clip(branch, *_clip_args(inputs))
            stn, outn = r.timed(lambda: den.predict(x, t), f"forward {spk}spk, Ulysses {r.n}")
            den.close()
            speedup = ratio(st1["median_s"], stn["median_s"])
            sec[f"ulysses_{spk}spk"] = stn
            sec[f"speedup_{spk}spk"] = speedup
            sec[f"rel_err_{spk}spk"] = rel_l2(outn[0], out1[0])
            r.data[f"x{r.n}_ulysses_speedup" + ("" if spk == 1 else "_2spk")] = speedup
            r.log(f"{spk} speaker(s): Ulysses {r.n} {speedup:.3f}x, output {sec[f'rel_err_{spk}spk']:.2e} from 1 GPU")
        r.save()


def _three_branches(s: Setting, inputs: dict) -> list:
    g = torch.Generator(device=s.device).manual_seed(5)
    ctx = inputs["encoder_hidden_states"][0]
    null = torch.randn(ctx.shape[0] // 2, ctx.shape[1], generator=g, device=s.device).to(ctx.dtype)
    audio = inputs["audio"]
    return [(ctx, audio), (null, audio), (null, torch.zeros_like(audio)[-1:])]


def run_step(r: Run) -> None:
    s, sec = r.setting, r.data["sections"].setdefault("step", {})
    inputs = dit_inputs(s, 2)
    x, t = inputs["hidden_states"], inputs["timestep"]
    branches = _three_branches(s, inputs)
    one = r.local()
    one.start_clip(branches, *_clip_args(inputs))
    st1, out1 = r.timed(lambda: one.predict(x, t), "3-pass step, 1 GPU")
    sec["one_gpu"] = st1
    if r.n == 1:
        return
    for mode in ("cfg", "auto", "ulysses"):
        try:
            den = r.parallel(mode, 3)
        except Exception as exc:  # e.g. cfg with more processes than branches
            sec[mode] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        sec[f"{mode}_plan"] = den.plan.describe()
        den.start_clip(branches, *_clip_args(inputs))
        stn, outn = r.timed(lambda: den.predict(x, t), f"3-pass step, --parallel {mode} on {r.n}")
        den.close()
        sec[mode] = stn
        sec[f"{mode}_speedup"] = ratio(st1["median_s"], stn["median_s"])
        sec[f"{mode}_rel_err"] = max(rel_l2(a, b) for a, b in zip(outn, out1))
        r.log(f"--parallel {mode}: {sec[f'{mode}_speedup']:.3f}x per step")
        r.save()
    r.data[f"x{r.n}_cfg_speedup"] = sec.get("cfg_speedup", NAN)
    r.data[f"x{r.n}_auto_step_speedup"] = sec.get("auto_speedup", NAN)


def run_profile(r: Run) -> None:
    s, sec = r.setting, r.data["sections"].setdefault("profile", {})
    if s.device.type != "cuda":
        raise Skipped("kernel profile needs CUDA")
    if r.n == 1:
        raise Skipped("no collectives with one GPU")
    from torch.profiler import ProfilerActivity, profile

    inputs = dit_inputs(s, 1)
    branch = [(inputs["encoder_hidden_states"][0], inputs["audio"])]
    den = r.parallel("ulysses", 1)
    den.start_clip(branch, *_clip_args(inputs))
    with torch.no_grad():
        den.predict(inputs["hidden_states"], inputs["timestep"])       # warm
        sync(s.device)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            den.predict(inputs["hidden_states"], inputs["timestep"])
            sync(s.device)
        wall = time.perf_counter() - t0
    den.close()
    nccl = total = 0.0
    kinds: dict[str, float] = {}
    for evt in prof.key_averages():
        sec_t = getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0.0)) / 1e6
        if sec_t <= 0:
            continue
        total += sec_t
        if "nccl" in evt.key.lower():
            nccl += sec_t
            kinds[evt.key[:80]] = kinds.get(evt.key[:80], 0.0) + sec_t
    sec.update(wall_s=wall, kernel_s=total, nccl_s=nccl, nccl_share_of_kernel_time=ratio(nccl, total),
               nccl_kernels=kinds)
    r.data[f"x{r.n}_alltoall_share"] = ratio(nccl, total)
    r.log(f"profile: NCCL {nccl:.3f}s of {total:.3f}s kernel time ({100 * ratio(nccl, total):.1f} %)")


def _conditions(r: Run, seconds: float, speakers: int, height: int, width: int):
    """Speech, text and the reference image as ``generate`` takes them (random, encoded on rank 0)."""
    from multitalk.pipeline.generate import Conditions
    from multitalk.pipeline.speakers import speaker_masks

    engine, rng = r.engine, np.random.default_rng(0)
    n = int(seconds * 16000)
    if speakers == 1:
        speech = [(rng.standard_normal(n) * 0.1).astype(np.float32)]
    else:  # 'add': one after the other
        half = n // 2
        a, b = (rng.standard_normal(half) * 0.1).astype(np.float32), (rng.standard_normal(n - half) * 0.1).astype(np.float32)
        speech = [np.concatenate([a, np.zeros(n - half, np.float32)]), np.concatenate([np.zeros(half, np.float32), b])]
    with torch.no_grad():
        embs = [engine.audio_encoder.embed(x, fps=25).float().cpu() for x in speech]
        context, context_null = engine.text_encoder.encode(["two people talking", r.setting.arch.sample_neg_prompt])
    cond_image = torch.rand(3, 1, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return Conditions(speech=speech, mix=sum(speech), audio_embs=embs, num_audio_frames=max(e.shape[0] for e in embs),
                      context=context, context_null=context_null, cond_image=cond_image,
                      ref_masks=speaker_masks(height, width, height, width, speakers), height=height, width=width)


def _generate(r: Run, params, cond, parallel: bool) -> dict:
    """One ``pipeline.generate`` on N processes (``parallel``) or on rank 0 alone; wall time, peak memory."""
    from multitalk.pipeline.generate import generate

    engine, dev = r.engine, r.setting.device
    runtime = engine.parallel
    if not parallel:
        r.local()                               # whole sequence on rank 0
        engine.parallel = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        sync(dev)
        t0 = time.perf_counter()
        result = generate(engine, None, params, on_frames=lambda frames: None, conditions=cond)
        sync(dev)
        wall = time.perf_counter() - t0
    finally:
        engine.parallel = runtime
    out = {"wall_s": wall, "frames": result.frames, "clips": result.num_clips, "timings": result.timings}
    if dev.type == "cuda":
        peaks = {0: torch.cuda.max_memory_allocated(dev)}
        if parallel and runtime is not None:
            peaks.update({k: v["peak_memory_bytes"] for k, v in runtime.group.servant_stats(runtime.group.jobs).items()})
        out["peak_memory_gib"] = {str(k): v / GIB for k, v in sorted(peaks.items()) if v is not None}
    return out


def run_clip720(r: Run) -> None:
    from multitalk.pipeline.inputs import GenerationParams

    sec = r.data["sections"].setdefault("clip720", {})
    tiny = r.setting.tiny
    size, (h, w), frames = ("preview", (32, 32), 5) if tiny else ("multitalk-720", (704, 1280), 81)
    steps = 1 if tiny else r.args.clip_steps
    params = GenerationParams(size=size, frame_num=frames, mode="clip", sample_steps=steps, seed=42)
    sec.update(size=size, height=h, width=w, frames=frames, steps=steps)
    r.require(0 if tiny else 300, "clip720")
    cond = _conditions(r, frames / 25 + 0.2, 2, h, w)
    runs = [("parallel", True)] if r.n > 1 else []
    runs.append(("one_gpu", False))
    for label, parallel in runs:
        if label == "one_gpu" and r.n > 1:
            r.require(0 if tiny else 240, "clip720 on one GPU")
        sec[label] = _generate(r, params, cond, parallel)
        r.log(f"clip720 {label}: {sec[label]['wall_s']:.1f}s, peak {sec[label].get('peak_memory_gib')}")
        r.save()
    sec["speedup"] = ratio(sec.get("one_gpu", {}).get("wall_s"), sec.get("parallel", {}).get("wall_s"))
    r.data[f"x{r.n}_clip720_s"] = sec.get("parallel", sec["one_gpu"])["wall_s"]


def run_video10s(r: Run) -> None:
    from multitalk.pipeline.inputs import GenerationParams

    sec = r.data["sections"].setdefault("video10s", {})
    tiny = r.setting.tiny
    extra = json.loads(r.args.video_params)
    try:
        params = GenerationParams.from_dict({"size": "preview" if tiny else "multitalk-480", "mode": "streaming",
                                             **({"frame_num": 5, "motion_frame": 1, "sample_steps": 1} if tiny else {}),
                                             **({k: v for k, v in extra.items() if not tiny or k != "recipe"})})
    except Exception as exc:
        raise Skipped(f"--video-params {r.args.video_params} not accepted here: {exc}") from None
    seconds = 0.4 if tiny else 10.0
    h, w = (32, 32) if tiny else (640, 640)
    sec.update(params=params.model_dump(), seconds=seconds, height=h, width=w)
    cond = _conditions(r, seconds, 2, h, w)
    for label, parallel in ([("parallel", True)] if r.n > 1 else []) + [("one_gpu", False)]:
        r.require(0 if tiny else 200, f"video10s {label}")
        sec[label] = _generate(r, params, cond, parallel)
        r.log(f"video10s {label}: {sec[label]['wall_s']:.1f}s")
        r.save()
    sec["speedup"] = ratio(sec.get("one_gpu", {}).get("wall_s"), sec.get("parallel", {}).get("wall_s"))
    r.data[f"x{r.n}_video10s_speedup"] = sec["speedup"]


RUNNERS = {"forward": run_forward, "step": run_step, "profile": run_profile, "clip720": run_clip720,
           "video10s": run_video10s}


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--gpus", type=int, default=2, help="processes, one GPU each (1: the single-GPU run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--tiny-cpu", action="store_true", help="TINY architecture on CPU processes with gloo (CI smoke)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clip-steps", type=int, default=4)
    p.add_argument("--video-params", default='{"recipe": "lightx2v"}',
                   help="GenerationParams of the 10-second video (JSON)")
    p.add_argument("--budget-s", type=float, default=540.0, help="later sections that would not fit are skipped")
    p.add_argument("--tag", default="", help="added to the report's name")
    args = p.parse_args(argv)
    args.sections = [x for x in SECTIONS if x in {y.strip() for y in args.sections.split(",")}]
    return args


def main(argv=None) -> int:
    from diffusers.utils import logging as diffusers_logging

    from multitalk.pipeline.engine import EngineConfig
    from multitalk.pipeline.parallel import load_parallel_engine

    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()
    if args.tiny_cpu:
        os.environ[TINY_ENV] = "1"
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny-cpu for the CPU smoke run")
        device = torch.device("cuda", 0)
        if torch.cuda.device_count() < args.gpus:
            raise SystemExit(f"--gpus {args.gpus} but {torch.cuda.device_count()} GPUs are visible")
    setting = make_setting(args.tiny_cpu, device)
    # the engine's defaults on every rank (builders.build_engine uses them for rank 0): compiled and
    # fused on CUDA, the self-attention "auto" picks (8-bit on Hopper)
    config = EngineConfig(device=str(device), dtype=setting.dtype, gpus=args.gpus, parallel="auto")

    def rank0_engine(config, device):
        return build_engine(make_setting(args.tiny_cpu, device), build_dit(make_setting(args.tiny_cpu, device), seed=1))

    t0 = time.perf_counter()
    engine = (load_parallel_engine(config, dit_factory=servant_dit, engine_factory=rank0_engine) if args.gpus > 1
              else rank0_engine(config, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-tiny"
    run = Run(args, setting, engine, args.out_dir, name + (f"_{args.tag}" if args.tag else ""))
    run.data.update(environment=environment(setting), argv=["<out-dir>" if Path(a) == Path(args.out_dir) else a
                                                             for a in sys.argv[1:]],
                    build_s=time.perf_counter() - t0, attention=engine.attention, tokens=setting.tokens,
                    started=dt.datetime.now().isoformat(timespec="seconds"))
    run.log(f"{name}: {args.gpus} processes, {setting.tokens} tokens, attention {engine.attention}, "
            f"sections {','.join(args.sections)}; report {run.path}")
    run.save()
    try:
        for section in args.sections:
            t = time.perf_counter()
            try:
                RUNNERS[section](run)
                status = "ok"
            except Skipped as exc:
                run.data["skipped"][section] = str(exc)
                status = f"skipped ({exc})"
            except Exception as exc:  # record and go on
                run.data["errors"][section] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                               "traceback": traceback.format_exc().replace(str(HERE.parent), "<repo>")[-4000:]}
                status = f"ERROR {type(exc).__name__}: {exc}"
                if engine.parallel is not None and engine.parallel.group.broken:
                    run.log(f"== {section}: {status}; the process group is broken, stopping")
                    break
            run.data["sections"].setdefault(section, {})["section_s"] = time.perf_counter() - t
            run.log(f"== {section}: {status} ({time.perf_counter() - t:.1f}s)")
            run.save()
    finally:
        run.data["total_s"] = time.perf_counter() - run.started
        run.save()
        engine.close()
    for key in ("x2_ulysses_speedup", "x2_cfg_speedup"):
        print(f"{key}: {run.data[key]}")
    print(f"report: {run.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
