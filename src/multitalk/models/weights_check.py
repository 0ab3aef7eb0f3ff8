"""``multitalk weights check``: every component's keys and shapes against the model, without loading data.

Folders are recognised by their content, in any order: the Wan2.1-I2V base folder (DiT
``config.json`` + ``.pth`` files), the MeiGen-MultiTalk folder (``multitalk.safetensors``; may be the
same folder when it was copied in) and the chinese-wav2vec2 folder (HF ``config.json`` of a
wav2vec2 model). Only headers are read (safetensors) or memory-mapped (``.pth``), so checking the
full-size folders takes seconds and no memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from multitalk.errors import CheckpointError, UserInputError
from multitalk.models.architecture import detect_architecture
from multitalk.models.checkpoint import LoadReport, SourceItem, build_on_meta
from multitalk.models.official_files import (BASE_FOLDER, CLIP_FILE, CONFIG_FILE, MULTITALK_FILE, T5_FILE,
                                             TOKENIZER_DIR, VAE_FILE, WAV2VEC_FOLDER, WAV2VEC_PREPROCESSOR_FILE,
                                             safetensors_shape_items)

def torch_shape_items(path: Path, prefix: str | None = None) -> Iterator[SourceItem]:
    """Meta tensors with the shapes of a ``torch.save`` state dict (memory-mapped, not read)."""
    from multitalk.models.checkpoint import iter_torch_file

    for key, t, file in iter_torch_file(path, prefix=prefix):
        yield key, torch.empty(tuple(t.shape), dtype=t.dtype, device="meta"), file


def dit_shape_items(files) -> Iterator[SourceItem]:
    """Shapes of the DiT tensors: base shards, then the MultiTalk audio weights (first wins)."""
    seen: set[str] = set()
    paths = list(files.shard_paths) + ([files.multitalk_path] if files.multitalk_path else [])
    for path in dict.fromkeys(paths):
        for key, t, file in safetensors_shape_items(Path(path)):
            if key not in seen:
                seen.add(key)
                yield key, t, file


def classify_folders(dirs: list[Path]) -> dict[str, Path]:
    """Map 'base', 'multitalk', 'wav2vec' to the given folders by their content."""
    found: dict[str, Path] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserInputError("dirs", f"{d} is not a folder", "pass the downloaded model folders")
        cfg = d / CONFIG_FILE
        cfg_json = {}
        if cfg.is_file():
            try:
                cfg_json = json.loads(cfg.read_text())
            except json.JSONDecodeError:
                cfg_json = {}
        if cfg_json.get("model_type") == "wav2vec2" or (d / WAV2VEC_PREPROCESSOR_FILE).is_file():
            found["wav2vec"] = d
            continue
        if (d / MULTITALK_FILE).is_file():
            found["multitalk"] = d
        if cfg_json.get("_class_name") == "WanModel" or list(d.glob("*.pth")):
            found["base"] = d
        if not any(d == v for v in found.values()):
            raise UserInputError("dirs", f"{d} holds none of the MultiTalk model files",
                                 "pass Wan2.1-I2V-14B-480P, MeiGen-MultiTalk and chinese-wav2vec2-base")
    return found


def _missing_file_report(component: str, path: Path) -> LoadReport:
    rep = LoadReport(component)
    rep.missing_files.append(str(path))
    return rep


def check_folders(dirs: list[Path]) -> list[LoadReport]:
    from multitalk.models import audio_encoder, image_encoder, text_encoder, transformer, vae
    from multitalk.models.layout import find_dit_files

    folders = classify_folders(dirs)
    reports: list[LoadReport] = []
    base = folders.get("base")
    if base is None:
        reports.append(_missing_file_report("base folder", Path(BASE_FOLDER)))
    else:
        arch = detect_architecture(base)
        try:
            files = find_dit_files(base, folders.get("multitalk"))
            reports.append(transformer.check_transformer_keys(arch.dit, dit_shape_items(files)))
        except CheckpointError as exc:
            rep = LoadReport("transformer")
            rep.missing_files.append(str(exc))
            reports.append(rep)

        def check(component, path, fn):
            if not path.is_file():
                reports.append(_missing_file_report(component, path))
                return
            try:
                reports.append(fn(path))
            except CheckpointError as exc:
                rep = LoadReport(component)
                rep.missing_files.append(str(exc))
                reports.append(rep)

        check("vae", base / VAE_FILE, lambda p: vae.load_vae_weights(
            build_on_meta(lambda: vae.build_vae_model(arch.vae)), torch_shape_items(p), arch.vae, dry_run=True))
        check("text_encoder", base / T5_FILE, lambda p: text_encoder.load_t5_weights(
            text_encoder.build_umt5_on_meta(arch.t5), torch_shape_items(p), dry_run=True))
        check("image_encoder", base / CLIP_FILE, lambda p: image_encoder.load_clip_weights(
            image_encoder.build_clip_on_meta(arch.clip), torch_shape_items(p, prefix="visual."), arch.clip,
            dry_run=True))
        tok = base / TOKENIZER_DIR
        if not tok.is_dir():
            reports.append(_missing_file_report("tokenizer", tok))
    w2v = folders.get("wav2vec")
    if w2v is None:
        reports.append(_missing_file_report("audio_encoder", Path(WAV2VEC_FOLDER)))
    else:
        try:
            from transformers import Wav2Vec2Config

            cfg = Wav2Vec2Config.from_pretrained(str(w2v))
            weights = audio_encoder.find_weight_file(w2v)
            items = (safetensors_shape_items(weights) if weights.suffix == ".safetensors"
                     else torch_shape_items(weights))
            reports.append(audio_encoder.load_wav2vec2_weights(
                audio_encoder.build_wav2vec2_on_meta(cfg), items, dry_run=True))
        except CheckpointError as exc:
            rep = LoadReport("audio_encoder")
            rep.missing_files.append(str(exc))
            reports.append(rep)
    return reports
