"""Upper bounds on what one job may ask for, so that one request cannot hold the GPU for days.

Settings (``MULTITALK_LIMIT_*``): frames (``frame_num``, and the frames of a streaming job),
speech seconds, resolution (the ``size`` bucket) and sampling steps. A request over a bound is
refused with a 422 that names the bound and the setting; audio that is only known after the
worker fetched it fails the job with ``bad_input`` and the same message.
"""

from __future__ import annotations

from pathlib import Path

from multitalk.errors import UserInputError
from multitalk.media.audio import audio_duration_s
from multitalk.pipeline.inputs import GenerationParams

from .config import ServiceConfig

# nominal height of each size bucket (preview: the 480 table at a quarter of its size)
RESOLUTION = {"preview": 120, "multitalk-480": 480, "multitalk-720": 720}
OFFICIAL_STREAMING_CAP = 1000        # frames of a streaming job without max_frames (official)


def _over(field: str, what: str, value, limit, setting: str, fix: str) -> UserInputError:
    return UserInputError(field, f"{what} {value} is above this server's limit of {limit} "
                          f"({setting})", fix)


def check_params(params: GenerationParams, config: ServiceConfig) -> GenerationParams:
    """Refuse options over the bounds; a streaming job without ``max_frames`` is capped at
    ``limit_frames`` (instead of the official 1000) when that is lower."""
    frames = config.limit_frames
    if params.frame_num > frames:
        raise _over("params.frame_num", "frame_num", params.frame_num, frames,
                    "MULTITALK_LIMIT_FRAMES", f"use frame_num <= {frames}")
    if params.mode == "streaming":
        if params.max_frames is not None and params.max_frames > frames:
            raise _over("params.max_frames", "max_frames", params.max_frames, frames,
                        "MULTITALK_LIMIT_FRAMES", f"use max_frames <= {frames}")
        if params.max_frames is None and frames < OFFICIAL_STREAMING_CAP:
            params.max_frames = frames
    if params.sample_steps > config.limit_steps:
        raise _over("params.sample_steps", "sample_steps", params.sample_steps,
                    config.limit_steps, "MULTITALK_LIMIT_STEPS",
                    f"use sample_steps <= {config.limit_steps}")
    if RESOLUTION[params.size] > config.limit_resolution:
        allowed = [s for s, h in RESOLUTION.items() if h <= config.limit_resolution]
        raise _over("params.size", "the resolution of", params.size,
                    f"{config.limit_resolution}p", "MULTITALK_LIMIT_RESOLUTION",
                    f"use size {' or '.join(allowed)}")
    return params


def check_audio(paths: dict[str, Path], audio_type: str | None, config: ServiceConfig) -> None:
    """Refuse speech longer than ``limit_audio_s`` (``paths``: field -> local file). Two
    speakers one after the other ('add') count together, simultaneous ones ('para') each."""
    limit = config.limit_audio_s
    seconds = {field: audio_duration_s(path, field) for field, path in paths.items()}
    fix = f"trim the speech to at most {limit:g} s"
    for field, s in seconds.items():
        if s > limit:
            raise _over(field, "the speech length", f"{s:.1f} s", f"{limit:g} s",
                        "MULTITALK_LIMIT_AUDIO_S", fix)
    if len(seconds) > 1 and (audio_type or "add") == "add" and sum(seconds.values()) > limit:
        raise _over("cond_audio", "the speech length of both speakers together",
                    f"{sum(seconds.values()):.1f} s", f"{limit:g} s", "MULTITALK_LIMIT_AUDIO_S",
                    fix + " in total, or use audio_type 'para'")
