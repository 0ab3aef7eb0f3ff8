"""Page-locked host copies of a module's weights, and the device copies made from them.

:class:`HostCopy` moves every tensor of a module (parameters and buffers, tied ones once) into one
host buffer and makes the module's tensors views of it; :meth:`HostCopy.point` re-points them at
device tensors (:meth:`HostCopy.empty_on`, filled by :meth:`HostCopy.copy_to`) and
:meth:`HostCopy.point_home` back at the host views. The module object, its parameter objects and
their shapes never change, only where their data lives, so a compiled block keeps its compiled
code. :class:`PerUseWeights` is the "onload for each use" placement built on it.

Why one buffer registered with ``cudaHostRegister`` and not ``tensor.pin_memory()`` per tensor (what
diffusers' group offloading does): PyTorch's caching host allocator rounds every pinned allocation
up to the next power of two (``ATen/core/CachingHostAllocator.h``, ``pinned_max_round_threshold``
unlimited by default), so a 13824 x 5120 bf16 feed-forward weight (141.6 MB) takes 256 MB and a
whole 14B block (0.93 GB) 1 GiB: host memory 1.2x to 1.8x the weights. A plain allocation
page-locked in place costs exactly its size, and one buffer per module needs one registration.
Pinned memory makes host-to-device copies asynchronous (a side stream can copy while the GPU
computes) and about 2x faster than pageable memory.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

ALIGN = 256      # every tensor starts on a 256-byte boundary (vector loads, compiled kernels' alignment)
PAGE = 4096


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _unregister(ptr: int) -> None:
    try:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()          # no copy may still read the pages
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown, driver gone: nothing left to protect
        pass


class HostBuffer:
    """``nbytes`` of host memory, page-locked in place when ``pin`` (and CUDA is there)."""

    def __init__(self, nbytes: int, pin: bool = True):
        self.nbytes = nbytes
        self.pinned = False
        base = torch.empty(nbytes + PAGE, dtype=torch.uint8)
        start = (-base.data_ptr()) % PAGE
        self.data = base[start:start + nbytes]
        if pin and nbytes and torch.cuda.is_available():
            try:
                err = torch.cuda.cudart().cudaHostRegister(self.data.data_ptr(), nbytes, 0)
                self.pinned = int(err) == 0
            except Exception as exc:  # pragma: no cover - a torch without the binding
                log.warning("cudaHostRegister unavailable (%s): pinning through the caching allocator", exc)
            if self.pinned:
                self._finalizer = weakref.finalize(self, _unregister, self.data.data_ptr())
            else:
                self.data = self.data.pin_memory()  # rounded up to a power of two, but pinned
                self.pinned = True

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = int(torch.Size(shape).numel()) * dtype.itemsize
        return self.data[offset:offset + n].view(dtype).view(shape)

    def close(self) -> None:
        """Unregister now (after the device is idle); the memory itself goes with its last view."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()


def _aligned_nbytes(t: torch.Tensor) -> int:
    return _round_up(t.numel() * t.element_size(), ALIGN)


def unique_tensors(module: nn.Module, skip: Callable[[str], bool] = lambda name: False
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter and buffer of ``module``, each tensor object once
    (tied weights share one object), ``None`` entries and names ``skip`` selects left out."""
    seen = set()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t is None or id(t) in seen or skip(name):
            continue
        seen.add(id(t))
        yield name, t


def module_tensors(module: nn.Module, skip: Callable[[str], bool] = lambda name: False
                   ) -> list[tuple[str, torch.Tensor]]:
    """:func:`unique_tensors` as a list; a tensor still on the ``meta`` device is an error."""
    out = []
    for name, t in unique_tensors(module, skip):
        if t.device.type == "meta":
            raise ValueError(f"{name} is still on the meta device (not loaded)")
        out.append((name, t))
    return out


def tensor_bytes(module: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> int:
    """Bytes of ``module``'s tensors as :class:`HostCopy` would hold them (meta tensors included)."""
    return sum(_aligned_nbytes(t) for _, t in unique_tensors(module, skip))


class HostCopy:
    """The tensors of ``module`` (those ``skip`` does not select) as views of one host buffer.

    Building it copies each tensor into the buffer, from wherever it is (CPU or GPU), and re-points
    the tensor at its view, so the original storage is freed tensor by tensor (host memory grows by
    at most one tensor beyond the buffer).
    """

    def __init__(self, module: nn.Module, *, pin: bool = True, skip: Callable[[str], bool] = lambda name: False):
        entries = module_tensors(module, skip)
        offsets, total = [], 0
        for _, t in entries:
            offsets.append(total)
            total += _aligned_nbytes(t)
        self.buffer = HostBuffer(total, pin=pin)
        self.names = [name for name, _ in entries]
        self.tensors = [t for _, t in entries]
        self.views = []
        for (_, t), off in zip(entries, offsets):
            view = self.buffer.view(off, tuple(t.shape), t.dtype)
            view.copy_(t.data)
            t.data = view
            self.views.append(view)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def pinned(self) -> bool:
        return self.buffer.pinned

    def signature(self) -> tuple:
        """Shapes and dtypes in order: two copies with the same signature can share device buffers."""
        return tuple((tuple(v.shape), v.dtype) for v in self.views)

    def empty_on(self, device: torch.device) -> list[torch.Tensor]:
        """Uninitialised device tensors shaped like this copy's."""
        return [torch.empty(v.shape, dtype=v.dtype, device=device) for v in self.views]

    def copy_to(self, targets: list[torch.Tensor], non_blocking: bool = True) -> None:
        """Copy every host view into ``targets`` (in the current stream; asynchronous when pinned)."""
        for dst, src in zip(targets, self.views):
            dst.copy_(src, non_blocking=non_blocking)

    def point(self, targets: list[torch.Tensor]) -> None:
        """Make the module's tensors use ``targets``' data (same shapes and dtypes)."""
        for t, dst in zip(self.tensors, targets):
            t.data = dst

    def point_home(self) -> None:
        self.point(self.views)

    def close(self) -> None:
        """Give the buffer up; the module's tensors must have been pointed elsewhere first."""
        self.buffer.close()


class PerUseWeights:
    """A module kept in pinned host memory and copied to ``device`` for each use (``onload`` /
    ``offload``); the device copy is dropped on ``offload``, the host copy stays."""

    def __init__(self, module: nn.Module, device: torch.device, pin: bool = True,
                 skip: Callable[[str], bool] = lambda name: False):
        self.module, self.device = module, torch.device(device)
        self.host = HostCopy(module, pin=pin and self.device.type == "cuda", skip=skip)
        self._on_device: list[torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return self.host.nbytes

    def onload(self) -> None:
        if self._on_device is None:
            self._on_device = self.host.empty_on(self.device)
            self.host.copy_to(self._on_device, non_blocking=self.host.pinned)
            self.host.point(self._on_device)

    def offload(self) -> None:
        if self._on_device is not None:
            self.host.point_home()
            self._on_device = None  # freed in stream order: later kernels reuse it after this use

    def release(self) -> None:
        """Make the module resident on ``device`` for good and give the host copy up."""
        self.onload()
        self._on_device = None
        self.host.close()

    def discard(self) -> None:
        """Drop the device copy and give the host copy up (the module is being thrown away)."""
        self.offload()
        self.host.close()
