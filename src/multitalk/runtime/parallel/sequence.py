"""Sequence (Ulysses) parallelism of the MultiTalk DiT on diffusers' context-parallel engine.

What diffusers provides and is used as is: ``ContextParallelConfig`` / ``ParallelConfig`` (meshes,
Ulysses degree, "Ulysses anything" for uneven token counts and padded heads), the model's
``_cp_plan`` applied by ``diffusers.hooks.context_parallel.apply_context_parallel`` (split the patch
tokens and RoPE tables, gather the head's output), and the attention dispatcher's Ulysses
attention (``TemplatedUlyssesAttention`` / ``TemplatedUlyssesAnythingAttention``: all-to-all of
q/k/v from token shards to head shards and back around the self-attention).

What is written here, and why:

* :func:`install` instead of ``ModelMixin.enable_parallelism``: that method computes the device as
  ``rank % torch.accelerator.device_count()``, a ``ZeroDivisionError`` on a machine without an
  accelerator (the CPU/gloo tests), and it can be applied once per model, while guidance
  parallelism switches layouts between the DiT calls of one step (a branch on a group of
  processes, the leftover branch on all of them, or no split at all). :func:`install` performs the
  same three steps with diffusers' own functions: check the attention backend supports context
  parallelism, hand the ``ParallelConfig`` to every attention processor, apply/remove the
  ``_cp_plan`` hooks.
* :class:`SequenceShard`, the :class:`~multitalk.models.sequence_shard.TokenShard` that MultiTalk's
  audio path needs and diffusers does not have (see that module): the global position of this
  process's tokens (it also picks even Ulysses or "Ulysses anything" per call: the plain mode needs
  the token count and the heads divisible by the degree and has no size exchange), the first
  latent frame's keys for the speaker map (a broadcast from the first process, which holds them
  whenever it holds at least one frame), the speaker rows' global min/max (an all-reduce), and the
  gather of the head's output (one all-gather; uneven slices padded to the largest and trimmed,
  because diffusers' uneven gather hands unequal tensors to ``all_gather``, which gloo refuses).
  All use functional collectives, so the ones inside a block stay inside its compiled graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
from diffusers import ContextParallelConfig
from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel
from diffusers.models._modeling_parallel import ParallelConfig
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from torch import nn

from multitalk.errors import UserInputError
from multitalk.runtime.parallel.plan import ParallelPlan


def split_sizes(total: int, parts: int) -> list[int]:
    """Token counts per process: ``torch.tensor_split`` order (the first ``total % parts`` get one more)."""
    q, r = divmod(total, parts)
    return [q + 1] * r + [q] * (parts - r)


# torch >= 2.12 names it all_gather_single (all_gather_tensor warns); the GPU image has 2.11
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _wait(t: torch.Tensor) -> torch.Tensor:
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


class SequenceShard:
    """:class:`~multitalk.models.sequence_shard.TokenShard` over one Ulysses group (see the module docstring)."""

    def __init__(self, cp_config: ContextParallelConfig, heads: int):
        self.cp = cp_config
        self.degree = cp_config.ulysses_degree
        self.rank = cp_config._ulysses_local_rank
        self.group = cp_config._ulysses_mesh.get_group()
        self.heads = heads
        self.sizes: list[int] = []

    def span(self, total: int) -> tuple[int, int]:
        # plain Ulysses (equal chunks, no size exchange) whenever it fits, "anything" otherwise
        self.cp.ulysses_anything = total % self.degree != 0 or self.heads % self.degree != 0
        if total < self.degree:
            raise UserInputError("size", f"{total} tokens cannot be split over {self.degree} processes",
                                 "use a larger video or fewer GPUs")
        self.sizes = split_sizes(total, self.degree)
        start = sum(self.sizes[: self.rank])
        return start, start + self.sizes[self.rank]

    def reference_keys(self, key: torch.Tensor, count: int) -> torch.Tensor:
        if self.sizes[0] >= count:        # the first process holds every reference token
            src = key[:, :count].contiguous() if self.rank == 0 else key.new_empty(key.shape[0], count, *key.shape[2:])
            return _wait(funcol.broadcast(src, 0, self.group))
        start = sum(self.sizes[: self.rank])
        lo, hi = min(start, count), min(start + key.shape[1], count)
        prefix = key.new_zeros(key.shape[0], count, *key.shape[2:])
        prefix[:, lo:hi] = key[:, lo - start:hi - start]
        return _wait(funcol.all_reduce(prefix, "sum", self.group))   # exact: every entry is x + zeros

    def row_extrema(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.stack([-rows.amin(dim=-1), rows.amax(dim=-1)])
        both = _wait(funcol.all_reduce(both, "max", self.group))
        return -both[0], both[1]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        # uneven slices are padded to the largest and trimmed after one equal all-gather
        largest = self.sizes[0]
        x = x.contiguous()
        if x.shape[1] < largest:
            x = torch.cat([x, x.new_zeros(x.shape[0], largest - x.shape[1], *x.shape[2:])], dim=1)
        full = _wait(_all_gather(x, 1, self.group))
        if largest * self.degree == sum(self.sizes):
            return full
        return torch.cat([part[:, :n] for part, n in zip(full.split(largest, dim=1), self.sizes)], dim=1)


@dataclass
class Layout:
    """One way of splitting a DiT call: the diffusers config of a Ulysses group and its token shard."""

    parallel_config: ParallelConfig
    shard: SequenceShard


def make_layout(mesh, rank: int, world: int, device: torch.device, heads: int) -> Layout:
    """A :class:`Layout` over ``mesh`` (a DeviceMesh with dims ``("ring", "ulysses")``, ring size 1)."""
    cp = ContextParallelConfig(ulysses_degree=mesh["ulysses"].size(), mesh=mesh)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(rank, world, device, mesh=mesh)
    return Layout(config, SequenceShard(cp, heads))


class Layouts:
    """The layouts a :class:`~multitalk.runtime.parallel.plan.ParallelPlan` uses on this process.

    ``group``: Ulysses over this process's guidance group (None when groups are single processes);
    ``world``: Ulysses over all processes (the leftover branch; the group layout when cfg is 1).
    Building them creates process groups, so every process must build the same plans in the same
    order (the job description carries the plan).
    """

    def __init__(self, plan: ParallelPlan, rank: int, device: torch.device, heads: int):
        from torch.distributed.device_mesh import init_device_mesh

        self.group: Layout | None = None
        self.world: Layout | None = None
        if plan.ulysses > 1:
            mesh = init_device_mesh(device.type, (plan.cfg, 1, plan.ulysses), mesh_dim_names=("cfg", "ring", "ulysses"))
            self.group = make_layout(mesh["ring", "ulysses"], rank, plan.world, device, heads)
        if plan.cfg == 1:
            self.world = self.group
        elif plan.branches % plan.cfg and plan.leftover_on_world:
            mesh = init_device_mesh(device.type, (1, plan.world), mesh_dim_names=("ring", "ulysses"))
            self.world = make_layout(mesh, rank, plan.world, device, heads)


def _check_backend(model: nn.Module) -> None:
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if not isinstance(module, AttentionModuleMixin) or not hasattr(processor, "_attention_backend"):
            continue
        if getattr(processor, "sdpa_override", None) is not None:
            continue   # a runtime kernel (8-bit attention) runs inside diffusers' Ulysses all-to-all
        backend = processor._attention_backend
        if backend is None:
            backend, _ = _AttentionBackendRegistry.get_active_backend()
        else:
            backend = AttentionBackendName(backend)
        if not _AttentionBackendRegistry._is_context_parallel_available(backend):
            supported = sorted(_AttentionBackendRegistry._supports_context_parallel)
            raise UserInputError("attention_backend", f"the attention backend {backend.value!r} does not support "
                                 "sequence parallelism", f"use one of {supported}")


def install(model: nn.Module, layout: Layout | None) -> None:
    """Make ``model``'s next calls use ``layout`` (None: the whole sequence on this process)."""
    current = getattr(model, "_multitalk_layout", None)
    if current is layout:
        return
    plan = model._cp_plan
    if current is not None:
        remove_context_parallel(model, plan)
    if layout is not None:
        _check_backend(model)
        apply_context_parallel(model, layout.parallel_config.context_parallel_config, plan)
    config = None if layout is None else layout.parallel_config
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if isinstance(module, AttentionModuleMixin) and processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    model._parallel_config = config
    model.token_shard = None if layout is None else layout.shard
    model._multitalk_layout = layout


__all__ = ["Layout", "Layouts", "SequenceShard", "install", "make_layout", "split_sizes"]

