"""wav2vec2 audio encoder (models/audio_encoder.py): golden section a embeddings, loading, errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import rel_l2

from multitalk.errors import CheckpointError, UserInputError
from multitalk.models.audio_encoder import (
    AudioEncoder,
    build_wav2vec2_on_meta,
    convert_wav2vec2_key,
    load_wav2vec2_weights,
)
from multitalk.models.checkpoint import meta_items, read_safetensors

TOL = 1e-5  # README: conv features and wav2vec2 embeddings

# golden embedding name -> speech array it was computed from
EMBEDDINGS = {
    "single1": "single1_speech",
    "multi1_add_1": "multi1_add_speech1",
    "multi1_add_2": "multi1_add_speech2",
    "multi1_para_1": "multi1_para_speech1",
    "multi1_para_2": "multi1_para_speech2",
    "multi3_para_1": "multi3_para_speech1",
    "multi3_para_2": "multi3_para_speech2",
}


@pytest.fixture(scope="module")
def encoder(tiny_wav2vec_dir) -> AudioEncoder:
    return AudioEncoder.from_pretrained(tiny_wav2vec_dir)


def _copy_folder(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


# --- golden section a -----------------------------------------------------------------------------

def test_conv_features_match_golden(encoder, golden_vectors):
    vec = golden_vectors("audio")
    speech = vec["single1_speech"].numpy()
    f50 = encoder.conv_features(speech)
    assert f50.shape == (533, 32) == ((len(speech) - 400) // 320 + 1, 32)
    assert rel_l2(f50, vec["single1_conv_features_50hz"]) < TOL
    f25 = encoder.conv_features(speech, frames=267)
    assert rel_l2(f25, vec["single1_conv_features_25hz"]) < TOL


@pytest.mark.parametrize("name", list(EMBEDDINGS))
def test_embedding_matches_golden(encoder, golden_vectors, golden_scalars, name):
    vec = golden_vectors("audio")
    emb = encoder.embed(vec[EMBEDDINGS[name]].numpy(), fps=25)
    ref = vec[f"{name}_emb"]
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert emb.shape == tuple(ref.shape) == tuple(golden_scalars["audio"]["embeddings"][name]["shape"])
    assert emb.shape[0] == golden_scalars["audio"]["embeddings"][name]["expected_frames"]
    assert rel_l2(emb, ref) < TOL


def test_embedding_from_example_file(encoder, examples, golden_vectors):
    """End to end: file -> load_speech -> embed equals the golden embedding."""
    from multitalk.media.audio import load_speech

    emb = encoder.embed(load_speech(examples / "single" / "1.wav"))
    assert rel_l2(emb, golden_vectors("audio")["single1_emb"]) < TOL


def test_do_normalize_from_preprocessor_config(tiny_wav2vec_dir, tmp_path, golden_vectors, encoder):
    folder = _copy_folder(tiny_wav2vec_dir, tmp_path / "w2v")
    cfg_path = folder / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["do_normalize"] is False
    cfg["do_normalize"] = True
    cfg_path.write_text(json.dumps(cfg))
    normalizing = AudioEncoder.from_pretrained(folder)
    vec = golden_vectors("audio")
    speech = vec["single1_speech"].numpy()
    ref = vec["single1_emb_do_normalize"]
    assert rel_l2(normalizing.embed(speech), ref) < TOL
    assert rel_l2(encoder.embed(speech), ref) > 1e-3  # the setting really changes the result


def test_layer_outputs_follow_transformers(encoder):
    """Without interpolation (frames == conv frames), the last embedding layer is the model's output."""
    rng = np.random.default_rng(0)
    speech = (0.1 * rng.standard_normal(320 * 100 + 100)).astype(np.float32)
    emb = encoder.embed(speech, fps=50)  # 100 frames == floor((N - 400) / 320) + 1
    assert emb.shape == (100, 2, 32)
    with torch.inference_mode():
        out = encoder.model(encoder.input_values(speech))
    assert rel_l2(emb[:, -1], out.last_hidden_state[0]) < 1e-6


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 399])
def test_speech_shorter_than_receptive_field(encoder, n):
    assert encoder.receptive_field == 400
    with pytest.raises(UserInputError) as e:
        encoder.embed(np.full(n, 0.1, np.float32))
    assert e.value.field == "cond_audio" and "too short" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserInputError, match="too short"):
        encoder.conv_features(np.full(n, 0.1, np.float32))


