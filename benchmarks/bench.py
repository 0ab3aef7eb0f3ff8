"""GPU benchmark of the MultiTalk DiT and of one clip end to end, on random weights.

    python benchmarks/bench.py --out-dir benchmarks/results [--sections ceilings,forward,...] [--tiny-cpu]

Everything is built with random weights (no checkpoint is needed): official-key tensors are drawn
on the device and streamed through the project's own loaders (``load_converted`` with the DiT,
umT5, CLIP, VAE and wav2vec2 converters), so dtypes and layouts are those of a real load. One
invocation runs the sections in this order, each in its own try/except (an error is recorded in
the report and the run goes on), and rewrites the JSON report after every measurement:

* ``ceilings``  matmul bf16/fp8 rates, SDPA rate per backend, H2D copy (``ceilings.py``)
* ``forward``   DiT forward at 640x640x81 (33600 tokens), 1 and 2 speakers, FLOPs + MFU,
                plus one timing per ``--attention-backends`` variant
* ``teacache``  forwards TeaCache skips over a 40-step schedule (shift 7) at 0.2 / 0.3
* ``fp8``       row-wise fp8 linears: time and relative L2 error against the bf16 output
* ``baseline``  diffusers' plain ``WanTransformer3DModel`` (Wan2.1 I2V-14B config), same inputs
* ``compile``   regional ``compile_repeated_blocks``: compile time and compiled forward
* ``compiled_extra``  the compiled model: 2 speakers, kernel breakdown, fp8 variants
* ``vae``       full-size VAE encode (81 frames) and chunked decode (21 latent frames): as loaded,
                channels-last probe, ``runtime.vae_fusion``; times, kernel breakdowns, relative error
* ``clip4``     one 81-frame clip at 4 steps through ``pipeline.generate`` (+ mp4), per stage

The harness (report, timing, shared state) is ``harness.py``, the random models and inputs
``builders.py``, and each section ``sections/<name>.py`` (registered in ``sections/__init__.py``).
``--tiny-cpu`` runs the same code on CPU with the TINY architecture and a 9-frame 32x32 video in seconds
(CUDA-only figures stay NaN). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import multitalk  # noqa: F401
except ImportError:  # a bare checkout (the GPU image): use the source tree
    sys.path.insert(0, str(HERE.parent / "src"))

from harness import HEADLINE_KEYS, Bench, Report, Setting, analytic_flops, environment, run_section  # noqa: E402
from multitalk.models.architecture import FULL_14B, TINY  # noqa: E402
from sections import SECTIONS, in_tiny_cpu_default  # noqa: E402


def print_table(report: Report) -> None:
    d = report.data
    rows = [("gpu", d["gpu"]), ("tokens", d["tokens"])] + [(k, d.get(k)) for k in HEADLINE_KEYS] + [
        (k, d[k]) for k in ("mfu_bf16_1spk", "best_attention_backend", "forward_bf16_1spk_best_s",
                            "forward_bf16_1spk_compiled_s", "compiled_over_floor", "compiled_over_diffusers",
                            "compiled_spk2_over_spk1", "fp8_over_compiled_bf16") if k in d]
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * (width + 16))
    for k, v in rows:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        print(f"{k:<{width}}  {text}")
    for name, err in d["errors"].items():
        print(f"ERROR {name}: {err['error'][:200]}")
    for name, why in d["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"report: {report.path}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True, help="folder of the JSON report")
    p.add_argument("--sections", default=None,
                   help=f"comma list, run in the fixed order {','.join(SECTIONS)} (default: all; "
                        "--tiny-cpu: those that run in seconds on CPU)")
    p.add_argument("--tiny-cpu", action="store_true", help="TINY architecture on CPU, 9 x 32x32 video (CI smoke)")
    p.add_argument("--backend", default="native", help="attention backend of every main measurement")
    p.add_argument("--attention-backends", default="_native_cudnn,_native_flash",
                   help="extra 1-speaker forwards, one per diffusers backend name ('' for none)")
    p.add_argument("--no-fullgraph", dest="fullgraph", action="store_false",
                   help="compile section: allow graph breaks")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per measurement (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clip-steps", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=200, help="trimmed T5 context length")
    p.add_argument("--budget-s", type=float, default=510.0,
                   help="wall-clock budget: later sections/variants that would not fit are skipped")
    args = p.parse_args(argv)
    default = [x for x in SECTIONS if not args.tiny_cpu or in_tiny_cpu_default(x)]
    wanted = default if args.sections is None else [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    args.sections = [x for x in SECTIONS if x in wanted]
    args.attention_backends = [x.strip() for x in args.attention_backends.split(",") if x.strip()]
    return args


def make_setting(args: argparse.Namespace) -> Setting:
    if args.tiny_cpu:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        return Setting(TINY, torch.device("cpu"), torch.float32, height=32, width=32, frames=9,
                       text_tokens=min(args.text_tokens, 24), tiny=True)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny-cpu for the CPU smoke run")
    return Setting(FULL_14B, torch.device("cuda"), torch.bfloat16, text_tokens=args.text_tokens)


def main(argv: list[str] | None = None) -> int:
    from diffusers.utils import logging as diffusers_logging

    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # one "experimental backend" warning per switch hides the log
    setting = make_setting(args)
    name = torch.cuda.get_device_name(setting.device) if setting.device.type == "cuda" else "cpu-tiny"
    report = Report(args.out_dir, name)
    # the output folder is a path of the machine that ran it: recorded as a placeholder
    argv = ["<out-dir>" if Path(a) == Path(args.out_dir) else a for a in sys.argv[1:]]
    report.data.update(tokens=setting.tokens, environment=environment(setting), argv=argv,
                       flops_1spk_analytic=analytic_flops(setting),
                       started=dt.datetime.now().isoformat(timespec="seconds"))
    report.save()
    bench = Bench(setting, args, report)
    bench.log(f"{name}: {setting.arch.name}, {setting.tokens} tokens, sections {','.join(args.sections)}; "
              f"report {report.path}")
    torch.manual_seed(0)
    for section in args.sections:
        run_section(bench, section)
    report.data["total_s"] = time.perf_counter() - bench.started
    report.save()
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
