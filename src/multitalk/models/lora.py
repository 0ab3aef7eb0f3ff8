"""LoRA files for the MultiTalk DiT: the released formats read into one form, checked against the
model, and merged into its weights once, at load.

Formats (told apart by their keys; every key of a file must fit one of them):

* **official / ComfyUI**: ``diffusion_model.<official name>.lora_down.weight`` and ``.lora_up.weight``
  (``.lora_A`` / ``.lora_B`` are read as down / up; optional ``.alpha``), plus full-size differences:
  ``.diff`` of a weight or parameter (norm scales, ``modulation``) and ``.diff_b`` of a bias. Keys
  without the ``diffusion_model.`` prefix are read the same way (the official wrapper accepts both).
* **kohya**: ``lora_unet_<official name with "." written "_">.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (and ``.diff`` / ``.diff_b``). The underscored names are resolved against the model's
  real module names: official names first, then diffusers names; a name two modules share is refused.
* **diffusers / PEFT**: ``transformer.<diffusers name>.lora_A.weight`` / ``.lora_B.weight``, optional
  ``.lora_B.bias`` (a bias difference, scaled like the pair) and ``.alpha``; without per-module alphas
  the alpha comes from diffusers' ``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``) as PEFT reads it. ``base_model.model.`` (a raw PEFT save) is read the same way.

The audio layers (``audio_cross_attn``, ``norm_x``, ``audio_proj``) are ordinary modules here: their
official and diffusers names are the same, and both go through :func:`convert_dit_key`.

**Scaling** follows diffusers, PEFT and ComfyUI: a pair changes ``W`` by
``scale * alpha/rank * (up @ down)`` (``alpha/sqrt(rank)`` with rsLoRA; ``alpha = rank`` when the file
has none), a difference by ``scale * diff``. The official ``WanLoraWrapper`` ignores the file's alpha
(``W += scale * up @ down``); the two agree whenever ``alpha == rank`` (README, deviations).

**Merging** (:func:`apply_loras`): every file is read and every key and shape checked against the
model before the first weight changes, so a bad file leaves the model as it was. Then each touched
tensor is computed once in float32 (``W + sum of the files' deltas`` in file order, each delta
``up @ down`` in float32) and written back in its own dtype: one rounding per tensor, however many
LoRAs stack. This runs before fp8 quantisation, ``torch.compile`` and offload, so a LoRA costs
nothing per step.

Why not diffusers' converters or PEFT's merge (checked in ``tests/test_lora.py``): diffusers 0.42.1's
``_convert_non_diffusers_wan_lora_to_diffusers`` drops ``.diff`` entries of norms (2 % of the golden
LoRA's effect), raises on keys of the audio layers and on an ``.alpha`` outside the blocks (the golden
kohya file has them on ``head``, ``text_embedding``, ``time_projection``), and fails on a file without
block keys; ``_convert_musubi_wan_lora_to_diffusers`` requires every attention and FFN module in every
block (LoRA B of the golden set has only q, v and o). The names therefore go through the project's
own official -> diffusers converter (:func:`convert_dit_key`, the one the weights load through).
PEFT's ``merge_and_unload`` would need an adapter injected into every targeted linear first, computes
the delta in the weight's dtype on the GPU (bf16), and leaves a model half-merged when a later module
fails; the merge here is a few lines of float32 arithmetic after a complete check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from multitalk.errors import CheckpointError, UserInputError
from multitalk.models.checkpoint import read_safetensors
from multitalk.models.official_files import read_safetensors_header
from multitalk.models.transformer import convert_dit_key, official_dit_key

log = logging.getLogger(__name__)

_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_MERGEABLE = (torch.float32, torch.bfloat16, torch.float16)
# (key suffix, role); the longest match wins, ".diff_b" before ".diff"
_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
)
_UNSUPPORTED = (  # key fragment -> what the file is
    ("dora_scale", "a DoRA"), ("hada_", "a LoHa"), ("lokr_", "a LoKr"), ("lora_mid", "a LoCon with a mid tensor"),
    ("lora_te", "a text-encoder LoRA"),
)


class LoraError(UserInputError):
    """A LoRA file or scale that cannot be applied: names the file, the key and both shapes.

    ``field`` is the option it came from (``lora_dir`` / ``lora_scale`` in the CLI; callers re-label
    it with :meth:`for_field`, e.g. ``params.loras.0.uri`` in the service); ``index`` is the
    position of the file in the list given.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 expected: tuple | None = None, got: tuple | None = None, fix: str | None = None,
                 field: str = "lora_dir", index: int | None = None):
        self.file, self.key, self.index = file, key, index
        self.expected = None if expected is None else tuple(expected)
        self.got = None if got is None else tuple(got)
        self._message = message
        text = f"{file}: {message}" if file else message
        if key:
            text += f"; key {key}"
        if expected is not None:
            text += f"; model shape {self.expected}"
        if got is not None:
            text += f"; LoRA shape {self.got}"
        super().__init__(field, text, fix)

    def for_field(self, field: str, index: int | None = None) -> "LoraError":
        """The same error, reported under another option name."""
        return LoraError(self._message, file=self.file, key=self.key, expected=self.expected, got=self.got,
                         fix=self.fix, field=field, index=self.index if index is None else index)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and its strength; ``sha256`` when the caller already knows the content hash."""

    path: Path
    scale: float = 1.0
    sha256: str | None = None

    @classmethod
    def of(cls, item: "LoraSpec | str | os.PathLike | tuple") -> "LoraSpec":
        if isinstance(item, LoraSpec):
            return item
        if isinstance(item, tuple):
            return cls(Path(item[0]), float(item[1]))
        return cls(Path(item))


# ----------------------------------------------------------------------------------------------
# Files


def resolve_lora_path(path: str | os.PathLike, index: int | None = None) -> Path:
    """The ``.safetensors`` file to read: ``path`` itself, or the only one in the folder ``path``."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if len(found) == 1:
            return found[0]
        listing = ", ".join(p.name for p in found) or "none"
        raise LoraError(f"folder {path} holds {len(found)} .safetensors files ({listing})",
                        fix="give the LoRA file itself", index=index)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}", fix="check the path", index=index)
    return path


