"""One 81-frame clip at 4 steps through ``pipeline.generate`` (+ mp4), timed per stage."""

from __future__ import annotations

import time

import numpy as np
import torch

from builders import build_engine
from harness import NAN, Bench, free_memory, timed_generate


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
            total, stages = _clip4_once(b, engine, steps, sec, label)
            sec[f"{label}_total_s"], sec[f"{label}_stages_s"] = total, stages
            b.log(f"clip4 {label}: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()) + f"; total {total:.1f}s")
            b.report.save()
    finally:
        del engine
        free_memory(s.device)
    sec["stages_s"] = sec["warm_stages_s"]
    b.report.set(clip4_total_s=sec["warm_total_s"], clip4_dit_s=sec["warm_stages_s"].get("dit", NAN),
                 clip4_cold_total_s=sec["cold_total_s"])


def _process_rng(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    return states + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def _clip4_once(b: Bench, engine, steps: int, sec: dict, label: str):
    from multitalk.pipeline.generate import Conditions
    from multitalk.pipeline.inputs import GenerationParams
    from multitalk.pipeline.speakers import speaker_masks

    s = b.setting
    params = GenerationParams(size="multitalk-480", frame_num=s.frames, mode="clip", sample_steps=steps, seed=42)
    speech = (np.random.default_rng(0).standard_normal(int(3.3 * 16000)) * 0.1).astype(np.float32)
    frames_seen, checksum, rng = [], [], []

    def conditions(timer):
        with timer.stage("audio_features"):
            emb = engine.audio_encoder.embed(speech, fps=25)
        with timer.stage("text_encode"):
            context, context_null = engine.text_encoder.encode(["a person talking", s.arch.sample_neg_prompt])
        cond_image = torch.rand(3, 1, s.height, s.width, generator=torch.Generator().manual_seed(0)) * 2 - 1
        rng.extend(_process_rng(s.device))
        return Conditions(speech=[speech], mix=speech, audio_embs=[emb], num_audio_frames=emb.shape[0],
                          context=context, context_null=context_null, cond_image=cond_image,
                          ref_masks=speaker_masks(s.height, s.width, s.height, s.width, 1),
                          height=s.height, width=s.width)

    def on_frames(frames: torch.Tensor) -> None:
        frames_seen.append(frames.shape[1])
        checksum.append(float(frames.sum(dtype=torch.float64)))

    total, stages, timer, result = timed_generate(s, engine, params, conditions, speech, sec, "mp4_bytes", on_frames)
    # the noise comes from the run's own generator: the process's RNG is untouched, and the same
    # seed gives the same frames on the cold and the warm run (a worker's jobs are reproducible)
    sec[f"{label}_process_rng_untouched"] = all(map(torch.equal, rng, _process_rng(s.device)))
    sec[f"{label}_frames_checksum"] = sum(checksum)
    sec.update(stage_calls=timer.calls, frames=result.frames, frames_delivered=sum(frames_seen),
               generate_timings=result.timings)
    return total, stages
