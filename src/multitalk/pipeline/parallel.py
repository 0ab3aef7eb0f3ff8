"""One video on several processes (GPUs): rank 0 samples, the other ranks run DiT calls with it.

Rank 0 is the process the user runs. It alone reads the inputs, runs the text, CLIP and wav2vec2
encoders and the VAE, draws every random number, combines the guidance branches (CFG or APG),
takes the Euler steps, writes the mp4 and reports progress: the sampler of ``generate`` is the
single-process one, with :class:`ParallelDenoiser` in place of the local DiT calls. The other
ranks (servants, :func:`serve`) load only their own DiT and wait for work.

Per job (a generation) rank 0 posts a description (the :class:`~multitalk.runtime.parallel.plan.ParallelPlan`)
on the control plane; then, all through collectives with timeouts:

* per clip, rank 0 broadcasts the branch inputs (text contexts, audio windows, CLIP features,
  ``y``, the speaker masks): the encoders' results reach every rank;
* per step, rank 0 broadcasts the latent, the timestep and (TeaCache) which branches compute;
  every rank runs its share of the step's DiT calls (:class:`BranchExecutor`: each guidance group
  its branch, its processes splitting the sequence with Ulysses), and each group's first process
  sends its branch's prediction to rank 0, which combines them exactly as one process would;
* ``end`` sends the servants back to waiting.

TeaCache is exact: its decision depends only on the timestep modulation, which rank 0 computes
itself; rank 0 sends the decisions, and each process keeps the residuals of the branches it ran
(its own slice of the tokens) and adds them when told to skip.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from multitalk.errors import ParallelError, UserInputError
from multitalk.pipeline.denoiser import _untimed, dit_call
from multitalk.pipeline.engine import Engine, EngineConfig, load_dit, prepare_dit
from multitalk.pipeline.teacache import TeaCache
from multitalk.runtime.parallel.channel import broadcast_message, recv_tensor, send_tensor
from multitalk.runtime.parallel.group import ParallelGroup, under_torchrun
from multitalk.runtime.parallel.plan import ParallelPlan, choose_plan
from multitalk.runtime.parallel.sequence import Layouts, install
from multitalk.runtime.placement import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

LOAD_CONCURRENCY_ENV = "MULTITALK_PARALLEL_LOAD_CONCURRENCY"


@dataclass(frozen=True)
class Job:
    """What every process needs before the first collective of a generation."""

    plan: ParallelPlan
    teacache: bool


class BranchExecutor:
    """This process's share of each step's DiT calls under ``plan`` (every rank runs one)."""

    def __init__(self, dit, rank: int, plan: ParallelPlan, layouts: Layouts):
        self.dit, self.rank, self.plan, self.layouts = dit, rank, plan, layouts
        self.rounds = plan.rounds()
        self.residuals: dict[int, torch.Tensor] = {}
        self.clip: dict | None = None

    def start_clip(self, clip: dict) -> None:
        self.clip = clip

    def step(self, x: torch.Tensor, t: torch.Tensor, compute: list[bool] | None) -> dict[int, torch.Tensor]:
        """Run this process's calls; returns ``{branch: prediction [16, T, h, w] float32}`` on rank 0."""
        c = self.clip
        preds: dict[int, torch.Tensor] = {}
        group = self.plan.group_of(self.rank)
        for rnd in self.rounds:
            if rnd.world:
                branch, layout = rnd.branches[0], self.layouts.world
            elif group in rnd.branches:
                branch, layout = rnd.branches[group], self.layouts.group
            else:
                continue
            install(self.dit, layout)
            context, audio = c["branches"][branch]
            pred = dit_call(self.dit, x, t, context, c["clip_fea"], c["y"], audio, c["ref_masks"], None, branch,
                            compute=None if compute is None else compute[branch],
                            residuals=self.residuals).float()[0]
            if rnd.world:
                if self.rank == 0:
                    preds[branch] = pred
                continue
            # each group's first process hands its branch to rank 0
            if self.rank == 0:
                preds[branch] = pred
                for other, b in rnd.branches.items():
                    if other != group:
                        preds[b] = recv_tensor(pred, src=self.plan.leader_of(other))
            elif self.rank == self.plan.leader_of(group):
                send_tensor(pred, dst=0)
        return preds