_HASHES: dict[tuple, str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content (remembered per path, size and modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    ident = (str(path), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        if ident in _HASHES:
            return _HASHES[ident]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    value = digest.hexdigest()
    with _HASH_LOCK:
        _HASHES[ident] = value
    return value


def _header(path: Path, index: int | None) -> tuple[dict[str, tuple], dict[str, str], dict[str, str]]:
    """``(shape per key, dtype per key, metadata)`` from the safetensors header (no tensor data read)."""
    try:
        header = read_safetensors_header(path)
    except CheckpointError as exc:  # not safetensors, truncated, corrupt header
        raise LoraError(f"not a readable safetensors file ({str(exc)[:200]})", file=path.name, index=index,
                        fix="LoRAs are read from .safetensors files only (a .pt/.ckpt file must be converted)") from None
    shapes = {k: tuple(e["shape"]) for k, e in header.entries.items()}
    return shapes, {k: e["dtype"] for k, e in header.entries.items()}, header.metadata


# ----------------------------------------------------------------------------------------------
# The model's names


class LoraTargets:
    """The model tensors a LoRA may change, under the names each format uses.

    Built from ``model.named_parameters()`` (works on a model on ``meta``: only names and shapes
    are needed to check a file).
    """

    def __init__(self, model: nn.Module):
        self.shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        # kohya: underscored module name -> (naming, dotted module name); None where two modules share it
        self._underscored: dict[str, tuple[str, str] | None] = {}
        for naming, rename in (("official", official_dit_key), ("diffusers", lambda n: n)):
            seen: dict[str, str | None] = {}
            for name in self.shapes:
                full = rename(name)
                head, _, leaf = full.rpartition(".")
                module = head if leaf in ("weight", "bias") else full  # a bare parameter: modulation
                under = module.replace(".", "_")
                seen[under] = module if seen.get(under, module) == module else None
            for under, module in seen.items():
                if under not in self._underscored:  # official names first
                    self._underscored[under] = None if module is None else (naming, module)

    def _ours(self, name: str, naming: str) -> str | None:
        ours = convert_dit_key(name, None)[0][0] if naming == "official" else name
        return ours if ours in self.shapes else None

    def weight(self, module: str, naming: str) -> str | None:
        return self._ours(f"{module}.weight", naming)

    def bias(self, module: str, naming: str) -> str | None:
        return self._ours(f"{module}.bias", naming)

    def parameter(self, name: str, naming: str) -> str | None:
        """A parameter addressed by its own name (``blocks.N.modulation``: a ``.diff`` of it)."""
        return self._ours(name, naming)

    def kohya(self, underscored: str) -> tuple[str, str] | None:
        """``(naming, dotted module)`` of an underscored kohya name; raises on a shared name."""
        if underscored not in self._underscored:
            return None
        found = self._underscored[underscored]
        if found is None:
            raise ValueError(f"{underscored!r} names more than one module")
        return found


# ----------------------------------------------------------------------------------------------
# One file: plan (names and shapes), then tensors


@dataclass
class LoraUpdate:
    """One change of one model tensor: a low-rank pair (``up @ down``) or a full-size difference."""

    target: str                      # model parameter name
    kind: str                        # "pair" | "diff"
    key: str                         # the file key (lora_up / diff) named in messages
    down_key: str | None = None
    alpha_key: str | None = None
    module: str = ""                 # the file's module name (alpha patterns, pair of a lora_B.bias)
    rank: int = 0
    factor_of: str | None = None     # a lora_B.bias is scaled like the pair of this module
    up: torch.Tensor | None = field(default=None, repr=False)
    down: torch.Tensor | None = field(default=None, repr=False)
    diff: torch.Tensor | None = field(default=None, repr=False)
    factor: float = 1.0              # alpha/rank of a pair (1 without alpha), 1 for a difference

    def delta(self, device: torch.device | str) -> torch.Tensor:
        """The unscaled float32 change (``factor`` and the file's scale are applied by the merge)."""
        if self.kind == "diff":
            return self.diff.to(device=device, dtype=torch.float32)
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return up @ down


@dataclass
class LoraFile:
    """A LoRA file read into the one internal form (see the module docstring)."""

    path: Path
    format: str
    updates: list[LoraUpdate]
    tensors: int                     # tensors in the file
    metadata: dict = field(default_factory=dict)
    sha256: str | None = None
    loaded: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def pairs(self) -> int:
        return sum(u.kind == "pair" for u in self.updates)

    @property
    def diffs(self) -> int:
        return sum(u.kind == "diff" for u in self.updates)


def _detect_format(keys: Sequence[str], file: str, index: int | None) -> tuple[str, str]:
    """``(format, prefix to strip)``."""
    for prefix, fmt in (("lora_unet_", "kohya"), ("diffusion_model.", "official"), ("transformer.", "diffusers"),
                        ("base_model.model.", "diffusers")):
        hits = [k for k in keys if k.startswith(prefix)]
        if hits and len(hits) == len(keys):
            return fmt, prefix
        if hits:
            other = next(k for k in keys if not k.startswith(prefix))
            raise LoraError(f"mixes {fmt}-format keys ({hits[0]}) with other keys", file=file, key=other, index=index,
                            fix="a file must hold one LoRA format for the DiT only")
    return "official", ""  # bare official names, as the official wrapper also accepts


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def _unsupported(key: str) -> str | None:
    for fragment, what in _UNSUPPORTED:
        if fragment in key:
            return what
    return None


_OTHER_MODEL = "does not fit this model (a LoRA for another model, e.g. Wan 1.3B or T2V?)"


def plan_lora(path: str | os.PathLike, targets: LoraTargets, index: int | None = None) -> LoraFile:
    """Read a file's header and check every key and shape against the model (no tensor data)."""
    path = resolve_lora_path(path, index)
    file = path.name
    shapes, dtypes, metadata = _header(path, index)
    if not shapes:
        raise LoraError("holds no tensors", file=file, index=index)
    fmt, prefix = _detect_format(list(shapes), file, index)

    def fail(message, key, expected=None, got=None, fix=None):
        raise LoraError(message, file=file, key=key, expected=expected, got=got, fix=fix, index=index)

    groups: dict[str, dict[str, str]] = {}
    for key in shapes:
        rest = key[len(prefix):]
        if fmt == "kohya":
            rest = rest.lstrip("_")
        parsed = _split(rest)
        if parsed is None or (fmt == "kohya" and "." in parsed[0]):
            what = _unsupported(key)
            fail(f"{what} file is not supported (only LoRA pairs, alpha, diff and diff_b)" if what
                 else "is not a LoRA entry (expected .lora_down/.lora_up/.lora_A/.lora_B.weight, .alpha, .diff, .diff_b)",
                 key)
        if dtypes[key] not in _FLOAT_DTYPES:
            fail(f"holds {dtypes[key]} numbers; a LoRA holds floating-point tensors", key)
        module, role = parsed
        roles = groups.setdefault(module, {})
        if role in roles:
            fail(f"duplicates {roles[role]}", key)
        roles[role] = key

    updates: list[LoraUpdate] = []
    for module, roles in groups.items():
        naming, name = fmt, module
        if fmt == "kohya":
            try:
                found = targets.kohya(module)
            except ValueError:
                fail("names more than one module of this model", next(iter(roles.values())))
            if found is None:
                fail(f"names no module of this model; {_OTHER_MODEL}", next(iter(roles.values())))
            naming, name = found
        if "down" in roles or "up" in roles:
            if "down" not in roles or "up" not in roles:
                have, miss = ("down", "up") if "down" in roles else ("up", "down")
                fail(f"has lora_{have} without its lora_{miss}", roles[have])
            target = targets.weight(name, naming)
            if target is None:
                fail(f"names no linear layer of this model; {_OTHER_MODEL}", roles["up"])
            up, down, want = shapes[roles["up"]], shapes[roles["down"]], targets.shapes[target]
            if len(up) < 2 or len(down) < 2 or up[1] != down[0] or math.prod(up[2:]) != 1:
                fail(f"lora_up {up} and lora_down {down} do not make a rank-r product", roles["up"])
            product = (up[0], *down[1:])
            if up[0] != want[0] or math.prod(product) != math.prod(want):
                fail(_OTHER_MODEL, roles["up"], want, product)
            alpha = roles.get("alpha")
            if alpha is not None and math.prod(shapes[alpha]) != 1:
                fail("alpha must be one number", alpha, got=shapes[alpha])
            updates.append(LoraUpdate(target, "pair", roles["up"], down_key=roles["down"], alpha_key=alpha,
                                      module=name, rank=down[0]))
            if "up_bias" in roles:
                bias = targets.bias(name, naming)
                if bias is None or targets.shapes[bias] != shapes[roles["up_bias"]]:
                    fail(f"lora_B.bias {_OTHER_MODEL}", roles["up_bias"],
                         None if bias is None else targets.shapes[bias], shapes[roles["up_bias"]])
                updates.append(LoraUpdate(bias, "diff", roles["up_bias"], module=name, factor_of=name))
        else:
            for orphan in ("alpha", "up_bias"):
                if orphan in roles:
                    fail(f"{orphan.replace('up_bias', 'lora_B.bias')} without a lora_down/lora_up pair", roles[orphan])
        if "diff" in roles:
            target = targets.weight(name, naming) or targets.parameter(name, naming)
            if target is None:
                fail(f"names no tensor of this model; {_OTHER_MODEL}", roles["diff"])
            if shapes[roles["diff"]] != targets.shapes[target]:
                fail(_OTHER_MODEL, roles["diff"], targets.shapes[target], shapes[roles["diff"]])
            updates.append(LoraUpdate(target, "diff", roles["diff"], module=name))
        if "diff_b" in roles:
            target = targets.bias(name, naming)
            if target is None:
                fail(f"names no bias of this model; {_OTHER_MODEL}", roles["diff_b"])
            if shapes[roles["diff_b"]] != targets.shapes[target]:
                fail(_OTHER_MODEL, roles["diff_b"], targets.shapes[target], shapes[roles["diff_b"]])
            updates.append(LoraUpdate(target, "diff", roles["diff_b"], module=name))
    seen: dict[str, str] = {}
    for u in updates:  # e.g. kohya "a_b.c" and official "a.b_c" landing on one tensor
        if u.target in seen:
            fail(f"changes {u.target} twice (also through {seen[u.target]})", u.key)
        seen[u.target] = u.key
    return LoraFile(path, fmt, updates, len(shapes), metadata)


def _peft_alpha(metadata: dict, module: str) -> tuple[float | None, bool]:
    """``(alpha, rslora)`` for ``module`` from diffusers' ``lora_adapter_metadata`` (PEFT's rules)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, False
    try:
        config = json.loads(raw)
    except ValueError:
        return None, False
    if any(k.startswith("transformer.") for k in config):
        config = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            alpha = value
            break
    return (None if alpha is None else float(alpha)), bool(config.get("use_rslora"))


def read_lora(path_or_plan: str | os.PathLike | LoraFile, targets: LoraTargets, index: int | None = None) -> LoraFile:
    """:func:`plan_lora`, then the tensors: every one finite, alphas read, factors set."""
    plan = path_or_plan if isinstance(path_or_plan, LoraFile) else plan_lora(path_or_plan, targets, index)
    needed = [k for u in plan.updates for k in (u.key, u.down_key, u.alpha_key) if k is not None]
    tensors: dict[str, torch.Tensor] = {}
    for key, t, _ in read_safetensors(plan.path, needed):
        if not torch.isfinite(t).all():
            raise LoraError("holds NaN or infinite values", file=plan.name, key=key, index=index,
                            fix="the file is damaged; download it again")
        tensors[key] = t
    factors: dict[str, float] = {}
    for u in plan.updates:
        if u.kind == "diff":
            u.diff = tensors[u.key]
            continue
        u.up, u.down = tensors[u.key], tensors[u.down_key]
        alpha, rslora = (float(tensors[u.alpha_key].float().reshape(-1)[0]), False) if u.alpha_key else (None, False)
        if alpha is None and plan.format == "diffusers":
            alpha, rslora = _peft_alpha(plan.metadata, u.module)
        if alpha is not None:
            u.factor = alpha / (math.sqrt(u.rank) if rslora else u.rank)
        factors[u.module] = u.factor
    for u in plan.updates:
        if u.factor_of is not None:
            u.factor = factors[u.factor_of]
    plan.loaded = True
    return plan


# ----------------------------------------------------------------------------------------------
# Several files: check, then merge


@dataclass
class LoraReport:
    """What :func:`apply_loras` did: per file its format, scale, hash and counts; times."""

    files: list[dict] = field(default_factory=list)
    tensors_changed: int = 0
    read_s: float = 0.0
    merge_s: float = 0.0

    @property
    def signature(self) -> tuple:
        """``((sha256, scale), ...)`` in merge order: equal signatures give equal weights."""
        return tuple((f["sha256"], f["scale"]) for f in self.files)

    def lines(self) -> list[str]:
        out = [f"LoRA {f['file']} ({f['format']}, scale {f['scale']:g}): {f['pairs']} low-rank pairs, "
               f"{f['diffs']} full-size differences from {f['tensors']} tensors" for f in self.files]
        if self.files:
            out.append(f"LoRA: {self.tensors_changed} model tensors changed (read {self.read_s:.1f}s, "
                       f"merged {self.merge_s:.1f}s)")
        return out


def lora_signature(loras: Iterable[LoraSpec | str | os.PathLike | tuple]) -> tuple:
    """The :attr:`LoraReport.signature` the given files would produce (hashes the files)."""
    specs = [LoraSpec.of(x) for x in loras]
    return tuple((s.sha256 or file_sha256(resolve_lora_path(s.path, i)), float(s.scale)) for i, s in enumerate(specs))


def check_scale(scale: float, index: int | None = None) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise LoraError(f"scale {scale!r} is not a number", field="lora_scale", index=index) from None
    if not math.isfinite(value):
        raise LoraError(f"scale {scale!r} is not finite", field="lora_scale", index=index, fix="e.g. 1.0")
    return value


def check_loras(model: nn.Module, loras: Sequence[LoraSpec | str | os.PathLike | tuple]) -> list[LoraFile]:
    """Check scales, files, keys and shapes against ``model`` (may be on ``meta``) without reading tensor data."""
    targets = LoraTargets(model)
    plans = []
    for i, spec in enumerate(LoraSpec.of(x) for x in loras):
        check_scale(spec.scale, i)
        plans.append(plan_lora(spec.path, targets, i))
    return plans


def read_loras(model: nn.Module, loras: Sequence[LoraSpec | str | os.PathLike | tuple]) -> list[tuple[LoraFile, float]]:
    """Read and check every file (scales, keys, shapes, finite values); ``[(file, scale)]``.

    Raises :class:`LoraError` (with ``index``) before anything is merged.
    """
    targets = LoraTargets(model)
    out = []
    for i, spec in enumerate(LoraSpec.of(x) for x in loras):
        scale = check_scale(spec.scale, i)
        lora = read_lora(spec.path, targets, i)
        lora.sha256 = spec.sha256 or file_sha256(lora.path)
        out.append((lora, scale))
    return out


@torch.no_grad()
def merge_loras(model: nn.Module, loaded: Sequence[tuple[LoraFile, float]],
                compute_device: torch.device | str | None = None) -> int:
    """Merge read files into ``model`` in place (float32 maths, one rounding per tensor).

    ``compute_device``: where the float32 sums are formed (default: each tensor's own device; an
    offloaded model on the CPU merges faster with the GPU here). Returns the number of tensors changed.
    """
    params = dict(model.named_parameters())
    per_target: dict[str, list[tuple[LoraUpdate, float]]] = {}
    for lora, scale in loaded:
        if not lora.loaded:
            raise ValueError(f"{lora.name}: read_lora() it first")
        for u in lora.updates:
            per_target.setdefault(u.target, []).append((u, scale))
    for name in per_target:  # every target mergeable before the first write
        p = params.get(name)
        if p is None or p.dtype not in _MERGEABLE or p.device.type == "meta":
            what = "missing" if p is None else f"{p.dtype} on {p.device}"
            raise RuntimeError(f"cannot merge a LoRA into {name} ({what}): merge before quantising or offloading")
    for name, items in per_target.items():
        p = params[name]
        device = torch.device(compute_device) if compute_device is not None else p.device
        acc = p.detach().to(device=device, dtype=torch.float32, copy=True)
        for u, scale in items:
            acc.add_(u.delta(device).reshape(acc.shape), alpha=scale * u.factor)
        p.copy_(acc)
    return len(per_target)


def apply_loras(model: nn.Module, loras: Sequence[LoraSpec | str | os.PathLike | tuple], *,
                compute_device: torch.device | str | None = None) -> LoraReport:
    """Read, check and merge LoRA files into ``model`` (in the given order); log and return what was done.

    Call it right after loading, before fp8 quantisation, ``torch.compile`` or offload. Nothing is
    changed when any file, key, shape, value or scale is bad (:class:`LoraError`).
    """
    report = LoraReport()
    if not loras:
        return report
    t0 = time.perf_counter()
    loaded = read_loras(model, loras)
    t1 = time.perf_counter()
    report.tensors_changed = merge_loras(model, loaded, compute_device)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    report.read_s, report.merge_s = t1 - t0, time.perf_counter() - t1
    report.files = [{"file": lora.name, "format": lora.format, "scale": scale, "sha256": lora.sha256,
                     "pairs": lora.pairs, "diffs": lora.diffs, "tensors": lora.tensors} for lora, scale in loaded]
    for line in report.lines():
        log.info(line)
    return report


# ----------------------------------------------------------------------------------------------
# Synthetic files (tests, benchmarks)


def random_official_lora(dit, rank: int = 32, seed: int = 0, *, diffs: bool = True, audio: bool = False,
                         dtype: torch.dtype = torch.bfloat16, strength: float = 0.1) -> dict[str, torch.Tensor]:
    """A random LoRA in the official layout for the DiT config ``dit``, shaped like the released ones.

    Pairs on every linear of every block (self/cross attention q, k, v, o, k_img, v_img, ffn.0,
    ffn.2; with ``audio`` also the audio attention's), and with ``diffs`` a ``.diff_b`` of each of
    their biases and a ``.diff`` of the q/k norms and ``norm3``. ``up @ down`` is about ``strength``
    times the size of a weight ~ N(0, 1/fan_in).
    """
    from multitalk.models.key_schema import dit_key_shapes

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    modules = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")
    if audio:
        modules += ("audio_cross_attn.q_linear", "audio_cross_attn.kv_linear", "audio_cross_attn.proj")
    norms = ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k", "norm3")
    shapes = dit_key_shapes(dit)
    for key, shape in shapes.items():
        if not key.startswith("blocks."):
            continue
        module, _, leaf = key.rpartition(".")
        local = module.split(".", 2)[-1]  # blocks.N.<local>
        name = f"diffusion_model.{module}"
        if local in modules and leaf == "weight":
            out_f, in_f = shape
            out[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)).to(dtype)
            out[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, generator=gen)
                                             * (strength / math.sqrt(rank))).to(dtype)
        elif diffs and local in modules and leaf == "bias":
            out[f"{name}.diff_b"] = (torch.randn(shape, generator=gen) * 0.01).to(dtype)
        elif diffs and local in norms and leaf == "weight":
            out[f"{name}.diff"] = (torch.randn(shape, generator=gen) * 0.01).to(dtype)
    return out


__all__ = [
    "LoraError", "LoraFile", "LoraReport", "LoraSpec", "LoraTargets", "LoraUpdate", "apply_loras",
    "check_loras", "check_scale", "file_sha256", "lora_signature", "merge_loras", "plan_lora", "random_official_lora",
    "read_lora", "read_loras", "resolve_lora_path",
]
