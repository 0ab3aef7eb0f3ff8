"""runtime.vae_fusion: the fused norm -> SiLU -> causal-pad chains compute what diffusers' VAE computes.

Uncompiled, the rewritten blocks must give the same bits as the model as loaded (same operations,
same order), over several chunks so the causal caches are exercised; compiled (inductor on CPU
here, Triton on CUDA) they must still reproduce the golden encode/decode vectors within their
tolerance. The GPU benchmark's ``vae`` section measures the speed and the bf16 difference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_l2

from multitalk.models.vae import WanVAE
from multitalk.runtime.vae_fusion import fuse_vae, norm_silu_causal_pad


@pytest.fixture()
def fresh_vae(tiny_ckpt_dir):
    def load() -> WanVAE:
        return WanVAE.from_checkpoint(tiny_ckpt_dir)
    return load


def _video(frames: int = 13, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, frames, 64, 96, generator=g) * 2 - 1


def test_uncompiled_fusion_is_bit_identical_over_several_chunks(fresh_vae):
    loaded, fused = fresh_vae(), fresh_vae()
    sites = fuse_vae(fused, compile=False)
    # every residual block (encoder, middles, decoder), both output heads, the 2 upsamplers of each level
    assert sites == sum(type(m).__name__ == "WanResidualBlock" for m in loaded.model.modules()) + 2 + 3
    assert fuse_vae(fused, compile=False) == 0  # idempotent

    video = _video(13)  # chunks of 1, 4, 4, 4 frames: caches are created, extended and carried
    assert torch.equal(fused.encode(video), loaded.encode(video))
    latent = torch.randn(16, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    a, b = list(fused.decode_chunks(latent)), list(loaded.decode_chunks(latent))
    assert [c.shape[1] for c in a] == [c.shape[1] for c in b] == [1, 4, 4, 4]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(fused.decode(latent), loaded.decode(latent))


def test_bf16_uncompiled_fusion_is_bit_identical(fresh_vae):
    """The bf16 path (the CUDA default) upcasts for the norm exactly as diffusers does."""
    loaded, fused = fresh_vae(), fresh_vae()
    loaded.to(torch.bfloat16), fused.to(torch.bfloat16)
    fuse_vae(fused, compile=False)
    video = _video(9, seed=2)
    assert torch.equal(fused.encode(video), loaded.encode(video))


def test_causal_pad_matches_cat_and_pad():
    """The padded input and the cache for one chunk, against the two copies diffusers makes."""
    g = torch.Generator().manual_seed(0)
    x, prev = torch.randn(1, 8, 4, 5, 6, generator=g), torch.randn(1, 8, 2, 5, 6, generator=g)
    gamma = torch.rand(8, 1, 1, 1, generator=g)
    padded, cache = norm_silu_causal_pad(x, gamma, 0.0, 8 ** 0.5, prev, (1, 1, 1, 1, 2, 0))
    y = torch.nn.functional.silu(torch.nn.functional.normalize(x, dim=1) * 8 ** 0.5 * gamma)
    assert padded.shape == (1, 8, 6, 7, 8)
    assert torch.equal(padded[:, :, :2, 1:-1, 1:-1], prev)
    assert torch.equal(padded[:, :, 2:, 1:-1, 1:-1], y)
    assert padded[..., 0].abs().sum() == 0 and padded[..., 0, :].abs().sum() == 0
    assert torch.equal(cache, y[:, :, -2:])
    # a 1-frame chunk keeps the last cached frame in front of it; with no cache, 2 zero frames
    padded, cache = norm_silu_causal_pad(x[:, :, :1], gamma, 0.0, 8 ** 0.5, prev, (1, 1, 1, 1, 2, 0))
    assert padded.shape[2] == 3 and torch.equal(cache[:, :, :1], prev[:, :, -1:])
    padded, cache = norm_silu_causal_pad(x[:, :, :1], gamma, 0.0, 8 ** 0.5, None, (1, 1, 1, 1, 2, 0))
    assert padded[:, :, :2].abs().sum() == 0 and cache.shape[2] == 1


def test_compiled_fusion_reproduces_golden_vectors(fresh_vae, golden_vectors):
    """The compiled path (inductor; ~1 min of compilation on 2 CPU cores) against golden section d."""
    vae = fresh_vae()
    fuse_vae(vae, compile=True)
    vec = golden_vectors("image_vae")
    cond = vec["multi1_cond_image"][0]
    video = torch.cat([cond, torch.zeros(3, 8, *cond.shape[-2:])], dim=1)
    assert rel_l2(vae.encode(video), vec["vae_encode_latent"]) < 1e-5
    chunks = list(vae.decode_chunks(vec["vae_decode_latent_in"]))
    assert rel_l2(torch.cat(chunks, dim=1), vec["vae_decode_video"]) < 1e-5


def test_refuses_what_it_cannot_fuse(fresh_vae):
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        fuse_vae(torch.nn.Linear(2, 2))
    vae = fresh_vae()
    vae.model.train()
    with pytest.raises(ValueError, match="eval mode"):
        fuse_vae(vae, compile=False)
