"""One 81-frame clip at 4 steps through ``pipeline.generate`` (+ mp4), timed per stage."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from builders import build_engine
from harness import NAN, Bench, Setting, StageTimer, free_memory, sync


def run(b: Bench) -> None:
    """One 81-frame clip end to end, twice on the same engine: cold (first use of every shape,
    cuDNN autotuning) and warm (what a service worker sees from its second job on)."""
    s, sec = b.setting, b.report.section("clip4")
    steps = b.args.clip_steps
    calls = steps * 3  # cond, drop_text, uncond per step (text scale 5)
    b.require(90 + 2 * calls * b.forward_s(), "clip4")
    dit = b.get_dit()
    t0 = time.perf_counter()
    engine = build_engine(s, dit)
    sec.update(build_s=time.perf_counter() - t0, build_stage_s=engine.load_seconds, steps=steps, dit_calls=calls,
               attention=engine.attention)  # the DiT self-attention the engine chose (int8 on Hopper)
    b.log(f"built encoders + VAE in {sec['build_s']:.1f}s")
    b.report.save()
    try:
        for label in ("cold", "warm"):
            total, stages = _clip4_once(b, engine, steps, sec)
            sec[f"{label}_total_s"], sec[f"{label}_stages_s"] = total, stages
            b.log(f"clip4 {label}: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()) + f"; total {total:.1f}s")
            b.report.save()
    finally:
        del engine
        free_memory(s.device)
    sec["stages_s"] = sec["warm_stages_s"]
    b.report.set(clip4_total_s=sec["warm_total_s"], clip4_dit_s=sec["warm_stages_s"].get("dit", NAN),
                 clip4_cold_total_s=sec["cold_total_s"])


def _clip4_once(b: Bench, engine, steps: int, sec: dict):
    from multitalk.media.video import BackgroundWriter
    from multitalk.pipeline.generate import Conditions, generate
    from multitalk.pipeline.inputs import GenerationParams
    from multitalk.pipeline.speakers import speaker_masks

    s = b.setting
    params = GenerationParams(size="multitalk-480", frame_num=s.frames, mode="clip", sample_steps=steps, seed=42)
    timer = StageTimer(s.device)
    speech = (np.random.default_rng(0).standard_normal(int(3.3 * 16000)) * 0.1).astype(np.float32)
    out_dir = Path(tempfile.mkdtemp(prefix="multitalk-bench-clip4-"))
    writer = None
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
        mp4 = _mp4_writer(out_dir / "clip4.mp4", s, speech, sec)
        writer = BackgroundWriter(mp4) if mp4 is not None else None  # as pipeline.render does
        frames_seen = []

        def on_frames(frames: torch.Tensor) -> None:
            frames_seen.append(frames.shape[1])
            if writer is not None:
                with timer.stage("mp4_write"):  # only a wait when the encoder thread falls behind
                    writer.write_frames(frames)

        # clip_encode, vae_encode, dit, vae_decode, color_correction: generate's own stage hook
        result = generate(engine, None, params, on_frames=on_frames, conditions=cond, stages=timer.stage)
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
