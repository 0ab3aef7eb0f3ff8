"""CLIP ViT-H/14 image encoder: transformers ``CLIPVisionModel`` loaded from the official ``.pth``.

The official folder holds ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, the state
dict of the whole ``XLMRobertaCLIP``; MultiTalk uses only its vision tower (``visual.*``) and only
up to the penultimate block (``use_31_block=True``): the features are the 257 tokens (class token +
16x16 patches) after all blocks but the last, without post-norm, pooling or head.

So the ``CLIPVisionModel`` built here has ``num_layers - 1`` encoder layers (the last official block
is never run, so it is not even loaded), its ``post_layernorm`` is an identity (only the pooled
output uses it) and ``last_hidden_state`` *is* the feature (= ``hidden_states[-2]`` of the full
tower). Key conversion (:func:`convert_clip_key`):

* ``visual.patch_embedding.weight`` -> ``embeddings.patch_embedding.weight`` (no bias in either)
* ``visual.cls_embedding`` ``[1, 1, D]`` -> ``embeddings.class_embedding`` ``[D]``
* ``visual.pos_embedding`` ``[1, 257, D]`` -> ``embeddings.position_embedding.weight`` ``[257, D]``
* ``visual.pre_norm`` -> ``pre_layrnorm``
* ``visual.transformer.N.{norm1, attn.to_qkv, attn.proj, norm2, mlp.0, mlp.2}`` ->
  ``encoder.layers.N.{layer_norm1, self_attn.{q,k,v}_proj (fused rows split in 3), self_attn.out_proj,
  layer_norm2, mlp.fc1, mlp.fc2}``
* ignored: the last block, ``visual.head``, ``visual.post_norm``, ``textual.*``, ``log_scale``.

Blocks are pre-LN with exact (erf) GELU, LayerNorm eps 1e-5, as the official ``activation='gelu'``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig as HFCLIPVisionConfig
from transformers import CLIPVisionModel

from multitalk.errors import CheckpointError, UserInputError
from multitalk.models.architecture import ARCHITECTURES, Architecture, CLIPVisionConfig, detect_architecture
from multitalk.models.checkpoint import (
    Converter,
    LoadReport,
    SourceItem,
    build_on_meta,
    iter_torch_file,
    load_converted,
)
from multitalk.models.official_files import CLIP_FILE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PREFIX = "visual."
_BLOCK_RE = re.compile(r"visual\.transformer\.(\d+)\.(.+)")
_BLOCK_KEYS = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight",
    "mlp.2.bias": "mlp.fc2.bias",
}
_TOP_KEYS = {
    "visual.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "visual.pre_norm.weight": "pre_layrnorm.weight",
    "visual.pre_norm.bias": "pre_layrnorm.bias",
}
# Official tensors that MultiTalk never uses.
_UNUSED = ("visual.head", "visual.post_norm.weight", "visual.post_norm.bias")


# ----------------------------------------------------------------------------- model + converter

def clip_vision_config(cfg: CLIPVisionConfig) -> HFCLIPVisionConfig:
    """transformers config of the tower MultiTalk runs: all official blocks but the last."""
    if cfg.dim % cfg.num_heads:
        raise CheckpointError(f"CLIP dim={cfg.dim} is not divisible by num_heads={cfg.num_heads}")
    if cfg.num_layers < 2:
        raise CheckpointError(f"CLIP needs at least 2 blocks (the last one is skipped), got {cfg.num_layers}")
    return HFCLIPVisionConfig(
        hidden_size=cfg.dim,
        intermediate_size=cfg.dim * cfg.mlp_ratio,
        projection_dim=cfg.out_dim,
        num_hidden_layers=cfg.num_layers - 1,
        num_attention_heads=cfg.num_heads,
        num_channels=3,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu",            # exact erf GELU (official nn.GELU())
        layer_norm_eps=cfg.eps,
        attention_dropout=0.0,
        attn_implementation="sdpa",
    )


def build_clip_on_meta(cfg: CLIPVisionConfig) -> CLIPVisionModel:
    """An eval-mode ``CLIPVisionModel`` (penultimate-block tower) whose tensors live on ``meta``."""
    hf_cfg = clip_vision_config(cfg)
    model = build_on_meta(lambda: CLIPVisionModel(hf_cfg))
    # The features are taken before any post-norm; post_layernorm only feeds the pooled output.
    model.post_layernorm = torch.nn.Identity()
    return model.eval().requires_grad_(False)


def clip_converter(cfg: CLIPVisionConfig) -> Converter:
    """A ``checkpoint.load_converted`` converter for the ``visual.*`` keys of the official CLIP file.

    Unknown keys come back under their own name so that the loader reports them as unexpected.
    """
    last_block = cfg.num_layers - 1

    def convert(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if not key.startswith(_PREFIX) or key in _UNUSED:
            return []  # textual.*, log_scale, head, post-norm
        if key in _TOP_KEYS:
            return [(_TOP_KEYS[key], tensor)]
        if key == "visual.cls_embedding":
            return [("embeddings.class_embedding", tensor.reshape(tensor.shape[-1]))]
        if key == "visual.pos_embedding":
            return [("embeddings.position_embedding.weight", tensor.reshape(tensor.shape[-2:]))]
        m = _BLOCK_RE.fullmatch(key)
        if m:
            index, leaf = int(m.group(1)), m.group(2)
            if index == last_block:
                return []  # use_31_block: the last block is never run
            prefix = f"encoder.layers.{index}."
            if leaf in _BLOCK_KEYS:
                return [(prefix + _BLOCK_KEYS[leaf], tensor)]
            if leaf in ("attn.to_qkv.weight", "attn.to_qkv.bias"):
                kind = leaf.rsplit(".", 1)[1]
                if tensor.shape[0] % 3:
                    return [(key, tensor)]
                q, k, v = tensor.chunk(3, dim=0)  # rows ordered (q | k | v), heads inside each
                return [(f"{prefix}self_attn.q_proj.{kind}", q), (f"{prefix}self_attn.k_proj.{kind}", k),
                        (f"{prefix}self_attn.v_proj.{kind}", v)]
        return [(key, tensor)]

    return convert


def check_clip_shapes(cfg: CLIPVisionConfig, shapes: Mapping[str, Sequence[int]],
                      file: str = CLIP_FILE) -> None:
    """Cross-check the architecture's CLIP numbers against the checkpoint's ``visual.*`` shapes."""
    def shape_of(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError("CLIP checkpoint lacks a tensor every vision tower has", file=file, key=key)
        return tuple(shapes[key])

    d, p = cfg.dim, cfg.patch_size
    tokens = (cfg.image_size // p) ** 2 + 1
    checks = [
        ("visual.patch_embedding.weight", (d, 3, p, p), "dim, patch_size"),
        ("visual.pos_embedding", (1, tokens, d), "image_size / patch_size tokens, dim"),
        ("visual.transformer.0.mlp.0.weight", (d * cfg.mlp_ratio, d), "mlp_ratio, dim"),
    ]
    for key, expected, names in checks:
        got = shape_of(key)
        if got != expected:
            raise CheckpointError(
                f"CLIP checkpoint does not match the architecture ({names} differ; wrong "
                f"architecture or wrong file?)", file=file, key=key, expected=expected, got=got)
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_RE.fullmatch(k))}
    if len(blocks) != cfg.num_layers:
        raise CheckpointError(
            f"CLIP checkpoint has {len(blocks)} vision blocks, the architecture expects {cfg.num_layers}",
            file=file)


def load_clip_weights(model: CLIPVisionModel, items: Iterable[SourceItem], cfg: CLIPVisionConfig, *,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      dry_run: bool = False) -> LoadReport:
    """Stream official CLIP tensors into ``model`` (built on meta); fills ``position_ids``."""
    report = load_converted(model, items, clip_converter(cfg), component="CLIP image encoder",
                            dtype=dtype, device=device, dry_run=dry_run)
    if not dry_run:
        emb = model.embeddings
        emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))
    return report


# ----------------------------------------------------------------------------- encoder

class ImageEncoder(torch.nn.Module):
    """The CLIP vision tower with the official preprocessing; ``encode`` gives the DiT's ``clip_fea``."""

    def __init__(self, model: CLIPVisionModel, cfg: CLIPVisionConfig):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, arch: Architecture | str | None = None,
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> ImageEncoder:
        """Load the vision tower of ``<ckpt_dir>/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``.

        ``arch`` (an :class:`Architecture` or its name) defaults to the one detected from the
        folder's ``config.json``. The real file is float16; each tensor is cast to ``dtype``.
        """
        ckpt_dir = Path(ckpt_dir)
        if arch is None:
            arch = detect_architecture(ckpt_dir)
        elif isinstance(arch, str):
            if arch not in ARCHITECTURES:
                raise CheckpointError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
            arch = ARCHITECTURES[arch]
        cfg = arch.clip
        path = ckpt_dir / CLIP_FILE
        if not path.is_file():
            raise CheckpointError(f"CLIP weights not found: the checkpoint folder has no {CLIP_FILE}",
                                  file=str(path))
        # Memory-mapped pass over the shapes only (reads no tensor data).
        shapes = {k: tuple(v.shape) for k, v, _ in iter_torch_file(path, prefix=_PREFIX)}
        check_clip_shapes(cfg, shapes, file=str(path))
        model = build_clip_on_meta(cfg)
        load_clip_weights(model, iter_torch_file(path, prefix=_PREFIX), cfg, dtype=dtype, device=device)
        return cls(model, cfg).to(device)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embedding.weight.dtype

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> CLIP pixels ``[B, 3, 224, 224]`` (float32).

        Bicubic resize (``align_corners=False``, no antialias), ``x * 0.5 + 0.5``, then the CLIP
        mean/std normalisation, in this order, as the official ``CLIPModel.visual``.
        """
        size = (self.cfg.image_size, self.cfg.image_size)
        x = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False)
        x = x.mul(0.5).add(0.5)
        return x.sub(self.mean.to(x.device)).div(self.std.to(x.device))

    @torch.inference_mode()
    def encode(self, frame: torch.Tensor) -> torch.Tensor:
        """CLIP features of the conditioning frame: ``[B, 257, dim]`` float32 (``B = 1`` for one frame).

        ``frame`` is in ``[-1, 1]``: ``[3, H, W]``, ``[B, 3, H, W]``, or the pipeline's
        ``[B, 3, T, H, W]`` cond video, of which the last frame is used (as the official code).
        """
        frames = _as_frames(frame)
        pixels = self.preprocess(frames.to(self.device))
        half = self.dtype in (torch.float16, torch.bfloat16) and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=half):
            out = self.model(pixel_values=pixels.to(self.dtype)).last_hidden_state
        return out.float()


def _as_frames(frame) -> torch.Tensor:
    if not isinstance(frame, torch.Tensor):
        raise UserInputError("cond_image", f"expected a tensor, got {type(frame).__name__}",
                             "pass the bucketed frame as a float tensor in [-1, 1]")
    if frame.dim() == 5:
        frame = frame[:, :, -1]
    elif frame.dim() == 3:
        frame = frame.unsqueeze(0)
    if frame.dim() != 4 or frame.shape[1] != 3 or frame.shape[0] < 1 or min(frame.shape[-2:]) < 1:
        raise UserInputError("cond_image", f"expected [3, H, W] or [B, 3, H, W], got {tuple(frame.shape)}",
                             "pass an RGB frame, channels first")
    if not frame.is_floating_point():
        raise UserInputError("cond_image", f"dtype {frame.dtype} is not floating point",
                             "convert uint8 pixels with media.image.cond_image_from_uint8")
    return frame


__all__: list[str] = ["CLIP_MEAN", "CLIP_STD", "ImageEncoder", "build_clip_on_meta",
                      "check_clip_shapes", "clip_converter", "clip_vision_config", "load_clip_weights"]
