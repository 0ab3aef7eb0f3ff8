"""Where the weights are: the DiT files of the official folders, in every supported layout.

The file names are :mod:`multitalk.models.official_files`. Supported: the two folders separately
(``multitalk_dir``), or the README's setup step where MeiGen's index and ``multitalk.safetensors``
were copied into the base folder (the tiny golden folder). Nothing has to be edited by hand: a
Wan-only index is fine when ``multitalk_dir`` is given, an index that names missing files falls
back to the shards present, and missing audio weights are a
:class:`~multitalk.errors.CheckpointError` that says which file to provide.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from multitalk.errors import CheckpointError
from multitalk.models.checkpoint import SourceItem, read_safetensors
from multitalk.models.official_files import (CONFIG_FILE, INDEX_FILE, MULTITALK_FILE, SHARD_GLOB, is_audio_key,
                                             read_safetensors_header)


@dataclass(frozen=True)
class DiTFiles:
    """The DiT files to stream: base shards, then the audio weights (``multitalk_path``, None if in the shards)."""

    config_path: Path
    shard_paths: tuple[Path, ...]
    multitalk_path: Path | None


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


def _safetensors_keys(path: Path) -> list[str]:
    return list(read_safetensors_header(path).entries)


def iter_dit_tensors(files: DiTFiles, dtype_for: Callable[[str], torch.dtype | None] | None = None
                     ) -> Iterator[SourceItem]:
    """Yield ``(official key, tensor, file name)`` shard by shard, one tensor at a time.

    Audio keys present both in a shard and in ``multitalk.safetensors`` are taken from the latter.
    ``dtype_for(official key)``: optional dtype to cast to while reading (see
    :func:`~multitalk.models.checkpoint.read_safetensors`).
    """
    audio_keys: set[str] = set()
    if files.multitalk_path is not None:
        audio_keys = set(_safetensors_keys(files.multitalk_path))
    for shard in files.shard_paths:
        header = read_safetensors_header(shard).entries
        keys = sorted((k for k in header if k not in audio_keys), key=lambda k: header[k]["data_offsets"][0])
        yield from read_safetensors(shard, keys, dtype_for)
    if files.multitalk_path is not None:
        yield from read_safetensors(files.multitalk_path, dtype_for=dtype_for)
