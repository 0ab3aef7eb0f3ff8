"""Where the weights are: the files of the official folders, in every supported layout.

The official README downloads two folders:

* ``Wan2.1-I2V-14B-480P/``: ``config.json``, the DiT base weights as 7 shards
  ``diffusion_pytorch_model-0000N-of-00007.safetensors`` + Wan's
  ``diffusion_pytorch_model.safetensors.index.json``, and the T5 / CLIP / VAE ``.pth`` files with
  the ``google/umt5-xxl`` tokenizer folder;
* ``MeiGen-MultiTalk/``: ``multitalk.safetensors`` (the audio weights: ``audio_proj``,
  ``blocks.N.audio_cross_attn``, ``blocks.N.norm_x``) and its own index json covering base + audio keys.

Supported: the two folders separately (``multitalk_dir``), or the README's setup step where
MeiGen's index and ``multitalk.safetensors`` were copied into the base folder (the tiny golden
folder). Nothing has to be edited by hand: a Wan-only index is fine when ``multitalk_dir`` is
given, an index that names missing files falls back to the shards present, and missing audio
weights are a :class:`~multitalk.errors.CheckpointError` that says which file to provide.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from multitalk.errors import CheckpointError
from multitalk.models.checkpoint import SourceItem

CONFIG_FILE = "config.json"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SHARD_GLOB = "diffusion_pytorch_model*.safetensors"
MULTITALK_FILE = "multitalk.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"
AUDIO_KEY_MARKERS = ("audio_proj.", "audio_cross_attn.", "norm_x.")


def is_audio_key(key: str) -> bool:
    """True for the MultiTalk audio weights (the content of ``multitalk.safetensors``)."""
    return any(m in key for m in AUDIO_KEY_MARKERS)


@dataclass(frozen=True)
class DiTFiles:
    """The DiT files to stream: base shards, then the audio weights (``multitalk_path``, None if in the shards)."""

    config_path: Path
    shard_paths: tuple[Path, ...]
    multitalk_path: Path | None


@dataclass(frozen=True)
class BaseFolderFiles:
    """The non-DiT files of ``Wan2.1-I2V-14B-480P/`` (paths; existence is checked by each loader)."""

    config_path: Path
    t5_path: Path
    clip_path: Path
    vae_path: Path
    tokenizer_dir: Path


def base_folder_files(ckpt_dir: str | Path) -> BaseFolderFiles:
    d = Path(ckpt_dir)
    return BaseFolderFiles(d / CONFIG_FILE, d / T5_FILE, d / CLIP_FILE, d / VAE_FILE, d / TOKENIZER_DIR)


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read the shard index ({exc})", file=str(path)) from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError("the shard index has no weight_map", file=str(path))
    return weight_map


def _base_shards(ckpt_dir: Path) -> tuple[tuple[Path, ...], bool]:
    """Base shards of ``ckpt_dir`` and whether they hold the audio weights (per the index)."""
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_index(index)
        named = sorted({f for f in weight_map.values() if f != MULTITALK_FILE})
        if named and all((ckpt_dir / f).is_file() for f in named):
            audio_in_shards = any(is_audio_key(k) and f != MULTITALK_FILE for k, f in weight_map.items())
            return tuple(ckpt_dir / f for f in named), audio_in_shards
    # No index, or one naming files that are not here: take the shards that are.
    shards = tuple(sorted(p for p in ckpt_dir.glob(SHARD_GLOB) if p.is_file()))
    return shards, False


def find_dit_files(ckpt_dir: str | Path, multitalk_dir: str | Path | None = None) -> DiTFiles:
    """Locate ``config.json``, the base shards and ``multitalk.safetensors``.

    The audio weights come from ``multitalk_dir/multitalk.safetensors`` when ``multitalk_dir`` is
    given, else from ``ckpt_dir/multitalk.safetensors``, else from the shards if the index maps
    audio keys into them.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError("checkpoint folder not found (pass the Wan2.1-I2V-14B-480P folder)", file=str(ckpt_dir))
    config = ckpt_dir / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError("no config.json in the checkpoint folder (is this Wan2.1-I2V-14B-480P?)",
                              file=str(config))
    shards, audio_in_shards = _base_shards(ckpt_dir)
    if not shards:
        raise CheckpointError(f"no DiT weights ({SHARD_GLOB}) in the checkpoint folder", file=str(ckpt_dir))

    if multitalk_dir is not None:
        candidate = Path(multitalk_dir) / MULTITALK_FILE
        if not candidate.is_file():
            raise CheckpointError(f"the MultiTalk folder has no {MULTITALK_FILE} "
                                  "(download MeiGen-AI/MeiGen-MultiTalk)", file=str(candidate))
        return DiTFiles(config, shards, candidate)
    local = ckpt_dir / MULTITALK_FILE
    if local.is_file():
        return DiTFiles(config, shards, local)
    if audio_in_shards:
        return DiTFiles(config, shards, None)
    raise CheckpointError(
        f"the MultiTalk audio weights are missing: pass the MeiGen-MultiTalk folder (with {MULTITALK_FILE}) "
        f"as multitalk_dir, or copy {MULTITALK_FILE} into the checkpoint folder", file=str(local))


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """``(tensor entries, data start offset)`` of a safetensors file."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except FileNotFoundError as exc:
        raise CheckpointError("weight file not found", file=str(path)) from exc
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"cannot read safetensors header ({exc})", file=str(path)) from exc
    header.pop("__metadata__", None)
    return header, 8 + size


_CHUNK_BYTES = 8 << 20


def read_safetensors(path: str | Path, keys: Iterable[str] | None = None,
                     dtype_for: Callable[[str], torch.dtype | None] | None = None) -> Iterator[SourceItem]:
    """Yield ``(key, tensor, file name)`` reading each tensor with plain file I/O into its own buffer.

    Unlike a memory map, nothing of the file stays mapped (or resident) once a tensor has been
    converted and dropped. ``dtype_for(key)`` (optional) names the dtype a floating tensor should
    arrive in; it is then cast while reading, in 8 MiB chunks, so no full-size copy in the file's
    dtype is ever made: loading peaks at the model size plus one chunk.
    """
    path = Path(path)
    header, start = read_safetensors_header(path)
    wanted = sorted(header, key=lambda k: header[k]["data_offsets"][0]) if keys is None else list(keys)
    chunk = None
    with open(path, "rb") as f:
        for key in wanted:
            entry = header.get(key)
            if entry is None:
                raise CheckpointError("tensor listed in the index is not in the file", file=path.name, key=key)
            src = _ST_DTYPES.get(entry["dtype"])
            if src is None:
                raise CheckpointError(f"unsupported dtype {entry['dtype']}", file=path.name, key=key)
            begin, end = entry["data_offsets"]
            nbytes = end - begin
            f.seek(start + begin)
            dst = dtype_for(key) if dtype_for is not None else None
            if dst is None or dst == src or not src.is_floating_point:
                buf = torch.empty(nbytes, dtype=torch.uint8)
                if nbytes and f.readinto(buf.numpy()) != nbytes:
                    raise CheckpointError("file is truncated", file=path.name, key=key)
                yield key, buf.view(src).reshape(entry["shape"]), path.name
                continue
            out = torch.empty(entry["shape"], dtype=dst).view(-1)
            if chunk is None:
                chunk = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
            step = _CHUNK_BYTES - _CHUNK_BYTES % src.itemsize
            done = 0
            while done < nbytes:
                n = min(step, nbytes - done)
                if f.readinto(chunk[:n].numpy()) != n:
                    raise CheckpointError("file is truncated", file=path.name, key=key)
                first = done // src.itemsize
                out[first:first + n // src.itemsize].copy_(chunk[:n].view(src))
                done += n
            yield key, out.view(entry["shape"]), path.name


def _safetensors_keys(path: Path) -> list[str]:
    return list(read_safetensors_header(path)[0])


def iter_dit_tensors(files: DiTFiles, dtype_for: Callable[[str], torch.dtype | None] | None = None
                     ) -> Iterator[SourceItem]:
    """Yield ``(official key, tensor, file name)`` shard by shard, one tensor at a time.

    Audio keys present both in a shard and in ``multitalk.safetensors`` are taken from the latter.
    ``dtype_for(official key)``: optional dtype to cast to while reading (see :func:`read_safetensors`).
    """
    audio_keys: set[str] = set()
    if files.multitalk_path is not None:
        audio_keys = set(_safetensors_keys(files.multitalk_path))
    for shard in files.shard_paths:
        header, _ = read_safetensors_header(shard)
        keys = sorted((k for k in header if k not in audio_keys), key=lambda k: header[k]["data_offsets"][0])
        yield from read_safetensors(shard, keys, dtype_for)
    if files.multitalk_path is not None:
        yield from read_safetensors(files.multitalk_path, dtype_for=dtype_for)
