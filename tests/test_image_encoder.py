"""CLIP image encoder against golden section (c), the key converter, and the full-size layout on meta."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import rel_l2

from multitalk.errors import CheckpointError, UserInputError
from multitalk.media.image import cond_image_from_uint8
from multitalk.models.architecture import FULL_14B, TINY
from multitalk.models.checkpoint import meta_items
from multitalk.models.image_encoder import (
    ImageEncoder,
    build_clip_on_meta,
    check_clip_shapes,
    clip_converter,
    load_clip_weights,
)
from multitalk.models.official_files import CLIP_FILE

CLIP_TOL = 1e-5  # golden README: CLIP features
CLIP_KEY = f"Wan2.1-I2V-14B-480P/{CLIP_FILE}"


@pytest.fixture(scope="module")
def encoder(tiny_ckpt_dir) -> ImageEncoder:
    return ImageEncoder.from_checkpoint(tiny_ckpt_dir)


@pytest.fixture(scope="module")
def image_vectors(golden_vectors):
    return golden_vectors("image_vae")


def _frame(image_vectors, name: str) -> torch.Tensor:
    return cond_image_from_uint8(image_vectors[f"{name}_cond_image_u8"][0, :, 0])  # [3, H, W]


@pytest.mark.parametrize("name", ["multi1", "single1", "multi3"])
def test_clip_features_match_reference(encoder, image_vectors, name):
    fea = encoder.encode(_frame(image_vectors, name))
    ref = image_vectors[f"{name}_clip_fea"]
    assert fea.dtype == torch.float32 and fea.shape == ref.shape == (1, 257, 32)
    err = rel_l2(fea, ref)
    print(f"{name}_clip_fea rel_l2={err:.2e}")
    assert err <= CLIP_TOL


def test_input_layouts_agree(encoder, image_vectors):
    frame = _frame(image_vectors, "multi1")
    single = encoder.encode(frame)
    # The pipeline's cond video [1, 3, T, H, W]: CLIP sees its last frame.
    video = torch.stack([torch.zeros_like(frame), frame], dim=1)[None]
    assert torch.equal(encoder.encode(video), single)
    batch = encoder.encode(torch.stack([frame, _frame(image_vectors, "single1")]))
    assert batch.shape == (2, 257, 32)
    assert rel_l2(batch[:1], single) <= 1e-6


def test_model_is_the_penultimate_block_tower(encoder):
    cfg = encoder.model.config
    assert len(encoder.model.encoder.layers) == TINY.clip.num_layers - 1
    assert cfg.hidden_act == "gelu" and cfg.layer_norm_eps == 1e-5
    assert isinstance(encoder.model.post_layernorm, torch.nn.Identity)
    assert torch.equal(encoder.model.embeddings.position_ids[0], torch.arange(257))


def test_fused_qkv_is_split_in_q_k_v_order():
    cfg = TINY.clip
    d = cfg.dim
    qkv = torch.arange(3 * d * d, dtype=torch.float32).view(3 * d, d)
    out = dict(clip_converter(cfg)("visual.transformer.0.attn.to_qkv.weight", qkv))
    assert torch.equal(out["encoder.layers.0.self_attn.q_proj.weight"], qkv[:d])
    assert torch.equal(out["encoder.layers.0.self_attn.k_proj.weight"], qkv[d:2 * d])
    assert torch.equal(out["encoder.layers.0.self_attn.v_proj.weight"], qkv[2 * d:])
    convert = clip_converter(cfg)
    last = f"visual.transformer.{cfg.num_layers - 1}.mlp.0.weight"
    for ignored in (last, "visual.head", "visual.post_norm.weight", "textual.head.0.weight", "log_scale"):
        assert convert(ignored, torch.zeros(1)) == []
    assert convert("visual.cls_embedding", torch.zeros(1, 1, d))[0][1].shape == (d,)


def test_full_size_layout_on_meta(full_manifest):
    entry = full_manifest[CLIP_KEY]
    assert entry["dtype"] == "float16"
    shapes = entry["keys"]  # whole XLMRobertaCLIP: visual.*, textual.*, log_scale
    cfg = FULL_14B.clip
    check_clip_shapes(cfg, shapes)
    model = build_clip_on_meta(cfg)
    assert len(model.encoder.layers) == 31
    report = load_clip_weights(model, meta_items(shapes, CLIP_FILE), cfg, dry_run=True)
    assert report.ok, report.summary()
    assert not (report.missing or report.unexpected or report.mismatched)
    n_visual = sum(k.startswith("visual.") for k in shapes)
    # 31 of 32 blocks, 12 official tensors each (fused qkv weight/bias -> 6) + 5 embedding/pre-norm.
    assert len(report.loaded) == 31 * 16 + 5
    assert n_visual == 32 * 12 + 5 + 3  # + head, post_norm.{weight,bias}


def test_wrong_architecture_is_a_checkpoint_error(tiny_ckpt_dir):
    with pytest.raises(CheckpointError) as e:
        ImageEncoder.from_checkpoint(tiny_ckpt_dir, arch=FULL_14B)
    assert e.value.key == "visual.patch_embedding.weight" and e.value.expected == (1280, 3, 14, 14)


def test_missing_file_is_a_checkpoint_error(tmp_path, tiny_ckpt_dir):
    shutil.copy(tiny_ckpt_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError) as e:
        ImageEncoder.from_checkpoint(tmp_path)
    assert CLIP_FILE in str(e.value)


def test_block_count_mismatch_is_reported():
    shapes = {k: v for k, v in _tiny_shapes().items() if not k.startswith("visual.transformer.1.")}
    with pytest.raises(CheckpointError, match="1 vision blocks"):
        check_clip_shapes(TINY.clip, shapes)


def _tiny_shapes() -> dict[str, tuple]:
    d, p = TINY.clip.dim, TINY.clip.patch_size
    shapes = {"visual.patch_embedding.weight": (d, 3, p, p), "visual.pos_embedding": (1, 257, d)}
    for i in range(TINY.clip.num_layers):
        shapes[f"visual.transformer.{i}.mlp.0.weight"] = (4 * d, d)
    return shapes


@pytest.mark.parametrize("bad", [torch.zeros(4, 32, 32), torch.zeros(1, 1, 32, 32),
                                 torch.zeros(3, 32, 32, dtype=torch.uint8), "frame.png"])
def test_bad_frames(encoder, bad):
    with pytest.raises(UserInputError) as e:
        encoder.encode(bad)
    assert e.value.field == "cond_image"
