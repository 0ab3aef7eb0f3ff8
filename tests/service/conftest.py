"""Fixtures of the service tests: real uvicorn servers on loopback, a real moto S3 server, real
media files, real SQLite stores, and worker/API subprocesses (helpers in service_support.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # service_support, media_runner

from service_support import Moto, Proc, Running, WebhookReceiver  # noqa: E402

# -- media -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """A small PNG and two short WAV recordings."""
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    img = (rng.random((72, 96, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(d / "face.png")
    t = np.arange(int(0.6 * 16000)) / 16000
    sf.write(d / "voice1.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 16000)
    sf.write(d / "voice2.wav", 0.3 * np.sin(2 * np.pi * 330 * t[:8000]), 16000)
    (d / "not_audio.wav").write_bytes(b"this is not a recording")
    return {"image": d / "face.png", "audio1": d / "voice1.wav", "audio2": d / "voice2.wav",
            "bad_audio": d / "not_audio.wav"}


# -- S3 (moto) ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def aws_env():
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    yield keys
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def moto(aws_env):
    m = Moto()
    m.fs().mkdir("inputs")
    m.fs().mkdir("outputs")
    yield m
    m.stop()


# -- in-process service ------------------------------------------------------------------------
@pytest.fixture
def make_service(tmp_path):
    started: list[Running] = []

    def make(runner_options: dict | None = None, data_dir: Path | None = None, **overrides):
        s = Running(data_dir or tmp_path / f"data{len(started)}", runner_options, **overrides)
        started.append(s)
        return s

    yield make
    for s in started:
        s.close()


@pytest.fixture
def webhook_receiver():
    made = []

    def make(fail_first: int = 0) -> WebhookReceiver:
        r = WebhookReceiver(fail_first)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(*args, **kwargs) -> Proc:
        p = Proc(*args, **kwargs)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
