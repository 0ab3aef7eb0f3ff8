"""The service's runner: keeps one loaded :class:`Engine` and renders one job at a time.

``PipelineRunner(preset="tiny")`` or ``PipelineRunner(ckpt_dir=..., wav2vec_dir=..., multitalk_dir=...)``;
``gpus=N`` makes the runner rank 0 of N processes (:mod:`multitalk.pipeline.parallel`).
``run(request, workdir, progress, should_cancel)`` takes the job body with every medium already
fetched to a local path and returns ``{video_path, frames, duration_s, width, height, seed}``.
"""

from __future__ import annotations

import threading
from pathlib import Path

from multitalk.pipeline.engine import Engine, EngineConfig
from multitalk.pipeline.generate import Progress
from multitalk.pipeline.inputs import GenerationParams, InputSpec
from multitalk.pipeline.render import render


class PipelineRunner:
    def __init__(self, ckpt_dir: str | None = None, wav2vec_dir: str | None = None,
                 multitalk_dir: str | None = None, preset: str | None = None, device: str = "auto",
                 dtype: str = "auto", offload: bool = False, fp8: bool = False, compile: bool | None = None,
                 attention: str = "auto", gpus: int = 1, parallel: str = "auto"):
        self.config = EngineConfig(ckpt_dir=Path(ckpt_dir) if ckpt_dir else None,
                                   wav2vec_dir=Path(wav2vec_dir) if wav2vec_dir else None,
                                   multitalk_dir=Path(multitalk_dir) if multitalk_dir else None,
                                   preset=preset, device=device, dtype=dtype, offload=offload, fp8=fp8,
                                   compile=compile, attention=attention, gpus=gpus, parallel=parallel)
        self.engine: Engine | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self.engine is None:
                self.engine = Engine.load(self.config)

    def close(self) -> None:
        """Stop the other processes of a multi-GPU engine (``gpus > 1``)."""
        with self._lock:
            if self.engine is not None:
                self.engine.close()
                self.engine = None

    def run(self, request: dict, workdir: Path, progress, should_cancel) -> dict:
        self.load()
        spec = InputSpec.model_validate({k: request[k] for k in ("prompt", "cond_image", "cond_audio",
                                                                   "audio_type", "bbox") if request.get(k) is not None})
        params = GenerationParams.from_dict(dict(request.get("params") or {}))

        def report(p: Progress) -> None:
            progress(p.to_dict())

        out = Path(workdir) / "video.mp4"
        result = render(self.engine, spec, params, out, progress=report, should_cancel=should_cancel)
        return {"video_path": str(out), "frames": result.frames, "duration_s": result.duration_s,
                "width": result.width, "height": result.height, "seed": result.seed}
