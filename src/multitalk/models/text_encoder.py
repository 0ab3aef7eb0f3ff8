"""umT5-XXL text encoder: transformers ``UMT5EncoderModel`` loaded from the official ``.pth``.

The official folder holds ``models_t5_umt5-xxl-enc-bf16.pth`` (the state dict of
``wan.modules.t5.T5Encoder``, bfloat16) and the tokenizer folder ``google/umt5-xxl``.
:func:`convert_t5_key` maps each official key to the transformers name;
:meth:`TextEncoder.from_checkpoint` builds the model on ``meta`` and streams the file into it, one
tensor at a time, cast to the requested dtype.

The two implementations compute the same thing (checked against the golden vectors):

* official ``ffn``: ``fc2(fc1(x) * gelu_tanh(gate.0(x)))`` = transformers gated-GELU
  ``wo(wi_1(x) * gelu_new(wi_0(x)))``: ``gate.0 -> wi_0``, ``fc1 -> wi_1``, ``fc2 -> wo``;
* attention without ``1/sqrt(d)`` scaling, a bidirectional relative position bias in *every*
  layer (``shared_pos=False`` = UMT5's per-layer ``relative_attention_bias``), masked keys at
  ``finfo.min``; RMS norms (eps 1e-6) before attention, FFN and at the end;
* the token embedding is ``shared.weight``, tied to ``encoder.embed_tokens.weight`` (one tensor).

Text handling follows ``HuggingfaceTokenizer(seq_len=512, clean="whitespace")`` and
``T5EncoderModel.__call__``: clean, tokenize with ``</s>`` appended, pad/truncate to 512, run the
padded batch with its mask, trim every output to its own length.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import regex
import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from multitalk.errors import CheckpointError, UserInputError
from multitalk.models.architecture import Architecture, T5Config, detect_architecture
from multitalk.models.checkpoint import (
    LoadReport,
    SourceItem,
    build_on_meta,
    iter_torch_file,
    load_converted,
)
from multitalk.models.official_files import T5_FILE, TOKENIZER_DIR

_DOWNLOAD_HINT = ("download the Wan2.1-I2V-14B-480P folder from Hugging Face "
                  "(huggingface-cli download Wan-AI/Wan2.1-I2V-14B-480P --local-dir <ckpt_dir>)")

# Unicode White_Space runs, as the official ``regex`` ``\s+`` matches them.
_WHITESPACE = regex.compile(r"\s+")


# ----------------------------------------------------------------------------- text cleaning

def clean_text(text: str) -> str:
    """The official ``clean="whitespace"``: ftfy, HTML-unescape twice, strip, collapse whitespace."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


# ----------------------------------------------------------------------------- model + converter

