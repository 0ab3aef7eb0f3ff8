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
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from bench import Setting, dit_inputs, rel_l2  # noqa: E402

R: dict = {}
T0 = time.perf_counter()
DEVICE = torch.device("cuda")


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def _engine(compile: bool):
    from multitalk.pipeline.engine import Engine, EngineConfig

    return Engine.load(EngineConfig(preset="tiny", device=str(DEVICE), dtype="float32", vae_dtype="float32",
                                    compile=compile))


def dit(out_dir: Path):
    import multitalk.runtime.dit_fusion as fusion
    from multitalk.models.architecture import TINY

    sec = R.setdefault("dit", {})
    s = Setting(TINY, DEVICE, torch.float32, height=224, width=112, frames=33, text_tokens=24,
                tiny=True)
    model = _engine(compile=False).transformer
    for speakers in (1, 2):
        inputs = dit_inputs(s, speakers)
        with torch.no_grad():
            run = lambda: model(**inputs).float().clone()  # noqa: E731
            ref = run()
            entry = {"eager_again": rel_l2(run(), ref)}
            for label, qk, gelu in (("gelu", False, True), ("qk", True, False), ("both", True, True)):
                fusion.fuse_dit(model, device="cuda", qk=qk, gelu=gelu)  # on CPU: the interpreter
                entry[label] = rel_l2(run(), ref)
                fusion.unfuse_dit(model)
        sec[f"{speakers}spk"] = entry
        log(f"dit {speakers}spk: {entry}")
    compiled = _engine(compile=False).transformer
    compiled.compile_repeated_blocks(fullgraph=False, dynamic=False)
    with torch.no_grad():
        for speakers in (1, 2):
            inputs = dit_inputs(s, speakers)
            ref = model(**inputs).float()
            sec[f"{speakers}spk"]["compiled_unfused"] = rel_l2(compiled(**inputs).float(), ref)
            fusion.fuse_dit(compiled, device="cuda")
            sec[f"{speakers}spk"]["compiled_fused"] = rel_l2(compiled(**inputs).float(), ref)
            fusion.unfuse_dit(compiled)
    log(f"dit: {json.dumps(sec)}")


def vae(out_dir: Path):
    from multitalk.runtime.vae_fusion import fuse_vae

    sec = R.setdefault("vae", {})
    g = torch.Generator(device=DEVICE).manual_seed(0)
    video = torch.rand(3, 33, 224, 112, device=DEVICE, generator=g) * 2 - 1

    def roundtrip(v):
        with torch.no_grad():
            latent = v.encode(video)
            return latent.float(), torch.cat(list(v.decode_chunks(latent)), dim=1).float()

    eager = _engine(compile=False).vae
    lat_ref, dec_ref = roundtrip(eager)
    lat, dec = roundtrip(eager)
    sec["eager_again"] = {"latent": rel_l2(lat, lat_ref), "video": rel_l2(dec, dec_ref)}
    tf32, bench = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    lat, dec = roundtrip(eager)
    sec["no_tf32_no_benchmark"] = {"latent": rel_l2(lat, lat_ref), "video": rel_l2(dec, dec_ref)}
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = tf32, bench
    fused = _engine(compile=False).vae
    sec["fused_sites"] = fuse_vae(fused, device=DEVICE)
    lat, dec = roundtrip(fused)
    sec["fused"] = {"latent": rel_l2(lat, lat_ref), "video": rel_l2(dec, dec_ref)}
    log(f"vae: {json.dumps(sec)}")


def video(out_dir: Path):
    from safetensors.torch import load_file

    from multitalk.pipeline.demo_inputs import write_demo_inputs
    from multitalk.pipeline.inputs import GenerationParams, load_input_json
    from multitalk.pipeline.render import render

    sec = R.setdefault("video", {})
    work = Path(tempfile.mkdtemp())
    spec, _ = load_input_json(write_demo_inputs(work / "inputs"))
    params = GenerationParams.from_dict(dict(size="preview", mode="clip", frame_num=33, sample_steps=4, seed=42))
    outs = {}
    for label, compile in (("eager", False), ("eager_again", False), ("compiled", True)):
        engine = _engine(compile)
        target = work / f"{label}.mp4"
        render(engine, spec, params, target, save_tensor=work / f"{label}.safetensors")
        outs[label] = load_file(str(work / f"{label}.safetensors"))["video"].float()
        del engine
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    for label in ("eager_again", "compiled"):
        sec[label] = rel_l2(outs[label], outs["eager"])
    log(f"video: {json.dumps(sec)}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--parts", default="dit,vae,video")
    p.add_argument("--device", default="cuda", help="cpu: check the plumbing (CUDA-only steps are no-ops)")
    args = p.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    R["gpu"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    for fn in [f for f in (dit, vae, video) if f.__name__ in args.parts.split(",")]:
        try:
            fn(args.out_dir)
        except Exception as exc:
            R[fn.__name__ + "_error"] = f"{type(exc).__name__}: {exc}\n" + traceback.format_exc()[-2500:]
            log(R[fn.__name__ + "_error"])
        (args.out_dir / "probe_cuda_parity.json").write_text(json.dumps(R, indent=1))
    R["total_s"] = time.perf_counter() - T0
    (args.out_dir / "probe_cuda_parity.json").write_text(json.dumps(R, indent=1))
    print(json.dumps(R, indent=1)[-6000:])


if __name__ == "__main__":
    main()
