"""The clip plan of a generation: audio windows per clip, tail padding of the audio embeddings, trim.

Clip ``k`` renders audio frames ``[k*(frame_num - motion_frame), ... + frame_num)``. The first clip
is conditioned on the reference image (1 frame) and keeps all its frames; later clips are
conditioned on the last ``motion_frame`` frames of the previous clip and keep only their new
frames. Before the last clip, every speaker whose embedding is not longer than that clip's window
end gets ``pad = end - len + 3`` frames appended, reflected (``flip(emb[-pad:])``).

Two trims:

* ``official=True`` reproduces the official script: stop when the next window end reaches
  ``min(max_frames_num, len(person 1))`` (``max_frames_num`` = ``frame_num`` in clip mode, 1000 in
  streaming), cut to ``max_frames_num`` frames and then, in streaming, drop ``pad`` of person 1
  frames if any speaker was padded: the ``+3`` of the padding is also cut from the video, so e.g.
  44 audio frames give 41 video frames (and when only person 2 was padded, ``[:-0]`` leaves no
  frame at all). It also refuses audio not longer than one clip.
* default: the output follows the audio: exactly ``min(audio frames, cap)`` frames where the cap
  is ``frame_num`` in clip mode and ``max_frames`` (if given) in streaming; audio frames = the
  longest speaker. A track shorter than one clip is padded (reflected) and the video trimmed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from multitalk.errors import UserInputError

AUDIO_WINDOW = 5
OFFICIAL_STREAMING_MAX_FRAMES = 1000
TAIL_EXTRA = 3  # the official pads 3 frames more than the last window end needs


def audio_window_indices(start: int, end: int, length: int, window: int = AUDIO_WINDOW) -> torch.Tensor:
    """``[end-start, window]`` int64: frame ``f`` gets ``f + (-w//2 .. w//2)`` clamped to ``[0, length-1]``."""
    half = window // 2
    centres = torch.arange(start, end, dtype=torch.long)[:, None]
    offsets = torch.arange(-half, half + 1, dtype=torch.long)[None]
    return (centres + offsets).clamp(0, length - 1)


def pad_tail(emb: torch.Tensor, pad: int) -> torch.Tensor:
    """Append ``pad`` frames (dim 0) reflecting the end: ``cat([emb, flip(emb[-pad:])])``.

    For ``pad <= len(emb)`` this is exactly the official padding; a longer pad (only possible in
    the default mode, for audio shorter than one clip) keeps reflecting back and forth.
    """
    out = emb
    while pad > 0:
        n = min(pad, emb.shape[0])
        out = torch.cat([out, torch.flip(out[-n:], dims=[0])], dim=0)
        pad -= n
    return out


@dataclass(frozen=True)
class Clip:
    """One clip of the plan: audio frames ``[start, end)``; keeps decoded frames ``[keep_from:]``."""

    index: int
    start: int
    end: int
    cond_frames: int                 # conditioning frames: 1 (reference image) or motion_frame
    embed_lens: tuple[int, ...]      # per speaker, embedding length while rendering this clip
    is_last: bool

    @property
    def keep_from(self) -> int:
        return 0 if self.index == 0 else self.cond_frames


@dataclass(frozen=True)
class ClipPlan:
    """All clips of a generation plus the padding and the final frame count."""

    clips: tuple[Clip, ...]
    source_lens: tuple[int, ...]     # per speaker, embedding length before padding
    pad_lengths: tuple[int, ...]     # per speaker, frames appended before the last clip
    generated_frames: int            # new frames of all clips, before the trim
    total_frames: int                # frames of the output video
    official: bool

    @property
    def num_clips(self) -> int:
        return len(self.clips)

    def _per_speaker(self, values: tuple[int, ...], count: int) -> tuple[int, ...]:
        if len(values) == 1:  # planned from one length: it holds for every speaker
            return values * count
        if count != len(values):
            raise ValueError(f"plan is for {len(values)} speakers, got {count} embeddings")
        return values

    def pad_embeddings(self, embs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each speaker's embedding with its tail padding (use with :meth:`audio_windows`)."""
        lens = self._per_speaker(self.source_lens, len(embs))
        for emb, n in zip(embs, lens):
            if emb.shape[0] != n:
                raise ValueError(f"embedding has {emb.shape[0]} frames, the plan expects {n}")
        return [pad_tail(e, p) for e, p in zip(embs, self._per_speaker(self.pad_lengths, len(embs)))]

    def audio_windows(self, padded_embs: Sequence[torch.Tensor], clip: Clip) -> torch.Tensor:
        """``[speakers, frame_num, 5, ...]``: the clip's audio windows, clamped as the official.

        Indices are clamped to the embedding length *at that clip* (the padding only exists
        from the last clip on), so earlier clips see exactly what the official sees.
        """
        lens = self._per_speaker(clip.embed_lens, len(padded_embs))
        return torch.stack([emb[audio_window_indices(clip.start, clip.end, n)]
                            for emb, n in zip(padded_embs, lens)])


def _check_geometry(frame_num: int, motion_frame: int, mode: str) -> None:
    if frame_num < 1 or (frame_num - 1) % 4:
        raise UserInputError("frame_num", f"must be 4n+1, e.g. 81, got {frame_num}", "use 4n+1, e.g. 81")
    if mode not in ("clip", "streaming"):
        raise UserInputError("mode", f"must be 'clip' or 'streaming', got {mode!r}")
    if mode == "streaming" and not 1 <= motion_frame < frame_num:
        raise UserInputError("motion_frame", f"must be between 1 and frame_num-1 ({frame_num - 1}), "
                             f"got {motion_frame}", "e.g. 25 with frame_num 81")


def plan_clips(audio_frames: int | Sequence[int], *, frame_num: int, motion_frame: int,
               mode: str = "streaming", max_frames: int | None = None, official: bool = False) -> ClipPlan:
    """The clip plan for speakers with ``audio_frames`` embedding frames each (25 fps).

    ``audio_frames``: one length per speaker (person 1 first) or a single int for all.
    ``max_frames``: streaming cap in frames (None: none; ``official=True``: 1000 as the official
    CLI). See the module docstring for the two trim rules.
    """
    lens = (int(audio_frames),) if isinstance(audio_frames, int) else tuple(int(n) for n in audio_frames)
    if not lens or min(lens) < 1:
        raise UserInputError("cond_audio", "the audio is empty", "give at least one second of speech")
    _check_geometry(frame_num, motion_frame, mode)
    if max_frames is not None and max_frames < 1:
        raise UserInputError("max_frames", f"must be >= 1, got {max_frames}")

    if official:
        if min(lens) <= frame_num:
            raise UserInputError("cond_audio", f"audio of {min(lens)} frames; the official pipeline needs "
                                 f"more than frame_num={frame_num} frames ({frame_num / 25:.2f} s)",
                                 "give longer audio or a smaller frame_num")
        cap = frame_num if mode == "clip" else (OFFICIAL_STREAMING_MAX_FRAMES if max_frames is None else max_frames)
        stop_at = min(cap, lens[0])
        target = None
    else:
        longest = max(lens)
        target = min(longest, frame_num) if mode == "clip" else min(longest, max_frames or longest)
        cap = frame_num if mode == "clip" else target
        stop_at = target

    step = frame_num - motion_frame
    cur = list(lens)
    pads = [0] * len(lens)
    clips: list[Clip] = []
    start, last, generated = 0, False, 0
    if not official and frame_num >= stop_at:
        last = True  # one clip covers everything: pad short tracks up front
        pads = [frame_num - n + TAIL_EXTRA if n <= frame_num else 0 for n in cur]
        cur = [n + p for n, p in zip(cur, pads)]
    while True:  # the official loop, step for step
        cond = 1 if not clips else motion_frame
        clips.append(Clip(len(clips), start, start + frame_num, cond, tuple(cur), last))
        generated += frame_num if len(clips) == 1 else frame_num - cond
        if last:
            break
        start += step
        end = start + frame_num
        if end >= stop_at:
            last = True
            pads = [end - n + TAIL_EXTRA if end >= n else 0 for n in cur]
            cur = [n + p for n, p in zip(cur, pads)]
        if cap <= frame_num:
            break

    if official:
        total = min(generated, cap)
        if cap > frame_num and sum(pads) > 0:
            total = total - pads[0] if pads[0] > 0 else 0  # the official's video[:, :, :-pads[0]]
    else:
        total = target
    clips[-1] = Clip(clips[-1].index, clips[-1].start, clips[-1].end, clips[-1].cond_frames,
                     clips[-1].embed_lens, True)
    return ClipPlan(tuple(clips), lens, tuple(pads), generated, max(total, 0), official)


def frames_for_audio(num_audio_frames: int, frame_num: int, motion_frame: int, mode: str = "streaming",
                     max_frames: int | None = None) -> int:
    """Video frames the default (audio-following) plan produces for ``num_audio_frames`` of audio."""
    return plan_clips(num_audio_frames, frame_num=frame_num, motion_frame=motion_frame, mode=mode,
                      max_frames=max_frames).total_frames