def test_speech_too_short_for_one_frame(encoder):
    with pytest.raises(UserInputError, match="too short"):
        encoder.embed(np.full(500, 0.1, np.float32), fps=25)  # 500 samples -> int(0.78) = 0 frames


def test_speech_with_nan(encoder):
    x = np.full(4000, 0.1, np.float32)
    x[7] = np.nan
    with pytest.raises(UserInputError, match="NaN"):
        encoder.embed(x)


# --- loading --------------------------------------------------------------------------------------

def test_converter_keys():
    t = torch.zeros(1)
    assert convert_wav2vec2_key("quantizer.codevectors", t) == []
    assert convert_wav2vec2_key("project_hid.weight", t) == []
    assert convert_wav2vec2_key("project_q.bias", t) == []
    assert convert_wav2vec2_key("wav2vec2.encoder.pos_conv_embed.conv.weight_g", t)[0][0] == \
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0"
    assert convert_wav2vec2_key("encoder.pos_conv_embed.conv.weight_v", t)[0][0] == \
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1"
    assert convert_wav2vec2_key("wav2vec2.encoder.layers.3.attention.q_proj.weight", t)[0][0] == \
        "encoder.layers.3.attention.q_proj.weight"


def test_loads_bare_pytorch_model_bin(encoder, tiny_wav2vec_dir, tmp_path, golden_vectors):
    """A ``Wav2Vec2Model`` dump (no prefix, parametrization names) in ``pytorch_model.bin`` loads too."""
    folder = _copy_folder(tiny_wav2vec_dir, tmp_path / "w2v", skip=("model.safetensors",))
    torch.save(encoder.model.state_dict(), folder / "pytorch_model.bin")
    other = AudioEncoder.from_pretrained(folder)
    vec = golden_vectors("audio")
    assert rel_l2(other.embed(vec["multi1_para_speech1"].numpy()), vec["multi1_para_1_emb"]) < TOL


def test_missing_folder_and_files(tiny_wav2vec_dir, tmp_path):
    with pytest.raises(CheckpointError, match="folder not found"):
        AudioEncoder.from_pretrained(tmp_path / "nowhere")
    no_weights = _copy_folder(tiny_wav2vec_dir, tmp_path / "a", skip=("model.safetensors",))
    with pytest.raises(CheckpointError) as e:
        AudioEncoder.from_pretrained(no_weights)
    assert "model.safetensors" in str(e.value) and e.value.file
    no_config = _copy_folder(tiny_wav2vec_dir, tmp_path / "b", skip=("config.json",))
    with pytest.raises(CheckpointError, match="config.json"):
        AudioEncoder.from_pretrained(no_config)
    no_pre = _copy_folder(tiny_wav2vec_dir, tmp_path / "c", skip=("preprocessor_config.json",))
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        AudioEncoder.from_pretrained(no_pre)


def test_shape_mismatch_names_key(tiny_wav2vec_dir, tmp_path):
    folder = _copy_folder(tiny_wav2vec_dir, tmp_path / "w2v")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        AudioEncoder.from_pretrained(folder)
    assert "intermediate_dense" in e.value.key
    assert e.value.expected[0] == 48 and e.value.got[0] == 64
    assert e.value.file == "model.safetensors"


# --- full size on meta ------------------------------------------------------------------------------

