"""GPU probe: which CUDA-only step moves the tiny preset's float32 output, and by how much.

    PYTHONPATH=/tmp/site python benchmarks/probe_cuda_parity.py --out-dir "$OUT"
    python benchmarks/probe_cuda_parity.py --out-dir /tmp/parity --device cpu   # the plumbing, on CPU

Why: on the H200 (run 9-post), ``multitalk generate`` with the tiny preset in float32 gave a video
4.6e-2 (relative L2) away from the same command with ``--no-compile``; with bf16 (the CUDA
default) 7.6e-2. On CPU, compiled against eager float32 is 1.5e-6 apart, and perturbing every DiT
output by 1e-4 (relative) moves that video by 3.3e-4 only: the CUDA difference is far more than
float32 rounding, and the CPU tests cannot see the steps that only run on CUDA (the q/k Triton
kernel and the GELU epilogue of ``runtime.dit_fusion``, inductor's CUDA code, the VAE's Triton
kernel, cuDNN's TF32 convolutions and autotuned algorithms).

Writes ``probe_cuda_parity.json``, each figure a relative L2 against the eager float32 reference
on the same weights and inputs:

* ``dit``: one forward of the tiny DiT (the preset's weights, random inputs at the preview bucket,
  1 and 2 speakers): eager again (determinism), ``fuse_dit`` GELU only / q/k only / both, the
  regional compile without and with ``fuse_dit`` (what ``Engine.load`` does);
* ``vae``: encode + decode of a random clip: eager again, ``fuse_vae``, and the eager model with
  ``torch.backends.cudnn.allow_tf32`` off (and ``cudnn.benchmark`` off);
* ``video``: the whole ``render`` of the demo inputs (33 frames, 4 steps) with compile off twice
  and on, float32.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from builders import dit_inputs  # noqa: E402
from harness import Setting, rel_l2  # noqa: E402
from probe import Probe  # noqa: E402

P = Probe("probe_cuda_parity")
DEVICE = torch.device("cuda")


def _engine(compile: bool):
    from multitalk.pipeline.engine import Engine, EngineConfig

    return Engine.load(EngineConfig(preset="tiny", device=str(DEVICE), dtype="float32", vae_dtype="float32",
                                    compile=compile))


@lru_cache(maxsize=1)
def _eager_engine():
    return _engine(compile=False)


def dit():
    import multitalk.runtime.dit_fusion as fusion
    from multitalk.models.architecture import TINY

    sec = P.section("dit")
    s = Setting(TINY, DEVICE, torch.float32, height=224, width=112, frames=33, text_tokens=24, tiny=True)
    model = _eager_engine().transformer
    compiled = copy.deepcopy(model)
    compiled.compile_repeated_blocks(fullgraph=False, dynamic=False)
    for speakers in (1, 2):
        inputs = dit_inputs(s, speakers)
        entry = sec.setdefault(f"{speakers}spk", {})

        def vs_eager(m, label):
            with torch.no_grad():
                entry[label] = rel_l2(m(**inputs).float(), ref)

        with torch.no_grad():
            ref = model(**inputs).float()
        vs_eager(model, "eager_again")
        for label, qk, gelu in (("gelu", False, True), ("qk", True, False), ("both", True, True)):
            fusion.fuse_dit(model, device="cuda", qk=qk, gelu=gelu)  # on CPU: the interpreter
            vs_eager(model, label)
            fusion.unfuse_dit(model)
        vs_eager(compiled, "compiled_unfused")
        fusion.fuse_dit(compiled, device="cuda")   # what Engine.load does on CUDA
        vs_eager(compiled, "compiled_fused")
        fusion.unfuse_dit(compiled)
        P.log(f"dit {speakers}spk: {entry}")


def vae():
    from multitalk.runtime.vae_fusion import fuse_vae

    sec = P.section("vae")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    video = torch.rand(3, 33, 224, 112, device=DEVICE, generator=g) * 2 - 1
    eager = _eager_engine().vae

    def roundtrip(v):
        with torch.no_grad():
            latent = v.encode(video)
            return latent.float(), torch.cat(list(v.decode_chunks(latent)), dim=1).float()

    lat_ref, dec_ref = roundtrip(eager)

    def vs_eager(v, label):
        lat, dec = roundtrip(v)
        sec[label] = {"latent": rel_l2(lat, lat_ref), "video": rel_l2(dec, dec_ref)}

    vs_eager(eager, "eager_again")
    tf32, autotune = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    vs_eager(eager, "no_tf32_no_benchmark")
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = tf32, autotune
    fused = copy.deepcopy(eager)
    sec["fused_sites"] = fuse_vae(fused, device=DEVICE)
    vs_eager(fused, "fused")
    P.log(f"vae: {json.dumps(sec)}")


def video():
    from safetensors.torch import load_file

    from multitalk.pipeline.demo_inputs import write_demo_inputs
    from multitalk.pipeline.inputs import GenerationParams, load_input_json
    from multitalk.pipeline.render import render

    sec = P.section("video")
    work = Path(tempfile.mkdtemp())
    spec, _ = load_input_json(write_demo_inputs(work / "inputs"))
    params = GenerationParams.from_dict(dict(size="preview", mode="clip", frame_num=33, sample_steps=4, seed=42))

    def frames(engine, label):
        render(engine, spec, params, work / f"{label}.mp4", save_tensor=work / f"{label}.safetensors")
        return load_file(str(work / f"{label}.safetensors"))["video"].float()

    ref = frames(_eager_engine(), "eager")
    sec["eager_again"] = rel_l2(frames(_eager_engine(), "eager_again"), ref)
    sec["compiled"] = rel_l2(frames(_engine(compile=True), "compiled"), ref)
    P.log(f"video: {json.dumps(sec)}")


def main():
    global DEVICE
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--parts", default="dit,vae,video")
    p.add_argument("--device", default="cuda", help="cpu: check the plumbing (CUDA-only steps are no-ops)")
    args = p.parse_args()
    DEVICE = torch.device(args.device)
    P.data["gpu"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    P.run(args.out_dir, {"dit": dit, "vae": vae, "video": video}, args.parts)


if __name__ == "__main__":
    main()
