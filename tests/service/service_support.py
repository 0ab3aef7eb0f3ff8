"""Helpers of the service tests (imported by conftest.py and the tests): real uvicorn servers on
loopback, a real moto S3 server, a webhook receiver, worker/API subprocesses.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))           # media_runner for in-process and subprocess workers

# the job stores the service tests run on (MULTITALK_TEST_STORES=sqlite runs one of them)
STORES = [k.strip() for k in os.environ.get("MULTITALK_TEST_STORES", "sqlite,postgres").split(",")
          if k.strip()]

TOKEN = "test-token-1"
# a Standard Webhooks secret: whsec_ + base64 of 32 bytes
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"multitalk-test-webhook-secret-32").decode()
RUNNER = "media_runner:MediaRunner"

# short leases, quick polling, few quick retries: the whole suite stays fast
FAST = dict(lease_s=1.5, heartbeat_s=0.25, poll_interval_s=0.05, max_attempts=3,
            upload_retries=2, upload_backoff_s=0.05, webhook_retries=2, webhook_backoff_s=0.05,
            webhook_timeout_s=2.0, download_timeout_s=5.0, api_tokens=(TOKEN,),
            webhook_secret=WEBHOOK_SECRET, s3_allow=("inputs", "outputs"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Moto:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.running = True
        # moto keeps its backends per process: start from an empty S3 every time
        httpx.post(f"{self.endpoint}/moto-api/reset", timeout=10).raise_for_status()

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True)

    def stop(self):
        if self.running:
            self.server.stop()
            self.running = False


class Running:
    """A service (API + in-process worker) served by uvicorn in a thread on 127.0.0.1."""

    def __init__(self, data_dir: Path, runner_options: dict | None = None, *,
                 in_process_worker: bool = True, token: str = TOKEN, **overrides):
        import uvicorn

        from multitalk.service.cli_commands import Service
        from multitalk.service.config import ServiceConfig

        cfg = ServiceConfig(data_dir=data_dir).with_overrides(**{**FAST, **overrides})
        self.config = cfg
        self.service = Service(cfg, RUNNER, runner_options=runner_options or {},
                               in_process_worker=in_process_worker)
        self.runner = self.service.worker.runner if self.service.worker else None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.service.app, host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "uvicorn start")
        self.client = self.client_for(token if cfg.authenticated else None)
        self.service.start_worker()

    def client_for(self, token: str | None) -> httpx.Client:
        """A client of this server with ``token`` (closed with the server)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self._clients = [*getattr(self, "_clients", []), client]
        return client

    def upload(self, path: Path, client: httpx.Client | None = None) -> str:
        with open(path, "rb") as f:
            r = (client or self.client).post("/v1/files", files={"file": (path.name, f)})
        assert r.status_code == 201, r.text
        return r.json()["uri"]

    def submit(self, body: dict, **kw) -> dict:
        r = self.client.post("/v1/jobs", json=body, **kw)
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = self.client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_status(self, job_id: str, statuses, timeout: float = 20) -> dict:
        statuses = {statuses} if isinstance(statuses, str) else set(statuses)
        return wait_for(lambda: (j := self.job(job_id))["status"] in statuses and j, timeout,
                        f"job {job_id} to reach {statuses}")

    def close(self):
        for client in self._clients:
            client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.service.stop(timeout=15)
        self.service.store.close()


def job_body(image: str, audio1: str, audio2: str | None = None, **extra) -> dict:
    body = {"prompt": "a person talking", "cond_image": image,
            "cond_audio": {"person1": audio1, **({"person2": audio2} if audio2 else {})},
            "params": {"frame_num": 9, "motion_frame": 5, "sample_steps": 4}}
    body.update(extra)
    return body


# -- webhook receiver --------------------------------------------------------------------------
class WebhookReceiver:
    """Records POSTs (with the time each arrived); answers 500 to the first ``fail_first`` of
    them; sleeps ``sleep_s`` before answering (a slow receiver); with ``drip_s`` answers 200 at
    once and then sends its body one byte a second for that long."""

    def __init__(self, fail_first: int = 0, sleep_s: float = 0.0, drip_s: float = 0.0):
        self.calls: list[dict] = []
        self.fail_first, self.sleep_s, self.drip_s = fail_first, sleep_s, drip_s
        self.closing = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.calls.append({"body": body, "headers": dict(self.headers),
                                    "path": self.path, "at": time.time()})
                if outer.sleep_s and outer.closing.wait(outer.sleep_s):
                    return
                code = 500 if len(outer.calls) <= outer.fail_first else 200
                self.send_response(code)
                self.send_header("Content-Length", str(int(outer.drip_s)))
                self.end_headers()
                for _ in range(int(outer.drip_s)):
                    try:
                        self.wfile.write(b".")
                        self.wfile.flush()
                    except OSError:
                        return
                    if outer.closing.wait(1.0):
                        return

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def json(self, i: int) -> dict:
        return json.loads(self.calls[i]["body"])

    def close(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


# -- subprocesses ------------------------------------------------------------------------------
class Proc:
    """``tests/service/run_service.py`` in a subprocess (worker or API)."""

    def __init__(self, role: str, data_dir: Path, port: int | None = None,
                 runner_options: dict | None = None, env: dict | None = None, **overrides):
        settings = {**FAST, **overrides}
        settings = {k: ",".join(v) if isinstance(v, (tuple, list)) else v
                    for k, v in settings.items()}
        cmd = [sys.executable, str(HERE / "run_service.py"), role, str(data_dir),
               json.dumps(settings), json.dumps(runner_options or {})]
        if port is not None:
            cmd.append(str(port))
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(HERE), os.environ.get("PYTHONPATH", "")]), **(env or {})}
        self.log = open(Path(data_dir).parent / f"{role}-{time.monotonic_ns()}.log", "w+")
        self.p = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def kill9(self):
        self.p.kill()
        self.p.wait(10)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.log.close()


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of a Prometheus exposition (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
