"""A 10-second two-speaker video with a few-step LoRA, warm, per stage (issue 11's benchmark).

A random rank-``--lora-rank`` LoRA in the **official format**, shaped like the released
step-distillation LoRAs (pairs on every block linear, ``diff_b`` on their biases, ``diff`` on the
norms: ``models.lora.random_official_lora``), is written to a safetensors file; the engine is then
put together by ``Engine.from_components`` with ``EngineConfig(loras=...)``, which reads, checks and
merges it through ``engine.prepare_dit`` exactly as ``Engine.load`` does (merge, then fp8 / the
self-attention choice ``--attention`` (default: the engine's ``auto``) / ``dit_fusion`` and the regional compile). On CUDA a warm-up clip (1 step,
both guidance branches) absorbs compilation and the VAE kernels' tuning; the measured run is
``--video-seconds`` of two-speaker speech ('add': one after the other) at the 640x640 bucket,
streaming (81-frame clips, 25 motion frames), ``recipe=lightx2v`` (4 steps, shift 2, text guide 1,
audio guide 2: two DiT passes per step), colour correction and the mp4 as in production.

Top-level keys: ``video10s_lora_warm_s`` (the whole warm video), ``video10s_lora_load_s`` (LoRA read
+ check + merge; ``lora_read_s`` / ``lora_merge_s`` apart), ``video10s_forwards``, and for comparison
the same video at 40 steps x 3 passes: ``video10s_40x3_forwards``, ``video10s_40x3_estimated_s``
(the measured non-DiT time + that many forwards at the measured time per forward). The section merges
into the shared DiT, so it drops it when done (a later section builds a fresh one).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from builders import build_engine
from harness import Bench, free_memory, timed_generate

TINY_CPU = False  # its own smoke test runs it (tests/test_bench_video10s_lora.py): ~30 s of CPU


def speech_tracks(seconds: float, seed: int = 0) -> list[np.ndarray]:
    """Two speakers one after the other: speech-like noise in one half of each track, silence in the other."""
    rng = np.random.default_rng(seed)
    n, half = int(seconds * 16000), int(seconds * 8000)
    tracks = []
    for lo, hi in ((0, half), (half, n)):
        x = np.zeros(n, dtype=np.float32)
        x[lo:hi] = rng.standard_normal(hi - lo).astype(np.float32) * 0.1
        tracks.append(x)
    return tracks


def run(b: Bench) -> None:
    from safetensors.torch import save_file

    from multitalk.models.lora import LoraSpec, random_official_lora
    from multitalk.pipeline.guidance import branch_names
    from multitalk.pipeline.inputs import GenerationParams

    s, sec, args = b.setting, b.report.section("video10s_lora"), b.args
    extra = {"attention": args.attention} if args.attention else {}  # default: the engine's own ("auto")
    seconds = args.video_seconds if args.video_seconds is not None else (0.52 if s.tiny else 10.0)
    params = GenerationParams(size="multitalk-480", frame_num=s.frames, motion_frame=5 if s.tiny else 25,
                              mode="streaming", recipe=args.recipe, seed=42)
    passes = len(branch_names(params.text_guide_scale, params.audio_guide_scale))
    clips_guess = max(1, int(np.ceil((seconds * 25 - params.motion_frame) / (params.frame_num - params.motion_frame))))
    b.require(90 + (2 + clips_guess * params.sample_steps) * passes * b.forward_s() * 1.1, "video10s_lora")

    tmp = Path(tempfile.mkdtemp(prefix="multitalk-bench-lora-"))
    engine = None
    try:
        dit = b.get_dit()
        t0 = time.perf_counter()
        lora_path = tmp / f"random_rank{args.lora_rank}_official.safetensors"
        save_file(random_official_lora(s.arch.dit, rank=args.lora_rank, seed=1), str(lora_path))
        sec.update(lora_write_s=time.perf_counter() - t0, lora_file_mib=lora_path.stat().st_size / 2**20,
                   lora_rank=args.lora_rank, attention_asked=args.attention, recipe=args.recipe, seconds=seconds)
        t0 = time.perf_counter()
        engine = build_engine(s, dit, loras=(LoraSpec(lora_path, 1.0),), **extra)
        sec.update(build_s=time.perf_counter() - t0, build_stage_s=engine.load_seconds, attention=engine.attention)
        lora = engine.lora_report
        b.report.set(video10s_lora_load_s=lora.read_s + lora.merge_s, lora_read_s=lora.read_s,
                     lora_merge_s=lora.merge_s, lora_tensors_changed=lora.tensors_changed)
        sec["lora_files"] = lora.files
        b.log(f"LoRA {sec['lora_file_mib']:.0f} MiB (rank {args.lora_rank}): read {lora.read_s:.2f}s, merged "
              f"{lora.merge_s:.2f}s, {lora.tensors_changed} tensors; engine {sec['build_s']:.1f}s, "
              f"{engine.attention} self-attention")

        speech = speech_tracks(seconds)
        if s.device.type == "cuda":  # (on the CPU nothing is compiled or tuned: the smoke run skips it)
            warm_params = params.model_copy(update={"sample_steps": 1, "mode": "clip"})
            total, stages, _ = _video_once(s, engine, warm_params, speech, sec, "warmup")
            sec.update(warmup_total_s=total, warmup_stages_s=stages)
            b.log("warm-up clip: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()) + f"; total {total:.1f}s")
            b.report.save()

        total, stages, calls = _video_once(s, engine, params, speech, sec, "warm")
        forwards, clips = calls.get("dit", 0), sec["warm_clips"]
        per_forward = stages["dit"] / max(forwards, 1)
        est_forwards = clips * 40 * 3
        estimate = total - stages["dit"] + est_forwards * per_forward
        sec.update(warm_total_s=total, warm_stages_s=stages, warm_stage_calls=calls, steps=params.sample_steps,
                   passes=passes, shift=params.shift, text_guide=params.text_guide_scale,
                   audio_guide=params.audio_guide_scale, frame_num=params.frame_num, motion_frame=params.motion_frame,
                   non_dit_s=total - stages["dit"])
        b.fwd_estimate_s = per_forward
        b.report.set(video10s_lora_warm_s=total, video10s_forwards=forwards, video10s_dit_forward_s=per_forward,
                     video10s_40x3_forwards=est_forwards, video10s_40x3_estimated_s=estimate,
                     video10s_speedup_vs_40x3=estimate / total, video10s_clips=clips, video10s_frames=sec["warm_frames"])
        b.log(f"video: {sec['warm_frames']} frames, {clips} clips, {forwards} DiT forwards: " +
              ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()) +
              f"; total {total:.1f}s warm (40x3: {est_forwards} forwards, ~{estimate:.0f}s)")
    finally:
        del engine
        b.drop_dit()  # its weights now hold the LoRA
        shutil.rmtree(tmp, ignore_errors=True)
        free_memory(s.device)


def _video_once(s, engine, params, speech: list[np.ndarray], sec: dict, label: str):
    from multitalk.pipeline.generate import Conditions
    from multitalk.pipeline.speakers import speaker_masks

    mix = speech[0] + speech[1]
    delivered = []

    def conditions(timer):
        with timer.stage("audio_features"):
            embs = [engine.audio_encoder.embed(x, fps=25) for x in speech]
        with timer.stage("text_encode"):
            context, context_null = engine.text_encoder.encode(["two people talking", s.arch.sample_neg_prompt])
        cond_image = torch.rand(3, 1, s.height, s.width, generator=torch.Generator().manual_seed(0)) * 2 - 1
        return Conditions(speech=speech, mix=mix, audio_embs=embs, num_audio_frames=max(e.shape[0] for e in embs),
                          context=context, context_null=context_null, cond_image=cond_image,
                          ref_masks=speaker_masks(s.height, s.width, s.height, s.width, 2), height=s.height, width=s.width)

    total, stages, timer, result = timed_generate(s, engine, params, conditions, mix, sec, f"{label}_mp4_bytes",
                                                  lambda frames: delivered.append(frames.shape[1]))
    sec[f"{label}_frames"], sec[f"{label}_clips"] = result.frames, result.num_clips
    sec[f"{label}_frames_delivered"] = sum(delivered)
    return total, stages, dict(timer.calls)
