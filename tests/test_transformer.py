"""MultiTalk DiT: golden forward (golden README section f), full-size key layout, diffusers integration."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_l2

from multitalk.errors import CheckpointError, UserInputError
from multitalk.models.architecture import FULL_14B, TINY
from multitalk.models.checkpoint import meta_items
from multitalk.models.transformer import (MultiTalkTransformer3DModel, MultiTalkTransformerBlock,
                                          apply_rotary, build_transformer_on_meta, check_transformer_keys,
                                          convert_dit_key, keep_fp32, load_transformer)

TOL = 1e-5
# golden dbg tensor -> (debug dict key, index into a per-block list or None)
DEBUG_NAMES = {
    "dbg_time_e": ("time_e", None),
    "dbg_time_e0": ("time_e0", None),
    "dbg_text_emb": ("text_emb", None),
    "dbg_img_emb": ("img_emb", None),
    "dbg_audio_proj": ("audio_proj", None),
    "dbg_block0_x_ref_attn_map": ("x_ref_attn_map", 0),
    "dbg_block0_out": ("blocks_out", 0),
}


@pytest.fixture(scope="module")
def dit(tiny_ckpt_dir):
    return load_transformer(tiny_ckpt_dir)


def _forward(model, v, debug=None, masks=None):
    with torch.no_grad():
        return model(v["x"][None], v["t"], [v["context"]], v["clip_fea"], v["y"], v["audio"],
                     v["ref_target_masks"] if masks is None else masks, debug=debug)


@pytest.mark.parametrize("case", ["dit_1person", "dit_2person_bbox"])
def test_golden_forward(dit, golden_vectors, case):
    v = golden_vectors(case)
    debug: dict = {}
    out = _forward(dit, v, debug)
    errors = {"out": rel_l2(out[0], v["out"])}
    for name in (k for k in v if k.startswith("dbg_")):
        key, index = DEBUG_NAMES[name]
        got = debug[key] if index is None else debug[key][index]
        if name == "dbg_block0_x_ref_attn_map":
            got = got[0]                                   # batch item 0: [3, L]
        errors[name] = rel_l2(got, v[name])
    print(f"\n{case} relative L2: " + ", ".join(f"{k}={e:.2e}" for k, e in errors.items()))
    assert len(errors) == 1 + sum(k.startswith("dbg_") for k in v)
    assert all(e <= TOL for e in errors.values()), errors


def test_two_speaker_routing_is_used(dit, golden_vectors):
    """Swapping the two person masks moves the speakers' RoPE bands: the output must change."""
    v = golden_vectors("dit_2person_bbox")
    swapped = v["ref_target_masks"][[1, 0, 2]]
    assert rel_l2(_forward(dit, v, masks=swapped)[0], v["out"]) > 1e-3


def test_prepare_run_blocks_finish_compose(dit, golden_vectors):
    """TeaCache path: finish(state, input + cached residual) reproduces forward."""
    v = golden_vectors("dit_1person")
    with torch.no_grad():
        state = dit.prepare(v["x"][None], v["t"], [v["context"]], v["clip_fea"], v["y"], v["audio"],
                            v["ref_target_masks"])
        residual = dit.run_blocks(state) - state.hidden_states
        out = dit.finish(state, state.hidden_states + residual)
    assert state.timestep_proj.shape == (1, 6, TINY.dit.dim)
    assert rel_l2(out[0], v["out"]) <= TOL


def test_padded_text_tensor_equals_list(dit, golden_vectors):
    v = golden_vectors("dit_1person")
    padded = torch.zeros(1, 512, v["context"].shape[1])
    padded[0, : v["context"].shape[0]] = v["context"]
    with torch.no_grad():
        out = dit(v["x"][None], v["t"], padded, v["clip_fea"], v["y"], v["audio"], v["ref_target_masks"])
    assert rel_l2(out[0], v["out"]) <= TOL


