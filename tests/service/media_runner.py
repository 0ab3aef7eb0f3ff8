"""A small real runner for the service tests: real input decoding, real H.264 + AAC mp4 output.

It stands in for the generation pipeline: it opens the fetched image with PIL, decodes every audio
input (soundfile, PyAV for other formats), "samples" ``steps`` steps (sleeping ``step_s`` each and
honouring ``should_cancel`` before every step), then writes a short mp4 of the image with the
mixed input audio. Prompt directives steer failures: ``[oom]`` raises torch.OutOfMemoryError at
step 1, ``[steps=N]`` / ``[step_s=S]`` override the timing. With ``record=<file>`` every run
appends ``start <job> <pid>`` and ``done <job> <pid>`` lines to that file (O_APPEND: one file
shared by several worker processes tells which process ran which job, and how often).
"""

from __future__ import annotations

import os
import re
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image

from multitalk.errors import UserInputError
from multitalk.service.runner import JobCancelled

FPS = 25
SR = 16000


def decode_audio(field: str, path: str) -> np.ndarray:
    """Mono float32 at 16 kHz (soundfile first, PyAV for compressed formats)."""
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        data = data.mean(axis=1)
    except Exception:  # noqa: BLE001
        try:
            with av.open(path) as f:
                res = av.AudioResampler(format="flt", layout="mono", rate=SR)
                chunks = [r.to_ndarray().reshape(-1) for fr in f.decode(audio=0)
                          for r in res.resample(fr)]
            data, sr = np.concatenate(chunks).astype(np.float32), SR
        except Exception as e:  # noqa: BLE001
            raise UserInputError(field, f"cannot decode audio: {e}", "send wav/mp3/flac") from None
    if sr != SR:
        idx = np.arange(int(len(data) * SR / sr)) * (sr / SR)
        data = np.interp(idx, np.arange(len(data)), data).astype(np.float32)
    if data.size == 0:
        raise UserInputError(field, "the audio is empty", "send a non-empty recording")
    return data


class MediaRunner:
    def __init__(self, steps: int = 4, step_s: float = 0.05, load_s: float = 0.0,
                 max_frames: int = 10, size: int = 64, record: str | None = None):
        self.steps, self.step_s, self.load_s = steps, step_s, load_s
        self.max_frames, self.size, self.record = max_frames, size, record
        self.loaded = False
        self.calls: list[str] = []

    def load(self) -> None:
        time.sleep(self.load_s)
        self.loaded = True

    def run(self, request, workdir: Path, progress, should_cancel) -> dict:
        assert self.loaded, "run() before load()"
        self.calls.append(request["job_id"])
        self._record("start", request["job_id"])
        prompt = request["prompt"]
        steps = int(_directive(prompt, "steps", self.steps))
        step_s = float(_directive(prompt, "step_s", self.step_s))
        try:
            with Image.open(request["cond_image"]) as im:
                im.load()
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001
            raise UserInputError("cond_image", f"not an image: {e}", "send png/jpg") from None
        persons = [decode_audio(f"cond_audio.{k}", v)
                   for k, v in request["cond_audio"].items() if v]
        if len(persons) == 2 and request.get("audio_type") == "add":
            mix = np.concatenate(persons)
        else:
            n = max(len(p) for p in persons)
            mix = sum(np.pad(p, (0, n - len(p))) for p in persons)
        frames = max(1, min(self.max_frames, int(len(mix) / SR * FPS)))

        progress({"stage": "sampling", "progress": 0.0, "clip": {"i": 1, "n": 1},
                  "step": {"i": 0, "n": steps}})
        for i in range(steps):
            if should_cancel():
                raise JobCancelled(f"cancelled before step {i + 1}")
            if "[oom]" in prompt and i == 1:
                import torch        # here only: worker processes start seconds faster without it

                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            time.sleep(step_s)
            progress({"stage": "sampling", "progress": 0.9 * (i + 1) / steps,
                      "clip": (1, 1), "step": (i + 1, steps)})
        progress({"stage": "encoding", "progress": 0.95})
        video = Path(workdir) / "out.mp4"
        seed = request["params"]["seed"]
        w = h = self.size
        write_mp4(video, image.resize((w, h)), frames, mix[: int(frames * SR / FPS)])
        self._record("done", request["job_id"])
        return {"video_path": str(video), "frames": frames, "duration_s": frames / FPS,
                "width": w, "height": h, "seed": seed if seed >= 0 else 7}


    def _record(self, event: str, job_id: str) -> None:
        if self.record:
            fd = os.open(self.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{event} {job_id} {os.getpid()}\n".encode())
            finally:
                os.close(fd)


def write_mp4(path: Path, image: Image.Image, frames: int, audio: np.ndarray) -> None:
    """H.264 video of ``image`` (brightness varying per frame) + AAC audio."""
    base = np.asarray(image, dtype=np.float32)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = image.width, image.height, "yuv420p"
        vs.options = {"preset": "ultrafast"}
        aus = out.add_stream("aac", rate=SR)
        aus.layout = "mono"
        for k in range(frames):
            arr = np.clip(base * (0.6 + 0.4 * k / max(1, frames - 1)), 0, 255).astype(np.uint8)
            for pkt in vs.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(pkt)
        for pkt in vs.encode():
            out.mux(pkt)
        af = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None, :], format="flt",
                                        layout="mono")
        af.sample_rate, af.pts, af.time_base = SR, 0, Fraction(1, SR)
        for pkt in aus.encode(af):
            out.mux(pkt)
        for pkt in aus.encode():
            out.mux(pkt)


def _directive(prompt: str, name: str, default):
    m = re.search(rf"\[{name}=([0-9.]+)\]", prompt)
    return m.group(1) if m else default
