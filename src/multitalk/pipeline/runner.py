"""The service's runner: keeps one loaded :class:`Engine` and renders one job at a time.

``PipelineRunner(preset="tiny")`` or ``PipelineRunner(ckpt_dir=..., wav2vec_dir=..., multitalk_dir=...)``;
``tts_dir``: a Kokoro folder for jobs whose ``tts_audio`` names Kokoro voices (espeak-ng otherwise).
``gpus=N`` makes the runner rank 0 of N processes (:mod:`multitalk.pipeline.parallel`).
``run(request, workdir, progress, should_cancel)`` takes the job body with every medium already
fetched to a local path and returns ``{video_path, frames, duration_s, width, height, seed}``.

``params.loras`` (local paths by then; ``lora_sha256`` their content hashes when the worker knows
them) become the engine's merged LoRAs before the job runs (:meth:`Engine.use_loras`: nothing to do
for the set already merged, a DiT reload for another one), so no job inherits another's LoRAs.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

from multitalk.errors import MemoryPlanError
from multitalk.models.lora import LoraError, LoraSpec, check_loras
from multitalk.pipeline.engine import Engine, EngineConfig
from multitalk.pipeline.generate import Progress
from multitalk.pipeline.inputs import GenerationParams, InputSpec
from multitalk.pipeline.render import render
from multitalk.pipeline.speech_from_text import SpeechSynthesizer, speak_inputs
from multitalk.runtime.memory_plan import Workload

log = logging.getLogger(__name__)

# the quarter-size preview bucket, the shortest clip, one speaker
SMALLEST_WORKLOAD = Workload(height=160, width=160, frames=5, speakers=1, audio_seconds=1.0)


class PipelineRunner:
    def __init__(self, ckpt_dir: str | None = None, wav2vec_dir: str | None = None,
                 multitalk_dir: str | None = None, preset: str | None = None, device: str = "auto",
                 dtype: str = "auto", offload: bool = False, fp8: bool = False, compile: bool | None = None,
                 attention: str = "auto", weights: str = "auto", max_vram_gib: float | None = None,
                 num_persistent_param_in_dit: int | None = None, tts_dir: str | None = None,
                 gpus: int = 1, parallel: str = "auto"):
        self.config = EngineConfig(ckpt_dir=Path(ckpt_dir) if ckpt_dir else None,
                                   wav2vec_dir=Path(wav2vec_dir) if wav2vec_dir else None,
                                   multitalk_dir=Path(multitalk_dir) if multitalk_dir else None,
                                   preset=preset, device=device, dtype=dtype, offload=offload, fp8=fp8,
                                   compile=compile, attention=attention, weights=weights,
                                   max_vram_gib=max_vram_gib, num_persistent_param_in_dit=num_persistent_param_in_dit,
                                   gpus=gpus, parallel=parallel)
        self.engine: Engine | None = None
        self._lock = threading.Lock()
        self._meta_dit = None  # the DiT on ``meta``: LoRA files are checked against it at submission
        # speech from text: Kokoro voices only by file name inside tts_dir, never a path of this
        # machine, and no silent espeak stand-in for a Kokoro voice the server cannot speak
        self.synthesizer = SpeechSynthesizer(tts_dir, voice_files=False, espeak_fallback=False)

    def load(self) -> None:
        with self._lock:
            if self.engine is None:
                self.engine = self._load()

    def _load(self) -> Engine:
        """The engine, planned for the largest 480p clip; where even that cannot fit, for the
        smallest clip (jobs that need more then fail as ``out_of_memory`` with the setting to try,
        and the worker serves the ones that fit)."""
        try:
            engine = Engine.load(self.config)
        except MemoryPlanError as exc:
            log.warning("%s; planning for small clips only", exc)
            engine = Engine.load(replace(self.config, workload=SMALLEST_WORKLOAD))
        if engine.plan is not None:
            log.info(engine.plan.summary())
        return engine

    def close(self) -> None:
        """Stop the other processes of a multi-GPU engine (``gpus > 1``)."""
        with self._lock:
            if self.engine is not None:
                self.engine.close()
                self.engine = None

    def run(self, request: dict, workdir: Path, progress, should_cancel) -> dict:
        self.load()
        spec = InputSpec.from_dict({k: request[k] for k in ("prompt", "cond_image", "cond_audio", "tts_audio",
                                                            "audio_type", "bbox") if request.get(k) is not None})
        if spec.uses_tts:
            spec, notes = speak_inputs(spec, Path(workdir) / "speech", self.synthesizer)
            for note in notes:
                log.warning("job %s: %s", request.get("job_id"), note)
        params = GenerationParams.from_dict(dict(request.get("params") or {}))
        hashes = list(request.get("lora_sha256") or []) + [None] * len(params.loras)
        loras = tuple(LoraSpec(Path(lora.uri), lora.scale, sha) for lora, sha in zip(params.loras, hashes))
        progress({"stage": "loras"})
        try:
            self.engine.use_loras(loras)
        except LoraError as exc:
            raise _job_field(exc) from None

        def report(p: Progress) -> None:
            progress(p.to_dict())

        out = Path(workdir) / "video.mp4"
        result = render(self.engine, spec, params, out, progress=report, should_cancel=should_cancel)
        return {"video_path": str(out), "frames": result.frames, "duration_s": result.duration_s,
                "width": result.width, "height": result.height, "seed": result.seed}

    def check_lora(self, field: str, path: Path) -> None:
        """Check one LoRA file's keys and shapes against this runner's DiT (headers only)."""
        with self._lock:
            if self._meta_dit is None:
                from multitalk.models.architecture import detect_architecture
                from multitalk.models.transformer import build_transformer_on_meta

                ckpt_dir, _, _ = self.config.resolved_dirs()
                self._meta_dit = build_transformer_on_meta(detect_architecture(ckpt_dir).dit)
        try:
            check_loras(self._meta_dit, [LoraSpec(Path(path))])
        except LoraError as exc:
            raise exc.for_field(field) from None


def _job_field(exc: LoraError) -> LoraError:
    """A LoRA error under the job's field name (``params.loras.N.uri`` / ``.scale``)."""
    index = exc.index if exc.index is not None else 0
    return exc.for_field(f"params.loras.{index}.{'scale' if exc.field == 'lora_scale' else 'uri'}")
