"""runtime.vae_fusion: the fused norm -> SiLU -> causal-pad calls compute what diffusers' VAE computes.

With the eager implementation the rewritten blocks must give the same bits as the model as loaded
(same operations, same order) over several chunks, so the causal caches are exercised, and
reproduce the golden encode/decode vectors; the Triton kernel must match the eager reference (on
CUDA for real; on CPU machines, CI's included, through Triton's interpreter, which conftest.py
selects). The GPU benchmark's ``vae`` section measures it at full size: speed and bf16 difference.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import rel_l2

from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from multitalk.models.vae import WanVAE
from multitalk.runtime.vae_fusion import EagerNormSiLU, TritonNormSiLU, causal_input, fuse_vae


def triton_interpreter() -> None:
    """Skip unless Triton is importable and can run here: on CUDA, or on CPU through its
    interpreter (``TRITON_INTERPRET=1``, set by conftest.py before anything imports triton)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA: run with TRITON_INTERPRET=1 to check the kernel on CPU")


@pytest.fixture()
def fresh_vae(tiny_ckpt_dir):
    def load() -> WanVAE:
        return WanVAE.from_checkpoint(tiny_ckpt_dir)
    return load


def _video(frames: int = 13, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, frames, 64, 96, generator=g) * 2 - 1


