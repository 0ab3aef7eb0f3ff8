"""The service's runner: keeps one loaded :class:`Engine` and renders one job at a time.

``PipelineRunner(preset="tiny")`` or ``PipelineRunner(ckpt_dir=..., wav2vec_dir=..., multitalk_dir=...)``;
``tts_dir``: a Kokoro folder for jobs whose ``tts_audio`` names Kokoro voices (espeak-ng otherwise).
``run(request, workdir, progress, should_cancel)`` takes the job body with every medium already
fetched to a local path and returns ``{video_path, frames, duration_s, width, height, seed}``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from multitalk.pipeline.engine import Engine, EngineConfig
from multitalk.pipeline.generate import Progress
from multitalk.pipeline.inputs import GenerationParams, InputSpec
from multitalk.pipeline.render import render
from multitalk.pipeline.speech_from_text import SpeechSynthesizer, speak_inputs

log = logging.getLogger(__name__)


class PipelineRunner:
    def __init__(self, ckpt_dir: str | None = None, wav2vec_dir: str | None = None,
                 multitalk_dir: str | None = None, preset: str | None = None, device: str = "auto",
                 dtype: str = "auto", offload: bool = False, fp8: bool = False, compile: bool | None = None,
                 attention: str = "auto", tts_dir: str | None = None):
        self.config = EngineConfig(ckpt_dir=Path(ckpt_dir) if ckpt_dir else None,
                                   wav2vec_dir=Path(wav2vec_dir) if wav2vec_dir else None,
                                   multitalk_dir=Path(multitalk_dir) if multitalk_dir else None,
                                   preset=preset, device=device, dtype=dtype, offload=offload, fp8=fp8,
                                   compile=compile, attention=attention)
        self.engine: Engine | None = None
        self._lock = threading.Lock()
        # speech from text: Kokoro voices only by file name inside tts_dir, never a path of this
        # machine, and no silent espeak stand-in for a Kokoro voice the server cannot speak
        self.synthesizer = SpeechSynthesizer(tts_dir, voice_files=False, espeak_fallback=False)

    def load(self) -> None:
        with self._lock:
            if self.engine is None:
                self.engine = Engine.load(self.config)

    def run(self, request: dict, workdir: Path, progress, should_cancel) -> dict:
        self.load()
        spec = InputSpec.from_dict({k: request[k] for k in ("prompt", "cond_image", "cond_audio", "tts_audio",
                                                            "audio_type", "bbox") if request.get(k) is not None})
        if spec.uses_tts:
            spec, notes = speak_inputs(spec, Path(workdir) / "speech", self.synthesizer)
            for note in notes:
                log.warning("job %s: %s", request.get("job_id"), note)
        params = GenerationParams.from_dict(dict(request.get("params") or {}))

        def report(p: Progress) -> None:
            progress(p.to_dict())

        out = Path(workdir) / "video.mp4"
        result = render(self.engine, spec, params, out, progress=report, should_cancel=should_cancel)
        return {"video_path": str(out), "frames": result.frames, "duration_s": result.duration_s,
                "width": result.width, "height": result.height, "seed": result.seed}
