"""Rank 0 -> every process: nested messages of tensors; group leaders -> rank 0: branch predictions.

:func:`broadcast_message` sends a nested ``dict``/``list``/``tuple`` whose leaves are tensors or
plain picklable values: the structure (with each tensor's shape and dtype) goes as one pickled
object (``broadcast_object_list``, over gloo beside NCCL), then every tensor by ``broadcast`` on
the processes' devices, received into fresh tensors of the right shape. :func:`send_tensor` /
:func:`recv_tensor` move one tensor between two processes (a branch's prediction from its group's
first process to rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class _Slot:
    index: int
    shape: tuple
    dtype: torch.dtype


def _strip(obj, tensors: list):
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj, tensors: list):
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def _slots(obj, out: list) -> list:
    if isinstance(obj, _Slot):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _slots(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _slots(v, out)
    return out


def broadcast_message(message, device: torch.device, src: int = 0):
    """Rank ``src`` passes ``message``; every process returns it (tensors on ``device``)."""
    rank = dist.get_rank()
    if rank == src:
        tensors: list[torch.Tensor] = []
        box = [_strip(message, tensors)]
    else:
        tensors, box = [], [None]
    dist.broadcast_object_list(box, src=src)
    skeleton = box[0]
    slots = sorted(_slots(skeleton, []), key=lambda s: s.index)
    out = []
    for slot in slots:
        if rank == src:
            t = tensors[slot.index].to(device).contiguous()
        else:
            t = torch.empty(slot.shape, dtype=slot.dtype, device=device)
        dist.broadcast(t, src=src)
        out.append(t)
    return _fill(skeleton, out)


def send_tensor(tensor: torch.Tensor, dst: int) -> None:
    dist.send(tensor.contiguous(), dst=dst)


def recv_tensor(like: torch.Tensor, src: int) -> torch.Tensor:
    out = torch.empty_like(like)
    dist.recv(out, src=src)
    return out


__all__ = ["broadcast_message", "recv_tensor", "send_tensor"]
