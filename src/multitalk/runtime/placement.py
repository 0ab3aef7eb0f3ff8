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


def resolve_device(name: str | None) -> torch.device:
    """``auto`` / ``None`` -> cuda if available, else cpu; anything else as given (validated)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def configure_backends(device: torch.device) -> None:
    """Process-wide CUDA settings that pay for MultiTalk's fixed shapes (cuDNN autotuning of the
    VAE's 3-D convolutions; TF32 only affects float32 matmuls, which the bf16 path does not run)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


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
