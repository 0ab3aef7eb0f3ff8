"""Device placement: which model lives where, and what happens around each use of a model.

``Placement`` is what the pipeline asks for a model before using it::

    with placement.use(engine.vae):
        latent = engine.vae.encode(video)

Each model has a policy, set from the memory plan (``runtime.memory_plan``) by :meth:`Placement.apply`:

* ``"gpu"``: resident on the device (nothing happens around a use);
* ``"per_use"``: kept in pinned host memory and copied to the device for each use, dropped after
  (``runtime.host_memory.PerUseWeights``);
* ``"streamed"``: a model with repeated blocks (the DiT, the umT5 encoder): its other tensors resident
  (the DiT) or per use (umT5), its streamed blocks copied in one at a time around each block call
  (``runtime.block_streaming.BlockStreamer``), the rest of its blocks resident;
* ``"cpu"``: the model stays on the CPU and runs there.

A model without a policy keeps the old behaviour: moved to the device on entry and, with
``offload=True`` (no plan), back to the CPU on exit (the official ``--offload_model``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from multitalk.errors import UserInputError
from multitalk.runtime.block_streaming import BlockStreamer
from multitalk.runtime.host_memory import PerUseWeights, unique_tensors


def resolve_device(name: str | None) -> torch.device:
    """``auto`` / ``None`` -> cuda if available, else cpu; anything else as given (validated)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserInputError("device", f"unknown device {name!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("device", f"{name!r} requested but this machine has no CUDA GPU",
                             "use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserInputError("device", f"{name!r} requested but this machine has {torch.cuda.device_count()} "
                             "CUDA GPU(s)", "use cuda:0 .. cuda:N-1")
    if dev.type not in ("cpu", "cuda"):
        raise UserInputError("device", f"{name!r} is not supported", "use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(name: str | torch.dtype | None, device: torch.device, field: str = "dtype") -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UserInputError(field, f"unknown dtype {name!r}", "use auto, float32 or bfloat16")
    return table[name]


def configure_backends(device: torch.device, float32: bool = False) -> None:
    """Process-wide CUDA settings: cuDNN autotuning of the VAE's fixed-shape 3-D convolutions, and
    TF32. ``float32``: a model runs in float32 on purpose (``--dtype float32``, ``--vae-dtype
    float32``), so float32 matmuls and convolutions stay IEEE float32 (cuDNN's TF32 convolutions,
    on by default in PyTorch, moved a float32 video by 3.4e-3 on the H200). Otherwise PyTorch's
    defaults: TF32 convolutions (only float32 ones, which the bf16 path does not run), no TF32
    matmuls. The legacy flags, because inductor reads them."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = not float32


# --- policies ------------------------------------------------------------------------------------

class _Resident:
    kind = "gpu"

    def __init__(self, module: nn.Module, device: torch.device):
        self.module = module.to(device)

    def enter(self) -> None:
        pass

    def exit(self) -> None:
        pass

    def release(self) -> None:
        pass

    def discard(self) -> None:
        pass

    host_bytes = 0


class _OnCpu(_Resident):
    kind = "cpu"

    def __init__(self, module: nn.Module, device: torch.device):
        self.module = module.to("cpu")

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.module.parameters(), *self.module.buffers()])


class _PerUse:
    kind = "per_use"

    def __init__(self, module: nn.Module, device: torch.device):
        self.module = module
        self.weights = PerUseWeights(module, device)

    def enter(self) -> None:
        self.weights.onload()

    def exit(self) -> None:
        self.weights.offload()

    def release(self) -> None:
        self.weights.release()

    def discard(self) -> None:
        self.weights.discard()

    @property
    def host_bytes(self) -> int:
        return self.weights.nbytes


class _Streamed:
    """Blocks streamed by a :class:`BlockStreamer`; the model's other tensors resident
    (``other="gpu"``) or copied in for each use (``other="per_use"``)."""

    kind = "streamed"

    def __init__(self, module: nn.Module, blocks: nn.ModuleList, prefix: str, streamed: Sequence[int],
                 device: torch.device, prefetch: int, other: str, hooks: bool):
        self.module, self.hooks = module, hooks
        # blocks first: each streamed block is packed from wherever it is, freeing device memory
        self.streamer = BlockStreamer(blocks, streamed, device, prefetch=prefetch)
        for i, block in enumerate(blocks):
            if i not in self.streamer.host:
                block.to(device)
        skip = lambda name: name.startswith(prefix)  # noqa: E731
        self.other = None
        if other == "per_use":
            self.other = PerUseWeights(module, device, skip=skip)
        else:
            _move_except(module, device, skip)
        if hooks:
            self.streamer.attach_hooks()
        else:
            module.block_streamer = self.streamer

    def enter(self) -> None:
        if self.other is not None:
            self.other.onload()
        self.streamer.begin()

    def exit(self) -> None:
        self.streamer.end()
        if self.other is not None:
            self.other.offload()

    def restream(self, streamed: Sequence[int], prefetch: int) -> None:
        self.streamer.restream(streamed)
        self.streamer.prefetch = max(1, int(prefetch))

    def release(self) -> None:
        self.streamer.detach()
        if not self.hooks:
            self.module.block_streamer = None
        if self.other is not None:
            self.other.release()

    def discard(self) -> None:
        self.streamer.discard()
        if not self.hooks:
            self.module.block_streamer = None
        if self.other is not None:
            self.other.discard()

    @property
    def host_bytes(self) -> int:
        return self.streamer.host_bytes + (self.other.nbytes if self.other is not None else 0)


def _move_except(module: nn.Module, device: torch.device, skip: Callable[[str], bool]) -> None:
    """Move every tensor of ``module`` whose name ``skip`` does not select to ``device``."""
    for _, t in list(unique_tensors(module, skip)):
        if t.device != device:
            t.data = t.data.to(device)


# --- placement -------------------------------------------------------------------------------------

class Placement:
    def __init__(self, device: torch.device, offload: bool = False):
        self.device = device
        self.offload = offload and device.type != "cpu"
        self._policies: dict[int, object] = {}

    # -- policies ----------------------------------------------------------------------------------

    def policy(self, module: nn.Module):
        return self._policies.get(id(module))

    def kind(self, module: nn.Module) -> str | None:
        p = self.policy(module)
        return None if p is None else p.kind

    def forget(self, module: nn.Module) -> None:
        """Drop ``module``'s policy and what it holds (pinned host copies, device slots) without moving
        anything back: the module is being thrown away."""
        policy = self._policies.pop(id(module), None)
        if policy is not None:
            policy.discard()

    def set_policy(self, module: nn.Module, kind: str, *, blocks: nn.ModuleList | None = None,
                   prefix: str = "blocks.", streamed: Sequence[int] = (), prefetch: int = 1,
                   other: str = "gpu", hooks: bool = False) -> None:
        """Give ``module`` a policy (see the module docstring), releasing its old one first."""
        old = self.policy(module)
        if old is not None and old.kind == kind == "streamed":
            old.restream(streamed, prefetch)
            return
        if old is not None and old.kind == kind:
            return
        if old is not None:
            old.release()
        if kind == "gpu":
            new = _Resident(module, self.device)
        elif kind == "cpu":
            new = _OnCpu(module, self.device)
        elif kind == "per_use":
            new = _PerUse(module, self.device)
        elif kind == "streamed":
            if blocks is None:
                raise ValueError("a streamed policy needs the model's blocks")
            new = _Streamed(module, blocks, prefix, streamed, self.device, prefetch, other, hooks)
        else:
            raise ValueError(f"unknown placement {kind!r}")
        self._policies[id(module)] = new

    def apply(self, plan, *, dit: nn.Module, text_encoder: nn.Module, image_encoder: nn.Module, vae: nn.Module,
              audio_encoder: nn.Module, text_blocks: tuple[nn.ModuleList, str]) -> None:
        """Place every model as ``plan`` (a ``MemoryPlan``) says. Changes that free device memory go
        first (models leaving the device, more DiT blocks streamed), those that take it last."""
        models = {"text_encoder": text_encoder, "image_encoder": image_encoder, "vae": vae,
                  "audio_encoder": audio_encoder}
        wanted = dict(plan.placement)
        dit_kind = "streamed" if plan.streamed else "gpu"

        def place(name: str) -> None:
            if name == "dit":
                self.set_policy(dit, dit_kind, blocks=dit.blocks, prefix="blocks.", streamed=plan.streamed,
                                prefetch=plan.prefetch, other="gpu")
            elif wanted[name] == "streamed":
                blocks, prefix = text_blocks
                self.set_policy(models[name], "streamed", blocks=blocks, prefix=prefix,
                                streamed=range(len(blocks)), prefetch=1, other="per_use", hooks=True)
            else:
                self.set_policy(models[name], wanted[name])

        # models leaving the device first, then the DiT (whose restream packs before it unpacks),
        # then models coming onto the device
        order = [n for n, k in wanted.items() if k != "gpu"] + ["dit"] + [n for n, k in wanted.items() if k == "gpu"]
        for name in order:
            place(name)

    @property
    def host_bytes(self) -> int:
        """Weights the placement keeps in host memory (pinned copies and CPU-resident models)."""
        return sum(p.host_bytes for p in self._policies.values())

    def streamers(self) -> list[BlockStreamer]:
        return [p.streamer for p in self._policies.values() if isinstance(p, _Streamed)]

    # -- use -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, module: nn.Module) -> Iterator[nn.Module]:
        policy = self.policy(module)
        if policy is None:
            module.to(self.device)
            try:
                yield module
            finally:
                if self.offload:
                    module.to("cpu")
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
            return
        policy.enter()
        try:
            yield module
        finally:
            policy.exit()


__all__ = ["Placement", "configure_backends", "resolve_device", "resolve_dtype"]
