"""GPU probe for the memory plan: block streaming with compile and fp8 on the real GPU, and the
working-memory figures the planner's constants come from.

    PYTHONPATH=/tmp/site python benchmarks/probe_memory.py --out-dir "$OUT" [--parts streaming,activations,...]
    python benchmarks/probe_memory.py --out-dir /tmp/probe --device cpu     # plumbing check, tiny sizes

Writes ``probe_memory.json``. Parts (in this order by default, each in its own section):

* ``streaming``: a full-size 8-block DiT (640x640x81, 2 speakers), fused + regionally compiled as
  ``Engine.load`` does: the resident forward against every block streamed (prefetch 1 and 2) and half
  of them streamed; bit-identity of the outputs; the streamer's counters; a CUDA profile of one
  streamed forward reduced to what overlapped (copy time under kernels, compute-stream idle time);
  then fp8 weight storage (every block linear in e4m3) compiled with ``_scaled_mm`` and dequantised:
  time and error against bf16, resident and streamed;
* ``activations``: peak working memory of the DiT forward (2 full-size blocks) eager and compiled at
  33,600 tokens (1 and 2 speakers) and 75,600 tokens (the 960x960 bucket);
* ``vae``: peak working memory of the full-size VAE's 81-frame encode and chunked decode at 640x640
  and 960x960;
* ``text``: umT5-XXL encode (2 x 512 tokens): peak, and resident vs block-streamed time;
* ``host``: host RSS of one block pinned tensor by tensor (``pin_memory``, what diffusers' group
  offloading does) against ``runtime.host_memory.HostCopy`` (one registered buffer);
* ``diffusers``: diffusers' ``apply_group_offloading`` (block level, stream, prefetch) on the same
  eager 8-block model against ``BlockStreamer``, eager both.
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from builders import build_dit, build_vae, dit_inputs, random_items  # noqa: E402
from harness import Setting, rel_l2  # noqa: E402
from probe import Probe  # noqa: E402

from multitalk.models.architecture import FULL_14B, TINY  # noqa: E402

P = Probe("probe_memory")
log = P.log
GIB = 2**30
ARGS = argparse.Namespace(device="cuda")


def dev() -> torch.device:
    return torch.device(ARGS.device)


def sync() -> None:
    if dev().type == "cuda":
        torch.cuda.synchronize()


def arch_with(layers: int):
    base = TINY if dev().type == "cpu" else FULL_14B
    return replace(base, dit=replace(base.dit, num_layers=layers))


def setting(layers: int, size: int = 640) -> Setting:
    if dev().type == "cpu":
        return Setting(arch_with(layers), dev(), torch.float32, height=32, width=32, frames=9, text_tokens=24,
                       tiny=True)
    return Setting(arch_with(layers), dev(), torch.bfloat16, height=size, width=size)


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    out = None
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def peak_of(fn) -> tuple[float, object]:
    """Working memory of ``fn``: peak allocated while it runs minus what was allocated before (GiB)."""
    if dev().type != "cuda":
        return float("nan"), fn()
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / GIB, out


def rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def free() -> None:
    gc.collect()
    if dev().type == "cuda":
        torch.cuda.empty_cache()


def compiled_dit(layers: int, size: int = 640, weights: str = "bf16", matmul: bool | None = None,
                 compile: bool = True):
    from multitalk.pipeline.engine import prepare_transformer

    s = setting(layers, size)
    dit = build_dit(s)
    prepare_transformer(dit, dev(), s.dtype, weights=weights, fp8_matmul=matmul,
                        compile=compile and dev().type == "cuda")
    return s, dit


# ----------------------------------------------------------------------------------------------


def overlap_summary(prof) -> dict:
    """From a CUDA profile: time of host-to-device copies, how much of it ran under kernels, and the
    compute stream's idle time inside the profiled span."""
    kernels, copies = [], []
    for e in prof.profiler.kineto_results.events():
        try:
            if e.device_type() != torch.autograd.DeviceType.CUDA:
                continue
            start, end = e.start_ns(), e.end_ns()
        except Exception:
            continue
        name = e.name()
        if "Memcpy HtoD" in name:
            copies.append((start, end))
        elif not name.startswith("Memcpy") and not name.startswith("Memset"):
            kernels.append((start, end))

    def union(iv):
        iv = sorted(iv)
        out = []
        for a, b in iv:
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        return out

    def length(iv):
        return sum(b - a for a, b in iv)

    def intersect(x, y):
        i = j = 0
        out = 0
        while i < len(x) and j < len(y):
            a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
            out += max(0, b - a)
            if x[i][1] < y[j][1]:
                i += 1
            else:
                j += 1
        return out

    k, c = union(kernels), union(copies)
    if not k:
        return {"kernels": 0}
    span = k[-1][1] - k[0][0]
    return {"span_ms": span / 1e6, "kernel_busy_ms": length(k) / 1e6, "compute_idle_ms": (span - length(k)) / 1e6,
            "h2d_copies": len(copies), "h2d_ms": length(c) / 1e6,
            "h2d_under_kernels_ms": intersect(c, k) / 1e6,
            "h2d_overlapped_fraction": intersect(c, k) / max(1, length(c))}


