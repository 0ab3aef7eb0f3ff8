"""Wan VAE: key conversion, loading errors and golden section d (encode / decode)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import rel_l2

from multitalk.errors import CheckpointError, UserInputError
from multitalk.models.architecture import FULL_14B, TINY
from multitalk.models.checkpoint import build_on_meta, iter_torch_file, meta_items
from multitalk.models.official_files import VAE_FILE
from multitalk.models.vae import (
    WanVAE,
    build_vae_model,
    convert_vae_key,
    load_vae_weights,
)

FULL_VAE = "Wan2.1-I2V-14B-480P/Wan2.1_VAE.pth"


@pytest.fixture(scope="module")
def tiny_vae(tiny_ckpt_dir) -> WanVAE:
    return WanVAE.from_checkpoint(tiny_ckpt_dir)


# --- golden section d -------------------------------------------------------------------------

def test_encode_matches_golden(tiny_vae, golden_vectors):
    """First-clip ``y`` latent: cond image as frame 0 + 8 zero frames at 448x896 (the acceptance test)."""
    vec = golden_vectors("image_vae")
    cond = vec["multi1_cond_image"][0]                                   # [3, 1, 448, 896]
    video = torch.cat([cond, torch.zeros(3, 8, *cond.shape[-2:])], dim=1)
    latent = tiny_vae.encode(video)
    assert latent.dtype == torch.float32
    assert rel_l2(latent, vec["vae_encode_latent"]) < 1e-5


def test_decode_matches_golden(tiny_vae, golden_vectors):
    vec = golden_vectors("image_vae")
    video = tiny_vae.decode(vec["vae_decode_latent_in"])
    assert video.shape == (3, 9, 64, 96)
    assert rel_l2(video, vec["vae_decode_video"]) < 1e-5
    assert video.abs().max() <= 1.0


def test_decode_chunks_equal_decode_exactly(tiny_vae, golden_vectors):
    """The pipeline decodes chunk by chunk (1, 4, 4 frames) to overlap encoding: same numbers, bit for bit."""
    latent = golden_vectors("image_vae")["vae_decode_latent_in"]
    chunks = list(tiny_vae.decode_chunks(latent))
    assert [c.shape[1] for c in chunks] == [1, 4, 4]
    assert all(c.dtype == torch.float32 and c.abs().max() <= 1.0 for c in chunks)
    assert torch.equal(torch.cat(chunks, dim=1), tiny_vae.decode(latent))
    # the feature cache is cleared afterwards: a second, different decode is unaffected
    other = latent.flip(1)
    assert torch.equal(torch.cat(list(tiny_vae.decode_chunks(other)), dim=1), tiny_vae.decode(other))


def test_encode_is_causal(tiny_vae):
    """Latent frame k depends only on frames up to 1+4k (official 1, 4, 4, ... chunking)."""
    video = torch.rand(3, 9, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    full = tiny_vae.encode(video)
    prefix = tiny_vae.encode(video[:, :5])
    assert full.shape == (16, 3, 4, 6) and prefix.shape == (16, 2, 4, 6)
    torch.testing.assert_close(prefix, full[:, :2], rtol=0, atol=1e-6)
    changed = video.clone()
    changed[:, 5:] = 0.0
    assert rel_l2(tiny_vae.encode(changed)[:, 2], full[:, 2]) > 1e-3


def test_bad_inputs_raise_user_errors(tiny_vae):
    with pytest.raises(UserInputError, match="frames"):
        tiny_vae.encode(torch.zeros(3, 4, 16, 16))
    with pytest.raises(UserInputError, match="multiple of 8"):
        tiny_vae.encode(torch.zeros(3, 1, 20, 16))
    with pytest.raises(UserInputError) as err:
        tiny_vae.encode(torch.zeros(1, 3, 1, 16, 16))
    assert err.value.field == "video"
    with pytest.raises(UserInputError) as err:
        tiny_vae.decode(torch.zeros(4, 1, 2, 2))
    assert err.value.field == "latent"


# --- key conversion and loading -----------------------------------------------------------------

def test_full_size_layout_converts_exactly(full_manifest):
    shapes = full_manifest[FULL_VAE]["keys"]
    model = build_on_meta(lambda: build_vae_model(FULL_14B.vae))
    report = load_vae_weights(model, meta_items(shapes), FULL_14B.vae, dry_run=True)
    assert report.ok, report.summary()
    assert sorted(report.loaded) == sorted(model.state_dict())
    assert len(report.loaded) == len(shapes)


def test_converter_agrees_with_diffusers_single_file(full_manifest):
    """Cross-check against diffusers' own (default-config only) converter on the real key list."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    keys = list(full_manifest[FULL_VAE]["keys"])
    reference = convert_wan_vae_to_diffusers({k: k for k in keys})
    assert {convert_vae_key(k, FULL_14B.vae): k for k in keys} == reference


def test_tiny_checkpoint_fills_every_tensor(tiny_vae):
    tensors = list(tiny_vae.model.state_dict().values())
    assert tensors and all(t.device.type == "cpu" for t in tensors)


def test_missing_vae_file_names_it(tiny_ckpt_dir, tmp_path):
    shutil.copy(tiny_ckpt_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError) as err:
        WanVAE.from_checkpoint(tmp_path)
    assert err.value.file is not None and err.value.file.endswith(VAE_FILE)
    assert VAE_FILE in str(err.value)


def test_wrong_architecture_reports_shape(tiny_ckpt_dir):
    """Loading the tiny file into the 14B layout fails on the first tensor, naming file, key and shape."""
    model = build_on_meta(lambda: build_vae_model(FULL_14B.vae))
    with pytest.raises(CheckpointError) as err:
        load_vae_weights(model, iter_torch_file(tiny_ckpt_dir / VAE_FILE), FULL_14B.vae)
    assert err.value.file == VAE_FILE and err.value.key and err.value.expected is not None


def test_unknown_key_is_rejected(tiny_ckpt_dir):
    model = build_on_meta(lambda: build_vae_model(TINY.vae))
    items = [("decoder.upsamples.99.residual.0.gamma", torch.ones(8, 1, 1, 1), VAE_FILE)]
    with pytest.raises(CheckpointError) as err:
        load_vae_weights(model, items, TINY.vae)
    assert err.value.key == "decoder.upsamples.99.residual.0.gamma"
