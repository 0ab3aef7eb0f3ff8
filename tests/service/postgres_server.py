"""A real Postgres server for the tests: initdb on a temporary folder, listening on a loopback port.

The Debian ``postgresql`` package provides the binaries (``.ci/run`` installs it). Postgres refuses
to run as root, so under root the server runs as the ``postgres`` user that the package creates.
Durability settings are off (``fsync``, ``synchronous_commit``, ``full_page_writes``): the tests
restart the server cleanly (``pg_ctl restart -m fast``) but never lose power, and it keeps their
many small transactions fast on a loaded machine.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
import uuid
from pathlib import Path


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class PostgresServer:
    def __init__(self, root: Path, port: int):
        self.initdb, self.pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise FileNotFoundError("Postgres binaries (initdb, pg_ctl) not found: "
                                    "apt-get install postgresql")
        self.root, self.port = Path(root), port
        self.data, self.sock = self.root / "pgdata", self.root / "sock"
        self.log = self.root / "postgres.log"
        self.user = None
        if os.geteuid() == 0:                 # postgres refuses root: run as its own user
            self.user = pwd.getpwnam("postgres")
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if self.user is not None:
            for p in (self.root, self.sock):
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
        done = self._run([self.initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust",
                          "-E", "UTF8", "--no-sync", "--no-instructions"], check=False)
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr or done.stdout}")
        self.start()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE tests")

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid,
                      "extra_groups": [], "env": {**os.environ, "HOME": str(self.root)}}
        return subprocess.run(cmd, check=check, capture_output=True, text=True, cwd=self.root,
                              **kwargs)

    def _options(self) -> str:
        return (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")

    def start(self) -> None:
        done = self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o",
                          self._options(), "-w", "-t", "60", "start"], check=False)
        if done.returncode:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"postgres did not start: {done.stderr or done.stdout}\n{log}")

    def restart(self) -> float:
        """A fast restart (every connection is dropped); returns how long it took."""
        t0 = time.monotonic()
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o",
                   self._options(), "-m", "fast", "-w", "-t", "60", "restart"])
        return time.monotonic() - t0

    def stop(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                  check=False)

    def new_database(self) -> str:
        """A fresh, empty schema of the ``tests`` database; returns a URL that uses only it
        (``search_path``). A schema is made in milliseconds where CREATE DATABASE takes ~1 s."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/tests",
                             autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return (f"postgresql://postgres@127.0.0.1:{self.port}/tests"
                f"?options=-csearch_path%3D{name}")
