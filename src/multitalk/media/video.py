"""H.264 + AAC mp4 writer fed clip by clip (PyAV), no whole-video buffering.

Pixel conversion is the official ``save_video_ffmpeg``'s: ``((x + 1) / 2 * 255)`` clipped to
[0, 255] and *truncated* to uint8 (``astype(np.uint8)``, not rounded), computed in float32. Video:
H.264 (libx264 if PyAV has it, else another H.264 encoder), yuv420p, CRF 18, ``fps`` frames per
second. Audio (optional): mono AAC, muxed as the frames arrive and, at :meth:`Mp4Writer.close`,
cut (or padded with silence) to exactly ``frames / fps`` seconds. The file is written under a
temporary name and renamed on a successful close, so a failed run leaves no half-written mp4.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from multitalk.errors import UserInputError

H264_ENCODERS = ("libx264", "h264_nvenc", "h264_videotoolbox", "h264_qsv", "h264_vaapi", "libopenh264")


def h264_encoder() -> str:
    """The best H.264 encoder this PyAV build has (libx264 first)."""
    available = av.codecs_available
    for name in H264_ENCODERS:
        if name in available:
            try:
                av.codec.Codec(name, "w")
                return name
            except Exception:  # listed but not usable as an encoder
                continue
    raise RuntimeError("PyAV has no H.264 encoder (install a PyAV wheel built with libx264)")


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[3, T, H, W]`` float in [-1, 1] (official layout) or ``[T, H, W, 3]`` uint8 -> ``[T, H, W, 3]`` uint8."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if frames.dtype == torch.uint8:
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [T, H, W, 3], got {tuple(frames.shape)}")
        return frames.cpu().numpy()
    if not frames.is_floating_point() or frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"float frames must be [3, T, H, W] in [-1, 1], got {tuple(frames.shape)} {frames.dtype}")
    x = (frames.detach().cpu().float() + 1) / 2
    x = (x * 255).clamp(0, 255).to(torch.uint8)  # truncation, as numpy's astype(uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def _check_output(path: Path) -> None:
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError("out", f"cannot create the output folder {folder} ({exc.strerror})",
                             "choose a writable location") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError("out", f"the output folder {folder} is not writable", "choose a writable location")


class _ClosesOnExit:
    """``with`` protocol of the writers: ``close()`` on success, ``abort()`` on an exception."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Mp4Writer(_ClosesOnExit):
    """Write an mp4 clip by clip::

        with Mp4Writer("out.mp4", width=896, height=448, fps=25, audio=speech) as w:
            w.write_frames(clip)        # [3, T, H, W] float in [-1, 1] or [T, H, W, 3] uint8
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: int = 25,
                 audio: np.ndarray | None = None, sample_rate: int = 16000, crf: int = 18,
                 encoder: str | None = None):
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise ValueError(f"yuv420p needs even positive sizes, got {width}x{height}")
        self.path = Path(path)
        _check_output(self.path)
        self.width, self.height, self.fps = int(width), int(height), int(fps)
        self.frames_written = 0
        self._tmp = self.path.with_name(f".{self.path.name}.part")
        try:
            self._container = av.open(str(self._tmp), mode="w", format="mp4")
        except OSError as exc:
            raise UserInputError("out", f"cannot write {self.path} ({exc.strerror or exc})",
                                 "choose a writable location") from None
        self._video = self._container.add_stream(encoder or h264_encoder(), rate=Fraction(self.fps))
        self._video.width, self._video.height = self.width, self.height
        self._video.pix_fmt = "yuv420p"
        self._video.codec_context.time_base = Fraction(1, self.fps)
        self._video.options = {"crf": str(crf), "preset": "veryfast"} if self._video.name == "libx264" else {}
        self._audio = None
        if audio is not None:
            samples = np.asarray(audio, dtype=np.float32)
            if samples.ndim != 1:
                raise ValueError(f"audio must be mono [samples], got shape {samples.shape}")
            self._samples, self.sample_rate, self._audio_sent = samples, int(sample_rate), 0
            self._audio = self._container.add_stream("aac", rate=self.sample_rate)
            self._audio.layout = "mono"
            self._audio.codec_context.time_base = Fraction(1, self.sample_rate)
        self._closed = False

    # -- writing ------------------------------------------------------------------------------

    def write_frames(self, frames: torch.Tensor | np.ndarray) -> None:
        """Encode frames (``[3, T, H, W]`` float in [-1, 1], or ``[T, H, W, 3]`` uint8)."""
        if self._closed:
            raise RuntimeError("Mp4Writer is closed")
        rgb = to_uint8_frames(frames)
        if rgb.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frames are {rgb.shape[2]}x{rgb.shape[1]}, the writer is {self.width}x{self.height}")
        for image in rgb:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = self.frames_written
            self._container.mux(self._video.encode(frame))
            self.frames_written += 1
        self._send_audio(self._audio_target(), pad=False)

    def _audio_target(self) -> int:
        """Samples that cover exactly the frames written so far."""
        return self.frames_written * self.sample_rate // self.fps if self._audio is not None else 0

    def _send_audio(self, upto: int, pad: bool) -> None:
        if self._audio is None or upto <= self._audio_sent:
            return
        chunk = self._samples[self._audio_sent:upto]
        if pad and len(chunk) < upto - self._audio_sent:  # audio shorter than the video: silence
            chunk = np.concatenate([chunk, np.zeros(upto - self._audio_sent - len(chunk), np.float32)])
        if len(chunk) == 0:
            return
        frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._audio_sent
        self._container.mux(self._audio.encode(frame))
        self._audio_sent += len(chunk)

    # -- finishing ----------------------------------------------------------------------------

    def close(self) -> Path:
        """Flush the encoders, mux the audio up to ``frames / fps`` s, and move the file in place."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            self._container.mux(self._video.encode(None))
            if self._audio is not None:
                self._send_audio(self._audio_target(), pad=True)
                self._container.mux(self._audio.encode(None))
        finally:
            self._container.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Stop without producing a file (used when generation fails)."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except Exception:
                pass
        self._tmp.unlink(missing_ok=True)


class BackgroundWriter(_ClosesOnExit):
    """Runs a writer's ``write_frames`` on its own thread, so encoding overlaps the caller's work.

    The generator hands decoded frames over and goes on decoding the next ones on the GPU while
    this thread converts and encodes (PyAV releases the GIL inside the codec). At most
    ``max_pending`` chunks wait in the queue (bounded host memory: the caller blocks when the
    encoder falls behind). An encoder error is raised in the caller at its next ``write_frames``
    or at :meth:`close`. Use as a context manager inside the writer's own ``with`` block::

        with Mp4Writer(path, w, h, audio=mix) as mp4, BackgroundWriter(mp4) as writer:
            writer.write_frames(frames)
    """

    _STOP = object()

    def __init__(self, writer, max_pending: int = 8):
        import queue
        import threading

        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="multitalk-mp4-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._error is not None or self._abort.is_set():
                continue  # keep draining so the producer never blocks on a dead consumer
            try:
                self.writer.write_frames(item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def write_frames(self, frames) -> None:
        self._raise_error()
        if not self._thread.is_alive():
            raise RuntimeError("BackgroundWriter is closed")
        self._queue.put(frames)

    def close(self) -> None:
        """Wait for every queued chunk to be encoded; raise the encoder's error if there was one."""
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()
        self._raise_error()

    def abort(self) -> None:
        """Drop what is still queued and stop the thread (the caller aborts the file)."""
        self._abort.set()
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()
