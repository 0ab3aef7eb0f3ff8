"""The official weight files: their names, which DiT keys are the MultiTalk audio weights, and the
one safetensors header reader that every loader and checker uses.

The official README downloads three folders:

* ``Wan2.1-I2V-14B-480P/``: ``config.json``, the DiT base weights as 7 shards
  ``diffusion_pytorch_model-0000N-of-00007.safetensors`` + their index, and the umT5, CLIP and VAE
  ``.pth`` files with the ``google/umt5-xxl`` tokenizer folder;
* ``MeiGen-MultiTalk/``: ``multitalk.safetensors`` (the audio weights) and its own index, which
  covers the base keys too;
* ``chinese-wav2vec2-base/``: a transformers wav2vec2 folder (``pytorch_model.bin`` or
  ``model.safetensors``, ``config.json``, ``preprocessor_config.json``).

Where the files are looked for, in every supported layout, is :mod:`multitalk.models.layout`;
the keys and shapes each file holds are :mod:`multitalk.models.key_schema`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from multitalk.errors import CheckpointError

BASE_FOLDER = "Wan2.1-I2V-14B-480P"
MULTITALK_FOLDER = "MeiGen-MultiTalk"
WAV2VEC_FOLDER = "chinese-wav2vec2-base"

CONFIG_FILE = "config.json"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SHARD_GLOB = "diffusion_pytorch_model*.safetensors"
MULTITALK_FILE = "multitalk.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"
WAV2VEC_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WAV2VEC_PREPROCESSOR_FILE = "preprocessor_config.json"

# What ``multitalk.safetensors`` holds: the audio projection, each block's audio cross-attention
# and the norm in front of it; every other DiT key is a base Wan key.
AUDIO_KEY_MARKERS = ("audio_proj.", "audio_cross_attn.", "norm_x.")


def shard_name(index: int, count: int) -> str:
    """The name of base shard ``index`` (1-based) of ``count``, as Wan's checkpoints are split."""
    return f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


def is_audio_key(key: str) -> bool:
    """True for the MultiTalk audio weights (the content of ``multitalk.safetensors``)."""
    return any(m in key for m in AUDIO_KEY_MARKERS)


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsHeader(NamedTuple):
    entries: dict          # key -> {"dtype", "shape", "data_offsets"}
    data_start: int        # file offset of the data the offsets count from
    metadata: dict         # the "__metadata__" strings ({} if none)


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """The header of a safetensors file (the only part read), checked to describe data that fits
    in the file: a corrupt or truncated file is a :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        size_on_disk = path.stat().st_size
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > size_on_disk - 8:
                raise ValueError(f"header length {size} runs past the end of the file")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        if 8 + size + end > size_on_disk:
            raise ValueError(f"the tensors need {8 + size + end} bytes, the file has {size_on_disk} (truncated?)")
    except FileNotFoundError as exc:
        raise CheckpointError("weight file not found", file=str(path)) from exc
    except (OSError, struct.error, ValueError, TypeError, KeyError, IndexError) as exc:
        raise CheckpointError(f"cannot read safetensors header ({exc})", file=str(path)) from exc
    return SafetensorsHeader(header, 8 + size, dict(metadata))


def safetensors_shape_items(path: str | Path) -> Iterator[tuple[str, torch.Tensor, str]]:
    """``(key, meta tensor, file name)`` with each tensor's shape and dtype, from the header only."""
    path = Path(path)
    for key, entry in read_safetensors_header(path).entries.items():
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"unsupported dtype {entry['dtype']}", file=path.name, key=key)
        yield key, torch.empty(tuple(entry["shape"]), dtype=dtype, device="meta"), path.name
