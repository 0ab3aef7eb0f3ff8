"""``Engine`` with LoRAs: merged at load before fp8, and switched per job by ``Engine.use_loras``.

Uses the project's tiny preset on the CPU (``MULTITALK_HOME`` in a temporary folder) and random
official-format LoRA files.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from multitalk.models.architecture import TINY
from multitalk.models.lora import LoraError, LoraSpec, random_official_lora
from multitalk.pipeline.engine import Engine, EngineConfig, load_dit


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        paths[name] = d / f"{name}.safetensors"
        save_file(random_official_lora(TINY.dit, rank=4, seed=seed), str(paths[name]))
    bad = random_official_lora(TINY.dit, rank=4, seed=3)
    bad["diffusion_model.blocks.0.ffn.0.diff_b"] = torch.zeros(255, dtype=torch.bfloat16)
    paths["bad"] = d / "bad.safetensors"
    save_file(bad, str(paths["bad"]))
    return paths


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MULTITALK_HOME", str(tmp_path_factory.mktemp("home")))
    yield
    mp.undo()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _config(**kw):
    return EngineConfig(preset="tiny", device="cpu", dtype="float32", compile=False, **kw)


def test_use_loras_switches_sets_and_restores_the_pristine_weights(home, loras):
    engine = Engine.load(_config())
    pristine = _state(engine.transformer)
    assert engine.use_loras([]) is False                          # already the set merged

    assert engine.use_loras([LoraSpec(loras["a"], 1.0)]) is True
    with_a = _state(engine.transformer)
    assert not _same(with_a, pristine)
    assert [f["file"] for f in engine.lora_report.files] == ["a.safetensors"]
    dit = engine.transformer
    assert engine.use_loras([LoraSpec(loras["a"], 1.0)]) is False and engine.transformer is dit

    assert engine.use_loras([LoraSpec(loras["a"], 0.5)]) is True   # another scale is another set
    assert engine.use_loras([LoraSpec(loras["b"], 1.0), LoraSpec(loras["a"], 1.0)]) is True
    assert engine.use_loras([]) is True
    assert _same(_state(engine.transformer), pristine)             # no merge is inherited
    assert engine.lora_report.files == []

    dit = engine.transformer
    with pytest.raises(LoraError, match="bad.safetensors.*LoRA shape \\(255,\\)"):
        engine.use_loras([LoraSpec(loras["a"]), LoraSpec(loras["bad"])])
    assert engine.transformer is dit and _same(_state(dit), pristine)   # a bad file keeps the current DiT

    fresh = Engine.load(_config(loras=(LoraSpec(loras["a"], 1.0),)))
    assert _same(_state(fresh.transformer), with_a)                # load-time merge = switched merge
    assert fresh.load_seconds["lora_merge"] >= 0 and fresh.lora_report.tensors_changed > 0


def test_loras_merge_before_fp8_quantisation(home, loras):
    fp8 = Engine.load(_config(fp8=True))
    names = [n for n, m in fp8.transformer.named_modules() if type(m).__name__ == "Fp8Linear"]
    assert names, "no linear was quantised"
    fp8.use_loras([LoraSpec(loras["a"], 1.0)])
    merged_then_quantised = fp8.transformer.get_submodule(names[0]).weight_fp8.float()
    # the reference: merge into the float32 weights, then quantise
    from multitalk.runtime.fp8 import Fp8Linear

    def reference_dit(loras_):
        config = _config(loras=loras_)
        ckpt, _, mt = config.resolved_dirs()
        cpu = torch.device("cpu")
        return load_dit(config, ckpt, mt, fp8.arch, cpu, torch.float32, cpu)[0]

    want = Fp8Linear(reference_dit((LoraSpec(loras["a"], 1.0),)).get_submodule(names[0])).weight_fp8.float()
    assert torch.equal(merged_then_quantised, want)
    fp8.use_loras([])
    back = fp8.transformer.get_submodule(names[0]).weight_fp8.float()
    assert torch.equal(back, Fp8Linear(reference_dit(()).get_submodule(names[0])).weight_fp8.float())


def test_a_multi_gpu_engine_keeps_the_loras_it_started_with(home, loras):
    """Rank 0 cannot re-merge its servants' DiTs: another set is one clear error, the same set runs."""
    from types import SimpleNamespace

    from multitalk.errors import UserInputError

    engine = Engine.load(_config(loras=(LoraSpec(loras["a"], 1.0),)))
    dit = engine.transformer
    engine.parallel = SimpleNamespace(close=lambda: None)   # what load_parallel_engine sets on rank 0
    assert engine.use_loras([LoraSpec(loras["a"], 1.0)]) is False
    with pytest.raises(UserInputError, match="multi-GPU engine keeps the LoRAs it was started with"):
        engine.use_loras([])
    assert engine.transformer is dit and [f["file"] for f in engine.lora_report.files] == ["a.safetensors"]
