"""The processes of one multi-GPU engine: start them, join them, watch them, stop them.

Rank 0 is the process the user started (``multitalk generate --gpus N``, ``multitalk worker --gpus
N``): it reads the inputs, runs the encoders and the VAE, writes the video and reports progress.
Ranks 1..N-1 are *servants*: they load their own copy of the DiT and run the DiT calls rank 0
hands them. Two ways to get the processes:

* :meth:`ParallelGroup.start` (rank 0 starts the servants itself with ``torch.multiprocessing``:
  ``forkserver`` on CPU, where the server imports the package once for all servants, ``spawn`` on
  CUDA); the c10d store is a ``TCPStore`` that rank 0 hosts on a free loopback port;
* :meth:`ParallelGroup.from_env` under an existing ``torchrun`` (``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK`` set): every rank runs the same command line, rank 0 goes on, the others serve.

Two planes:

* **data**: ``torch.distributed`` collectives on the default group (NCCL on CUDA with a gloo
  side-band for CPU objects, gloo on CPU), all with the group's timeout
  (``MULTITALK_PARALLEL_TIMEOUT_S``, default 600 s): nothing waits forever inside a job;
* **control**: the c10d store, for what may wait without a bound: a servant waiting for the next
  job (a service worker idles between jobs) and error reports.

Failure handling: a watchdog thread on rank 0 checks every 0.2 s that each servant process is
alive and that none reported an error; on the first failure it records the reason ("rank 1 exited:
killed by signal 9 (SIGKILL)") and aborts the process group, so a collective rank 0 is blocked in
fails at once instead of waiting for the timeout; :meth:`ParallelGroup.guard` turns that into a
:class:`~multitalk.errors.ParallelError` naming the rank. Servants stop when rank 0 disappears
(their store connection breaks, a collective fails, or the parent check below sees it gone).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from multitalk.errors import ParallelError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "MULTITALK_PARALLEL_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
_POLL_S = 0.2


def collective_timeout_s() -> float:
    """The collectives' timeout: ``MULTITALK_PARALLEL_TIMEOUT_S`` or 600 s."""
    raw = os.environ.get(TIMEOUT_ENV)
    return float(raw) if raw else DEFAULT_TIMEOUT_S


