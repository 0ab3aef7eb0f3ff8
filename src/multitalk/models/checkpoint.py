"""Streaming checkpoint loading shared by every component.

The official folders hold ``.safetensors`` shards and ``torch.save`` ``.pth`` files whose keys use
the official module names. Each component module provides a *converter*: a function
``convert(key, tensor) -> list[(new_key, tensor)]`` that maps one official tensor to zero or more
tensors of the library model (diffusers / transformers). :func:`load_converted` then

* builds nothing itself: the caller passes a model constructed on the ``meta`` device;
* reads the source files one tensor at a time (safetensors lazily, ``.pth`` via ``mmap``),
* converts, checks the shape against the model, casts *that tensor* to the target dtype (or keeps
  float32 for the parameters the model keeps in float32), and assigns it,

so peak host memory stays near the size of the model in its target dtype, never the size of an
fp32 copy of the whole file. Every problem is a :class:`~multitalk.errors.CheckpointError` naming
the file, the key and the expected shape.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from multitalk.errors import CheckpointError

Converter = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]
# A source item: (official key, tensor, file it came from)
SourceItem = tuple[str, torch.Tensor, str]


def iter_safetensors(path: str | os.PathLike, keys: Iterable[str] | None = None) -> Iterator[SourceItem]:
    """Yield ``(key, tensor, file)`` from a safetensors file, one tensor at a time."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("weight file not found", file=str(path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            wanted = list(f.keys()) if keys is None else list(keys)
            for key in wanted:
                yield key, f.get_tensor(key), path.name
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt header, truncated file
        raise CheckpointError(f"cannot read safetensors file ({exc})", file=str(path)) from exc


def iter_torch_file(path: str | os.PathLike, prefix: str | None = None) -> Iterator[SourceItem]:
    """Yield ``(key, tensor, file)`` from a ``torch.save`` state dict, memory-mapped.

    ``prefix`` keeps only keys starting with it (e.g. ``"visual."`` for the CLIP file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("weight file not found", file=str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        try:  # legacy (non-zip) serialisation cannot be memory-mapped
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read torch checkpoint ({exc})", file=str(path)) from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError("torch checkpoint does not hold a state dict", file=str(path))
    for key in list(sd.keys()):
        if prefix is not None and not key.startswith(prefix):
            continue
        tensor = sd.pop(key)
        if isinstance(tensor, torch.Tensor):
            yield key, tensor, path.name
    del sd


def meta_items(shapes: dict[str, list[int]], file: str = "<manifest>") -> Iterator[SourceItem]:
    """Source items of meta tensors with the given shapes (checks full-size layouts without data)."""
    for key, shape in shapes.items():
        yield key, torch.empty(tuple(shape), device="meta"), file


@dataclass
class LoadReport:
    """What a load (or a dry-run check) found, per component."""

    component: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # (official key) -> no target
    mismatched: list[tuple[str, tuple, tuple, str]] = field(default_factory=list)  # key, expected, got, file
    missing_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.missing_files)

    def summary(self) -> str:
        return (f"{self.component}: {len(self.loaded)} found, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
                + (f", {len(self.missing_files)} missing files" if self.missing_files else ""))


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:  # pragma: no cover - guarded by the expected-key check
        raise KeyError(name)


def load_converted(
    model: torch.nn.Module,
    items: Iterable[SourceItem],
    convert: Converter,
    *,
    component: str,
    dtype: torch.dtype = torch.float32,
    keep_fp32: Callable[[str], bool] = lambda name: False,
    device: str | torch.device | Callable[[str], str | torch.device] = "cpu",
    ignore_target: Callable[[str], bool] = lambda name: False,
    strict: bool = True,
    dry_run: bool = False,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> LoadReport:
    """Stream converted tensors into ``model`` (built on ``meta``); return a :class:`LoadReport`.

    ``ignore_target(name)`` marks model tensors that the checkpoint need not provide (buffers the
    model computes itself). With ``strict`` any missing/unexpected/mismatched key raises a
    :class:`CheckpointError`; with ``dry_run`` nothing is assigned (used by ``weights check`` and the
    full-size meta tests). ``device`` may be a function of the model key (a memory plan loads the
    blocks it streams into host memory and the rest onto the GPU); ``transform(key, tensor)``, when
    given, replaces each tensor after its cast, before it is assigned (fp8 weight storage quantises
    there, so no copy of the whole model in the compute dtype ever exists).
    """
    device_of = device if callable(device) else (lambda name: device)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    report = LoadReport(component)
    seen: set[str] = set()
    for key, tensor, file in items:
        converted = convert(key, tensor)
        if not converted:
            continue
        for new_key, value in converted:
            if new_key not in expected:
                report.unexpected.append(f"{key} -> {new_key}")
                if strict and not dry_run:
                    raise CheckpointError(f"{component}: checkpoint key has no place in the model",
                                          file=file, key=key)
                continue
            if tuple(value.shape) != expected[new_key]:
                report.mismatched.append((new_key, expected[new_key], tuple(value.shape), file))
                if strict and not dry_run:
                    raise CheckpointError(f"{component}: shape mismatch", file=file, key=key,
                                          expected=expected[new_key], got=tuple(value.shape))
                continue
            seen.add(new_key)
            report.loaded.append(new_key)
            if dry_run:
                continue
            target_dtype = torch.float32 if keep_fp32(new_key) else dtype
            target = device_of(new_key)
            if value.is_floating_point():
                value = value.to(device=target, dtype=target_dtype, copy=False)
            else:
                value = value.to(device=target)
            if transform is not None:
                value = transform(new_key, value)
            _set_tensor(model, new_key, value.contiguous())
    report.missing = sorted(k for k in expected if k not in seen and not ignore_target(k))
    if strict and not dry_run and report.missing:
        raise CheckpointError(
            f"{component}: {len(report.missing)} tensors missing from the checkpoint "
            f"(first: {report.missing[0]}, expected shape {expected[report.missing[0]]})",
            key=report.missing[0], expected=expected[report.missing[0]])
    return report


def materialize_remaining(model: torch.nn.Module, device: str | torch.device = "cpu") -> None:
    """Allocate any parameters/buffers still on ``meta`` (computed buffers are filled by the caller)."""
    for name, t in list(model.state_dict(keep_vars=True).items()):
        if t.device.type == "meta":
            _set_tensor(model, name, torch.zeros(t.shape, dtype=t.dtype, device=device))


def build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct a model without allocating its weights."""
    with torch.device("meta"):
        return factory()
