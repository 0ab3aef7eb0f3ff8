"""GPU benchmark of few-step generation with a LoRA: a 10-second two-speaker video, warm.

    python benchmarks/bench_lora.py --out-dir DIR [--attention NAME] [--seconds 10] [--rank 32]
    python benchmarks/bench_lora.py --tiny-cpu --out-dir /tmp/bench   # CPU smoke run (seconds)

What it runs (random weights, nothing downloaded; built with ``bench.py``'s builders):

1. the full-size MultiTalk DiT and random umT5 / CLIP / VAE / wav2vec2 around it (``bench.build_dit``,
   ``bench.build_engine``: the project's loaders fed random official-key tensors);
2. a random rank-``--rank`` LoRA in the **official format**, shaped like the released step-distillation
   LoRAs (pairs on every block linear, ``diff_b`` on their biases, ``diff`` on the norms), written to a
   safetensors file and then read, checked and merged by ``engine.prepare_dit`` exactly as
   ``Engine.load`` does it (LoRA merge, then attention option, ``dit_fusion`` and regional compile):
   ``video10s_lora_load_s`` = read + check + merge, with ``lora_read_s`` / ``lora_merge_s`` apart;
3. a warm-up clip (1 step, both guidance branches: compile and the VAE kernels' tuning happen here);
4. the measured run: ``--seconds`` of two-speaker speech at the 640x640 bucket, streaming (81-frame
   clips, 25 motion frames), ``--recipe lightx2v`` (4 steps, shift 2, text guide 1, audio guide 2:
   two DiT passes per step), through ``pipeline.generate.generate`` with the mp4 written as
   ``pipeline.render`` does. Wall time per stage (``bench.StageTimer``), ``video10s_lora_warm_s``,
   ``video10s_forwards``; and the same video at the default 40 steps x 3 passes, estimated from the
   measured time per DiT forward (``video10s_40x3_forwards``, ``video10s_40x3_estimated_s``).

``--attention NAME`` passes ``EngineConfig(attention=NAME)`` through ``prepare_dit`` (the 8-bit
attention option); it is refused when ``EngineConfig`` has no such field.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402  (benchmarks/bench.py: builders, timers, Setting)

from multitalk.models.architecture import FULL_14B, TINY  # noqa: E402

NAN = float("nan")
HEADLINE = ("video10s_lora_warm_s", "video10s_lora_load_s", "video10s_forwards", "video10s_40x3_forwards",
            "video10s_40x3_estimated_s", "video10s_speedup_vs_40x3", "video10s_dit_forward_s")


class LoraBenchReport:
    """The JSON report, rewritten after every step (a timeout keeps what was measured)."""

    def __init__(self, out_dir: Path, device_name: str):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"{dt.date.today().isoformat()}_{bench.slug(device_name)}_video10s_lora.json"
        self.data: dict = {"gpu": device_name, **{k: NAN for k in HEADLINE}, "sections": {}, "errors": {}}

    def set(self, **values) -> None:
        self.data.update(values)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.part")
        tmp.write_text(json.dumps(self.data, indent=2, default=bench._jsonable) + "\n")
        os.replace(tmp, self.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--tiny-cpu", action="store_true", help="TINY architecture on CPU, 32x32 video (CI smoke)")
    p.add_argument("--seconds", type=float, default=None, help="speech length (default 10; --tiny-cpu 0.52: two clips)")
    p.add_argument("--rank", type=int, default=32, help="rank of the random LoRA")
    p.add_argument("--recipe", default="lightx2v", choices=("lightx2v", "fusionx"))
    p.add_argument("--attention", default=None, help="EngineConfig.attention (e.g. the 8-bit attention option)")
    p.add_argument("--text-tokens", type=int, default=200)
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.52 if args.tiny_cpu else 10.0
    return args


def make_setting(args) -> bench.Setting:
    if args.tiny_cpu:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        return bench.Setting(TINY, torch.device("cpu"), torch.float32, height=32, width=32, frames=9,
                             text_tokens=min(args.text_tokens, 24), tiny=True)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny-cpu for the CPU smoke run")
    return bench.Setting(FULL_14B, torch.device("cuda"), torch.bfloat16, text_tokens=args.text_tokens)


def engine_config(args, lora_path: Path, device: torch.device):
    from multitalk.models.lora import LoraSpec
    from multitalk.pipeline.engine import EngineConfig

    extra = {}
    if args.attention:
        if "attention" not in {f.name for f in dataclasses.fields(EngineConfig)}:
            raise SystemExit(f"--attention {args.attention}: EngineConfig has no 'attention' field in this checkout")
        extra["attention"] = args.attention
    return EngineConfig(device=str(device), compile=None, loras=(LoraSpec(lora_path, 1.0),), **extra)


def speech_tracks(seconds: float, seed: int = 0) -> list[np.ndarray]:
    """Two speakers one after the other ('add'): each track is speech-like noise in its half, silent in the other."""
    rng = np.random.default_rng(seed)
    n, half = int(seconds * 16000), int(seconds * 8000)
    tracks = []
    for who in range(2):
        x = np.zeros(n, dtype=np.float32)
        lo, hi = (0, half) if who == 0 else (half, n)
        x[lo:hi] = rng.standard_normal(hi - lo).astype(np.float32) * 0.1
        tracks.append(x)
    return tracks


def run_video(s: bench.Setting, engine, dit, params, speech: list[np.ndarray], sec: dict, label: str) -> tuple[float, dict]:
    """One streaming generation with every stage timed; the mp4 written as pipeline.render does."""
    import multitalk.pipeline.generate as gen_mod
    from multitalk.media.video import BackgroundWriter
    from multitalk.pipeline.generate import Conditions, generate
    from multitalk.pipeline.speakers import speaker_masks

    timer = bench.StageTimer(s.device)
    out_dir = Path(tempfile.mkdtemp(prefix="multitalk-bench-lora-"))
    restore, writer, mp4 = [], None, None
    mix = speech[0] + speech[1]
    try:
        bench.sync(s.device)
        t_start = time.perf_counter()
        with timer.stage("audio_features"):
            embs = [engine.audio_encoder.embed(x, fps=25) for x in speech]
        with timer.stage("text_encode"):
            context, context_null = engine.text_encoder.encode(["two people talking", s.arch.sample_neg_prompt])
        cond_image = torch.rand(3, 1, s.height, s.width, generator=torch.Generator().manual_seed(0)) * 2 - 1
        cond = Conditions(speech=speech, mix=mix, audio_embs=embs, num_audio_frames=max(e.shape[0] for e in embs),
                          context=context, context_null=context_null, cond_image=cond_image,
                          ref_masks=speaker_masks(s.height, s.width, s.height, s.width, 2), height=s.height, width=s.width)
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
        mp4 = bench._mp4_writer(out_dir / "video.mp4", s, mix, sec)
        writer = BackgroundWriter(mp4) if mp4 is not None else None
        delivered = []

        def on_frames(frames: torch.Tensor) -> None:
            delivered.append(frames.shape[1])
            if writer is not None:
                with timer.stage("mp4_write"):
                    writer.write_frames(frames)

        with timer.module("dit", dit):
            result = generate(engine, None, params, on_frames=on_frames, conditions=cond)
        if writer is not None:
            with timer.stage("mp4_write"):
                writer.close()
                mp4.close()
            writer = None
            sec[f"{label}_mp4_bytes"] = (out_dir / "video.mp4").stat().st_size
        bench.sync(s.device)
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
    sec[f"{label}_calls"] = dict(timer.calls)
    sec[f"{label}_frames"], sec[f"{label}_clips"] = result.frames, result.num_clips
    sec[f"{label}_frames_delivered"] = sum(delivered)
    return total, stages


def main(argv=None) -> int:
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import save_file

    from multitalk.models.lora import random_official_lora
    from multitalk.pipeline.engine import prepare_dit
    from multitalk.pipeline.guidance import branch_names
    from multitalk.pipeline.inputs import GenerationParams

    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()
    s = make_setting(args)
    name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu-tiny"
    report = LoraBenchReport(args.out_dir, name)
    argv_rec = ["<out-dir>" if Path(a) == Path(args.out_dir) else a for a in (argv if argv is not None else sys.argv[1:])]
    report.data.update(environment=bench.environment(s), argv=argv_rec, tokens=s.tokens,
                       started=dt.datetime.now().isoformat(timespec="seconds"))
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    config = engine_config(args, Path("unused"), s.device)  # refuse a bad --attention before any GPU work
    build, sec = report.data["sections"].setdefault("build", {}), report.data["sections"].setdefault("video", {})
    tmp = Path(tempfile.mkdtemp(prefix="multitalk-bench-lora-file-"))
    try:
        t0 = time.perf_counter()
        dit = bench.build_dit(s)
        bench.sync(s.device)
        build["dit_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = bench.build_engine(s, dit)
        build.update(encoders_s=time.perf_counter() - t0, encoders_stage_s=engine.load_seconds)
        log(f"built DiT ({build['dit_s']:.1f}s) and encoders ({build['encoders_s']:.1f}s)")

        # the LoRA: written once, then read + checked + merged as Engine.load does (before compile)
        t0 = time.perf_counter()
        lora_path = tmp / f"random_rank{args.rank}_official.safetensors"
        save_file(random_official_lora(s.arch.dit, rank=args.rank, seed=1), str(lora_path))
        build.update(lora_write_s=time.perf_counter() - t0, lora_file_mib=lora_path.stat().st_size / 2**20)
        config = engine_config(args, lora_path, s.device)
        t0 = time.perf_counter()
        lora = prepare_dit(dit, config, s.device)
        bench.sync(s.device)
        prepare_s = time.perf_counter() - t0
        report.set(video10s_lora_load_s=lora.read_s + lora.merge_s, lora_read_s=lora.read_s, lora_merge_s=lora.merge_s,
                   lora_tensors_changed=lora.tensors_changed, lora_files=lora.files, prepare_dit_s=prepare_s,
                   attention=args.attention)
        log(f"LoRA {build['lora_file_mib']:.0f} MiB: read {lora.read_s:.2f}s, merged {lora.merge_s:.2f}s "
            f"({lora.tensors_changed} tensors); prepare_dit {prepare_s:.1f}s")

        params = GenerationParams(size="multitalk-480", frame_num=s.frames, motion_frame=25 if not args.tiny_cpu else 5,
                                  mode="streaming", recipe=args.recipe, seed=42)
        passes = len(branch_names(params.text_guide_scale, params.audio_guide_scale))
        speech = speech_tracks(args.seconds)

        # warm-up: one short clip (compile of both branches' shapes, VAE kernel tuning, cuDNN plans)
        warm_params = params.model_copy(update={"sample_steps": 1, "mode": "clip"})
        t0 = time.perf_counter()
        total, stages = run_video(s, engine, dit, warm_params, speech, sec, "warmup")
        sec.update(warmup_total_s=total, warmup_stages_s=stages)
        log(f"warm-up clip: {total:.1f}s ({', '.join(f'{k} {v:.1f}' for k, v in stages.items())})")
        report.save()

        total, stages = run_video(s, engine, dit, params, speech, sec, "warm")
        forwards = sec["warm_calls"].get("dit", 0)
        clips = sec["warm_clips"]
        per_forward = stages["dit"] / max(forwards, 1)
        est_forwards = clips * 40 * 3
        estimate = total - stages["dit"] + est_forwards * per_forward
        sec.update(warm_total_s=total, warm_stages_s=stages, steps=params.sample_steps, passes=passes,
                   shift=params.shift, text_guide=params.text_guide_scale, audio_guide=params.audio_guide_scale,
                   seconds=args.seconds, frame_num=params.frame_num, motion_frame=params.motion_frame,
                   non_dit_s=total - stages["dit"])
        report.set(video10s_lora_warm_s=total, video10s_forwards=forwards, video10s_dit_forward_s=per_forward,
                   video10s_40x3_forwards=est_forwards, video10s_40x3_estimated_s=estimate,
                   video10s_speedup_vs_40x3=estimate / total, video10s_clips=clips,
                   video10s_frames=sec["warm_frames"])
        log(f"video: {sec['warm_frames']} frames in {clips} clips, {forwards} DiT forwards, {total:.1f}s warm "
            f"({', '.join(f'{k} {v:.1f}' for k, v in stages.items())}); at 40x3: {est_forwards} forwards, "
            f"~{estimate:.0f}s")
    except Exception as exc:  # record, keep what was measured
        report.data["errors"]["run"] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                        "traceback": traceback.format_exc().replace(str(HERE.parent), "<repo>")[-4000:]}
        report.save()
        print(report.data["errors"]["run"]["traceback"], flush=True)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.set(total_s=time.perf_counter() - started)
    print(json.dumps({k: report.data[k] for k in HEADLINE}, indent=1), f"\nreport: {report.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
