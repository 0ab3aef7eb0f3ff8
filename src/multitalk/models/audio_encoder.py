"""chinese-wav2vec2 audio features at video frame rate (transformers ``Wav2Vec2Model``).

The official ``get_embedding`` (``generate_multitalk.py`` + ``src/audio_analysis/wav2vec2.py``):

1. ``Wav2Vec2FeatureExtractor`` on the 16 kHz speech (``do_normalize`` from
   ``preprocessor_config.json``: ``(x - mean) / sqrt(var + 1e-7)`` when true);
2. the convolutional feature encoder (50 Hz);
3. **linear interpolation (``align_corners=True``) to ``int(len / 16000 * fps)`` frames**,
   *before* the feature projection and the transformer encoder;
4. the encoder, keeping the hidden states as transformers 4.x returned them; the embedding is
   ``hidden_states[1:]`` (the output of every layer), laid out ``[frames, layers, channels]``.

transformers 5 no longer returns per-layer states from ``Wav2Vec2Encoder``, so
:meth:`AudioEncoder.embed` runs the encoder's sub-modules itself and collects them.

Weights come from an HF-format folder (``config.json``, ``preprocessor_config.json``,
``model.safetensors`` or ``pytorch_model.bin``). The real file is a ``Wav2Vec2ForPreTraining``
dump: keys prefixed ``wav2vec2.``, the positional-conv weight norm under the legacy names
``weight_g`` / ``weight_v``, and pre-training heads (``quantizer.*``, ``project_hid.*``,
``project_q.*``) that are skipped. :func:`convert_wav2vec2_key` handles all of that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from multitalk.errors import CheckpointError, UserInputError
from multitalk.models.checkpoint import (
    LoadReport,
    SourceItem,
    build_on_meta,
    iter_torch_file,
    load_converted,
    materialize_remaining,
    read_safetensors,
)
from multitalk.models.official_files import WAV2VEC_PREPROCESSOR_FILE, WAV2VEC_WEIGHT_FILES

SAMPLE_RATE = 16000
_DOWNLOAD_HINT = ("download it from Hugging Face (huggingface-cli download TencentGameMate/"
                  "chinese-wav2vec2-base --local-dir <wav2vec_dir>)")

# Pre-training heads of Wav2Vec2ForPreTraining that the audio encoder does not use.
_UNUSED_PREFIXES = ("quantizer.", "project_hid.", "project_q.", "lm_head.", "dropout_features.")
_PREFIX = "wav2vec2."
_POS_CONV = "encoder.pos_conv_embed.conv."
_WEIGHT_NORM = {  # legacy torch.nn.utils.weight_norm names -> parametrizations names
    _POS_CONV + "weight_g": _POS_CONV + "parametrizations.weight.original0",
    _POS_CONV + "weight_v": _POS_CONV + "parametrizations.weight.original1",
}
# Used only by SpecAugment in training; absent from the model when masking is disabled.
_MASK_EMBED = "masked_spec_embed"


# ----------------------------------------------------------------------------- config + converter

def full_size_config() -> Wav2Vec2Config:
    """``Wav2Vec2Config`` of chinese-wav2vec2-base (12 layers x 768, conv 7 x 512, post-LN)."""
    return Wav2Vec2Config(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
        conv_bias=False, feat_extract_norm="group", feat_extract_activation="gelu", hidden_act="gelu",
        do_stable_layer_norm=False, layer_norm_eps=1e-5, num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16, mask_time_prob=0.05,
    )


def convert_wav2vec2_key(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map one checkpoint tensor to its ``Wav2Vec2Model`` name ([] for pre-training heads).

    Accepts ``Wav2Vec2ForPreTraining`` (``wav2vec2.``-prefixed) and bare ``Wav2Vec2Model`` keys, and
    both weight-norm spellings. Unknown keys pass through, so the loader reports them.
    """
    if key.startswith(_UNUSED_PREFIXES):
        return []
    if key.startswith(_PREFIX):
        key = key[len(_PREFIX):]
    return [(_WEIGHT_NORM.get(key, key), tensor)]


