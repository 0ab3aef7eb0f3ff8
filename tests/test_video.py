"""Mp4Writer: H.264 yuv420p video fed clip by clip + AAC audio cut to the video duration."""

import threading

import av
import numpy as np
import pytest
import torch

from multitalk.errors import UserInputError
from multitalk.media.video import BackgroundWriter, Mp4Writer, to_uint8_frames

SR = 16000


def _speech(seconds):
    t = np.arange(int(SR * seconds)) / SR
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _probe(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        info = {"codec": v.codec_context.name, "w": v.codec_context.width, "h": v.codec_context.height,
                "pix_fmt": v.codec_context.pix_fmt, "rate": v.average_rate,
                "frames": sum(1 for _ in c.decode(video=0))}
    with av.open(str(path)) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            info["audio_codec"] = a.codec_context.name
            info["audio_s"] = float(a.duration * a.time_base)
            info["audio_samples"] = sum(f.samples for f in c.decode(audio=0))
    return info


@pytest.mark.parametrize("audio_seconds", [2.0, 0.5])  # audio longer (cut) / shorter (padded) than video
def test_clips_with_audio(tmp_path, audio_seconds):
    out = tmp_path / "sub" / "out.mp4"
    g = torch.Generator().manual_seed(0)
    with Mp4Writer(out, width=64, height=48, fps=25, audio=_speech(audio_seconds), sample_rate=SR) as w:
        w.write_frames(torch.rand(3, 9, 48, 64, generator=g) * 2 - 1)  # first clip: all 9 frames
        w.write_frames(torch.rand(3, 4, 48, 64, generator=g) * 2 - 1)  # later clips: new frames only
        w.write_frames(np.full((4, 48, 64, 3), 128, np.uint8))
    info = _probe(out)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert (info["w"], info["h"], info["rate"], info["frames"]) == (64, 48, 25, 17)
    assert info["audio_codec"] == "aac"
    video_s = 17 / 25
    assert abs(info["audio_s"] - video_s) <= 1 / 25
    assert abs(info["audio_samples"] / SR - video_s) <= 1 / 25
    assert not list(tmp_path.glob("sub/.*.part"))


def test_pixels_survive_encoding(tmp_path):
    out = tmp_path / "gray.mp4"
    with Mp4Writer(out, width=32, height=32, fps=25) as w:
        w.write_frames(torch.full((3, 2, 32, 32), 0.2))          # -> int(0.6*255) = 153
    with av.open(str(out)) as c:
        assert not c.streams.audio
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert abs(float(frame.mean()) - 153) < 2


def test_official_uint8_conversion_truncates():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 1.5, -3.0]).view(1, 7, 1, 1).expand(3, 7, 1, 1)
    got = to_uint8_frames(x)[:, 0, 0, 0].tolist()
    official = np.clip(((x[0, :, 0, 0].numpy() + 1) / 2) * 255, 0, 255).astype(np.uint8).tolist()
    assert got == official == [0, 63, 127, 254, 255, 255, 0]
    with pytest.raises(ValueError):
        to_uint8_frames(torch.zeros(9, 3, 4, 4))


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserInputError) as e:
        Mp4Writer(blocker / "out.mp4", width=32, height=32)
    assert e.value.field == "out"


def test_failed_generation_leaves_no_file(tmp_path):
    out = tmp_path / "fail.mp4"
    with pytest.raises(RuntimeError):
        with Mp4Writer(out, width=32, height=32) as w:
            w.write_frames(torch.zeros(3, 1, 32, 32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_wrong_frame_size(tmp_path):
    with Mp4Writer(tmp_path / "x.mp4", width=32, height=32) as w:
        with pytest.raises(ValueError):
            w.write_frames(torch.zeros(3, 1, 16, 32))
        w.write_frames(torch.zeros(3, 1, 32, 32))


# --- BackgroundWriter: the encoder on its own thread ---------------------------------------------

def test_background_writer_writes_the_same_video(tmp_path):
    g = torch.Generator().manual_seed(1)
    chunks = [torch.rand(3, n, 48, 64, generator=g) * 2 - 1 for n in (1, 4, 4, 4)]
    with Mp4Writer(tmp_path / "direct.mp4", width=64, height=48, audio=_speech(1.0), sample_rate=SR) as w:
        for c in chunks:
            w.write_frames(c)
    with Mp4Writer(tmp_path / "bg.mp4", width=64, height=48, audio=_speech(1.0), sample_rate=SR) as mp4, \
            BackgroundWriter(mp4, max_pending=2) as w:
        for c in chunks:
            w.write_frames(c)
    direct, bg = _probe(tmp_path / "direct.mp4"), _probe(tmp_path / "bg.mp4")
    assert bg == direct and bg["frames"] == 13

    def pixels(path):
        with av.open(str(path)) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert np.array_equal(pixels(tmp_path / "bg.mp4"), pixels(tmp_path / "direct.mp4"))


class _Recorder:
    def __init__(self, fail_at=None, gate=None):
        self.seen, self.fail_at, self.gate = [], fail_at, gate
        self.thread_names = set()

    def write_frames(self, frames):
        if self.gate is not None:
            self.gate.wait(10)
        self.thread_names.add(threading.current_thread().name)
        if len(self.seen) == self.fail_at:
            raise OSError("disk full")
        self.seen.append(frames)


def test_background_writer_runs_off_the_caller_thread_in_order():
    rec = _Recorder()
    with BackgroundWriter(rec) as w:
        for i in range(20):
            w.write_frames(i)
    assert rec.seen == list(range(20))
    assert rec.thread_names == {"multitalk-mp4-writer"}


def test_background_writer_error_reaches_the_caller():
    rec = _Recorder(fail_at=2)
    w = BackgroundWriter(rec)
    with pytest.raises(OSError, match="disk full"):
        for i in range(50):
            w.write_frames(i)
        w.close()
    assert rec.seen == [0, 1]


def test_background_writer_queue_is_bounded_and_abort_drops_the_rest():
    gate = threading.Event()
    rec = _Recorder(gate=gate)
    w = BackgroundWriter(rec, max_pending=2)
    w.write_frames(0)                      # taken by the thread, which waits at the gate
    w.write_frames(1)
    w.write_frames(2)                      # the queue (2) is full now
    blocked = threading.Thread(target=w.write_frames, args=(3,), daemon=True)
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()              # the producer waits instead of buffering without bound
    w._abort.set()
    gate.set()
    blocked.join(5)
    w.abort()
    assert rec.seen == [0] and not w._thread.is_alive()
