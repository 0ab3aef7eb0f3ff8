"""Device placement: keep every model on the accelerator, or onload each one only while it runs.

``Placement(device, offload=False)`` is what the pipeline asks for a model before using it::

    with placement.use(engine.vae):
        latent = engine.vae.encode(video)

With ``offload=False`` models stay on ``device`` (moved there once). With ``offload=True`` a model
is moved to ``device`` on entry and back to the CPU on exit, so only one large model occupies
accelerator memory at a time (the official ``--offload_model``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from multitalk.errors import UserInputError


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


class Placement:
    def __init__(self, device: torch.device, offload: bool = False):
        self.device = device
        self.offload = offload and device.type != "cpu"

    @contextlib.contextmanager
    def use(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        module.to(self.device)
        try:
            yield module
        finally:
            if self.offload:
                module.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