def test_eager_fusion_is_bit_identical_over_several_chunks(fresh_vae):
    loaded, fused = fresh_vae(), fresh_vae()
    sites = fuse_vae(fused, impl="eager")
    # every residual block (encoder, middles, decoder), both output heads, the decoder's 3 upsamplers
    assert sites == sum(type(m).__name__ == "WanResidualBlock" for m in loaded.model.modules()) + 2 + 3
    assert fuse_vae(fused, impl="eager") == 0  # idempotent

    video = _video(13)  # chunks of 1, 4, 4, 4 frames: caches are created, extended and carried
    assert torch.equal(fused.encode(video), loaded.encode(video))
    latent = torch.randn(16, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    a, b = list(fused.decode_chunks(latent)), list(loaded.decode_chunks(latent))
    assert [c.shape[1] for c in a] == [c.shape[1] for c in b] == [1, 4, 4, 4]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(fused.decode(latent), loaded.decode(latent))


def test_eager_fusion_matches_golden_and_bf16_bits(fresh_vae, golden_vectors):
    """Golden section d through the rewritten model; in bf16 (the CUDA default) the norm's float32
    round trip and the upsampling give the same bits as diffusers'."""
    vae = fresh_vae()
    fuse_vae(vae, impl="eager")
    vec = golden_vectors("image_vae")
    cond = vec["multi1_cond_image"][0]
    video = torch.cat([cond, torch.zeros(3, 8, *cond.shape[-2:])], dim=1)
    assert rel_l2(vae.encode(video), vec["vae_encode_latent"]) < 1e-5
    assert rel_l2(torch.cat(list(vae.decode_chunks(vec["vae_decode_latent_in"])), dim=1),
                  vec["vae_decode_video"]) < 1e-5

    loaded, fused = fresh_vae().to(torch.bfloat16), fresh_vae().to(torch.bfloat16)
    fuse_vae(fused, impl="eager")
    video = _video(9, seed=2)
    assert torch.equal(fused.encode(video), loaded.encode(video))
    latent = torch.randn(16, 3, 8, 12, generator=torch.Generator().manual_seed(4))
    assert torch.equal(fused.decode(latent), loaded.decode(latent))


def test_causal_input_matches_cat_and_pad():
    """The padded input and the cache for one chunk, against the two copies diffusers makes."""
    g = torch.Generator().manual_seed(0)
    y, prev = torch.randn(1, 8, 4, 5, 6, generator=g), torch.randn(1, 8, 2, 5, 6, generator=g)
    padded, cache = causal_input(y, prev, (1, 1, 1, 1, 2, 0))
    assert padded.shape == (1, 8, 6, 7, 8)
    assert torch.equal(padded[:, :, :2, 1:-1, 1:-1], prev)
    assert torch.equal(padded[:, :, 2:, 1:-1, 1:-1], y)
    assert padded[..., 0].abs().sum() == 0 and padded[..., 0, :].abs().sum() == 0
    assert torch.equal(cache, y[:, :, -2:])
    # a 1-frame chunk keeps the last cached frame in front of it; with no cache, 2 zero frames
    padded, cache = causal_input(y[:, :, :1], prev, (1, 1, 1, 1, 2, 0))
    assert padded.shape[2] == 3 and torch.equal(cache[:, :, :1], prev[:, :, -1:])
    padded, cache = causal_input(y[:, :, :1], None, (1, 1, 1, 1, 2, 0))
    assert padded[:, :, :2].abs().sum() == 0 and cache.shape[2] == 1


@pytest.mark.parametrize("frames,prev_frames", [(4, 2), (1, 1), (1, None), (2, 2)])
def test_triton_kernel_matches_reference(frames, prev_frames):
    """The Triton kernel (on CUDA, or through Triton's interpreter on CPU): padded buffer and cache
    against the eager reference."""
    triton_interpreter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(frames)
    norm = WanRMS_norm(24, images=False)
    norm.gamma.data = torch.rand(24, 1, 1, 1, generator=g) + 0.5
    norm.register_buffer("fused_weight", norm.gamma.detach().flatten() * norm.scale)
    norm.to(device)
    x = torch.randn(1, 24, 6, 7, 9, generator=g)[:, :, :frames].transpose(3, 4).contiguous().transpose(3, 4)
    x = x.to(device)  # a non-contiguous activation (as after an upsampler's permute)
    prev = torch.randn(1, 24, prev_frames, 7, 9, generator=g).to(device) if prev_frames else None
    want = EagerNormSiLU().norm_silu_causal_pad(x, norm, prev, (1, 1, 1, 1, 2, 0))
    got = TritonNormSiLU().norm_silu_causal_pad(x, norm, prev, (1, 1, 1, 1, 2, 0))
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(TritonNormSiLU().norm_silu(x, norm), EagerNormSiLU().norm_silu(x, norm),
                               rtol=1e-5, atol=1e-6)


def test_triton_fused_vae_matches_eager_over_chunks(fresh_vae):
    """The whole rewritten VAE with the Triton kernel (padded buffers, caches carried between chunks
    of 1, 4, 4 frames) against the model as loaded, float32."""
    triton_interpreter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded, fused = fresh_vae().to(device), fresh_vae().to(device)
    fuse_vae(fused, impl="triton")
    assert fused.model._multitalk_fused == "triton"
    tol = 1e-5 if device == "cpu" else 1e-3  # CUDA: cuDNN's TF32 convolutions round both sides
    video = _video(9, seed=5)[:, :, :32, :48]
    assert rel_l2(fused.encode(video).cpu(), loaded.encode(video).cpu()) < tol
    latent = torch.randn(16, 3, 4, 6, generator=torch.Generator().manual_seed(6))
    chunks = list(fused.decode_chunks(latent))
    assert [c.shape[1] for c in chunks] == [1, 4, 4]
    assert rel_l2(torch.cat(chunks, dim=1).cpu(), loaded.decode(latent).cpu()) < tol


def test_picks_triton_for_a_gpu_model_only_when_triton_is_there(fresh_vae):
    """An offloaded VAE is loaded on the CPU and runs on the GPU: ``device`` decides the kernel."""
    import importlib.util

    vae = fresh_vae()
    assert fuse_vae(vae, device="cuda") > 0
    assert vae.model._multitalk_fused == ("triton" if importlib.util.find_spec("triton") else "eager")
    cpu_vae = fresh_vae()
    fuse_vae(cpu_vae)
    assert cpu_vae.model._multitalk_fused == "eager"


def test_refuses_what_it_cannot_fuse(fresh_vae):
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        fuse_vae(torch.nn.Linear(2, 2))
    vae = fresh_vae()
    with pytest.raises(ValueError, match="unknown impl"):
        fuse_vae(vae, impl="cuda-graphs")
    vae.model.train()
    with pytest.raises(ValueError, match="eval mode"):
        fuse_vae(vae, impl="eager")