def streaming() -> None:
    from multitalk.runtime.block_streaming import spread
    from multitalk.runtime.fp8 import set_fp8_matmul
    from multitalk.runtime.placement import Placement

    sec = P.section("streaming")
    layers = 8
    s, dit = compiled_dit(layers)
    inputs = dit_inputs(s, speakers=2)
    placement = Placement(dev())
    sec["block_bytes"] = sum(t.numel() * t.element_size() for t in [*dit.blocks[0].parameters(),
                                                                    *dit.blocks[0].buffers()])

    def forward():
        with torch.no_grad():
            return dit(**inputs)

    t0 = time.perf_counter()
    forward()
    sync()
    sec["first_call_s"] = time.perf_counter() - t0
    sec["resident_s"], ref = timed(forward)
    log(f"resident {sec['resident_s']:.3f}s (first call {sec['first_call_s']:.1f}s)")
    P.save()

    def streamed(label: str, which, prefetch: int = 1, profile: bool = False):
        placement.set_policy(dit, "streamed", blocks=dit.blocks, streamed=which, prefetch=prefetch)
        streamer = placement.policy(dit).streamer
        with placement.use(dit):
            peak, _ = peak_of(forward)          # also the warm-up of this layout
            t, out = timed(forward)
            row = {"streamed": list(which), "prefetch": prefetch, "s": t, "over_resident": t / sec["resident_s"],
                   "bit_identical": bool(torch.equal(out, ref)), "rel_err": rel_l2(out.float(), ref.float()),
                   "peak_gib": peak, "stats": vars(streamer.stats).copy(), "pinned": streamer.pinned}
            if profile and dev().type == "cuda":
                from torch.profiler import ProfilerActivity, profile as prof_ctx

                with prof_ctx(activities=[ProfilerActivity.CUDA]) as prof:
                    forward()
                    sync()
                row["profile"] = overlap_summary(prof)
        sec[label] = row
        log(f"{label}: {t:.3f}s = {row['over_resident']:.3f}x, identical {row['bit_identical']}, "
            f"peak {peak:.2f} GiB, {row['stats']}, {row.get('profile')}")
        P.save()

    streamed("all_prefetch1", range(layers), 1, profile=True)
    streamed("all_prefetch2", range(layers), 2)
    streamed("half", spread(layers, layers // 2), 1, profile=True)
    placement.set_policy(dit, "gpu")          # every block resident again
    sec["resident_after_s"], again = timed(forward)
    sec["resident_after_identical"] = bool(torch.equal(again, ref))
    P.save()

    # fp8 weight storage on the same weights
    from multitalk.runtime.fp8 import block_linears_filter, quantize_linears_fp8

    quantize_linears_fp8(dit, block_linears_filter, out_dtype=s.dtype,
                         matmul="scaled_mm" if dev().type == "cuda" else "dequant")
    for mode in ("scaled_mm", "dequant") if dev().type == "cuda" else ("dequant",):
        set_fp8_matmul(dit, mode)
        t0 = time.perf_counter()
        forward()
        sync()
        row = {"first_call_s": time.perf_counter() - t0}
        row["resident_s"], out8 = timed(forward)
        row["over_bf16"] = row["resident_s"] / sec["resident_s"]
        row["rel_err_vs_bf16"] = rel_l2(out8.float(), ref.float())
        placement.set_policy(dit, "streamed", blocks=dit.blocks, streamed=range(layers), prefetch=1)
        with placement.use(dit):
            forward()
            row["streamed_s"], outs = timed(forward)
            row["streamed_bit_identical"] = bool(torch.equal(outs, out8))
            row["block_bytes"] = placement.policy(dit).streamer.block_bytes
        placement.set_policy(dit, "gpu")
        row["streamed_over_resident"] = row["streamed_s"] / row["resident_s"]
        sec[f"fp8_{mode}"] = row
        log(f"fp8 {mode}: {row}")
        P.save()
    del dit
    free()


def activations() -> None:
    sec = P.section("activations")
    for compiled in (False, True):
        s, dit = compiled_dit(2, compile=compiled)
        weights = sum(t.numel() * t.element_size() for t in [*dit.parameters(), *dit.buffers()]) / GIB
        for size, speakers in ((640, 1), (640, 2), (960, 2)):
            s2 = replace(s, height=size, width=size) if dev().type == "cuda" else s
            inputs = dit_inputs(s2, speakers=speakers)
            with torch.no_grad():
                if compiled:
                    dit(**inputs)             # compile this shape first
                peak, _ = peak_of(lambda: dit(**inputs))
            key = f"{'compiled' if compiled else 'eager'}_{size}_{speakers}spk"
            sec[key] = {"work_gib": peak, "tokens": s2.tokens,
                        "widths_per_token": peak * GIB / (s2.tokens * s2.arch.dit.dim * 2)}
            log(f"{key}: {peak:.2f} GiB over {weights:.1f} GiB of weights")
            del inputs
            free()
            P.save()
        del dit
        free()


def vae() -> None:
    sec = P.section("vae")
    s = setting(2)
    model = build_vae(s, seed=5)
    from multitalk.runtime.vae_fusion import fuse_vae

    fuse_vae(model, device=dev())
    for size in ((640, 960) if dev().type == "cuda" else (32,)):
        video = torch.rand(3, s.frames, size, size, device=dev()) * 2 - 1
        model.encode(video)  # cuDNN autotuning of the shapes
        peak_e, latent = peak_of(lambda: model.encode(video))

        def decode():
            for chunk in model.decode_chunks(latent):
                del chunk

        decode()
        peak_d, _ = peak_of(decode)
        sec[str(size)] = {"encode_gib": peak_e, "decode_gib": peak_d,
                          "encode_per_pixel": peak_e * GIB / size**2, "decode_per_pixel": peak_d * GIB / size**2}
        log(f"vae {size}: {sec[str(size)]}")
        del video, latent
        free()
        P.save()


def text() -> None:
    from multitalk.models import tiny
    from multitalk.models.text_encoder import TextEncoder, build_umt5_on_meta, load_t5_tokenizer, load_t5_weights
    from multitalk.runtime.placement import Placement
    import tempfile

    sec = P.section("text")
    s = setting(2)
    with tempfile.TemporaryDirectory() as root:
        ckpt, _ = tiny.write_tiny_checkpoints(root)
        tok = load_t5_tokenizer(ckpt / tiny.TOKENIZER_SUBDIR)
    model = build_umt5_on_meta(s.arch.t5)
    load_t5_weights(model, random_items("t5", tiny.t5_key_shapes(s.arch.t5), dev(), 3), dtype=s.dtype, device=dev())
    enc = TextEncoder(model, tok, text_len=s.arch.t5.text_len)
    prompts = ["a person talking", s.arch.sample_neg_prompt]
    enc.encode(prompts)
    peak, ref = peak_of(lambda: enc.encode(prompts))
    sec["work_gib"] = peak
    sec["resident_s"], _ = timed(lambda: enc.encode(prompts))
    placement = Placement(dev())
    placement.set_policy(model, "streamed", blocks=model.encoder.block, prefix="encoder.block.",
                         streamed=range(len(model.encoder.block)), other="per_use", hooks=True)

    def streamed():
        with placement.use(model):
            return enc.encode(prompts)

    streamed()
    sec["streamed_s"], out = timed(streamed)
    sec["streamed_identical"] = all(torch.equal(a, b) for a, b in zip(out, ref))
    sec["host_bytes"] = placement.host_bytes
    sec["peak_streamed_gib"], _ = peak_of(streamed)
    log(f"text: {sec}")
    P.save()
    del model, enc
    free()


def host() -> None:
    """One block's weights put into host memory twice from the GPU: tensor by tensor with
    ``pin_memory`` (PyTorch's caching host allocator), then as one ``HostCopy``."""
    from multitalk.runtime.host_memory import HostCopy

    sec = P.section("host")
    s = setting(1)
    block = build_dit(s).blocks[0]
    nbytes = sum(t.numel() * t.element_size() for t in block.parameters())
    gc.collect()
    r0 = rss()
    pinned = [t.detach().cpu().pin_memory() for t in block.parameters()] if dev().type == "cuda" else []
    gc.collect()
    r1 = rss()
    del pinned
    gc.collect()
    if dev().type == "cuda":
        torch._C._host_emptyCache()
    r2 = rss()
    t0 = time.perf_counter()
    copy = HostCopy(block, pin=dev().type == "cuda")   # from the GPU: the host buffer is all new memory
    sec["hostcopy_build_s"] = time.perf_counter() - t0
    gc.collect()
    r3 = rss()
    sec.update(block_bytes=nbytes, pin_memory_rss_growth=r1 - r0, hostcopy_rss_growth=r3 - r2,
               pin_memory_over_bytes=(r1 - r0) / nbytes, hostcopy_over_bytes=(r3 - r2) / nbytes,
               hostcopy_pinned=copy.pinned, hostcopy_bytes=copy.nbytes)
    if dev().type == "cuda":   # H2D rate from the registered buffer into device tensors
        targets = copy.empty_on(dev())
        copy.copy_to(targets)
        sync()
        t, _ = timed(lambda: copy.copy_to(targets), repeat=5)
        sec["h2d_gbps"] = copy.nbytes / t / 1e9
    log(f"host: {sec}")
    P.save()


def diffusers_offload() -> None:
    from diffusers.hooks import apply_group_offloading

    from multitalk.runtime.placement import Placement

    sec = P.section("diffusers")
    layers = 8
    s, dit = compiled_dit(layers, compile=False)
    inputs = dit_inputs(s, speakers=2)

    def forward():
        with torch.no_grad():
            return dit(**inputs)

    forward()
    sec["eager_resident_s"], ref = timed(forward)
    placement = Placement(dev())
    placement.set_policy(dit, "streamed", blocks=dit.blocks, streamed=range(layers), prefetch=1)
    with placement.use(dit):
        forward()
        sec["eager_blockstreamer_s"], out = timed(forward)
    sec["blockstreamer_identical"] = bool(torch.equal(out, ref))
    placement.set_policy(dit, "gpu")
    if dev().type == "cuda":
        dit.cpu()
        free()
        apply_group_offloading(dit, onload_device=dev(), offload_device="cpu", offload_type="block_level",
                               num_blocks_per_group=1, use_stream=True)
        forward()
        sec["eager_diffusers_s"], out = timed(forward)
        sec["diffusers_identical"] = bool(torch.equal(out, ref))
        peak, _ = peak_of(forward)
        sec["diffusers_peak_gib"] = peak
    for k in ("eager_blockstreamer_s", "eager_diffusers_s"):
        if k in sec:
            sec[k.replace("_s", "_over_resident")] = sec[k] / sec["eager_resident_s"]
    log(f"diffusers: {sec}")
    P.save()


PARTS = {"streaming": streaming, "activations": activations, "vae": vae, "text": text, "host": host,
         "diffusers": diffusers_offload}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    ARGS.device = args.device
    if args.device == "cpu":
        torch.set_num_threads(2)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    P.data["environment"] = {"torch": torch.__version__, "device": args.device,
                             "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    P.run(args.out_dir, PARTS, args.parts)


if __name__ == "__main__":
    main()