def umt5_config(t5: T5Config) -> UMT5Config:
    """transformers ``UMT5Config`` of the encoder described by ``t5``."""
    if t5.dim_attn % t5.num_heads:
        raise CheckpointError(f"umT5 dim_attn={t5.dim_attn} is not divisible by num_heads={t5.num_heads}")
    return UMT5Config(
        vocab_size=t5.vocab_size,
        d_model=t5.dim,
        d_kv=t5.dim_attn // t5.num_heads,
        d_ff=t5.dim_ffn,
        num_layers=t5.num_layers,
        num_heads=t5.num_heads,
        relative_attention_num_buckets=t5.num_buckets,
        relative_attention_max_distance=t5.max_distance,
        feed_forward_proj="gated-gelu",  # gelu_new = tanh approximation, as the official GELU
        layer_norm_epsilon=t5.eps,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def build_umt5_on_meta(t5: T5Config) -> UMT5EncoderModel:
    """An eval-mode ``UMT5EncoderModel`` for ``t5`` whose tensors live on ``meta``."""
    cfg = umt5_config(t5)
    return build_on_meta(lambda: UMT5EncoderModel(cfg)).eval().requires_grad_(False)


_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_KEYS = {
    "token_embedding.weight": "shared.weight",  # encoder.embed_tokens is tied to it
    "norm.weight": "encoder.final_layer_norm.weight",
}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
# Tied to shared.weight: the checkpoint provides it once.
_TIED = "encoder.embed_tokens.weight"


def convert_t5_key(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map one official ``T5Encoder`` tensor to its ``UMT5EncoderModel`` name.

    Unknown keys are returned unchanged, so the loader reports them as unexpected.
    """
    if key in _TOP_KEYS:
        return [(_TOP_KEYS[key], tensor)]
    m = _BLOCK_RE.fullmatch(key)
    if m and m.group(2) in _BLOCK_KEYS:
        return [(f"encoder.block.{m.group(1)}.{_BLOCK_KEYS[m.group(2)]}", tensor)]
    return [(key, tensor)]


def check_t5_shapes(t5: T5Config, shapes: dict[str, Sequence[int]], file: str = T5_FILE) -> None:
    """Cross-check the architecture's umT5 numbers against the checkpoint's tensor shapes.

    vocab/dim from ``token_embedding``, heads/buckets from ``pos_embedding`` ``[buckets, heads]``,
    attention and FFN widths from ``attn.q`` / ``ffn.fc1``, layers from the block count.
    """
    def shape_of(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError("umT5 checkpoint lacks a tensor every T5Encoder has", file=file, key=key)
        return tuple(shapes[key])

    checks = [
        ("token_embedding.weight", (t5.vocab_size, t5.dim), "vocab_size, dim"),
        ("blocks.0.pos_embedding.embedding.weight", (t5.num_buckets, t5.num_heads), "num_buckets, num_heads"),
        ("blocks.0.attn.q.weight", (t5.dim_attn, t5.dim), "dim_attn, dim"),
        ("blocks.0.ffn.fc1.weight", (t5.dim_ffn, t5.dim), "dim_ffn, dim"),
    ]
    for key, expected, names in checks:
        got = shape_of(key)
        if got != expected:
            raise CheckpointError(
                f"umT5 checkpoint does not match the architecture ({names} differ; wrong "
                f"architecture or wrong file?)", file=file, key=key, expected=expected, got=got)
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_RE.fullmatch(k))}
    if len(blocks) != t5.num_layers:
        raise CheckpointError(
            f"umT5 checkpoint has {len(blocks)} blocks, the architecture expects {t5.num_layers}",
            file=file)


def load_t5_weights(model: UMT5EncoderModel, items: Iterable[SourceItem], *,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    dry_run: bool = False) -> LoadReport:
    """Stream official umT5 tensors into ``model`` (built on meta) and re-tie the embedding."""
    report = load_converted(model, items, convert_t5_key, component="umT5 text encoder",
                            dtype=dtype, device=device, ignore_target=lambda name: name == _TIED,
                            dry_run=dry_run)
    if not dry_run:
        model.encoder.embed_tokens = model.shared
    return report


# ----------------------------------------------------------------------------- tokenizer

def load_t5_tokenizer(path: str | Path):
    """The umT5 tokenizer of the official folder (``<ckpt_dir>/google/umt5-xxl``)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"umT5 tokenizer folder not found; {_DOWNLOAD_HINT} "
                              f"(it contains {TOKENIZER_DIR}/)", file=str(path))
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot load the umT5 tokenizer ({exc}); {_DOWNLOAD_HINT}",
                              file=str(path)) from exc


# ----------------------------------------------------------------------------- encoder

class TextEncoder:
    """Tokenizer + umT5 encoder producing the DiT's text context."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, arch: Architecture | None = None,
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> TextEncoder:
        """Load ``models_t5_umt5-xxl-enc-bf16.pth`` and ``google/umt5-xxl`` from an official folder."""
        ckpt_dir = Path(ckpt_dir)
        arch = arch if arch is not None else detect_architecture(ckpt_dir)
        t5 = arch.t5
        weights = ckpt_dir / T5_FILE
        if not weights.is_file():
            raise CheckpointError(f"umT5 weight file not found; {_DOWNLOAD_HINT}", file=str(weights))
        tokenizer = load_t5_tokenizer(ckpt_dir / TOKENIZER_DIR)
        if len(tokenizer) > t5.vocab_size:
            raise CheckpointError(
                f"the tokenizer has {len(tokenizer)} tokens, more than the encoder's vocabulary "
                f"({t5.vocab_size}); tokenizer and weights belong to different models",
                file=str(ckpt_dir / TOKENIZER_DIR))
        # Memory-mapped pass over the shapes only (reads no tensor data).
        check_t5_shapes(t5, {k: tuple(v.shape) for k, v, _ in iter_torch_file(weights)}, file=str(weights))
        model = build_umt5_on_meta(t5)
        load_t5_weights(model, iter_torch_file(weights), dtype=dtype, device=device)
        return cls(model, tokenizer, text_len=t5.text_len)

    def tokenize(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenize: ``(ids [B, text_len] int64, mask [B, text_len] int64)`` on CPU."""
        texts = _check_texts(texts)
        out = self.tokenizer([clean_text(t) for t in texts], padding="max_length", truncation=True,
                             max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].long()

    @torch.inference_mode()
    def encode(self, texts: str | Sequence[str]) -> list[torch.Tensor]:
        """Encode a batch; one ``[L_i, dim]`` tensor per text, trimmed to its own token count.

        The whole batch runs padded to ``text_len`` with its mask (as the official code does), so
        results depend on nothing but the text. Outputs are in the model's dtype and device.
        """
        ids, mask = self.tokenize(texts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths)]


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise UserInputError("prompt", "no text to encode", "pass at least one prompt")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise UserInputError("prompt", f"text {i} is a {type(t).__name__}, not a string",
                                 "pass prompts as strings")
    return texts
