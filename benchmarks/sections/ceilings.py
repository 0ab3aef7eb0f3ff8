"""Same-run ceilings: bf16 / fp8 matmul rates, SDPA rate per backend, H2D copy (``ceilings.py``)."""

from __future__ import annotations

from harness import Bench, Skipped


def run(b: Bench) -> None:
    if b.setting.device.type != "cuda":
        raise Skipped("ceilings need CUDA")
    import ceilings

    sec = b.report.section("ceilings")
    sec.update(ceilings.measure_all(b.setting.tokens))
    b.report.save()
    b.log(f"ceilings: bf16 {sec['matmul_bf16_tflops']:.0f} TFLOP/s, fp8 {sec['matmul_fp8_tflops']:.0f}, "
          f"best SDPA {sec['sdpa_best_backend']} {sec['sdpa_best_tflops']:.0f}")
