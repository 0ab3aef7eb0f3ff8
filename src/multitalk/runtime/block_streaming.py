"""Stream a model's repeated blocks from pinned host memory, the copy of the next block overlapping
the compute of the current one; as many blocks as the memory plan allows stay resident.

``BlockStreamer(blocks, streamed=[...], device=...)`` packs each streamed block into its own pinned
host buffer (:class:`~multitalk.runtime.host_memory.HostCopy`) and, between ``begin()`` and
``end()`` (what ``Placement.use`` calls around a model's use), keeps ``prefetch + 1`` device *slots*,
each a set of tensors shaped like one block. Around each block call the runner calls
``before_block(i)`` / ``after_block(i)``:

* ``before_block(i)``: the compute stream waits (on the GPU, through an event) for the copy of
  block ``i`` into its slot, and the block's tensors are pointed at the slot;
* ``after_block(i)``: an event marks the slot free once the compute has read it, the block's
  tensors are pointed back at the host copy, and the copies of the next streamed blocks (in call
  order, wrapping around to the next forward) are queued on a side stream, each waiting for its
  slot's free event. The copy of the block after next therefore runs while the blocks before it
  compute. Resident blocks are spread evenly between the streamed ones, so each copy has the
  compute of one or more blocks to hide behind.

The DiT calls the streamer from ``run_blocks`` (``MultiTalkTransformer3DModel.block_streamer``);
a model whose block loop we do not own (the umT5 encoder) gets module hooks (:meth:`attach_hooks`).

Why not diffusers' ``apply_group_offloading`` (block level, one block per group, CUDA stream,
prefetch), which the issue measured at 1.15x the resident forward on the plain Wan 14B: its
mechanism (``ModuleGroup`` and ``GroupOffloadingHook``) is the same idea, and this keeps its parts
(pinned host copy per group, copy on a side stream, prefetch of the next group, tensors re-pointed
with ``.data``), but four of its properties do not fit this model:

1. its hooks replace each block's ``forward``; our blocks are compiled with
   ``compile_repeated_blocks`` (``torch.compile`` of each block's ``_call_impl``), so the hooks run
   inside the compiled region, with the ``torch.compiler.disable``-d onload/offload as graph breaks
   and per-block hook objects that dynamo guards on (one recompilation per block; diffusers' own
   compile + offload test raises ``cache_size_limit``). Here the calls sit in the Python loop around
   the compiled blocks, which keep their single compiled graph;
2. it offloads every block of every ``ModuleList``; a partial layout (as many blocks resident as
   fit) is the point of the 24 GiB tier;
3. its ordering is host-side: ``onload_`` starts with ``stream.synchronize()`` and, without
   ``record_stream``, ``offload_`` synchronises the compute stream after every block, so the GPU
   idles while the host launches the next block; with ``record_stream`` the host runs ahead and
   device memory is bounded only by how fast the copies go. Here the slots are fixed buffers and
   all ordering is GPU-side (events): the host never waits, device memory is exactly
   ``prefetch + 1`` blocks;
4. it pins tensor by tensor through PyTorch's caching host allocator, which rounds each one up to a
   power of two (see ``runtime.host_memory``).

On the CPU (the tests) the same bookkeeping runs with plain synchronous copies, so a streamed model
can be checked against the resident one bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from multitalk.runtime.host_memory import HostCopy


def spread(total: int, streamed: int) -> list[int]:
    """Which of ``total`` blocks to stream so that the ``streamed`` ones are spread evenly
    (the last block is streamed first, then every ``total / streamed``-th before it)."""
    streamed = max(0, min(total, streamed))
    return sorted({total - 1 - (k * total) // streamed for k in range(streamed)}) if streamed else []


@dataclass
class _Slot:
    tensors: list[torch.Tensor]
    block: int | None = None           # the block it holds or is being loaded with
    loaded: object = None              # event: the copy into it is done
    freed: object = None               # event: the last compute that read it is done
    used: bool = False                 # freed has been recorded at least once


@dataclass
class StreamStats:
    """What one ``begin()``..``end()`` use did (for logs and the benchmark)."""

    blocks_streamed: int = 0
    prefetched: int = 0                # copies queued ahead of their block
    waited: int = 0                    # blocks whose copy was not queued ahead (a synchronous start)
    bytes_copied: int = 0
    host_wait_s: float = 0.0           # time the host spent in before/after (bookkeeping, never a sync)
    uses: int = 0


class BlockStreamer:
    """See the module docstring. ``blocks``: the model's block list; ``streamed``: indices to stream."""

    def __init__(self, blocks: Sequence[nn.Module], streamed: Iterable[int], device: torch.device | str,
                 prefetch: int = 1, pin: bool = True):
        self.blocks = blocks
        self.device = torch.device(device)
        self.order = sorted(set(int(i) for i in streamed))
        if any(i < 0 or i >= len(blocks) for i in self.order):
            raise ValueError(f"streamed block indices {self.order} out of range 0..{len(blocks) - 1}")
        self.prefetch = max(1, int(prefetch))
        self.cuda = self.device.type == "cuda"
        self.pin = pin and self.cuda
        self.host = {i: HostCopy(blocks[i], pin=self.pin) for i in self.order}
        self._check_layout()
        self.stats = StreamStats()
        self._slots: list[_Slot] = []
        self._stream = None
        self._active = False
        self._hooks: list = []

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return min(self.prefetch + 1, len(self.order))

    @property
    def host_bytes(self) -> int:
        return sum(h.nbytes for h in self.host.values())

    @property
    def pinned(self) -> bool:
        return all(h.pinned for h in self.host.values())

    # -- use -----------------------------------------------------------------------------------

    def begin(self) -> None:
        """Allocate the slots and queue the first copies (they overlap whatever runs before block 0)."""
        if self._active or not self.order:
            self._active = bool(self.order)
            return
        first = self.host[self.order[0]]
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._slots = []
        for _ in range(self.num_slots):
            slot = _Slot(first.empty_on(self.device))
            if self.cuda:
                slot.loaded, slot.freed = torch.cuda.Event(), torch.cuda.Event()
            self._slots.append(slot)
        self._active = True
        self.stats.uses += 1
        for i in self.order[:self.num_slots]:
            self._load(i, ahead=True)

    def end(self) -> None:
        """Drop the slots; copies still queued are ordered before any later use of that memory."""
        if not self._active:
            return
        for i in self.order:
            self.host[i].point_home()
        if self.cuda and self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self._slots, self._stream, self._active = [], None, False

    def before_block(self, i: int) -> None:
        if i not in self.host:
            return
        if not self._active:
            raise RuntimeError("BlockStreamer.before_block outside begin()/end() (use placement.use(model))")
        t0 = time.perf_counter()
        slot = self._slot_holding(i)
        if slot is None:
            slot = self._load(i, ahead=False)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.loaded)
        self.host[i].point(slot.tensors)
        self.stats.blocks_streamed += 1
        self.stats.host_wait_s += time.perf_counter() - t0

    def after_block(self, i: int) -> None:
        if i not in self.host or not self._active:
            return
        t0 = time.perf_counter()
        slot = self._slot_holding(i)
        if self.cuda:
            slot.freed.record(torch.cuda.current_stream(self.device))
        slot.used = True
        self.host[i].point_home()
        # the slots should now hold the next num_slots streamed blocks in call order (wrapping into
        # the next forward): queue the missing ones; i's own slot is the first one overwritten
        k = self.order.index(i)
        for step in range(1, self.num_slots + 1):
            nxt = self.order[(k + step) % len(self.order)]
            if self._slot_holding(nxt) is None:
                self._load(nxt, ahead=True, after=i)
        self.stats.host_wait_s += time.perf_counter() - t0

    # -- internals -----------------------------------------------------------------------------

    def _slot_holding(self, i: int) -> _Slot | None:
        for slot in self._slots:
            if slot.block == i:
                return slot
        return None

    def _victim(self, start: int) -> _Slot:
        """The slot to overwrite: one holding nothing, else the one whose block is needed last in
        the cyclic call order counted from position ``start``."""
        empty = [s for s in self._slots if s.block is None]
        if empty:
            return empty[0]
        n = len(self.order)
        return max(self._slots, key=lambda slot: (self.order.index(slot.block) - start) % n)

    def _load(self, i: int, ahead: bool, after: int | None = None) -> _Slot:
        # counted from the block after ``after`` (a prefetch), or from ``i`` itself (a miss)
        start = self.order.index(after) + 1 if after is not None else self.order.index(i)
        slot = self._victim(start)
        slot.block = i
        host = self.host[i]
        if self.cuda:
            with torch.cuda.stream(self._stream):
                if slot.used:
                    self._stream.wait_event(slot.freed)   # the last compute that read the slot is done
                host.copy_to(slot.tensors, non_blocking=True)
                slot.loaded.record(self._stream)
        else:
            host.copy_to(slot.tensors, non_blocking=False)
        self.stats.bytes_copied += host.nbytes
        if ahead:
            self.stats.prefetched += 1
        else:
            self.stats.waited += 1
        return slot

    # -- models whose block loop we do not own -------------------------------------------------

    def attach_hooks(self) -> None:
        """Call ``before_block`` / ``after_block`` from forward (pre-)hooks on each streamed block
        (for models that are not compiled, e.g. the text encoder)."""
        for i in self.order:
            block = self.blocks[i]
            self._hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: self.before_block(i)))
            self._hooks.append(block.register_forward_hook(lambda m, a, o, i=i: self.after_block(i)))

    def restream(self, streamed: Iterable[int]) -> None:
        """Change which blocks are streamed (outside ``begin()``/``end()``): newly streamed blocks are
        packed into host memory first (freeing device memory), then newly resident ones copied back."""
        if self._active:
            raise RuntimeError("restream() while the blocks are in use")
        new = sorted(set(int(i) for i in streamed))
        for i in new:
            if i not in self.host:
                self.host[i] = HostCopy(self.blocks[i], pin=self.pin)
        for i in [i for i in self.order if i not in new]:
            self._make_resident(i)
        self.order = new
        self._check_layout()
        if self._hooks:
            self._remove_hooks()
            self.attach_hooks()

    def _check_layout(self) -> None:
        """All streamed blocks share one slot layout; ``block_bytes`` is one block's host copy."""
        if len({h.signature() for h in self.host.values()}) > 1:
            raise ValueError("streamed blocks must have the same tensor shapes and dtypes (one slot layout)")
        self.block_bytes = next(iter(self.host.values())).nbytes if self.host else 0

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _make_resident(self, i: int) -> None:
        host = self.host.pop(i)
        on_device = host.empty_on(self.device)
        host.copy_to(on_device, non_blocking=False)
        host.point(on_device)
        host.close()

    def discard(self) -> None:
        """Give the host copies and slots up without copying anything back (the model is being
        thrown away, e.g. reloaded for other LoRAs)."""
        self.end()
        self._remove_hooks()
        for host in self.host.values():
            host.close()
        self.host, self.order = {}, []

    def detach(self) -> None:
        """Remove hooks, make every streamed block resident on the device again, free the host copies."""
        self.end()
        self._remove_hooks()
        for i in self.order:
            self._make_resident(i)
        self.host, self.order = {}, []
