"""LoRAs and recipes through the real ``multitalk generate`` command.

* The end-to-end run: ``multitalk generate --lora_dir A B --lora_scale 1.0 0.5 --recipe lightx2v``
  (4 steps, shift 2, text guide 1 -> the 2-pass guidance) on the golden tiny weights and LoRA files,
  through the typer app (argument parsing included), against the same generation in-process with the LoRAs merged by the official
  rule written out here (``W += scale * up @ down``, ``+= scale * diff``) on the engine's DiT.
* Bad LoRA input is one line naming the option, the file, the key and both shapes, exit code 2,
  before any model is loaded; ``--recipe`` defaults give way to options given explicitly; the
  official ``nargs='+'`` spelling and repeated options both work.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import rel_l2
from multitalk.cli import app, expand_multi_value_options
from multitalk.models.architecture import TINY
from multitalk.models.lora import random_official_lora

pytestmark = pytest.mark.timeout(600)


def test_nargs_plus_spelling_becomes_repeated_options():
    args = ["generate", "x.json", "--lora_dir", "a.safetensors", "b.safetensors", "--lora-scale", "1", "-0.5",
            "--seed", "3", "--lora-dir", "c", "in.json", "--lora_scale=2", "--", "--lora_dir", "d"]
    assert expand_multi_value_options(args) == [
        "generate", "x.json", "--lora_dir", "a.safetensors", "--lora_dir", "b.safetensors", "--lora-scale", "1",
        "--lora-scale", "-0.5", "--seed", "3", "--lora-dir", "c", "in.json", "--lora_scale=2", "--", "--lora_dir", "d"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from multitalk.pipeline.demo_inputs import write_demo_inputs

    d = tmp_path_factory.mktemp("lora-cli")
    good = d / "good.safetensors"
    save_file(random_official_lora(TINY.dit, rank=2), str(good))
    other = d / "other_model.safetensors"   # a LoRA for a wider model (like the 1.3B for the 14B)
    save_file(random_official_lora(replace(TINY.dit, dim=96, num_heads=2), rank=2), str(other))
    (d / "weights.pt").write_bytes(b"\x80\x02 a pickle")
    return {"dir": d, "good": good, "other": other, "pt": d / "weights.pt", "json": write_demo_inputs(d / "demo")}


def _invoke(files, *args):
    full = ["generate", str(files["json"]), "--preset", "tiny", "--device", "cpu", "--quiet",
            "--out", str(files["dir"] / "out.mp4"), *args]
    return CliRunner().invoke(app, full, catch_exceptions=True)


@pytest.mark.parametrize("args,words", [
    (["--lora_dir", "{other}"], ["lora_dir: other_model.safetensors: does not fit this model",
                                 "key diffusion_model.blocks.0", "model shape (64, 64)", "LoRA shape (96, 96)"]),
    (["--lora_dir", "{good}", "{other}", "--lora_scale", "1", "0.5"], ["other_model.safetensors", "LoRA shape (96, 96)"]),
    (["--lora_dir", "{pt}"], ["lora_dir: weights.pt: not a readable safetensors file"]),
    (["--lora_dir", "{good}", "{good}", "--lora_scale", "1"], ["lora_scale: 1 scales for 2 LoRA files"]),
    (["--lora_scale", "1"], ["lora_scale: given without --lora_dir"]),
    (["--lora_dir", "{good}", "--lora_scale", "nan"], ["lora_scale: scale nan is not finite"]),
    (["--lora_dir", "{dir}/missing.safetensors"], ["lora_dir: LoRA file not found"]),
    (["--recipe", "turbo"], ["recipe: Input should be 'lightx2v' or 'fusionx'"]),
])
def test_bad_lora_input_is_one_line_exit_2(files, monkeypatch, args, words):
    from multitalk.models import transformer

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(transformer, "load_transformer", no_model)
    result = _invoke(files, *[a.format(**files) for a in args])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for word in words:
        assert word in text, (word, text)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args,want", [
    (["--recipe", "lightx2v"], (4, 2.0, 1.0, 2.0)),
    (["--recipe", "fusionx"], (8, 2.0, 1.0, 2.0)),
    (["--recipe", "lightx2v", "--sample_steps", "6", "--sample-audio-guide-scale", "3"], (6, 2.0, 1.0, 3.0)),
    (["--recipe", "fusionx", "--sample_shift", "5", "--sample_text_guide_scale", "5"], (8, 5.0, 5.0, 2.0)),
    (["--sample_steps", "40"], (40, 7.0, 5.0, 4.0)),
])
def test_recipe_defaults_and_explicit_options_win(files, monkeypatch, args, want):
    from multitalk.errors import UserInputError
    from multitalk.pipeline import inputs

    seen = []
    original = inputs.GenerationParams.from_cli.__func__

    def spy(cls, **options):
        seen.append(original(cls, **options))
        raise UserInputError("stop", "captured")

    monkeypatch.setattr(inputs.GenerationParams, "from_cli", classmethod(spy))
    result = _invoke(files, *args)
    assert result.exit_code == 2 and seen, result.output
    p = seen[0]
    assert (p.sample_steps, p.shift, p.text_guide_scale, p.audio_guide_scale) == want


def test_recipe_without_lora_warns(files, monkeypatch):
    from multitalk.errors import UserInputError
    from multitalk.pipeline.engine import Engine

    def stop(cls, config):
        raise UserInputError("stop", "no model needed")

    monkeypatch.setattr(Engine, "load", classmethod(stop))
    result = _invoke(files, "--recipe", "lightx2v")
    assert "without --lora_dir" in " ".join(result.output.split())
    assert "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors" in result.output.replace("\n", "")


# -- end to end -----------------------------------------------------------------------------------
def _official_merge(model, path, scale):
    """The official ``WanLoraWrapper`` rule, written out: pairs, diff, diff_b; alpha ignored."""
    from multitalk.models.transformer import convert_dit_key

    sd = load_file(str(path))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in sd.items():
            name = key[len("diffusion_model."):]
            for suffix, leaf in ((".lora_down.weight", ".weight"), (".diff_b", ".bias"), (".diff", ".weight")):
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    target = params[convert_dit_key(module + leaf, None)[0][0]]
                    if suffix == ".lora_down.weight":
                        up = sd[f"diffusion_model.{module}.lora_up.weight"]
                        target += (up.float() @ value.float()) * scale
                    else:
                        target += value.float() * scale
                    break


@pytest.mark.slow
def test_generate_with_loras_and_two_pass_guidance(golden, examples, tmp_path):
    from multitalk.pipeline.engine import Engine, EngineConfig
    from multitalk.pipeline.inputs import GenerationParams, load_input_json
    from multitalk.pipeline.render import render

    weights, lora = golden / "weights", golden / "lora"
    a, b = lora / "lora_a_official.safetensors", lora / "lora_b_official.safetensors"
    args = ["generate", str(examples / "single_example_1.json"), "--ckpt-dir", str(weights / "Wan2.1-I2V-tiny"),
            "--wav2vec-dir", str(weights / "chinese-wav2vec2-tiny"), "--size", "preview", "--frame_num", "5",
            "--mode", "clip", "--base_seed", "42", "--color_correction_strength", "0",
            "--recipe", "lightx2v", "--lora_dir", str(a), str(b), "--lora_scale", "1.0", "0.5",
            "--out", str(tmp_path / "lora.mp4"), "--save-tensor", str(tmp_path / "lora.safetensors"),
            "--device", "cpu", "--dtype", "float32", "--quiet"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)   # the real command, in this process
    assert result.exit_code == 0, result.output[-3000:]
    log = " ".join(result.output.split())
    assert "LoRA lora_a_official.safetensors (official, scale 1): 28 low-rank pairs, 5 full-size differences" in log
    assert "LoRA lora_b_official.safetensors (official, scale 0.5): 6 low-rank pairs" in log
    assert "LoRA: 33 model tensors changed" in log
    assert "sampling: 4 steps x 2 model passes per clip (shift 2, text guide 1, audio guide 2)" in log
    video = load_file(str(tmp_path / "lora.safetensors"))["video"]
    assert (tmp_path / "lora.mp4").stat().st_size > 0

    # the same generation in-process: base weights, then the LoRAs merged by the official rule
    engine = Engine.load(EngineConfig(ckpt_dir=weights / "Wan2.1-I2V-tiny", wav2vec_dir=weights / "chinese-wav2vec2-tiny",
                                      device="cpu", dtype="float32", compile=False))
    spec, _ = load_input_json(examples / "single_example_1.json")
    params = GenerationParams.from_cli(size="preview", frame_num=5, mode="clip", seed=42, color_correction_strength=0.0,
                                       sample_steps=4, sample_shift=2.0, text_guide_scale=1.0, audio_guide_scale=2.0)
    base_dit = {k: v.clone() for k, v in engine.transformer.state_dict().items()}
    _official_merge(engine.transformer, a, 1.0)
    _official_merge(engine.transformer, b, 0.5)
    moved = max(rel_l2(v, base_dit[k]) for k, v in engine.transformer.state_dict().items())
    calls = []
    hook = engine.transformer.register_forward_hook(lambda *_: calls.append(1))
    render(engine, spec, params, tmp_path / "ref.mp4", save_tensor=tmp_path / "ref.safetensors")
    hook.remove()
    assert len(calls) == 4 * 2  # text guide 1: cond + drop-audio per step
    ref = load_file(str(tmp_path / "ref.safetensors"))["video"]
    err = rel_l2(video, ref)
    print(f"CLI with LoRAs vs official-rule merge: {err:.2e} (weights moved up to {moved:.2e})")
    assert err < 1e-5
    assert moved > 1e-2  # the LoRAs change the weights (the golden tests: and the DiT output by ~7 %)
