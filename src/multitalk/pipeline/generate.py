"""Image + speech + prompt -> video frames, the official MultiTalk sampler with its bugs fixed.

``generate(engine, spec, params, on_frames=...)`` prepares the conditions once (speech arrays and
their wav2vec2 embeddings, text contexts, the bucketed reference image, speaker masks), then samples
clip after clip (streaming) and hands each clip's *new* frames to ``on_frames`` as they are
decoded (a few frames per call), so a long video never sits in host memory and the caller can
encode while the GPU goes on. Deliberate differences from the official script
are listed in the README ("Differences from the official script").
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from multitalk.errors import GenerationError, JobCancelled, UserInputError
from multitalk.media.audio import combine_speakers, load_speech, num_video_frames
from multitalk.media.image import (choose_bucket, cond_image_from_uint8, load_image,
                                   resize_and_center_crop)
from multitalk.pipeline.clips import plan_clips
from multitalk.pipeline.color import ColorMatcher
from multitalk.pipeline.conditioning import (draw_noise, frame_mask, motion_latent_frames,
                                             padded_condition_video, renoise)
from multitalk.pipeline.denoiser import LocalDenoiser, _untimed
from multitalk.pipeline.engine import Engine
from multitalk.pipeline.guidance import GuidanceState
from multitalk.pipeline.inputs import GenerationParams, InputSpec
from multitalk.pipeline.schedule import sample_timesteps
from multitalk.pipeline.speakers import speaker_masks
from multitalk.pipeline.teacache import TeaCache

log = logging.getLogger(__name__)

FPS = 25
SAMPLE_RATE = 16000


@dataclass
class Progress:
    stage: str
    clip: int = 0
    num_clips: int = 0
    step: int = 0
    num_steps: int = 0
    fraction: float = 0.0
    eta_s: float | None = None

    def to_dict(self) -> dict:
        return {"stage": self.stage, "clip": {"i": self.clip, "n": self.num_clips},
                "step": {"i": self.step, "n": self.num_steps}, "progress": round(self.fraction, 4),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1)}


@dataclass
class Conditions:
    """Everything computed once per generation."""

    speech: list[np.ndarray]              # per speaker, 16 kHz, loudness-normalised (after add/para)
    mix: np.ndarray                       # what the video's sound track plays
    audio_embs: list[torch.Tensor]        # per speaker [F, L, C] on CPU, float32
    num_audio_frames: int
    context: torch.Tensor                 # [L, text_dim]
    context_null: torch.Tensor
    cond_image: torch.Tensor              # [3, 1, H, W] in [-1, 1]
    ref_masks: torch.Tensor               # [3, H/8, W/8]
    height: int
    width: int


@dataclass
class GenerationResult:
    frames: int
    width: int
    height: int
    fps: int
    seed: int
    duration_s: float
    num_clips: int
    audio: np.ndarray = field(repr=False, default=None)
    timings: dict = field(default_factory=dict)


@dataclass
class Media:
    """The decoded inputs, checked before any model is loaded (fast, clear errors)."""

    speech: list[np.ndarray]
    mix: np.ndarray
    cond_image: torch.Tensor              # [3, 1, H, W] in [-1, 1]
    ref_masks: torch.Tensor
    height: int
    width: int


def prepare_media(spec: InputSpec, params: GenerationParams) -> Media:
    """Decode and validate the image, speech tracks and boxes (no model needed)."""
    img = load_image(spec.cond_image, field="cond_image")
    src_h, src_w = img.height, img.width
    th, tw = choose_bucket(src_h, src_w, params.size)
    masks = speaker_masks(src_h, src_w, th, tw, num_speakers=spec.num_speakers, bbox=spec.bbox_dict(),
                          face_scale=params.face_scale)
    cond_image = cond_image_from_uint8(resize_and_center_crop(img, th, tw))[:, None]  # [3, 1, H, W]
    tracks = [load_speech(path, field=f"cond_audio.person{i + 1}") for i, path in enumerate(spec.speaker_paths())]
    if len(tracks) == 2:
        s1, s2, mix = combine_speakers(tracks[0], tracks[1], spec.audio_type)
        # 'add': each speaker's track is silent while the other talks (official arrays).
        # 'para': each speaker is embedded as recorded (as the official does); a shorter track is
        # padded in the sound mix and its embedding is extended by the clip plan, never a crash.
        speech = [s1, s2] if spec.audio_type == "add" else [tracks[0], tracks[1]]
    else:
        speech, mix = [tracks[0]], tracks[0]
    for i, s in enumerate(speech):
        if num_video_frames(len(s), FPS, SAMPLE_RATE) < 1:
            raise UserInputError(f"cond_audio.person{i + 1}", "the track is shorter than one video frame (40 ms)",
                                 "give at least a fraction of a second of speech")
    return Media(speech, mix, cond_image, masks, th, tw)


def prepare_conditions(engine: Engine, spec: InputSpec, params: GenerationParams,
                       media: Media | None = None) -> Conditions:
    media = media or prepare_media(spec, params)
    with engine.placement.use(engine.audio_encoder.model):
        embs = [engine.audio_encoder.embed(s, fps=FPS, field=f"cond_audio.person{i + 1}").float().cpu()
                for i, s in enumerate(media.speech)]
    n_prompt = params.n_prompt or engine.arch.sample_neg_prompt
    with engine.placement.use(engine.text_encoder.model):
        context, context_null = engine.text_encoder.encode([spec.prompt, n_prompt])
    return Conditions(media.speech, media.mix, embs, max(e.shape[0] for e in embs), context, context_null,
                      media.cond_image, media.ref_masks, media.height, media.width)


StageHook = Callable[[str], contextlib.AbstractContextManager]


def generate(engine: Engine, spec: InputSpec, params: GenerationParams, *,
             on_frames: Callable[[torch.Tensor], None],
             progress: Callable[[Progress], None] | None = None,
             should_cancel: Callable[[], bool] | None = None,
             conditions: Conditions | None = None,
             stages: StageHook | None = None) -> GenerationResult:
    """Sample the video; ``on_frames([3, n, H, W] float32 in [-1,1])`` receives new frames per clip.

    ``stages(name)``, if given, is entered around every piece of work of each clip, for timing
    (the benchmark's per-stage breakdown): ``clip_encode``, ``vae_encode``, ``dit`` (each
    transformer call), ``vae_decode`` (the production of each decoded chunk) and
    ``color_correction``; ``on_frames`` runs outside them.
    """
    stage = stages or _untimed
    t_start = time.perf_counter()
    report = progress or (lambda p: None)
    cancelled = should_cancel or (lambda: False)
    report(Progress("conditioning"))
    cond = conditions or prepare_conditions(engine, spec, params)
    timings = {"conditioning_s": time.perf_counter() - t_start}

    device, dtype = engine.device, engine.dtype
    arch = engine.arch
    frame_num, motion_frame = params.frame_num, params.motion_frame
    plan = plan_clips([e.shape[0] for e in cond.audio_embs], frame_num=frame_num, motion_frame=motion_frame,
                      mode=params.mode, max_frames=params.max_frames, official=params.official_trim)
    audio_embs = plan.pad_embeddings(cond.audio_embs)
    steps = params.sample_steps
    timesteps = [t.to(device) for t in sample_timesteps(steps, params.shift, arch.num_train_timesteps)]
    lat_h, lat_w = cond.height // arch.vae_stride[1], cond.width // arch.vae_stride[2]
    t_lat = (frame_num - 1) // arch.vae_stride[0] + 1

    seed = params.seed
    # The official seeds the global RNG once (torch.manual_seed) and draws every noise tensor from
    # the engine device's default generator; a generator of this run, seeded the same way, gives
    # the same numbers without touching the process's RNG (jobs of a worker stay reproducible).
    # noise_device "cpu" draws on the CPU instead: the same video for a seed on any device.
    generator = torch.Generator(device=device if params.noise_device == "engine" else "cpu").manual_seed(seed)
    context = cond.context.to(device, dtype)
    context_null = cond.context_null.to(device, dtype)
    ref_masks = cond.ref_masks.to(device)
    reference = cond.cond_image.to(device)          # colour-correction reference (first clip's frame)
    colour = ColorMatcher(reference[None], params.color_correction_strength)
    guidance_branches = GuidanceState(params).num_branches
    teacache = (TeaCache(steps, params.teacache_thresh, params.size, branches=guidance_branches)
                if params.use_teacache else None)
    dit = engine.transformer
    denoiser = (engine.parallel.denoiser(dit, teacache, guidance_branches, stage=stage)
                if engine.parallel is not None else LocalDenoiser(dit, teacache, stage=stage))
    cond_frames = reference                         # [3, n_cond, H, W]
    written = 0
    n_clips = len(plan.clips)
    t_loop = time.perf_counter()
    done_steps = 0
    total_steps = n_clips * steps

    try:
        for ci, clip in enumerate(plan.clips):
            first = ci == 0
            n_cond = clip.cond_frames
            audio = plan.audio_windows(audio_embs, clip).to(device, dtype)
            noise = draw_noise((arch.vae.z_dim, t_lat, lat_h, lat_w), generator, device)
            with torch.no_grad():
                with engine.placement.use(engine.image_encoder), stage("clip_encode"):
                    clip_fea = engine.image_encoder.encode(cond_frames[:, -1]).to(device, dtype)
                with engine.placement.use(engine.vae), stage("vae_encode"):
                    y_lat = engine.vae.encode(padded_condition_video(cond_frames, frame_num).to(device)).to(device)
                latent_motion = y_lat[:, :motion_latent_frames(n_cond)].float()
                msk = frame_mask(frame_num, n_cond, lat_h, lat_w, device=device)
                y = torch.cat([msk, y_lat[None]], dim=1).to(dtype)

                latent = noise
                if not first:
                    latent[:, :latent_motion.shape[1]] = renoise(latent_motion, timesteps[0], generator)
                guidance = GuidanceState(params)
                zero_audio = torch.zeros_like(audio)[-1:]
                branches = guidance.branches(context, context_null, audio, zero_audio)
                if teacache is not None:
                    teacache.start_clip()
                denoiser.start_clip(branches, clip_fea, y, ref_masks)
                with engine.placement.use(dit):
                    for i in range(steps):
                        if cancelled():
                            raise JobCancelled("cancelled")  # between sampling steps
                        t = timesteps[i]
                        noise_pred = guidance.combine(denoiser.predict(latent.to(dtype)[None], t))
                        dt = (timesteps[i] - timesteps[i + 1]) / arch.num_train_timesteps
                        latent = latent - noise_pred * dt
                        if not first:
                            latent[:, :latent_motion.shape[1]] = renoise(latent_motion, timesteps[i + 1], generator)
                        done_steps += 1
                        elapsed = time.perf_counter() - t_loop
                        eta = elapsed / done_steps * (total_steps - done_steps)
                        report(Progress("sampling", ci + 1, n_clips, i + 1, steps, done_steps / total_steps, eta))
                _check_finite(latent, f"clip {ci + 1}/{n_clips}: the sampled latent")
                report(Progress("decoding", ci + 1, n_clips, steps, steps, done_steps / total_steps))
                # decode chunk by chunk (1, 4, 4, ... frames; the same maths as one decode) and hand the
                # new frames over at once, so colour correction, the host copy and the mp4 encoder
                # work on early frames while the GPU decodes the later ones
                emit_end = clip.keep_from + max(0, min(frame_num - clip.keep_from, plan.total_frames - written))
                parts, f0 = [], 0
                with engine.placement.use(engine.vae):
                    chunks = iter(engine.vae.decode_chunks(latent))
                    while True:
                        with stage("vae_decode"):
                            chunk = next(chunks, None)                     # [3, n, H, W] float32
                        if chunk is None:
                            break
                        _check_finite(chunk, f"clip {ci + 1}/{n_clips}: the decoded frames")
                        with stage("color_correction"):
                            chunk = colour(chunk[None])[0]                 # as is at strength 0
                        parts.append(chunk)
                        f1 = f0 + chunk.shape[1]
                        lo, hi = max(f0, clip.keep_from), min(f1, emit_end)
                        if hi > lo:
                            on_frames(chunk[:, lo - f0:hi - f0].cpu())
                            written += hi - lo
                        f0 = f1
                video = torch.cat(parts, dim=1)                           # [3, frame_num, H, W]
            cond_frames = video[:, -motion_frame:].to(device)
    finally:
        denoiser.close()
    timings["sampling_s"] = time.perf_counter() - t_loop
    mix = cond.mix[: int(round(written / FPS * SAMPLE_RATE))]
    return GenerationResult(written, cond.width, cond.height, FPS, seed, written / FPS, n_clips, mix, timings)


def _check_finite(x: torch.Tensor, what: str) -> None:
    """A NaN or Inf would become a black video: stop the run instead (one reduction per clip / chunk)."""
    if not bool(torch.isfinite(x).all()):
        raise GenerationError(f"{what} hold NaN or Inf values: the run stopped and no video was written "
                              "(a float16 --dtype can overflow: use bfloat16 or float32)")

