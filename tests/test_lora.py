"""LoRA files (``models.lora``): the golden merges, the three formats, the checks and the merge itself.

Golden: ``../shared/golden/lora`` holds LoRA files in the official, kohya and diffusers formats and the
official code's DiT outputs after its ``WanLoraWrapper`` merged them into the tiny weights; every
expected tensor is reproduced within 1e-5 (relative L2, float32) through ``engine.load_dit``, the
path ``Engine.load`` takes. The other tests build small random models and files, so they run
without the golden data.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import rel_l2
from multitalk.models.architecture import TINY
from multitalk.models.lora import (LoraError, LoraSpec, apply_loras, check_loras, lora_signature,
                                   random_official_lora)
from multitalk.models.transformer import MultiTalkTransformer3DModel, convert_dit_key, official_dit_key

TOL = 1e-5
CASES = ("dit_1person", "dit_2person_bbox")


# -- golden -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_golden(golden):
    from safetensors.torch import load_file

    folder = golden / "lora"
    spec = json.loads((folder / "lora.json").read_text())
    runs: dict[str, list] = {}
    for name, case in spec["cases"].items():
        runs.setdefault(name.rsplit(".", 1)[0], case["files"])
    return folder, runs, load_file(str(folder / "lora_expected.safetensors"))


def _dit_out(model, v) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=v["x"][None], timestep=v["t"], encoder_hidden_states=[v["context"]],
                     encoder_hidden_states_image=v["clip_fea"], y=v["y"], audio=v["audio"],
                     ref_target_masks=v["ref_target_masks"])[0]


def _load_dit_with(golden, loras):
    from multitalk.models.architecture import detect_architecture
    from multitalk.pipeline.engine import EngineConfig, load_dit

    ckpt = golden / "weights" / "Wan2.1-I2V-tiny"
    config = EngineConfig(ckpt_dir=ckpt, wav2vec_dir=golden / "weights" / "chinese-wav2vec2-tiny", device="cpu",
                          dtype="float32", compile=False, loras=tuple(loras))
    config.check_loras()
    cpu = torch.device("cpu")
    return load_dit(config, ckpt, None, detect_architecture(ckpt), cpu, torch.float32, cpu)[:2]


GOLDEN_RUNS = [("lora_a_scale1", None), ("lora_a_scale0.6", None), ("lora_a_then_b", None),
               ("lora_a_pairs_only", None), ("lora_a_pairs_only", "lora_a_kohya.safetensors"),
               ("lora_a_pairs_only", "lora_a_diffusers.safetensors")]


@pytest.mark.parametrize("run,other_file", GOLDEN_RUNS, ids=["a_scale1", "a_scale0.6", "a_then_b", "a_pairs_only",
                                                             "kohya", "diffusers"])
def test_golden_merges(lora_golden, golden, golden_vectors, run, other_file):
    folder, runs, expected = lora_golden
    files = [[other_file, 1.0]] if other_file else runs[run]
    model, report = _load_dit_with(golden, [LoraSpec(folder / f, s) for f, s in files])
    assert [f["file"] for f in report.files] == [f for f, _ in files]
    assert [f["scale"] for f in report.files] == [s for _, s in files]
    for case in CASES:
        err = rel_l2(_dit_out(model, golden_vectors(case)), expected[f"{run}.{case}.out"])
        print(run, other_file, case, f"{err:.2e}")
        assert err < TOL, (run, other_file, case, err)


def test_golden_formats_are_read_as_such(lora_golden, golden):
    folder, _, _ = lora_golden
    _, report = _load_dit_with(golden, [folder / "lora_a_official.safetensors", folder / "lora_a_kohya.safetensors",
                                        folder / "lora_a_diffusers.safetensors"])
    assert [f["format"] for f in report.files] == ["official", "kohya", "diffusers"]
    a, kohya, diffusers = report.files
    assert (a["pairs"], a["diffs"]) == (28, 5)      # 3 diff_b + 2 norm diffs
    assert (kohya["pairs"], kohya["diffs"]) == (28, 0) and (diffusers["pairs"], diffusers["diffs"]) == (28, 0)


# -- diffusers' own converters, measured (why the names go through convert_dit_key) ---------------
def test_diffusers_wan_converters_do_not_fit_the_released_files():
    from diffusers.loaders.lora_conversion_utils import (_convert_musubi_wan_lora_to_diffusers,
                                                         _convert_non_diffusers_wan_lora_to_diffusers)

    r = torch.zeros(4, 64)
    u = torch.zeros(64, 4)
    pair = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": r,
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": u}
    # a norm's .diff is dropped (the golden LoRA A's diffs move the output by ~2 %)
    out = _convert_non_diffusers_wan_lora_to_diffusers({**pair, "diffusion_model.blocks.0.norm3.diff": torch.ones(64)})
    assert not any("norm" in k for k in out)
    # the audio layers' keys are refused
    with pytest.raises(ValueError):
        _convert_non_diffusers_wan_lora_to_diffusers({
            **pair, "diffusion_model.blocks.0.audio_cross_attn.q_linear.lora_down.weight": r,
            "diffusion_model.blocks.0.audio_cross_attn.q_linear.lora_up.weight": u})
    # an alpha outside the blocks (the golden kohya file has them on head, text_embedding, time_projection)
    with pytest.raises(ValueError):
        _convert_non_diffusers_wan_lora_to_diffusers({
            **pair, "diffusion_model.head.head.lora_down.weight": r, "diffusion_model.head.head.lora_up.weight": u,
            "diffusion_model.head.head.alpha": torch.tensor(4.0)})
    # no block keys at all
    with pytest.raises(ValueError):
        _convert_non_diffusers_wan_lora_to_diffusers({"diffusion_model.head.head.lora_down.weight": r,
                                                      "diffusion_model.head.head.lora_up.weight": u})
    # musubi/kohya: every attention and FFN module of every block must be there (LoRA B has q, v, o only)
    with pytest.raises(KeyError):
        _convert_musubi_wan_lora_to_diffusers({"lora_unet_blocks_0_self_attn_q.lora_down.weight": r,
                                               "lora_unet_blocks_0_self_attn_q.lora_up.weight": u,
                                               "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0)})


# -- random models and files ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dit():
    torch.manual_seed(0)
    return MultiTalkTransformer3DModel.from_dit_config(TINY.dit).eval().requires_grad_(False)


@pytest.fixture
def model(tiny_dit):
    import copy

    return copy.deepcopy(tiny_dit)


def _save(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_official_names_round_trip(tiny_dit):
    from multitalk.models.tiny import dit_key_shapes

    for key in tiny_dit.state_dict():
        assert convert_dit_key(official_dit_key(key), None)[0][0] == key
    for key in dit_key_shapes(TINY.dit):
        assert official_dit_key(convert_dit_key(key, None)[0][0]) == key


def _pairs(sd):
    return {k: v for k, v in sd.items() if k.endswith("_down.weight") or k.endswith("_up.weight")}


def _kohya(sd, alpha=None, prefix="lora_unet_"):
    out = {}
    for k, v in sd.items():
        module, _, suffix = k[len("diffusion_model."):].partition(".lora_")
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_{suffix}"] = v
        if alpha is not None and suffix == "down.weight":
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def _diffusers(sd):
    out = {}
    for k, v in sd.items():
        module, _, suffix = k[len("diffusion_model."):].partition(".lora_")
        ours = convert_dit_key(module + ".weight", None)[0][0][: -len(".weight")]
        out[f"transformer.{ours}.lora_{'A' if suffix == 'down.weight' else 'B'}.weight"] = v
    return out


def test_three_formats_and_alpha_give_the_same_weights(tmp_path, tiny_dit):
    import copy

    rank, alpha = 4, 2.0  # alpha/rank = 0.5, as diffusers/PEFT/ComfyUI scale it
    pairs = _pairs(random_official_lora(TINY.dit, rank=rank, seed=3, audio=True))
    with_alpha = dict(pairs)
    for k in pairs:
        if k.endswith(".lora_down.weight"):
            with_alpha[k.replace(".lora_down.weight", ".alpha")] = torch.tensor(alpha)
    files = {
        "official": _save(tmp_path, "o.safetensors", with_alpha),
        "kohya": _save(tmp_path, "k.safetensors", _kohya(pairs, alpha)),
        "kohya__": _save(tmp_path, "k2.safetensors", _kohya(pairs, alpha, prefix="lora_unet__")),
        "diffusers": _save(tmp_path, "d.safetensors", _diffusers(pairs),
                           {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})}),
    }
    merged = {}
    for name, path in files.items():
        m = copy.deepcopy(tiny_dit)
        report = apply_loras(m, [path])
        assert report.files[0]["format"] == name.rstrip("_")
        merged[name] = _state(m)
    for name in ("kohya", "kohya__", "diffusers"):
        assert _same(merged[name], merged["official"]), name
    # against the formula, including the audio layers
    base = tiny_dit.state_dict()
    q = "blocks.1.audio_cross_attn.q_linear.weight"
    up = pairs["diffusion_model.blocks.1.audio_cross_attn.q_linear.lora_up.weight"].float()
    down = pairs["diffusion_model.blocks.1.audio_cross_attn.q_linear.lora_down.weight"].float()
    assert torch.allclose(merged["official"][q], base[q] + alpha / rank * up @ down, atol=1e-6)
    assert not torch.equal(merged["official"][q], base[q])


def test_peft_alpha_pattern_and_rslora(tmp_path, model):
    pairs = _diffusers(_pairs(random_official_lora(TINY.dit, rank=4, seed=5)))
    meta = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn1.to_q": 2}, "use_rslora": True}
    base = _state(model)
    apply_loras(model, [_save(tmp_path, "p.safetensors", pairs, {"lora_adapter_metadata": json.dumps(meta)})])
    for name, alpha in (("blocks.0.attn1.to_q", 2.0), ("blocks.0.attn1.to_k", 8.0)):
        up = pairs[f"transformer.{name}.lora_B.weight"].float()
        down = pairs[f"transformer.{name}.lora_A.weight"].float()
        want = base[f"{name}.weight"] + alpha / math.sqrt(4) * up @ down
        assert torch.allclose(model.state_dict()[f"{name}.weight"], want, atol=1e-6), name


def test_stacked_files_scales_and_differences(tmp_path, model):
    a = random_official_lora(TINY.dit, rank=4, seed=1)       # pairs + diff_b + norm diffs
    b = _pairs(random_official_lora(TINY.dit, rank=2, seed=2))
    base = _state(model)
    report = apply_loras(model, [LoraSpec(_save(tmp_path, "a.safetensors", a), 1.0),
                                 LoraSpec(_save(tmp_path, "b.safetensors", b), -0.5)])
    sd = model.state_dict()

    def delta(sd_, module):
        return sd_[f"diffusion_model.{module}.lora_up.weight"].float() @ sd_[f"diffusion_model.{module}.lora_down.weight"].float()

    want = base["blocks.0.attn1.to_q.weight"] + delta(a, "blocks.0.self_attn.q") - 0.5 * delta(b, "blocks.0.self_attn.q")
    assert torch.allclose(sd["blocks.0.attn1.to_q.weight"], want, atol=1e-6)
    # .diff_b on a bias, .diff on a norm scale (official norm3 = diffusers norm2)
    assert torch.allclose(sd["blocks.0.attn1.to_q.bias"],
                          base["blocks.0.attn1.to_q.bias"] + a["diffusion_model.blocks.0.self_attn.q.diff_b"].float())
    assert torch.allclose(sd["blocks.1.norm2.weight"], base["blocks.1.norm2.weight"] + a["diffusion_model.blocks.1.norm3.diff"].float())
    assert report.tensors_changed == sum(k.endswith((".lora_down.weight", ".diff", ".diff_b")) for k in a)
    assert report.signature == lora_signature([LoraSpec(tmp_path / "a.safetensors", 1.0),
                                               LoraSpec(tmp_path / "b.safetensors", -0.5)])


def test_bf16_weights_are_rounded_once(tmp_path, tiny_dit):
    import copy

    model = copy.deepcopy(tiny_dit).to(torch.bfloat16)
    base = model.state_dict()["blocks.0.ffn.net.0.proj.weight"].float()
    a = _pairs(random_official_lora(TINY.dit, rank=4, seed=1))
    paths = [_save(tmp_path, f"{i}.safetensors", a) for i in range(3)]
    apply_loras(model, [LoraSpec(p, 0.3) for p in paths])
    d = a["diffusion_model.blocks.0.ffn.0.lora_up.weight"].float() @ a["diffusion_model.blocks.0.ffn.0.lora_down.weight"].float()
    want = (base + 0.3 * d + 0.3 * d + 0.3 * d).to(torch.bfloat16)
    assert torch.equal(model.state_dict()["blocks.0.ffn.net.0.proj.weight"], want)


def test_kohya_names_resolve_against_the_model(tmp_path, model):
    r, u = torch.randn(2, 64), torch.randn(64, 2)
    base = _state(model)
    path = _save(tmp_path, "k.safetensors", {
        "lora_unet_blocks_1_cross_attn_k_img.lora_down.weight": r, "lora_unet_blocks_1_cross_attn_k_img.lora_up.weight": u,
        "lora_unet_blocks_0_modulation.diff": torch.ones(1, 6, 64),          # a bare parameter
        "lora_unet_blocks_0_attn1_to_out_0.lora_down.weight": r,              # a diffusers name, underscored
        "lora_unet_blocks_0_attn1_to_out_0.lora_up.weight": u,
    })
    apply_loras(model, [path])
    sd = model.state_dict()
    assert torch.allclose(sd["blocks.1.attn2.add_k_proj.weight"], base["blocks.1.attn2.add_k_proj.weight"] + u @ r)
    assert torch.allclose(sd["blocks.0.attn1.to_out.0.weight"], base["blocks.0.attn1.to_out.0.weight"] + u @ r)
    assert torch.allclose(sd["blocks.0.scale_shift_table"], base["blocks.0.scale_shift_table"] + 1)


BAD = {
    "unknown module": ({"diffusion_model.blocks.0.self_attn.qq.lora_down.weight": torch.zeros(2, 64),
                        "diffusion_model.blocks.0.self_attn.qq.lora_up.weight": torch.zeros(64, 2)},
                       ["names no linear layer", "blocks.0.self_attn.qq.lora_up.weight"]),
    "1.3B shapes": ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 96),
                     "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(96, 2)},
                    ["does not fit this model", "model shape (64, 64)", "LoRA shape (96, 96)"]),
    "T2V patch embedding": ({"diffusion_model.patch_embedding.diff": torch.zeros(64, 16, 1, 2, 2)},
                            ["model shape (64, 36, 1, 2, 2)", "LoRA shape (64, 16, 1, 2, 2)"]),
    "missing partner": ({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(2, 64)},
                        ["lora_down without its lora_up"]),
    "orphan alpha": ({"diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(1.0)}, ["alpha without"]),
    "bad rank": ({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(2, 64),
                  "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(256, 3)}, ["rank-r product"]),
    "LoHa": ({"lora_unet_blocks_0_ffn_0.hada_w1_a": torch.zeros(2, 64)}, ["LoHa file is not supported"]),
    "mixed": ({"diffusion_model.blocks.0.ffn.0.diff_b": torch.zeros(256), "lora_te_x.lora_up.weight": torch.zeros(1, 1)},
              ["mixes official-format keys"]),
    "integer": ({"diffusion_model.blocks.0.ffn.0.diff_b": torch.zeros(256, dtype=torch.int32)}, ["I32"]),
    "bias shape": ({"diffusion_model.blocks.0.ffn.0.diff_b": torch.zeros(255)}, ["model shape (256,)", "LoRA shape (255,)"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_name_file_key_and_shapes_and_change_nothing(tmp_path, model, case):
    tensors, words = BAD[case]
    good = _save(tmp_path, "good.safetensors", random_official_lora(TINY.dit, rank=2))
    bad = _save(tmp_path, "bad.safetensors", tensors)
    before = _state(model)
    with pytest.raises(LoraError) as info:
        apply_loras(model, [good, bad])
    text = str(info.value)
    assert "bad.safetensors" in text and info.value.index == 1 and info.value.field == "lora_dir"
    for word in words:
        assert word in text, (case, text)
    assert _same(_state(model), before)  # nothing half-merged


def test_non_finite_values_and_scales_change_nothing(tmp_path, model):
    sd = random_official_lora(TINY.dit, rank=2)
    key = "diffusion_model.blocks.1.ffn.2.lora_up.weight"
    sd[key] = sd[key].clone()
    sd[key][3, 1] = float("nan")
    good = _save(tmp_path, "good.safetensors", random_official_lora(TINY.dit, rank=2))
    before = _state(model)
    with pytest.raises(LoraError, match="NaN or infinite.*" + key.replace(".", r"\.")):
        apply_loras(model, [good, _save(tmp_path, "nan.safetensors", sd)])
    with pytest.raises(LoraError) as info:
        apply_loras(model, [LoraSpec(good, 1.0), LoraSpec(good, float("inf"))])
    assert info.value.field == "lora_scale" and info.value.index == 1
    assert _same(_state(model), before)


def test_files_that_are_not_loras(tmp_path, model):
    (tmp_path / "x.pt").write_bytes(b"\x80\x02 a pickle, not safetensors")
    with pytest.raises(LoraError, match="x.pt: not a readable safetensors file"):
        check_loras(model, [tmp_path / "x.pt"])
    with pytest.raises(LoraError, match="not found"):
        check_loras(model, [tmp_path / "missing.safetensors"])
    with pytest.raises(LoraError, match="holds no tensors"):
        check_loras(model, [_save(tmp_path, "empty.safetensors", {})])
    folder = tmp_path / "one"
    folder.mkdir()
    _save(folder, "only.safetensors", random_official_lora(TINY.dit, rank=2))
    assert check_loras(model, [folder])[0].name == "only.safetensors"  # a folder with one file
    _save(folder, "second.safetensors", random_official_lora(TINY.dit, rank=2))
    with pytest.raises(LoraError, match="holds 2 .safetensors files"):
        check_loras(model, [folder])


def test_quantised_or_meta_targets_are_refused_before_any_change(tmp_path, tiny_dit):
    from multitalk.models.transformer import build_transformer_on_meta

    path = _save(tmp_path, "a.safetensors", random_official_lora(TINY.dit, rank=2))
    meta = build_transformer_on_meta(TINY.dit)
    assert check_loras(meta, [path])[0].pairs > 0   # headers check on meta
    with pytest.raises(RuntimeError, match="merge before quantising"):
        apply_loras(meta, [path])
