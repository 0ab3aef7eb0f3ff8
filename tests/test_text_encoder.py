"""umT5 text encoder + tokenizer against golden section (b), and the full-size layout on meta."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import rel_l2

from multitalk.errors import CheckpointError, UserInputError
from multitalk.models.architecture import FULL_14B, SAMPLE_NEG_PROMPT, detect_architecture
from multitalk.models.checkpoint import meta_items
from multitalk.models.official_files import T5_FILE, TOKENIZER_DIR
from multitalk.models.text_encoder import (
    TextEncoder,
    build_umt5_on_meta,
    check_t5_shapes,
    clean_text,
    convert_t5_key,
    load_t5_weights,
)

CONTEXT_TOL = 1e-5  # golden README: T5 context

# wan/configs/shared_config.py: wan_shared_cfg.sample_neg_prompt (the Chinese default).
NEG_SHARED_ZH = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@pytest.fixture(scope="module")
def texts(examples) -> dict[str, str]:
    def prompt(name):
        return json.loads((examples / name).read_text())["prompt"]

    return {
        "prompt_single1": prompt("single_example_1.json"),
        "prompt_multi1": prompt("multitalk_example_1.json"),
        "neg_multitalk": SAMPLE_NEG_PROMPT,
        "neg_shared_zh": NEG_SHARED_ZH,
    }


@pytest.fixture(scope="module")
def encoder(tiny_ckpt_dir) -> TextEncoder:
    return TextEncoder.from_checkpoint(tiny_ckpt_dir)


@pytest.fixture(scope="module")
def text_vectors(golden_vectors):
    return golden_vectors("text")


def test_clean_text_matches_official_rules():
    # ftfy repairs mojibake, HTML entities are unescaped twice, whitespace runs collapse.
    assert clean_text("  caf\u00c3\u00a9  ") == "caf\u00e9"
    assert clean_text("fish &amp;amp; chips") == "fish & chips"
    assert clean_text("a\t\tb\n\nc\u3000 d ") == "a b c d"
    assert clean_text("&lt;b&gt;") == "<b>"


def test_reconstructed_negative_prompts_are_the_golden_texts(texts, golden_scalars):
    recorded = golden_scalars["text"]["texts"]
    assert texts["neg_shared_zh"] == recorded["neg_shared_zh"]
    assert texts["neg_multitalk"] == recorded["neg_multitalk"]


@pytest.mark.parametrize("name", ["prompt_single1", "prompt_multi1", "neg_multitalk", "neg_shared_zh"])
def test_token_ids_and_mask_exact(encoder, texts, text_vectors, golden_scalars, name):
    ids, mask = encoder.tokenize([texts[name]])
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids.shape == mask.shape == (1, 512)
    assert torch.equal(ids[0], text_vectors[f"{name}_ids"])
    assert torch.equal(mask[0], text_vectors[f"{name}_mask"])
    assert int(mask.sum()) == golden_scalars["text"][name]["seq_len"]


@pytest.mark.parametrize("batch", [("prompt_single1", "neg_multitalk"),
                                   ("prompt_multi1", "neg_multitalk"),
                                   ("neg_shared_zh",)])
def test_context_matches_golden(encoder, texts, text_vectors, batch):
    contexts = encoder.encode([texts[n] for n in batch])
    assert len(contexts) == len(batch)
    for name, ctx in zip(batch, contexts):
        ref = text_vectors[f"{name}_context"]
        assert ctx.shape == ref.shape, name  # trimmed to its own length
        err = rel_l2(ctx, ref)
        assert err < CONTEXT_TOL, f"{name}: rel L2 {err:.2e}"


def test_embedding_is_tied_after_loading(encoder):
    assert encoder.model.encoder.embed_tokens.weight is encoder.model.shared.weight
    assert all(p.device.type == "cpu" for p in encoder.model.parameters())


def test_bfloat16_load_casts_every_tensor(tiny_ckpt_dir, texts, text_vectors):
    enc = TextEncoder.from_checkpoint(tiny_ckpt_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    (ctx,) = enc.encode([texts["neg_shared_zh"]])
    assert ctx.dtype == torch.bfloat16
    # bf16 is not held to the float32 tolerance; it must still be the same function.
    assert rel_l2(ctx.float(), text_vectors["neg_shared_zh_context"]) < 5e-2


def test_bad_text_input_is_a_user_error(encoder):
    with pytest.raises(UserInputError) as exc:
        encoder.encode([])
    assert exc.value.field == "prompt"
    with pytest.raises(UserInputError):
        encoder.tokenize(["ok", 3])


def test_converter_maps_official_names():
    t = torch.empty(1)
    ffn = "encoder.block.7.layer.1.DenseReluDense"
    assert convert_t5_key("blocks.7.ffn.gate.0.weight", t)[0][0] == f"{ffn}.wi_0.weight"
    assert convert_t5_key("blocks.7.ffn.fc1.weight", t)[0][0] == f"{ffn}.wi_1.weight"
    assert convert_t5_key("blocks.7.ffn.fc2.weight", t)[0][0] == f"{ffn}.wo.weight"
    assert convert_t5_key("norm.weight", t)[0][0] == "encoder.final_layer_norm.weight"
    assert convert_t5_key("head.weight", t)[0][0] == "head.weight"  # unknown -> reported unexpected
    assert (convert_t5_key("blocks.0.pos_embedding.embedding.weight", t)[0][0]
            == "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    assert convert_t5_key("token_embedding.weight", t)[0][0] == "shared.weight"


def test_full_size_layout_converts_on_meta(full_manifest):
    keys = full_manifest[f"Wan2.1-I2V-14B-480P/{T5_FILE}"]["keys"]
    check_t5_shapes(FULL_14B.t5, keys)
    model = build_umt5_on_meta(FULL_14B.t5)
    report = load_t5_weights(model, meta_items(keys), dry_run=True)
    assert report.ok, report.summary()
    assert not report.missing and not report.unexpected and not report.mismatched
    assert len(report.loaded) == len(keys) == 242


def test_architecture_mismatch_is_caught_before_building(tiny_ckpt_dir):
    full = detect_architecture(tiny_ckpt_dir, name=FULL_14B.name)
    with pytest.raises(CheckpointError) as exc:
        TextEncoder.from_checkpoint(tiny_ckpt_dir, arch=full)
    assert exc.value.key == "token_embedding.weight"
    assert exc.value.expected == (FULL_14B.t5.vocab_size, FULL_14B.t5.dim)


def _copy_layout(src, dst):
    """The tiny folder with symlinked files, so one file can be replaced."""
    dst.mkdir()
    for p in src.iterdir():
        os.symlink(p, dst / p.name)
    return dst


def test_truncated_checkpoint_names_the_file(tiny_ckpt_dir, tmp_path):
    ckpt = _copy_layout(tiny_ckpt_dir, tmp_path / "ckpt")
    data = (tiny_ckpt_dir / T5_FILE).read_bytes()
    (ckpt / T5_FILE).unlink()
    (ckpt / T5_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        TextEncoder.from_checkpoint(ckpt)
    assert exc.value.file and exc.value.file.endswith(T5_FILE)


def test_missing_files_say_what_to_download(tiny_ckpt_dir, tmp_path):
    ckpt = _copy_layout(tiny_ckpt_dir, tmp_path / "ckpt")
    (ckpt / T5_FILE).unlink()
    with pytest.raises(CheckpointError, match="download") as exc:
        TextEncoder.from_checkpoint(ckpt)
    assert exc.value.file == str(ckpt / T5_FILE)

    ckpt2 = _copy_layout(tiny_ckpt_dir, tmp_path / "ckpt2")
    (ckpt2 / "google").unlink()
    with pytest.raises(CheckpointError, match="download") as exc:
        TextEncoder.from_checkpoint(ckpt2)
    assert exc.value.file == str(ckpt2 / TOKENIZER_DIR)


def test_corrupt_tokenizer_is_a_checkpoint_error(tiny_ckpt_dir, tmp_path):
    ckpt = _copy_layout(tiny_ckpt_dir, tmp_path / "ckpt")
    (ckpt / "google").unlink()
    tok = ckpt / TOKENIZER_DIR
    shutil.copytree(tiny_ckpt_dir / TOKENIZER_DIR, tok)
    for p in tok.iterdir():
        p.chmod(0o644)
    (tok / "tokenizer.json").write_text("{not json")
    (tok / "spiece.model").write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as exc:
        TextEncoder.from_checkpoint(ckpt)
    assert exc.value.file == str(tok)