def _pretraining_keys(layers: int, hidden: int, ffn: int, conv: int, groups: int = 16) -> dict[str, tuple]:
    """Key/shape listing of a ``Wav2Vec2ForPreTraining`` file (legacy weight-norm names)."""
    w = "wav2vec2."
    shapes = {w + "masked_spec_embed": (hidden,)}
    kernels = [10, 3, 3, 3, 3, 2, 2]
    for i, k in enumerate(kernels):
        shapes[f"{w}feature_extractor.conv_layers.{i}.conv.weight"] = (conv, 1 if i == 0 else conv, k)
    shapes[f"{w}feature_extractor.conv_layers.0.layer_norm.weight"] = (conv,)
    shapes[f"{w}feature_extractor.conv_layers.0.layer_norm.bias"] = (conv,)
    shapes[f"{w}feature_projection.layer_norm.weight"] = (conv,)
    shapes[f"{w}feature_projection.layer_norm.bias"] = (conv,)
    shapes[f"{w}feature_projection.projection.weight"] = (hidden, conv)
    shapes[f"{w}feature_projection.projection.bias"] = (hidden,)
    shapes[f"{w}encoder.pos_conv_embed.conv.weight_g"] = (1, 1, 128)
    shapes[f"{w}encoder.pos_conv_embed.conv.weight_v"] = (hidden, hidden // groups, 128)
    shapes[f"{w}encoder.pos_conv_embed.conv.bias"] = (hidden,)
    shapes[f"{w}encoder.layer_norm.weight"] = (hidden,)
    shapes[f"{w}encoder.layer_norm.bias"] = (hidden,)
    for i in range(layers):
        p = f"{w}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}attention.{proj}.weight"] = (hidden, hidden)
            shapes[f"{p}attention.{proj}.bias"] = (hidden,)
        for norm in ("layer_norm", "final_layer_norm"):
            shapes[f"{p}{norm}.weight"] = (hidden,)
            shapes[f"{p}{norm}.bias"] = (hidden,)
        shapes[f"{p}feed_forward.intermediate_dense.weight"] = (ffn, hidden)
        shapes[f"{p}feed_forward.intermediate_dense.bias"] = (ffn,)
        shapes[f"{p}feed_forward.output_dense.weight"] = (hidden, ffn)
        shapes[f"{p}feed_forward.output_dense.bias"] = (hidden,)
    # pre-training heads (ignored by the loader); chinese-wav2vec2-base sizes
    shapes.update({"quantizer.codevectors": (1, 640, 128), "quantizer.weight_proj.weight": (640, conv),
                   "quantizer.weight_proj.bias": (640,), "project_hid.weight": (256, hidden),
                   "project_hid.bias": (256,), "project_q.weight": (256, 256), "project_q.bias": (256,)})
    return shapes


def test_synthetic_key_pattern_is_the_tiny_files(tiny_wav2vec_dir):
    """The full-size listing below follows the real file's key pattern (checked on the tiny file)."""
    weights = tiny_wav2vec_dir / "model.safetensors"
    tiny = {k: tuple(t.shape) for k, t, _ in read_safetensors(weights)}
    synthetic = _pretraining_keys(layers=2, hidden=32, ffn=64, conv=32)
    heads = re.compile(r"(quantizer|project_hid|project_q)\.")
    assert set(tiny) == set(synthetic)
    assert {k: v for k, v in tiny.items() if not heads.match(k)} == \
        {k: v for k, v in synthetic.items() if not heads.match(k)}


def test_full_size_layout_on_meta():
    config = AudioEncoder.full_size_config()
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (12, 768, 3072)
    model = build_wav2vec2_on_meta(config)
    # (transformers allocates the 768-float masked_spec_embed with the legacy torch.Tensor constructor)
    assert {n for n, p in model.named_parameters() if p.device.type != "meta"} <= {"masked_spec_embed"}
    items = meta_items({k: list(v) for k, v in _pretraining_keys(12, 768, 3072, 512).items()},
                       file="model.safetensors")
    report = load_wav2vec2_weights(model, items, dry_run=True)
    assert report.ok, report.summary()
    assert not report.missing and not report.unexpected and not report.mismatched
    assert len(report.loaded) == len(model.state_dict()) == 1 + 7 + 2 + 4 + 3 + 2 + 12 * 16
    # 12 layers x 768 is what the DiT's AudioProjModel(blocks=12, channels=768) consumes
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(94.4e6, rel=0.01)
