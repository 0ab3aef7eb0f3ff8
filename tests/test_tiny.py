"""The tiny checkpoint writer: official layout, golden key/shape maps, determinism, loadability."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from multitalk.models import key_schema, official_files, tiny
from multitalk.models.architecture import FULL_14B, TINY, detect_architecture


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_a")
    tiny.write_tiny_checkpoints(out, seed=0)
    return out


@pytest.fixture(scope="module")
def written_again(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_b")
    tiny.write_tiny_checkpoints(out, seed=0)
    return out


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _key_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_every_weight_file_matches_golden_key_shapes(written, golden):
    layout = tiny.tiny_file_layout()
    assert len(layout) == 7
    for rel, expected in layout.items():
        ours = _key_shapes(written / rel)
        assert ours == dict(expected), rel
        theirs = _key_shapes(golden / "weights" / rel)
        assert ours == theirs, f"{rel}: {sorted(set(ours.items()) ^ set(theirs.items()))[:5]}"


def test_weight_files_are_float32(written):
    for rel in tiny.tiny_file_layout():
        path = written / rel
        if path.suffix == ".pth":
            sd = torch.load(str(path), weights_only=True)
            assert {v.dtype for v in sd.values()} == {torch.float32}, rel
        else:
            from safetensors.torch import load_file

            assert {v.dtype for v in load_file(str(path)).values()} == {torch.float32}, rel


@pytest.mark.parametrize("rel", [
    f"{tiny.CKPT_FOLDER}/config.json",
    f"{tiny.CKPT_FOLDER}/{official_files.INDEX_FILE}",
    f"{tiny.CKPT_FOLDER}/{official_files.TOKENIZER_DIR}/tokenizer_config.json",
    f"{tiny.CKPT_FOLDER}/{official_files.TOKENIZER_DIR}/special_tokens_map.json",
    f"{tiny.WAV2VEC_FOLDER}/config.json",
    f"{tiny.WAV2VEC_FOLDER}/preprocessor_config.json",
])
def test_json_files_equal_golden(written, golden, rel):
    ours = json.loads((written / rel).read_text())
    theirs = json.loads((golden / "weights" / rel).read_text())
    assert ours == theirs


def test_same_file_set_as_golden(written, golden):
    ours = {p for p in _files(written) if not p.startswith(".")}
    theirs = set(_files(golden / "weights")) - {"tiny_spec.json"}
    assert ours == theirs


def test_two_runs_give_identical_bytes(written, written_again):
    a, b = _files(written), _files(written_again)
    assert len(a) == 16  # 15 checkpoint files + the stamp
    assert a == b


def test_seed_changes_weights_not_layout(tmp_path, written):
    ckpt, _ = tiny.write_tiny_checkpoints(tmp_path, seed=1)
    rel = f"{tiny.CKPT_FOLDER}/{official_files.MULTITALK_FILE}"
    assert _key_shapes(tmp_path / rel) == _key_shapes(written / rel)
    assert _files(tmp_path)[rel] != _files(written)[rel]
    assert json.loads((tmp_path / tiny.STAMP_NAME).read_text())["seed"] == 1


def test_up_to_date_copy_is_reused_and_stale_one_rewritten(tmp_path, monkeypatch):
    ckpt, _ = tiny.write_tiny_checkpoints(tmp_path)
    cfg = ckpt / "config.json"
    before = cfg.stat().st_mtime_ns
    calls = []
    real = tiny._write_all
    monkeypatch.setattr(tiny, "_write_all", lambda root, seed: calls.append(seed) or real(root, seed))
    tiny.write_tiny_checkpoints(tmp_path)
    assert calls == [] and cfg.stat().st_mtime_ns == before
    monkeypatch.setattr(tiny, "WRITER_VERSION", tiny.WRITER_VERSION + 1)
    tiny.write_tiny_checkpoints(tmp_path)
    assert calls == [0]
    assert json.loads((tmp_path / tiny.STAMP_NAME).read_text())["writer_version"] == tiny.WRITER_VERSION
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-")]  # temp dir removed


def test_default_dir_follows_multitalk_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MULTITALK_HOME", str(tmp_path))
    assert tiny.default_tiny_dir() == tmp_path / "tiny"
    monkeypatch.delenv("MULTITALK_HOME")
    assert tiny.default_tiny_dir() == Path.home() / ".cache" / "multitalk" / "tiny"


def test_detect_architecture_gives_tiny(written):
    assert detect_architecture(written / tiny.CKPT_FOLDER) == TINY


def test_tokenizer_loads_and_round_trips(written):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(written / tiny.CKPT_FOLDER / official_files.TOKENIZER_DIR))
    assert type(tok).__name__ == "T5Tokenizer"
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) <= TINY.t5.vocab_size
    text = "A man and a woman talk in a cozy studio, smiling warmly."
    enc = tok(text, padding="max_length", max_length=32, truncation=True)
    ids = enc.input_ids
    n = sum(enc.attention_mask)
    assert ids[n - 1] == 1 and ids[n:] == [0] * (32 - n)
    assert 2 not in ids  # every character is covered by the corpus
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_json_agrees_with_sentencepiece_model(written):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = written / tiny.CKPT_FOLDER / official_files.TOKENIZER_DIR
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    tok = AutoTokenizer.from_pretrained(str(folder))
    text = "Two friends sit on a bench in the park; the sky is clear."
    assert tok(text).input_ids == sp.encode(text) + [1]
    assert sp.get_piece_size() == len(tok)


def test_key_shapes_reproduce_full_size_manifest(full_manifest):
    dit = key_schema.dit_key_shapes(FULL_14B.dit)
    expected = {
        "MeiGen-MultiTalk/multitalk.safetensors":
            {k: s for k, s in dit.items() if official_files.is_audio_key(k)},
        "Wan2.1-I2V-14B-480P/diffusion_pytorch_model-*.safetensors":
            {k: s for k, s in dit.items() if not official_files.is_audio_key(k)},
        "Wan2.1-I2V-14B-480P/Wan2.1_VAE.pth": key_schema.vae_key_shapes(FULL_14B.vae),
        "Wan2.1-I2V-14B-480P/models_t5_umt5-xxl-enc-bf16.pth": key_schema.t5_key_shapes(FULL_14B.t5),
        "Wan2.1-I2V-14B-480P/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth":
            key_schema.clip_key_shapes(FULL_14B.clip, key_schema.CLIPTextTower()),
    }
    for name, shapes in expected.items():
        manifest = {k: tuple(v) for k, v in full_manifest[name]["keys"].items()}
        assert dict(shapes) == manifest, name
        assert sum(math.prod(s) for s in shapes.values()) == full_manifest["_notes"]["params"][name]


@pytest.mark.parametrize("numbers", [key_schema.TINY_WAV2VEC2, key_schema.Wav2Vec2Numbers()], ids=["tiny", "base"])
def test_wav2vec2_keys_match_transformers_pretraining_model(numbers):
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    cfg = Wav2Vec2Config(**{k: v for k, v in tiny.wav2vec2_config(numbers).items()
                            if not k.startswith("_")})
    with torch.device("meta"):
        model = Wav2Vec2ForPreTraining(cfg)
    legacy = {"parametrizations.weight.original0": "weight_g",
              "parametrizations.weight.original1": "weight_v"}
    hf = {}
    for k, v in model.state_dict().items():
        for new, old in legacy.items():
            k = k.replace(new, old)
        hf[k] = tuple(v.shape)
    assert hf == dict(key_schema.wav2vec2_key_shapes(numbers))


def test_initialisation_scheme(written):
    from safetensors.torch import load_file

    ck = written / tiny.CKPT_FOLDER
    base = load_file(str(ck / tiny.DIT_SHARDS[0]))
    w = base["blocks.0.ffn.0.weight"]  # [256, 64]
    assert abs(w.std().item() * math.sqrt(64) - 1) < 0.05
    assert abs(base["blocks.0.norm3.weight"].mean().item() - 1) < 0.05
    assert 0.07 < base["blocks.0.self_attn.q.bias"].std().item() < 0.13
    assert abs(base["blocks.0.modulation"].std().item() * 8 - 1) < 0.15
    # time embedding: low-frequency columns (k near 127 of each half) carry the energy
    te = base["time_embedding.0.weight"]
    col = te.pow(2).sum(0)
    assert col[120:128].sum() > 50 * col[:8].sum() and col[248:].sum() > 50 * col[128:136].sum()
    assert abs(te.pow(2).sum().item() / (64 * 256 / 256) - 1) < 0.1  # energy kept at N(0, 1/256)
    vae = torch.load(str(ck / official_files.VAE_FILE), weights_only=True)
    head = vae["decoder.head.2.weight"]
    assert abs(head.std().item() * math.sqrt(8 * 27) / 0.35 - 1) < 0.15
    assert vae["decoder.head.2.bias"].abs().max() < 0.1


def test_vae_decodes_into_range(written):
    """Loaded through the real VAE loader, a random latent decodes to mostly unclipped pixels."""
    from multitalk.models.vae import WanVAE

    vae = WanVAE.from_checkpoint(written / tiny.CKPT_FOLDER)
    latent = torch.randn(16, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    video = vae.decode(latent)
    assert torch.isfinite(video).all()
    assert (video.abs() > 0.999).float().mean() < 0.01
    assert 0.05 < video.std().item() < 0.6