def under_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (or any launcher setting the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"


@dataclass(frozen=True)
class GroupSpec:
    """What a servant needs to join rank 0's group (picklable)."""

    world: int
    host: str
    port: int
    device_type: str            # "cpu" or "cuda"
    first_device: int           # rank r uses cuda:first_device+r
    timeout_s: float
    parent_pid: int
    threads: int | None = None  # CPU threads per servant (None: torch's default)

    def device(self, rank: int) -> torch.device:
        return torch.device("cpu") if self.device_type == "cpu" else torch.device("cuda", self.first_device + rank)


class ParallelGroup:
    """This process's membership in the engine's process group (see the module docstring)."""

    def __init__(self, rank: int, world: int, device: torch.device, store: dist.Store, timeout_s: float,
                 processes: dict[int, object] | None = None):
        self.rank, self.world, self.device = rank, world, device
        self.timeout_s = timeout_s
        self.control = dist.PrefixStore("multitalk/control/", store)
        self.processes = processes or {}
        self.failure: str | None = None
        self.failed_rank: int | None = None
        self._aborted = False
        self._closed = False
        self._jobs = 0
        self._watch_stop = threading.Event()
        self._watch: threading.Thread | None = None
        if rank == 0:
            self._watch = threading.Thread(target=self._watchdog, name="multitalk-rank-watchdog", daemon=True)
            self._watch.start()

    # -- starting -------------------------------------------------------------------------------
    @classmethod
    def start(cls, world: int, device: torch.device, servant: Callable, servant_args: tuple = (),
              timeout_s: float | None = None, threads: int | None = None) -> "ParallelGroup":
        """Make this process rank 0 of ``world`` and start ranks 1..world-1 running
        ``servant(group, *servant_args)`` (a module-level function)."""
        import torch.multiprocessing as mp

        timeout_s = collective_timeout_s() if timeout_s is None else timeout_s
        device = torch.device(device)
        if device.type == "cuda":
            needed = (device.index or 0) + world
            if torch.cuda.device_count() < needed:
                raise ParallelError(f"{world} GPUs requested from cuda:{device.index or 0} but only "
                                    f"{torch.cuda.device_count()} are visible")
        store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        spec = GroupSpec(world, "127.0.0.1", store.port, device.type, device.index or 0, timeout_s, os.getpid(),
                         threads)
        if device.type == "cpu":
            # one import of the package in the fork server serves every servant (process start-up
            # dominates short CPU runs); CUDA processes are spawned (no CUDA state crosses a fork)
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["multitalk.pipeline.parallel"])
        else:
            ctx = mp.get_context("spawn")
        processes = {}
        for rank in range(1, world):
            p = ctx.Process(target=_servant_main, args=(rank, spec, servant, servant_args),
                            name=f"multitalk-rank{rank}", daemon=False)
            p.start()
            processes[rank] = p
        try:
            _init_process_group(0, spec, store)
        except Exception as exc:
            for p in processes.values():
                p.kill()
            raise ParallelError(f"could not form the process group of {world} processes: {exc}") from exc
        return cls(0, world, spec.device(0), store, timeout_s, processes)

    @classmethod
    def from_env(cls, device_type: str, timeout_s: float | None = None) -> "ParallelGroup":
        """Join the group of a ``torchrun`` launch (rank, size and rendezvous from the environment)."""
        timeout_s = collective_timeout_s() if timeout_s is None else timeout_s
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        device = torch.device("cpu") if device_type == "cpu" else torch.device("cuda", local)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend=_backend(device.type), timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        store = dist.distributed_c10d._get_default_store()
        return cls(rank, world, device, store, timeout_s)

    # -- control plane --------------------------------------------------------------------------
    def post_job(self, job: object) -> None:
        """Rank 0: hand the next job description to every servant (they wait for it without a bound)."""
        self._jobs += 1
        self.control.set(f"job/{self._jobs}", pickle.dumps(job))

    def next_job(self) -> object:
        """Servant: wait for the next job description posted by rank 0."""
        self._jobs += 1
        key = f"job/{self._jobs}"
        while not self.control.check([key]):
            time.sleep(_POLL_S)
        return pickle.loads(self.control.get(key))

    @property
    def jobs(self) -> int:
        """Jobs posted (rank 0) or taken (servant) so far: the current job's number."""
        return self._jobs

    def report_stats(self, stats: dict) -> None:
        """Servant: this job's figures (e.g. peak memory) for rank 0 (:meth:`servant_stats`)."""
        self.control.set(f"stats/{self.rank}/{self._jobs}", pickle.dumps(stats))

    def servant_stats(self, job: int, timeout_s: float = 30.0) -> dict[int, dict]:
        """Rank 0: each servant's :meth:`report_stats` of job ``job`` (those that arrive in time)."""
        out, deadline = {}, time.monotonic() + timeout_s
        for rank in range(1, self.world):
            key = f"stats/{rank}/{job}"
            while not self.control.check([key]) and time.monotonic() < deadline and self.failure is None:
                time.sleep(_POLL_S / 4)
            if self.control.check([key]):
                out[rank] = pickle.loads(self.control.get(key))
        return out

    def report_error(self, message: str) -> None:
        """Servant: tell rank 0 why this process cannot go on (rank 0's watchdog aborts the job)."""
        try:
            self.control.set(f"error/{self.rank}", message.encode())
        except Exception:  # noqa: BLE001 - rank 0 gone: nothing to tell
            log.debug("rank %d could not report its error", self.rank)

    # -- failure handling (rank 0) ----------------------------------------------------------------
    def _check(self) -> tuple[int, str] | None:
        for rank, p in self.processes.items():
            if not p.is_alive():
                return rank, f"rank {rank} of {self.world} {_describe_exit(p.exitcode)}"
        for rank in range(1, self.world):
            key = f"error/{rank}"
            if self.control.check([key]):
                return rank, f"rank {rank} of {self.world} failed: {self.control.get(key).decode()}"
        return None

    def _watchdog(self) -> None:
        while not self._watch_stop.wait(_POLL_S):
            try:
                found = self._check()
            except Exception:  # noqa: BLE001 - store gone while closing
                return
            if found is not None:
                self.fail(found[1], found[0])
                return

    def fail(self, reason: str, rank: int | None = None) -> None:
        """Record the first failure and abort the process group (blocked collectives return an error)."""
        if self.failure is None:
            self.failure, self.failed_rank = reason, rank
            log.error("%s", reason)
        if not self._aborted and dist.is_initialized():
            self._aborted = True
            with contextlib.suppress(Exception):
                dist.distributed_c10d._abort_process_group()

    @property
    def broken(self) -> bool:
        return self.failure is not None

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run collectives; a lost rank, a failed or timed-out collective becomes a :class:`ParallelError`."""
        if self.failure is not None:
            raise ParallelError(self.failure, self.failed_rank)
        try:
            yield
        except ParallelError:
            raise
        except Exception as exc:
            if self.rank == 0 and self.failure is None:
                deadline = time.monotonic() + 2.0          # let the watchdog name the rank
                while self.failure is None and time.monotonic() < deadline:
                    found = self._check()
                    if found is not None:
                        self.fail(found[1], found[0])
                        break
                    time.sleep(_POLL_S / 4)
            if self.failure is not None:
                raise ParallelError(self.failure, self.failed_rank) from exc
            if isinstance(exc, dist.DistError) or "gloo" in str(exc).lower() or "nccl" in str(exc).lower():
                self.fail(f"{what} failed on rank {self.rank}: {type(exc).__name__}: {exc}".strip())
                raise ParallelError(self.failure) from exc
            raise

    # -- stopping -------------------------------------------------------------------------------
    def close(self, join_timeout_s: float = 30.0) -> None:
        """Rank 0: tell the servants to stop, wait for them (kill stragglers), leave the group."""
        if self._closed:
            return
        self._closed = True
        self._watch_stop.set()
        if self.rank == 0 and self.processes:
            with contextlib.suppress(Exception):
                self.post_job(None)                    # None: shut down
            deadline = time.monotonic() + (join_timeout_s if self.failure is None else 2.0)
            for p in self.processes.values():
                p.join(max(0.0, deadline - time.monotonic()))
            for p in self.processes.values():
                if p.is_alive():
                    p.kill()
                    p.join(5)
        if dist.is_initialized():
            # after a failure the group was aborted: its teardown may block on the dead peer, so it
            # gets a few seconds on a side thread and is then left to the process's exit
            def destroy():
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()

            t = threading.Thread(target=destroy, name="multitalk-pg-destroy", daemon=True)
            t.start()
            t.join(30.0 if self.failure is None else 3.0)


def _backend(device_type: str) -> str:
    # NCCL for the GPU tensors; gloo beside it for CPU objects (pickled job/step headers, sizes)
    return "gloo" if device_type == "cpu" else "cpu:gloo,cuda:nccl"


def _init_process_group(rank: int, spec: GroupSpec, store: dist.Store) -> None:
    device = spec.device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=_backend(spec.device_type), store=dist.PrefixStore("pg/", store),
                            rank=rank, world_size=spec.world,
                            timeout=datetime.timedelta(seconds=spec.timeout_s),
                            device_id=device if device.type == "cuda" else None)


def _parent_watch(parent_pid: int) -> None:
    """Servant: end this process when rank 0 is gone (e.g. killed while we wait in a collective)."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(3)
        except PermissionError:
            pass


def _servant_main(rank: int, spec: GroupSpec, servant: Callable, servant_args: tuple) -> None:
    """Entry point of ranks 1..N-1 started by :meth:`ParallelGroup.start`."""
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_parent_watch, args=(spec.parent_pid,), daemon=True).start()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    store = dist.TCPStore(spec.host, spec.port, None, False, datetime.timedelta(seconds=spec.timeout_s))
    _init_process_group(rank, spec, store)
    group = ParallelGroup(rank, spec.world, spec.device(rank), store, spec.timeout_s)
    try:
        servant(group, *servant_args)
    except BaseException as exc:  # tell rank 0 why, then leave (the group cannot go on without us)
        group.report_error(f"{type(exc).__name__}: {exc}")
        log.exception("rank %d failed", rank)
        os._exit(1)
    os._exit(0)  # skip interpreter teardown (threads, a process group that rank 0 may have left)


__all__ = ["DEFAULT_TIMEOUT_S", "GroupSpec", "ParallelGroup", "TIMEOUT_ENV", "collective_timeout_s",
           "under_torchrun"]