class ParallelRuntime:
    """Rank 0's handle on the other processes (``Engine.parallel``)."""

    def __init__(self, group: ParallelGroup, mode: str, heads: int):
        self.group, self.mode, self.heads = group, mode, heads
        self._layouts: dict[ParallelPlan, Layouts] = {}

    @property
    def world(self) -> int:
        return self.group.world

    def plan(self, branches: int) -> ParallelPlan:
        return choose_plan(self.mode, self.group.world, branches, self.heads)

    def denoiser(self, dit, teacache: TeaCache | None, branches: int, stage=None) -> "ParallelDenoiser":
        return ParallelDenoiser(self, dit, self.plan(branches), teacache, stage)

    def layouts(self, plan: ParallelPlan) -> Layouts:
        return _layouts(self._layouts, plan, self.group, self.heads)

    def close(self) -> None:
        self.group.close()


def _layouts(cache: dict, plan: ParallelPlan, group: ParallelGroup, heads: int) -> Layouts:
    if plan not in cache:                 # collective: every rank builds the same plans in order
        cache[plan] = Layouts(plan, group.rank, group.device, heads)
    return cache[plan]


class ParallelDenoiser:
    """Rank 0's side of :class:`~multitalk.pipeline.denoiser.LocalDenoiser` over several processes."""

    def __init__(self, runtime: ParallelRuntime, dit, plan: ParallelPlan, teacache: TeaCache | None, stage=None):
        self.runtime, self.group, self.dit, self.plan, self.teacache = runtime, runtime.group, dit, plan, teacache
        self.stage = stage or _untimed   # "dit": a whole step's DiT work here
        with self.group.guard("starting the job"):
            self.group.post_job(Job(plan, teacache is not None))
            self.executor = BranchExecutor(dit, 0, plan, runtime.layouts(plan))
        self._open = True
        log.info("%s", plan.describe())

    def start_clip(self, branches, clip_fea, y, ref_masks) -> None:
        message = {"op": "clip", "branches": list(branches), "clip_fea": clip_fea, "y": y, "ref_masks": ref_masks}
        with self.group.guard("sending the clip's conditions"):
            self.executor.start_clip(broadcast_message(message, self.group.device))

    def predict(self, x_in: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        compute = None
        if self.teacache is not None:
            t_in = torch.as_tensor(t, device=x_in.device).reshape(-1)
            e0 = self.dit.condition_embedder.time_embedding(t_in)[1].unflatten(1, (6, -1))
            compute = []
            for b in range(self.plan.branches):
                decision = self.teacache.should_compute(b, e0)
                if decision:
                    self.teacache.note_residual(b)
                compute.append(decision)
        with self.group.guard("a sampling step"), self.stage("dit"):
            message = broadcast_message({"op": "step", "x": x_in, "t": t, "compute": compute}, self.group.device)
            preds = self.executor.step(message["x"], message["t"], compute)
        return [preds[b] for b in range(self.plan.branches)]

    def close(self) -> None:
        if self._open and not self.group.broken:
            self._open = False
            with self.group.guard("ending the job"):
                broadcast_message({"op": "end"}, self.group.device)


# ----------------------------------------------------------------------------------------------
# servants


def _run_job(group: ParallelGroup, dit, job: Job, cache: dict, heads: int) -> None:
    cuda = group.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(group.device)
    executor = BranchExecutor(dit, group.rank, job.plan, _layouts(cache, job.plan, group, heads))
    with group.guard("a job"), torch.no_grad():
        while True:
            message = broadcast_message(None, group.device)
            op = message["op"]
            if op == "clip":
                executor.start_clip(message)
            elif op == "step":
                executor.step(message["x"], message["t"], message["compute"])
            elif op == "end":
                break
            else:
                raise ParallelError(f"unknown message {op!r} from rank 0")
    group.report_stats({"peak_memory_bytes": torch.cuda.max_memory_allocated(group.device) if cuda else None})


def serve(group: ParallelGroup, config: EngineConfig, concurrency: int = 1, dit_factory=None) -> None:
    """A servant's life: load this rank's DiT (in turn), then run jobs until rank 0 says stop.

    ``dit_factory(config, device) -> model`` (a module-level function) builds the DiT instead of
    loading ``config``'s folders (the benchmark's random full-size weights); either way the
    engine's runtime choices (``prepare_dit``: fp8, 8-bit attention, fusions, compile) follow.
    """
    dit = _load_servant_dit(group, config, concurrency, dit_factory)
    heads = dit.config.num_attention_heads
    cache: dict = {}
    while True:
        job = group.next_job()
        if job is None:
            return
        _run_job(group, dit, job, cache, heads)


def _load_servant_dit(group: ParallelGroup, config: EngineConfig, concurrency: int, dit_factory=None):
    dtype = resolve_dtype(config.dtype, group.device)
    # staggered: at most ``concurrency`` servants stream their weights at once (host RAM, disk)
    wait_for = group.rank - concurrency
    if wait_for >= 1:
        key = f"loaded/{wait_for}"
        while not group.control.check([key]):
            time.sleep(0.1)
    t0, started = time.perf_counter(), time.time()
    if dit_factory is None:
        from multitalk.models.architecture import detect_architecture

        ckpt_dir, _w2v, mt_dir = config.resolved_dirs()
        dit = load_dit(config, ckpt_dir, mt_dir, detect_architecture(ckpt_dir), group.device, dtype,
                       home=group.device)[0]                      # LoRAs merged as on rank 0
    else:
        dit = dit_factory(config, group.device)
        prepare_dit(dit, config, group.device, dtype)
    group.control.set(f"loaded/{group.rank}", f"{started:.6f} {time.time():.6f}")   # when it streamed, for the logs/tests
    log.info("rank %d loaded its DiT in %.1fs", group.rank, time.perf_counter() - t0)
    group.control.set(f"ready/{group.rank}", str(time.time()))
    return dit


# ----------------------------------------------------------------------------------------------
# rank 0


def load_parallel_engine(config: EngineConfig, *, dit_factory=None, engine_factory=None) -> Engine:
    """This process becomes rank 0 of ``config.gpus`` processes (it starts the others), or of a
    ``torchrun`` launch (whose other ranks call :func:`serve_from_env`); returns rank 0's
    :class:`Engine` with ``engine.parallel`` set, once every process has loaded its DiT.

    ``engine_factory(config, device) -> Engine`` builds rank 0's engine instead of
    ``Engine.load_local`` and ``dit_factory`` the servants' DiTs (see :func:`serve`): the
    benchmark's random full-size models."""
    if config.offload:
        raise UserInputError("offload_model", "offloading is not available with several GPUs",
                             "drop --offload_model (each GPU holds one DiT) or use --gpus 1")
    if config.parallel not in ("auto", "ulysses", "cfg"):
        raise UserInputError("parallel", f"unknown mode {config.parallel!r}", "use auto, ulysses or cfg")
    if dit_factory is None:
        config.resolved_dirs()                  # a missing folder is the user's error, before any process starts
    base = resolve_device(config.device)
    concurrency = _load_concurrency()
    if under_torchrun():
        group = ParallelGroup.from_env(base.type)
        if config.gpus > 1 and config.gpus != group.world:
            raise UserInputError("gpus", f"--gpus {config.gpus} under torchrun with {group.world} processes",
                                 "leave --gpus out under torchrun, or give the same number")
        if group.rank != 0:
            raise UserInputError("gpus", f"rank {group.rank} of a torchrun launch was asked to load rank 0's engine",
                                 "call serve_from_env on the other ranks")
    else:
        if config.gpus < 2:
            raise UserInputError("gpus", f"{config.gpus} GPUs", "use --gpus 2 or more for a multi-GPU engine")
        # CPU processes share the cores: each servant gets its share (rank 0 keeps its own setting)
        threads = max(1, torch.get_num_threads() // config.gpus) if base.type == "cpu" else None
        group = ParallelGroup.start(config.gpus, base, serve, (config, concurrency, dit_factory), threads=threads)
    try:
        t0 = time.perf_counter()
        engine = (engine_factory or Engine.load_local)(config, device=group.device)
        _wait_ready(group)
        engine.load_seconds["parallel_ready"] = time.perf_counter() - t0
        engine.parallel = ParallelRuntime(group, config.parallel, engine.transformer.config.num_attention_heads)
        return engine
    except BaseException:
        group.close()
        raise


def serve_from_env(config: EngineConfig) -> None:
    """A non-zero rank of a ``torchrun`` launch: serve rank 0 until it stops (then return)."""
    group = ParallelGroup.from_env(resolve_device(config.device).type)
    concurrency = _load_concurrency()
    try:
        serve(group, config, concurrency)
    except BaseException as exc:
        group.report_error(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        group.close()


def _load_concurrency() -> int:
    """How many servants may stream their weights at once (``MULTITALK_PARALLEL_LOAD_CONCURRENCY``)."""
    return max(1, int(os.environ.get(LOAD_CONCURRENCY_ENV, "1")))


def _wait_ready(group: ParallelGroup) -> None:
    """Wait (without a bound: loading 14B weights takes what it takes) until every servant loaded
    its DiT; a servant that dies or fails meanwhile ends the wait with its reason."""
    pending = set(range(1, group.world))
    while pending:
        if group.failure is not None:
            raise ParallelError(group.failure, group.failed_rank)
        pending = {r for r in pending if not group.control.check([f"ready/{r}"])}
        if pending:
            time.sleep(0.1)


__all__ = ["BranchExecutor", "Job", "ParallelDenoiser", "ParallelRuntime", "load_parallel_engine", "serve",
           "serve_from_env"]
