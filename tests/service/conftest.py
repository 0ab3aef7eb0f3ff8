"""Fixtures of the service tests: real uvicorn servers on loopback, a real moto S3 server, real
media files, real job stores, and worker/API subprocesses (helpers in service_support.py).

Every test that starts a service (``make_service``, ``procs``) or opens a store (``open_test_store``)
runs twice: on a SQLite file and on a real Postgres server (``postgres_server.py``, one per session,
a fresh schema per test). ``MULTITALK_TEST_STORES=sqlite`` (or ``postgres``) runs one of them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# prometheus_client chooses multiprocess mode when it is imported: one folder for the session, set
# before anything imports it (service processes started by the tests inherit it)
_METRICS_DIR = tempfile.mkdtemp(prefix="multitalk-test-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _METRICS_DIR

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # service_support, media_runner

from postgres_server import PostgresServer  # noqa: E402
from service_support import (STORES, Moto, Proc, Running, WebhookReceiver,  # noqa: E402
                             free_port)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_METRICS_DIR, ignore_errors=True)


# -- job stores --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres():
    """A real Postgres server on a loopback port for the whole session (its folder is directly
    under the temp folder: under root the server runs as ``postgres``, which cannot enter
    pytest's private temp folders)."""
    root = Path(tempfile.mkdtemp(prefix="multitalk-test-postgres-"))
    try:
        server = PostgresServer(root, free_port())
    except FileNotFoundError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(str(e))
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=STORES)
def db_kind(request) -> str:
    return request.param


@pytest.fixture
def db_url(db_kind, request) -> str:
    """The ``db`` setting of this test's services: "" (SQLite under data_dir) or a fresh
    Postgres schema."""
    if db_kind == "postgres":
        return request.getfixturevalue("postgres").new_database()
    return ""


@pytest.fixture
def open_test_store(db_kind, request, tmp_path):
    """``open_test_store(**kw)``: another connection to this test's store (SQLite file or
    Postgres schema), as a second process would have."""
    from multitalk.service.store import open_store

    url = request.getfixturevalue("db_url") or f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    opened = []

    def make(**kwargs):
        store = open_store(url, **kwargs)
        opened.append(store)
        return store

    make.url = url
    yield make
    for store in opened:
        store.close()

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
def make_service(tmp_path, db_url):
    started: list[Running] = []

    def make(runner_options: dict | None = None, data_dir: Path | None = None, **overrides):
        overrides.setdefault("db", db_url)
        s = Running(data_dir or tmp_path / f"data{len(started)}", runner_options, **overrides)
        started.append(s)
        return s

    yield make
    for s in started:
        s.close()


@pytest.fixture
def webhook_receiver():
    made = []

    def make(fail_first: int = 0, sleep_s: float = 0.0, drip_s: float = 0.0) -> WebhookReceiver:
        r = WebhookReceiver(fail_first, sleep_s=sleep_s, drip_s=drip_s)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def procs(db_url):
    started: list[Proc] = []

    def start(*args, **kwargs) -> Proc:
        kwargs.setdefault("db", db_url)
        p = Proc(*args, **kwargs)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
