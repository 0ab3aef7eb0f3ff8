"""The full-size VAE alone: encode (81 frames) and chunked decode (21 latent frames), as loaded,
channels-last probe and ``runtime.vae_fusion``."""

from __future__ import annotations

import time

import torch

from builders import build_vae
from harness import Bench, free_memory, kernel_breakdown, measure, ratio, rel_l2, sync


def run(b: Bench) -> None:
    """The VAE alone at the clip's size: encode of the 81-frame conditioning video (image + zeros, as
    the pipeline builds it) and chunked decode of a 21-frame latent. Variants on the same weights and
    inputs: ``loaded`` (diffusers as loaded; with a CUDA kernel breakdown), ``channels_last`` (the
    loaded model with channels-last 3-D weights, a probe of cuDNN's layout preference), ``fused``
    (``runtime.vae_fusion`` as the Engine applies it). Relative errors are against ``loaded``."""
    from multitalk.runtime.placement import configure_backends
    from multitalk.runtime.vae_fusion import fuse_vae

    s, sec = b.setting, b.report.section("vae")
    cuda = s.device.type == "cuda"
    b.require(60 if cuda else 20, "vae")
    configure_backends(s.device)
    vae = build_vae(s, seed=15)
    g = torch.Generator().manual_seed(3)
    video = torch.cat([torch.rand(3, 1, s.height, s.width, generator=g) * 2 - 1,
                       torch.zeros(3, s.frames - 1, s.height, s.width)], dim=1)
    t, h, w = s.latent_grid
    latent = torch.randn(vae.z_dim, t, h, w, generator=g)
    calls = {"encode": lambda: vae.encode(video),
             "decode": lambda: torch.cat(list(vae.decode_chunks(latent)), dim=1)}
    results = {}

    def run_variant(label: str) -> None:
        for name, fn in calls.items():
            sync(s.device)
            t0 = time.perf_counter()
            fn()
            sync(s.device)
            first = time.perf_counter() - t0
            stats, out = measure(fn, s.device, warmup=0, repeat=2)
            sec[f"{name}_{label}"] = dict(stats, first_call_s=first)
            results[(name, label)] = out.float().cpu()
            if label != "loaded":
                sec[f"{name}_{label}_rel_err"] = rel_l2(results[(name, label)], results[(name, "loaded")])
                sec[f"{name}_{label}_over_loaded"] = ratio(stats["median_s"], sec[f"{name}_loaded"]["median_s"])
            b.log(f"vae {name} {label}: first {first:.2f}s, median {stats['median_s']:.3f}s")
            b.report.save()

    try:
        run_variant("loaded")
        if cuda:
            for name, fn in calls.items():
                sec[f"{name}_loaded_breakdown"] = kernel_breakdown(fn)
            conv3d = [m for m in vae.model.modules() if isinstance(m, torch.nn.Conv3d)]
            try:
                for m in conv3d:
                    m.weight.data = m.weight.data.to(memory_format=torch.channels_last_3d)
                run_variant("channels_last")
            except Exception as exc:  # a probe: record and go on
                sec["channels_last_error"] = f"{type(exc).__name__}: {exc}"[:500]
            for m in conv3d:
                m.weight.data = m.weight.data.contiguous()
        sec["fused_sites"] = fuse_vae(vae)
        sec["fused_impl"] = vae.model._multitalk_fused
        run_variant("fused")
        if cuda:
            for name, fn in calls.items():
                sec[f"{name}_fused_breakdown"] = kernel_breakdown(fn)
        b.log("vae fused/loaded: " + ", ".join(
            f"{n} {sec[f'{n}_fused_over_loaded']:.3f} (err {sec[f'{n}_fused_rel_err']:.2e})" for n in calls))
    finally:
        del vae
        free_memory(s.device)
