"""Streaming load keeps host memory near the bf16 model size (never an fp32 copy of the shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from multitalk.models.architecture import DiTConfig
from multitalk.models.tiny import dit_key_shapes, is_multitalk_key

# ~94 M parameters: ~376 MB as fp32 files, ~190 MB as bf16 in memory.
CFG = dict(dim=1024, ffn_dim=4096, num_heads=16, num_layers=4, text_dim=256, clip_dim=64,
           intermediate_dim=64, output_dim=64, audio_blocks=2, audio_channels=32)
N_SHARDS = 3

LOADER = textwrap.dedent("""
    import json, re, sys, torch
    torch.set_num_threads(2)
    from multitalk.models.architecture import DiTConfig
    from multitalk.models.transformer import build_transformer_on_meta, load_transformer

    cfg = DiTConfig(**json.loads(sys.argv[2]))
    build_transformer_on_meta(cfg)                     # warm every import before measuring

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    fp8 = len(sys.argv) > 3 and sys.argv[3] == "fp8"
    if fp8:
        from multitalk.runtime.fp8 import LoadQuantizer, block_linears_filter, quantize_linears_fp8
    open("/proc/self/clear_refs", "w").write("5")      # reset the peak-RSS mark (VmHWM)
    before = status("VmRSS")
    if fp8:  # what Engine.load does for --weights fp8: quantised as read, then the layers swapped
        quantizer = LoadQuantizer()
        model = load_transformer(sys.argv[1], arch=cfg, dtype=torch.bfloat16, transform=quantizer)
        quantize_linears_fp8(model, block_linears_filter, out_dtype=torch.bfloat16, scales=quantizer.scales)
        assert not quantizer.scales
    else:
        model = load_transformer(sys.argv[1], arch=cfg, dtype=torch.bfloat16)
    peak = status("VmHWM")
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t is not None)
    print(json.dumps({"growth": peak - before, "model_bytes": size}))
""")


def _write_folder(folder: Path, cfg: DiTConfig) -> int:
    """Official-layout folder of random fp32 weights, written shard by shard; returns the fp32 bytes."""
    folder.mkdir()
    shapes = dit_key_shapes(cfg)
    base = [k for k in shapes if not is_multitalk_key(k)]
    files = {f"diffusion_pytorch_model-{i + 1:05d}-of-{N_SHARDS:05d}.safetensors": base[i::N_SHARDS]
             for i in range(N_SHARDS)}
    files["multitalk.safetensors"] = [k for k in shapes if is_multitalk_key(k)]
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for name, keys in files.items():
        tensors = {k: torch.randn(shapes[k], generator=gen) for k in keys}
        save_file(tensors, str(folder / name))
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": cfg.dim}))
    return total


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS accounting")
def test_bf16_load_peak_memory(tmp_path):
    fp32_bytes = _write_folder(tmp_path / "ckpt", DiTConfig(**CFG))
    result = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "ckpt"), json.dumps(CFG)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    growth, model_bytes = stats["growth"], stats["model_bytes"]
    print(f"\nfp32 files {fp32_bytes / 1e6:.0f} MB, bf16 model {model_bytes / 1e6:.0f} MB, "
          f"peak RSS growth while loading {growth / 1e6:.0f} MB = {growth / model_bytes:.2f}x the model")
    assert model_bytes < 0.6 * fp32_bytes              # really loaded as bf16
    assert growth <= 1.3 * model_bytes
    assert growth < 0.75 * fp32_bytes


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS accounting")
def test_fp8_load_never_holds_the_bf16_model(tmp_path):
    """--weights fp8: each block weight is quantised as it is read, so host memory peaks near the
    fp8 model, never at the bf16 one (the issue's host budget: 1.15x what the plan keeps)."""
    _write_folder(tmp_path / "ckpt", DiTConfig(**CFG))
    # Every weight of the 14B model (52-141 MB in bf16) is above glibc's largest mmap threshold
    # (32 MB), so each freed bf16 copy goes back to the OS at once; this small model's (2-8 MB) would
    # stay in the heap as holes (measured: 1.55x instead of 1.17x). Fixing the threshold gives them
    # the same treatment, so the test sees the loader, not the allocator's heuristics.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "ckpt"), json.dumps(CFG), "fp8"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    growth, fp8_bytes = stats["growth"], stats["model_bytes"]
    bf16_bytes = sum(v.numel() * 2 for k, v in _meta_model().state_dict().items())
    print(f"\nfp8 model {fp8_bytes / 1e6:.0f} MB (bf16: {bf16_bytes / 1e6:.0f} MB), "
          f"peak RSS growth while loading {growth / 1e6:.0f} MB = {growth / fp8_bytes:.2f}x the fp8 model")
    assert fp8_bytes < 0.65 * bf16_bytes
    assert growth <= 1.15 * fp8_bytes + 16e6        # + one float32 source tensor in flight
    assert growth < 0.8 * bf16_bytes


def _meta_model():
    from multitalk.models.transformer import build_transformer_on_meta

    return build_transformer_on_meta(DiTConfig(**CFG))
