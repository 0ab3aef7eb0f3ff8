"""Writes the ``tiny`` random-weight checkpoint folders in the official on-disk layout.

:func:`write_tiny_checkpoints` produces two folders that load through exactly the same code as
the real ones (only :data:`~multitalk.models.architecture.TINY` differs):

* ``Wan2.1-I2V-tiny/``: DiT ``config.json``, two base shards + ``multitalk.safetensors`` + index,
  ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
  ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` and a ``google/umt5-xxl/``
  tokenizer (a small sentencepiece unigram model trained here from
  ``multitalk/assets/tokenizer_corpus.txt``);
* ``chinese-wav2vec2-tiny/``: HF ``Wav2Vec2ForPreTraining``-style ``model.safetensors`` + configs.

Every key name and shape comes from :mod:`multitalk.models.key_schema` (the same listing as the
full-size files, from the tiny numbers) and every file name from :mod:`multitalk.models.official_files`.
Weights follow the golden initialisation scheme: matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2),
norm scales ~ 1 + N(0, 0.1^2), plus a few exceptions that keep generated videos in range. Random
numbers are drawn in float64 from a per-component CPU ``torch.Generator`` (the float64 normal
sampler has no vectorised variant, so the bytes are the same on every CPU) and stored as float32.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from importlib.resources import files
from pathlib import Path

import torch

from multitalk.models.architecture import TINY, Architecture
from multitalk.models.key_schema import (TINY_CLIP_TEXT, TINY_WAV2VEC2, CLIPTextTower, Shape, Wav2Vec2Numbers,
                                         clip_key_shapes, dit_key_shapes, t5_key_shapes, vae_key_shapes,
                                         wav2vec2_key_shapes)
from multitalk.models.official_files import (CLIP_FILE, CONFIG_FILE, INDEX_FILE, MULTITALK_FILE, T5_FILE,
                                             TOKENIZER_DIR, VAE_FILE, WAV2VEC_PREPROCESSOR_FILE,
                                             WAV2VEC_WEIGHT_FILES, is_audio_key, shard_name)

#: Bump when the written bytes change; a folder whose stamp differs is rewritten.
WRITER_VERSION = 1
STAMP_NAME = ".multitalk-tiny.json"
CKPT_FOLDER = "Wan2.1-I2V-tiny"
WAV2VEC_FOLDER = "chinese-wav2vec2-tiny"
DIT_SHARDS = (shard_name(1, 2), shard_name(2, 2))
WAV2VEC_WEIGHTS = WAV2VEC_WEIGHT_FILES[0]  # model.safetensors

# Per-component generator offsets: generator seed = seed * 256 + offset.
_SEED_OFFSETS = {"dit": 1, "vae": 2, "t5": 3, "clip": 4, "wav2vec2": 5}


def split_dit_shards(base: OrderedDict[str, Shape], n_shards: int, itemsize: int = 4
                     ) -> list[OrderedDict[str, Shape]]:
    """Split the base DiT keys (in module order) into shards of about equal byte size.

    A key goes to shard ``j`` when the bytes before it are in the ``j``-th ``1/n`` of the total.
    """
    sizes = [math.prod(s) * itemsize for s in base.values()]
    total = sum(sizes)
    shards: list[OrderedDict[str, Shape]] = [OrderedDict() for _ in range(n_shards)]
    before = 0
    for (key, shape), size in zip(base.items(), sizes):
        j = min(n_shards - 1, before * n_shards // total)
        shards[j][key] = shape
        before += size
    return shards


def tiny_file_layout(arch: Architecture = TINY, clip_text: CLIPTextTower = TINY_CLIP_TEXT,
                     wav2vec2: Wav2Vec2Numbers = TINY_WAV2VEC2) -> dict[str, OrderedDict[str, Shape]]:
    """Every weight file of the tiny folders (paths relative to ``out_dir``) -> key -> shape."""
    dit = dit_key_shapes(arch.dit)
    base = OrderedDict((k, s) for k, s in dit.items() if not is_audio_key(k))
    audio = OrderedDict((k, s) for k, s in dit.items() if is_audio_key(k))
    layout: dict[str, OrderedDict[str, Shape]] = {}
    for name, shard in zip(DIT_SHARDS, split_dit_shards(base, len(DIT_SHARDS))):
        layout[f"{CKPT_FOLDER}/{name}"] = shard
    layout[f"{CKPT_FOLDER}/{MULTITALK_FILE}"] = audio
    layout[f"{CKPT_FOLDER}/{VAE_FILE}"] = vae_key_shapes(arch.vae)
    layout[f"{CKPT_FOLDER}/{T5_FILE}"] = t5_key_shapes(arch.t5)
    layout[f"{CKPT_FOLDER}/{CLIP_FILE}"] = clip_key_shapes(arch.clip, clip_text)
    layout[f"{WAV2VEC_FOLDER}/{WAV2VEC_WEIGHTS}"] = wav2vec2_key_shapes(wav2vec2)
    return layout


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

def _normal(gen: torch.Generator, shape: Shape, std: float, mean: float = 0.0) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x * std + mean).to(torch.float32)


def _fan_in(shape: Shape) -> int:
    return max(1, math.prod(shape[1:]))


def _is_scale(key: str, shape: Shape) -> bool:
    return key.endswith(".gamma") or key.endswith(".weight_g") or (
        len(shape) == 1 and key.endswith(".weight"))


def _smooth_time_embedding(w: torch.Tensor) -> torch.Tensor:
    """Scale column ``k`` of each sinusoid half by ``exp(-(half-1-k)/8)`` at equal total energy.

    The sinusoidal timestep embedding puts frequency ``10000**(-k/half)`` in column ``k`` (cos
    half, then sin half); damping the high frequencies makes ``e0`` vary smoothly with ``t``, so
    TeaCache sees small relative changes between steps (as the real model does).
    """
    half = w.shape[1] // 2
    k = torch.arange(w.shape[1], dtype=torch.float64) % half
    scaled = w.double() * torch.exp(-(half - 1 - k) / 8.0)
    # exactly rounded sums so the renormalisation is the same on every machine
    energy = math.fsum(v * v for v in w.double().flatten().tolist())
    energy_scaled = math.fsum(v * v for v in scaled.flatten().tolist())
    return (scaled * math.sqrt(energy / energy_scaled)).to(torch.float32)


def init_tensor(component: str, key: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
    """Draw one tensor following the golden scheme (see ``tiny_spec.json`` ``weight_init``)."""
    if key == "log_scale":
        return torch.tensor(math.log(1 / 0.07), dtype=torch.float32)
    if component == "vae" and key == "decoder.head.2.weight":
        return _normal(gen, shape, 0.35 / math.sqrt(_fan_in(shape)))
    if component == "vae" and key == "decoder.head.2.bias":
        return _normal(gen, shape, 0.02)
    if key.endswith(".bias"):
        return _normal(gen, shape, 0.1)
    if _is_scale(key, shape):
        return _normal(gen, shape, 0.1, mean=1.0)
    is_embedding = key.endswith("_embedding") or (
        "embedding.weight" in key and not key.endswith("patch_embedding.weight"))
    if key.endswith("modulation") or is_embedding:
        # per-vector draws: modulation, class/position/token embeddings ~ N(0, 1/width)
        return _normal(gen, shape, 1 / math.sqrt(shape[-1]))
    w = _normal(gen, shape, 1 / math.sqrt(_fan_in(shape)))
    if component == "dit" and key == "time_embedding.0.weight":
        w = _smooth_time_embedding(w)
    return w


def init_state_dict(component: str, shapes: OrderedDict[str, Shape], seed: int
                    ) -> OrderedDict[str, torch.Tensor]:
    """Random float32 state dict for ``shapes``, drawn in key order from one seeded generator."""
    gen = torch.Generator(device="cpu").manual_seed(seed * 256 + _SEED_OFFSETS[component])
    return OrderedDict((k, init_tensor(component, k, s, gen).contiguous()) for k, s in shapes.items())


# ---------------------------------------------------------------------------------------------
# Configs and tokenizer
# ---------------------------------------------------------------------------------------------

def dit_config(arch: Architecture = TINY) -> dict:
    """The DiT ``config.json`` (diffusers ``WanModel`` config plus the keys a non-14B model needs)."""
    d = arch.dit
    return dict(sorted({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "i2v",
        "dim": d.dim, "ffn_dim": d.ffn_dim, "freq_dim": d.freq_dim, "in_dim": d.in_dim,
        "num_heads": d.num_heads, "num_layers": d.num_layers, "out_dim": d.out_dim,
        "text_len": d.text_len, "eps": d.eps, "audio_window": d.audio_window,
        "intermediate_dim": d.intermediate_dim, "output_dim": d.output_dim,
        "context_tokens": d.context_tokens, "vae_scale": d.vae_scale,
        "norm_input_visual": d.norm_input_visual, "norm_output_audio": d.norm_output_audio,
        "text_dim": d.text_dim, "tiny_clip_vision_dim": d.clip_dim,
        "tiny_audio_proj_blocks": d.audio_blocks, "tiny_audio_proj_channels": d.audio_channels,
    }.items()))


def wav2vec2_config(w: Wav2Vec2Numbers = TINY_WAV2VEC2) -> dict:
    """``config.json`` of the wav2vec2 folder (transformers ``Wav2Vec2Config``, pre-training head)."""
    from transformers import Wav2Vec2Config

    cfg = Wav2Vec2Config(
        hidden_size=w.hidden_size, num_hidden_layers=w.num_hidden_layers,
        num_attention_heads=w.num_attention_heads, intermediate_size=w.intermediate_size,
        conv_dim=list(w.conv_dim), conv_kernel=list(w.conv_kernel), conv_stride=list(w.conv_stride),
        conv_bias=False, feat_extract_norm="group", do_stable_layer_norm=False,
        num_conv_pos_embeddings=w.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=w.num_conv_pos_embedding_groups,
        num_codevector_groups=w.num_codevector_groups,
        num_codevectors_per_group=w.num_codevectors_per_group, codevector_dim=w.codevector_dim,
        proj_codevector_dim=w.proj_codevector_dim, output_hidden_size=w.hidden_size,
        architectures=["Wav2Vec2ForPreTraining"])
    return dict(sorted(cfg.to_diff_dict().items()))


WAV2VEC2_PREPROCESSOR = {"do_normalize": False, "feature_size": 1, "padding_side": "right",
                         "padding_value": 0.0, "return_attention_mask": False,
                         "sampling_rate": 16000}
TOKENIZER_CONFIG = {"additional_special_tokens": [], "eos_token": "</s>", "extra_ids": 0,
                    "legacy": True, "model_max_length": 512, "pad_token": "<pad>",
                    "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}
SPECIAL_TOKENS_MAP = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer_model(vocab_size: int = TINY.t5.vocab_size) -> bytes:
    """Train the tiny sentencepiece unigram model (``spiece.model`` bytes) from the bundled corpus.

    Single thread, fixed seed, no input shuffling, in-memory input: the bytes are the same on
    every run. Ids: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, no ``<s>``; at most ``vocab_size`` pieces.
    """
    import sentencepiece as spm

    corpus = (files("multitalk") / "assets" / "tokenizer_corpus.txt").read_text(encoding="utf-8")
    lines = [ln for ln in corpus.splitlines() if ln.strip()]
    spm.set_random_generator_seed(20250101)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="unigram",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
        shuffle_input_sentence=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    return buf.getvalue()


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(train_tokenizer_model(vocab_size))
    _write_json(folder / "tokenizer_config.json", TOKENIZER_CONFIG)
    _write_json(folder / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    # tokenizer.json: the fast-tokenizer conversion of spiece.model, as HF ships it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    (folder / "tokenizer.json").write_text(tok.backend_tokenizer.to_str(pretty=True),
                                           encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------

def default_tiny_dir() -> Path:
    """``$MULTITALK_HOME/tiny``, else ``~/.cache/multitalk/tiny``."""
    home = os.environ.get("MULTITALK_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "multitalk"
    return base / "tiny"


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _stamp(seed: int) -> dict:
    return {"writer_version": WRITER_VERSION, "seed": seed}


def _is_current(out_dir: Path, seed: int) -> bool:
    try:
        stamp = json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp == _stamp(seed) and all((out_dir / f).is_dir() for f in (CKPT_FOLDER, WAV2VEC_FOLDER))


def _save_torch(path: Path, state: OrderedDict[str, torch.Tensor]) -> None:
    torch.save(state, str(path))


def _write_all(root: Path, seed: int) -> None:
    from safetensors.torch import save_file

    arch = TINY
    ckpt, w2v = root / CKPT_FOLDER, root / WAV2VEC_FOLDER
    ckpt.mkdir()
    w2v.mkdir()
    layout = tiny_file_layout(arch)

    # DiT: base shards + multitalk.safetensors + index
    dit = init_state_dict("dit", dit_key_shapes(arch.dit), seed)
    weight_map = {}
    for name in (*DIT_SHARDS, MULTITALK_FILE):
        keys = layout[f"{CKPT_FOLDER}/{name}"]
        save_file({k: dit[k] for k in keys}, str(ckpt / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = sum(t.numel() * t.element_size() for t in dit.values())
    _write_json(ckpt / INDEX_FILE, {"metadata": {"total_size": total},
                                    "weight_map": dict(sorted(weight_map.items()))})
    _write_json(ckpt / CONFIG_FILE, dit_config(arch))

    _save_torch(ckpt / VAE_FILE, init_state_dict("vae", layout[f"{CKPT_FOLDER}/{VAE_FILE}"], seed))
    _save_torch(ckpt / T5_FILE, init_state_dict("t5", layout[f"{CKPT_FOLDER}/{T5_FILE}"], seed))
    _save_torch(ckpt / CLIP_FILE, init_state_dict("clip", layout[f"{CKPT_FOLDER}/{CLIP_FILE}"], seed))
    _write_tokenizer(ckpt / TOKENIZER_DIR, arch.t5.vocab_size)

    # wav2vec2
    w2v_state = init_state_dict("wav2vec2", layout[f"{WAV2VEC_FOLDER}/{WAV2VEC_WEIGHTS}"], seed)
    save_file(dict(w2v_state), str(w2v / WAV2VEC_WEIGHTS), metadata={"format": "pt"})
    _write_json(w2v / "config.json", wav2vec2_config())
    _write_json(w2v / WAV2VEC_PREPROCESSOR_FILE, WAV2VEC2_PREPROCESSOR)


def write_tiny_checkpoints(out_dir: str | os.PathLike | None = None, seed: int = 0,
                           force: bool = False) -> tuple[Path, Path]:
    """Write (or reuse) the tiny folders under ``out_dir``; returns ``(ckpt_dir, wav2vec_dir)``.

    Same bytes on every run and machine for a given ``seed``. The folders are built in a temporary
    directory beside ``out_dir`` and renamed into place; a stamp file (writer version + seed)
    written last marks a complete, up-to-date copy, which later calls reuse unless ``force``.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_tiny_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir, w2v_dir = out_dir / CKPT_FOLDER, out_dir / WAV2VEC_FOLDER
    with open(out_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent writers: the second one reuses the result
        try:
            if not force and _is_current(out_dir, seed):
                return ckpt_dir, w2v_dir
            (out_dir / STAMP_NAME).unlink(missing_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir))
            try:
                _write_all(tmp, seed)
                for name in (CKPT_FOLDER, WAV2VEC_FOLDER):
                    if (out_dir / name).exists():
                        shutil.rmtree(out_dir / name)
                    os.replace(tmp / name, out_dir / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _write_json(out_dir / STAMP_NAME, _stamp(seed))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return ckpt_dir, w2v_dir