def build_wav2vec2_on_meta(config: Wav2Vec2Config) -> Wav2Vec2Model:
    """An eval-mode ``Wav2Vec2Model`` (eager attention, as the reference) with tensors on ``meta``."""
    config._attn_implementation = "eager"
    return build_on_meta(lambda: Wav2Vec2Model(config)).eval().requires_grad_(False)


def load_wav2vec2_weights(model: Wav2Vec2Model, items: Iterable[SourceItem], *,
                          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          dry_run: bool = False) -> LoadReport:
    """Stream checkpoint tensors into ``model`` (built on meta); strict except ``masked_spec_embed``."""
    has_mask_embed = _MASK_EMBED in dict(model.named_parameters(remove_duplicate=False))

    def convert(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        out = convert_wav2vec2_key(key, tensor)
        return [(k, t) for k, t in out if k != _MASK_EMBED or has_mask_embed]

    report = load_converted(model, items, convert, component="wav2vec2 audio encoder", dtype=dtype,
                            device=device, ignore_target=lambda name: name == _MASK_EMBED,
                            dry_run=dry_run)
    if not dry_run:
        materialize_remaining(model, device)  # masked_spec_embed when the file lacks it (unused)
    return report


def find_weight_file(wav2vec_dir: Path) -> Path:
    for name in WAV2VEC_WEIGHT_FILES:
        if (wav2vec_dir / name).is_file():
            return wav2vec_dir / name
    raise CheckpointError(f"wav2vec2 weights not found (expected {' or '.join(WAV2VEC_WEIGHT_FILES)}); "
                          f"{_DOWNLOAD_HINT}", file=str(wav2vec_dir / WAV2VEC_WEIGHT_FILES[0]))


def _iter_weights(path: Path) -> Iterable[SourceItem]:
    return read_safetensors(path) if path.suffix == ".safetensors" else iter_torch_file(path)


# ----------------------------------------------------------------------------- encoder

class AudioEncoder:
    """Feature extractor + wav2vec2 producing per-video-frame speech embeddings."""

    def __init__(self, model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor):
        self.model = model
        self.feature_extractor = feature_extractor

    full_size_config = staticmethod(full_size_config)

    @property
    def device(self) -> torch.device:
        return self.model.feature_projection.projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.feature_projection.projection.weight.dtype

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def receptive_field(self) -> int:
        """Samples one conv feature frame sees (400 for the wav2vec2 conv stack)."""
        field = 1
        for kernel, stride in reversed(list(zip(self.model.config.conv_kernel, self.model.config.conv_stride))):
            field = (field - 1) * stride + kernel
        return field

    @classmethod
    def from_pretrained(cls, wav2vec_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> AudioEncoder:
        """Load an HF-format wav2vec2 folder (e.g. ``chinese-wav2vec2-base``)."""
        wav2vec_dir = Path(wav2vec_dir)
        if not wav2vec_dir.is_dir():
            raise CheckpointError(f"wav2vec2 folder not found; {_DOWNLOAD_HINT}", file=str(wav2vec_dir))
        for name in ("config.json", WAV2VEC_PREPROCESSOR_FILE):
            if not (wav2vec_dir / name).is_file():
                raise CheckpointError(f"wav2vec2 {name} not found; {_DOWNLOAD_HINT}",
                                      file=str(wav2vec_dir / name))
        weights = find_weight_file(wav2vec_dir)
        try:
            config = Wav2Vec2Config.from_pretrained(str(wav2vec_dir))
            feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(wav2vec_dir))
        except Exception as exc:
            raise CheckpointError(f"cannot read the wav2vec2 configuration ({exc})",
                                  file=str(wav2vec_dir)) from exc
        model = build_wav2vec2_on_meta(config)
        load_wav2vec2_weights(model, _iter_weights(weights), dtype=dtype, device=device)
        return cls(model, feature_extractor)

    # ------------------------------------------------------------------------- forward pieces

    def input_values(self, speech: np.ndarray, field: str = "cond_audio") -> torch.Tensor:
        """Feature-extractor output ``[1, N]`` (float32, normalised iff ``do_normalize``)."""
        speech = np.asarray(speech)
        if speech.ndim != 1:
            raise UserInputError(field, f"speech must be a mono 1-D array, got shape {speech.shape}",
                                 "average the channels first (multitalk.media.audio.load_speech)")
        if len(speech) < self.receptive_field:
            raise UserInputError(
                field, f"the audio is too short ({len(speech)} samples at 16 kHz; the audio encoder "
                       f"needs at least {self.receptive_field})", "provide at least 0.04 s of speech")
        if not np.all(np.isfinite(speech)):
            raise UserInputError(field, "the audio contains NaN or infinite samples",
                                 "re-export the audio as ordinary PCM (e.g. 16-bit WAV)")
        values = self.feature_extractor(speech, sampling_rate=SAMPLE_RATE).input_values
        values = np.squeeze(np.asarray(values, dtype=np.float32))
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(1, -1)

    @torch.inference_mode()
    def conv_features(self, speech: np.ndarray, frames: int | None = None,
                      field: str = "cond_audio") -> torch.Tensor:
        """Conv feature-encoder output ``[T50, C]`` (50 Hz), or interpolated to ``frames`` rows."""
        feats = self._conv_features(self.input_values(speech, field))
        if frames is not None:
            feats = _interpolate(feats, frames)
        return feats[0].float().cpu()

    @torch.inference_mode()
    def embed(self, speech: np.ndarray, fps: int = 25, field: str = "cond_audio") -> torch.Tensor:
        """Speech (16 kHz mono) -> ``[frames, layers, channels]`` float32 on CPU.

        ``frames = int(len(speech) / 16000 * fps)``, the official video length of the audio.
        """
        frames = int(len(speech) / SAMPLE_RATE * fps)
        if frames < 1:
            need = max(self.receptive_field, math.ceil(SAMPLE_RATE / fps))
            raise UserInputError(field, f"the audio is too short ({len(speech)} samples at 16 kHz "
                                        f"make no video frame at {fps} fps)",
                                 f"provide at least {need} samples ({need / SAMPLE_RATE:.3f} s)")
        feats = _interpolate(self._conv_features(self.input_values(speech, field)), frames)
        hidden, _ = self.model.feature_projection(feats)
        layers = self._encoder_layer_outputs(hidden)
        return torch.stack(layers, dim=2)[0].float().cpu()

    def _conv_features(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(device=self.device, dtype=self.dtype)
        return self.model.feature_extractor(values).transpose(1, 2)  # [1, T50, C]

    def _encoder_layer_outputs(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """``hidden_states[1:]`` of the transformers 4.x encoder (no mask, eval mode)."""
        encoder = self.model.encoder
        hidden = hidden + encoder.pos_conv_embed(hidden)
        if self.model.config.do_stable_layer_norm:
            # pre-LN encoder: states are layer inputs; the last one is layer_norm(final output)
            outputs = []
            for layer in encoder.layers:
                hidden = layer(hidden, attention_mask=None)
                outputs.append(hidden)
            outputs[-1] = encoder.layer_norm(outputs[-1])
            return outputs
        hidden = encoder.layer_norm(hidden)
        outputs = []
        for layer in encoder.layers:
            hidden = layer(hidden, attention_mask=None)
            outputs.append(hidden)
        return outputs


def _interpolate(feats: torch.Tensor, frames: int) -> torch.Tensor:
    """The reference ``linear_interpolation``: ``[B, T, C]`` -> ``[B, frames, C]``, align_corners."""
    return F.interpolate(feats.transpose(1, 2), size=frames, mode="linear",
                         align_corners=True).transpose(1, 2)


__all__ = ["AudioEncoder", "build_wav2vec2_on_meta", "convert_wav2vec2_key", "full_size_config",
           "load_wav2vec2_weights"]
