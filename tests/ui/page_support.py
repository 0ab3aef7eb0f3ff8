"""Helpers of the page tests: start ``multitalk ui`` / ``multitalk serve`` as real subprocesses on
loopback, and a headless Debian chromium driven by Playwright (no browser download)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CHROMIUM = os.environ.get("MULTITALK_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(home: Path) -> dict:
    """Environment of the subprocesses: no telemetry, tiny weights under ``home``."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "MULTITALK_HOME": str(home),
            "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
            "PYTHONUNBUFFERED": "1"}


class Server:
    """``python -m multitalk.cli <args>`` until :meth:`stop`; its output goes to ``log``."""

    def __init__(self, args: list[str], env: dict, log: Path, url: str, ready_path: str = "/"):
        self.url, self.log_path = url, log
        self.log = open(log, "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "multitalk.cli", *args], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.ready_path = ready_path

    def wait(self, timeout: float = 180) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not up after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
