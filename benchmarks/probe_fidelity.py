"""GPU probe: how close the CUDA paths come to the official output, with the noise drawn on the CPU.

    PYTHONPATH=/tmp/site python benchmarks/probe_fidelity.py --golden GOLDEN --examples EXAMPLES --out-dir "$OUT"
    python benchmarks/probe_fidelity.py --golden ../shared/golden --examples ../shared/examples \\
        --out-dir /tmp/fidelity --device cpu --cases single --variants float32,vae_bf16   # on CPU

``--noise-device cpu`` draws the seeded noise as the official CPU run drew it, so a CUDA run and
a CPU run of the same case start from the same numbers and any difference is the GPU's
arithmetic. Writes ``probe_fidelity.json``:

* ``golden``: the three golden end-to-end cases (``tests/test_e2e_golden.py``'s settings) and
  ``streaming``, a held-out-style case (two speakers ``add`` with boxes, streaming over 5 clips of
  17 frames at ``multitalk-480``, colour correction 1.0). Each runs once in float32 on the CPU
  (the reference) and then on ``--device`` in each variant: ``float32`` (eager, TF32 off),
  ``float32_compiled`` (regional compile + fused DiT / VAE kernels), ``vae_bf16`` (float32, bf16
  VAE), ``bf16`` (the CUDA default). Per run: ``vs_cpu`` (relative L2 of the whole video against
  the CPU float32 run) and, for the golden cases, ``vs_golden`` (the tests' measures: 8x8 block
  means, per-frame mean and std, against the official vectors). ``ok`` marks float32 variants
  within 1e-5 of the CPU run;
* ``vae``: the full-size Wan VAE (random weights, ``builders.build_vae``) on an 81-frame
  640x640 clip: bf16 (as loaded and fused) and float32 with cuDNN's TF32 convolutions, each
  against float32 with TF32 off (latent and decoded video).

The golden folder needs only ``weights/Wan2.1-I2V-tiny/``, ``weights/chinese-wav2vec2-tiny/`` and
``vectors/e2e_{single_clip,multi_add_bbox_stream,multi_para_stream}.safetensors``; the examples
folder ``single_example_1.json``, ``single/{single1.png,1.wav}``, ``multitalk_example_1.json`` and
``multi/1/{multi1.png,1.WAV,2.WAV}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import rel_l2  # noqa: E402
from probe import Probe  # noqa: E402

P = Probe("probe_fidelity")
FLOAT32_TOL = 1e-5

# the golden end-to-end cases (tests/test_e2e_golden.py) and the held-out-style streaming case
CASES = {
    "single": dict(json="single_example_1.json", vectors="e2e_single_clip", params=dict(
        frame_num=9, motion_frame=5, mode="clip", sample_steps=4, sample_shift=7, seed=42,
        color_correction_strength=0.0)),
    "add": dict(json="multitalk_example_1.json", vectors="e2e_multi_add_bbox_stream", params=dict(
        frame_num=9, motion_frame=5, mode="streaming", max_frames=17, sample_steps=8, sample_shift=7, seed=123,
        use_teacache=True, teacache_thresh=0.2, use_apg=True, color_correction_strength=0.0)),
    "para": dict(json="multitalk_example_1.json", audio_type="para", bbox=None, vectors="e2e_multi_para_stream",
                 frames=25, params=dict(frame_num=9, motion_frame=5, mode="streaming", max_frames=25,
                                        sample_steps=4, sample_shift=7, seed=2024, color_correction_strength=1.0)),
    # para without colour correction: tells the GPU arithmetic apart from the colour matching's
    # amplification of it (para is the case with colour correction 1.0 and speech-free frames)
    "para_nocc": dict(json="multitalk_example_1.json", audio_type="para", bbox=None, frames=25, params=dict(
        frame_num=9, motion_frame=5, mode="streaming", max_frames=25, sample_steps=4, sample_shift=7, seed=2024,
        color_correction_strength=0.0)),
    "streaming": dict(json="multitalk_example_1.json", params=dict(
        frame_num=17, motion_frame=5, mode="streaming", max_frames=61, sample_steps=4, seed=7,
        color_correction_strength=1.0)),
}
VARIANTS = {  # EngineConfig fields on --device
    "float32": dict(dtype="float32", compile=False),
    "float32_compiled": dict(dtype="float32", compile=True),
    "vae_bf16": dict(dtype="float32", vae_dtype="bfloat16", compile=False),
    "bf16": dict(),
}


def _spec(case: dict, examples: Path):
    from multitalk.pipeline.inputs import InputSpec, load_input_json

    spec, _ = load_input_json(examples / case["json"])
    if "audio_type" not in case:
        return spec
    fields = spec.model_dump(include={"prompt", "cond_image", "cond_audio"})
    return InputSpec.from_dict({**fields, "audio_type": case["audio_type"], "bbox": case["bbox"]})


def _video(engine, spec, params) -> torch.Tensor:
    from multitalk.pipeline.generate import generate

    frames: list[torch.Tensor] = []
    generate(engine, spec, params, on_frames=frames.append)
    return torch.cat(frames, dim=1).float()


def _vs_golden(video: torch.Tensor, ref: dict, frames: int) -> dict:
    v = video[:, :frames].double()
    blocks = F.avg_pool2d(v.transpose(0, 1), 8).transpose(0, 1)
    ours = {"video_ds8": blocks, "video_frame_mean": v.mean(dim=(2, 3)).T,
            "video_frame_std": v.std(dim=(2, 3), unbiased=False).T}
    return {k: rel_l2(x, ref[k][:frames] if k != "video_ds8" else ref[k][:, :frames]) for k, x in ours.items()}


def golden(args) -> None:
    from safetensors.torch import load_file

    from multitalk.pipeline.engine import Engine, EngineConfig
    from multitalk.pipeline.inputs import GenerationParams

    weights = dict(ckpt_dir=args.golden / "weights" / "Wan2.1-I2V-tiny",
                   wav2vec_dir=args.golden / "weights" / "chinese-wav2vec2-tiny")
    sec = P.section("golden")
    runs = {}
    for name in args.cases:
        case = CASES[name]
        runs[name] = (_spec(case, args.examples), GenerationParams.from_dict({**case["params"], "noise_device": "cpu"}))
    configs = {"cpu_float32": dict(device="cpu", dtype="float32", compile=False),
               **{v: dict(device=args.device, **VARIANTS[v]) for v in args.variants}}
    reference: dict[str, torch.Tensor] = {}
    for label, fields in configs.items():
        engine = Engine.load(EngineConfig(**weights, **fields))
        for name, (spec, params) in runs.items():
            video = _video(engine, spec, params)
            entry = sec.setdefault(name, {}).setdefault(label, {"frames": video.shape[1]})
            if label == "cpu_float32":
                reference[name] = video
            else:
                entry["vs_cpu"] = rel_l2(video, reference[name])
                if "float32" in label:
                    entry["ok"] = entry["vs_cpu"] <= FLOAT32_TOL
            vectors = CASES[name].get("vectors")
            if vectors:
                ref = load_file(str(args.golden / "vectors" / f"{vectors}.safetensors"))
                entry["vs_golden"] = _vs_golden(video, ref, CASES[name].get("frames", video.shape[1]))
            P.log(f"{name} {label}: {json.dumps(entry)}")
            P.save()
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def vae(args) -> None:
    from builders import build_vae
    from harness import Setting

    from multitalk.models.architecture import FULL_14B, TINY
    from multitalk.runtime.placement import configure_backends
    from multitalk.runtime.vae_fusion import fuse_vae

    sec = P.section("vae")
    device = torch.device(args.device)
    s = (Setting(FULL_14B, device, torch.float32) if device.type == "cuda"
         else Setting(TINY, device, torch.float32, height=64, width=64, frames=9, tiny=True))
    g = torch.Generator().manual_seed(3)
    video = torch.cat([torch.rand(3, 1, s.height, s.width, generator=g) * 2 - 1,
                       torch.rand(3, s.frames - 1, s.height, s.width, generator=g) * 0.2 - 0.1], dim=1)

    def roundtrip(model) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            latent = model.encode(video.to(device))
            return latent.float().cpu(), torch.cat(list(model.decode_chunks(latent)), dim=1).float().cpu()

    configure_backends(device, float32=True)                 # TF32 off: the float32 reference
    model = build_vae(s, seed=15, dtype=torch.float32)
    ref_latent, ref_video = roundtrip(model)

    def compare(label: str, model) -> None:
        latent, decoded = roundtrip(model)
        sec[label] = {"latent": rel_l2(latent, ref_latent), "video": rel_l2(decoded, ref_video)}
        P.log(f"vae {label}: {sec[label]}")
        P.save()

    compare("float32_again", model)
    configure_backends(device, float32=False)                # PyTorch's default: TF32 convolutions
    compare("float32_tf32_conv", model)
    del model
    model = build_vae(s, seed=15, dtype=torch.bfloat16)
    compare("bf16", model)
    sec["fused_sites"] = fuse_vae(model, device=device)
    compare("bf16_fused", model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--golden", type=Path, required=True, help="the golden folder (see the docstring for the files)")
    p.add_argument("--examples", type=Path, required=True, help="the official examples folder")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--device", default="cuda", help="cpu: the plumbing (every variant then runs on the CPU)")
    p.add_argument("--parts", default="golden,vae")
    p.add_argument("--cases", default=",".join(CASES), help=f"of {','.join(CASES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {','.join(VARIANTS)}")
    args = p.parse_args()
    args.cases = [c for c in args.cases.split(",") if c]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.cases) - set(CASES)) + sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown cases / variants {unknown}")
    P.data.update(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  torch=torch.__version__, cases=args.cases, variants=args.variants)
    P.run(args.out_dir, {"golden": lambda: golden(args), "vae": lambda: vae(args)}, args.parts)


if __name__ == "__main__":
    main()
