"""CPU check of issue 18's second gate: on the tiny preset, the 8-bit attention moves the video less
than running the pipeline in bf16 already does.

    python benchmarks/tiny_e2e_attention.py --out results.json [--steps 3]

One 9-frame clip of the demo's two speakers at the preview size, the same seed, four ways: float32
(the reference), bf16, float32 with the 8-bit attention and bf16 with it. The 8-bit attention runs
as ``runtime.attention_int8.reference_int8_attention`` (PyTorch; the same quantisation and tile
arithmetic the Triton kernel is held to). Reports each video's relative L2 distance to float32.
Takes a few minutes on two CPU cores (the VAE dominates).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from multitalk.pipeline.demo_inputs import write_demo_inputs  # noqa: E402
from multitalk.pipeline.engine import Engine, EngineConfig  # noqa: E402
from multitalk.pipeline.generate import generate  # noqa: E402
from multitalk.pipeline.inputs import GenerationParams, load_input_json  # noqa: E402
from multitalk.runtime.attention_int8 import enable_int8_self_attention  # noqa: E402


def video(spec, params, dtype: str, int8: bool) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    engine = Engine.load(EngineConfig(preset="tiny", device="cpu", dtype=dtype, compile=False, attention="sdpa"))
    if int8:
        enable_int8_self_attention(engine.transformer, reference=True)
    frames = []
    generate(engine, spec, params, on_frames=lambda f: frames.append(f.float().clone()))
    return torch.cat(frames, dim=1), time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        spec, _ = load_input_json(write_demo_inputs(Path(tmp)))
        params = GenerationParams.from_dict(dict(size="preview", frame_num=9, mode="clip", sample_steps=args.steps,
                                                 seed=7, color_correction_strength=0.0))
        runs = {name: video(spec, params, dtype, int8) for name, dtype, int8 in
                (("float32", "float32", False), ("bf16", "bfloat16", False), ("int8attn", "float32", True),
                 ("bf16_int8attn", "bfloat16", True))}
    ref = runs["float32"][0].double()
    report = {"video_shape": list(ref.shape), "steps": args.steps,
              "rel_l2_vs_float32": {k: float((v.double() - ref).norm() / ref.norm()) for k, (v, _) in runs.items()
                                    if k != "float32"},
              "seconds": {k: s for k, (_, s) in runs.items()}}
    report["gate_passes"] = report["rel_l2_vs_float32"]["int8attn"] <= report["rel_l2_vs_float32"]["bf16"]
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