def test_rope_matches_official_float64_complex(dit):
    """diffusers' cached cos/sin RoPE == official rope_apply (float64 complex) to 1e-5."""
    frames, h, w = 3, 6, 10
    heads, d = TINY.dit.num_heads, TINY.dit.dim // TINY.dit.num_heads
    x = torch.randn(1, frames * h * w, heads, d, generator=torch.Generator().manual_seed(0))
    cos, sin = dit.rope(torch.empty(1, 36, frames, 2 * h, 2 * w))
    ours = apply_rotary(x, cos, sin)

    def params(n, dim):
        f = torch.outer(torch.arange(n, dtype=torch.float64),
                        1.0 / torch.pow(10000, torch.arange(0, dim, 2, dtype=torch.float64).div(dim)))
        return torch.polar(torch.ones_like(f), f)

    c = d // 2
    freqs = torch.cat([params(1024, d - 4 * (d // 6)), params(1024, 2 * (d // 6)), params(1024, 2 * (d // 6))], 1)
    ft, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    grid = torch.cat([ft[:frames].view(frames, 1, 1, -1).expand(frames, h, w, -1),
                      fh[:h].view(1, h, 1, -1).expand(frames, h, w, -1),
                      fw[:w].view(1, 1, w, -1).expand(frames, h, w, -1)], dim=-1).reshape(-1, 1, c)
    ref = torch.view_as_real(torch.view_as_complex(x[0].double().reshape(-1, heads, c, 2)) * grid).flatten(2)
    assert rel_l2(ours[0], ref.float()) <= TOL
    assert dit.rope(torch.empty(1, 36, frames, 2 * h, 2 * w))[0] is cos   # cached per shape


def test_bf16_load_keeps_time_path_fp32(tiny_ckpt_dir, golden_vectors):
    model = load_transformer(tiny_ckpt_dir, dtype=torch.bfloat16)
    v = golden_vectors("dit_2person_bbox")
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        assert (p.dtype == torch.float32) == keep_fp32(name), name
    assert model.rope.freqs_cos.device.type == "cpu"
    debug: dict = {}
    with torch.no_grad():
        model.prepare(v["x"][None], v["t"], [v["context"]], v["clip_fea"], v["y"], v["audio"],
                      v["ref_target_masks"], debug=debug)
    assert debug["time_e0"].dtype == torch.float32
    assert rel_l2(debug["time_e0"], v["dbg_time_e0"]) <= TOL


def test_full_size_keys_convert_exactly(full_manifest):
    """Every 14B base + MultiTalk key lands on a model tensor of the same shape, and nothing is left over."""
    items = []
    for f in ("Wan2.1-I2V-14B-480P/diffusion_pytorch_model-*.safetensors", "MeiGen-MultiTalk/multitalk.safetensors"):
        items.extend(meta_items(full_manifest[f]["keys"], file=f))
    report = check_transformer_keys(FULL_14B.dit, items)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == [], report.summary()
    model = build_transformer_on_meta(FULL_14B.dit)
    assert len(report.loaded) == len(model.state_dict()) == 1303 + 330
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(full_manifest["_notes"]["params"][f] for f in (
        "Wan2.1-I2V-14B-480P/diffusion_pytorch_model-*.safetensors", "MeiGen-MultiTalk/multitalk.safetensors"))


def test_unknown_key_is_reported(tiny_ckpt_dir):
    assert convert_dit_key("blocks.0.self_attn.q.weight", None)[0][0] == "blocks.0.attn1.to_q.weight"
    assert convert_dit_key("blocks.3.audio_cross_attn.kv_linear.bias", None)[0][0] == \
        "blocks.3.audio_cross_attn.kv_linear.bias"
    report = check_transformer_keys(TINY.dit, meta_items({"blocks.0.audio_attn2.q.weight": [64, 64]}))
    assert report.unexpected and report.missing


def test_diffusers_integration_metadata():
    from diffusers.hooks._helpers import TransformerBlockRegistry

    meta = TransformerBlockRegistry.get(MultiTalkTransformerBlock)
    assert meta.return_hidden_states_index == 0
    model = build_transformer_on_meta(TINY.dit)
    names = {type(m).__name__ for m in model.modules()}
    assert set(MultiTalkTransformer3DModel._repeated_blocks) <= names
    assert set(MultiTalkTransformer3DModel._no_split_modules) <= names
    assert model.config.num_layers == TINY.dit.num_layers == len(model.blocks)
    assert keep_fp32("condition_embedder.time_proj.weight") and keep_fp32("blocks.1.scale_shift_table")
    assert not keep_fp32("blocks.1.attn1.to_q.weight")


def test_first_block_cache_hook_runs(tiny_ckpt_dir, golden_vectors):
    from diffusers import FirstBlockCacheConfig

    model = load_transformer(tiny_ckpt_dir)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    v = golden_vectors("dit_1person")
    with model.cache_context("cond"):
        out = _forward(model, v)
    assert rel_l2(out[0], v["out"]) <= TOL


def test_bad_inputs(dit, golden_vectors):
    v = golden_vectors("dit_2person_bbox")
    with pytest.raises(UserInputError) as e:
        with torch.no_grad():
            dit(v["x"][None], v["t"], [v["context"]], v["clip_fea"], v["y"], v["audio"], None)
    assert e.value.field == "ref_target_masks"
    with pytest.raises(UserInputError) as e:
        with torch.no_grad():
            dit(v["x"][None], v["t"], [v["context"]], v["clip_fea"], v["y"], v["audio"][:, :8],
                v["ref_target_masks"])
    assert e.value.field == "audio"
    with pytest.raises(UserInputError):
        dit(v["x"][None], v["t"], [v["context"], v["context"]], v["clip_fea"], v["y"], v["audio"],
            v["ref_target_masks"])


def test_wrong_architecture_is_a_checkpoint_error(tiny_ckpt_dir):
    with pytest.raises(CheckpointError) as e:
        load_transformer(tiny_ckpt_dir, arch=FULL_14B)
    assert e.value.key and e.value.expected is not None and e.value.file
