"""Generate straight into an mp4 (H.264 + AAC speech), optionally keeping the float video tensor.

This is what the CLI and the service's worker call: frames go to the encoder clip by clip, so host
memory stays bounded however long the audio is (unless ``save_tensor`` asks for the whole video).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from multitalk.errors import UserInputError
from multitalk.media.video import BackgroundWriter, Mp4Writer
from multitalk.pipeline.engine import Engine
from multitalk.pipeline.generate import (FPS, SAMPLE_RATE, GenerationResult, Media, Progress, generate,
                                         prepare_conditions, prepare_media)
from multitalk.pipeline.inputs import GenerationParams, InputSpec
from multitalk.pipeline.memory import out_of_memory_as_plan_error, workload_of


def check_output_path(out: Path, field: str = "out") -> Path:
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        out = out.with_suffix(out.suffix + ".mp4") if out.suffix else out.with_suffix(".mp4")
    folder = out.parent if str(out.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(field, f"cannot create the output folder {folder} ({exc.strerror})",
                             "choose a writable location") from exc
    if not os.access(folder, os.W_OK):
        raise UserInputError(field, f"the output folder {folder} is not writable", "choose a writable location")
    return out


def render(engine: Engine, spec: InputSpec, params: GenerationParams, out: Path, *,
           save_tensor: Path | None = None, media: Media | None = None,
           progress: Callable[[Progress], None] | None = None,
           should_cancel: Callable[[], bool] | None = None) -> GenerationResult:
    out = check_output_path(out)
    if save_tensor is not None:
        save_tensor = Path(save_tensor)
        check_output_path(save_tensor.with_suffix(".mp4"), field="save_tensor")
    if progress:
        progress(Progress("conditioning"))
    media = media or prepare_media(spec, params)
    engine.fit(workload_of(media, params))       # before any model runs: a clear error if it cannot fit
    with out_of_memory_as_plan_error(engine):
        return _render(engine, spec, params, out, media, save_tensor, progress, should_cancel)


def _render(engine, spec, params, out, media, save_tensor, progress, should_cancel) -> GenerationResult:
    cond = prepare_conditions(engine, spec, params, media)
    kept: list[torch.Tensor] = []
    # the encoder runs on its own thread: it works on a clip's first frames while the GPU decodes
    # the rest, and on the last clip's frames while the next clip samples
    with Mp4Writer(out, width=cond.width, height=cond.height, fps=FPS, audio=cond.mix,
                   sample_rate=SAMPLE_RATE) as mp4, BackgroundWriter(mp4) as writer:
        def on_frames(frames: torch.Tensor) -> None:
            writer.write_frames(frames)
            if save_tensor is not None:
                kept.append(frames)

        result = generate(engine, spec, params, on_frames=on_frames, progress=progress,
                          should_cancel=should_cancel, conditions=cond)
    if save_tensor is not None:
        from safetensors.torch import save_file

        save_file({"video": torch.cat(kept, dim=1).float().contiguous()}, str(save_tensor))
    return result
