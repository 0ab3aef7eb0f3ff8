"""After ``compile``: the compiled model with 2 speakers, a kernel breakdown, fp8 variants compiled."""

from __future__ import annotations

import torch

from builders import dit_inputs
from harness import Bench, Skipped, free_memory, kernel_breakdown, rel_l2, restore_modules
from sections.fp8 import fp8_filter

TINY_CPU = False  # needs the compile section


def run(b: Bench) -> None:
    """After ``compile``: 2 speakers compiled, a kernel breakdown, and fp8 variants compiled.

    fp8 errors are taken against the compiled bf16 output (``rel_err``: same compiled path, so the
    difference is fp8's alone) and against the eager bf16 output (``rel_err_vs_eager``, which adds
    the compile's own rounding difference, ``compile.rel_err_vs_eager``)."""
    from multitalk.runtime.fp8 import ffn_cross_fp8_filter, ffn_fp8_filter, quantize_linears_fp8

    s, sec = b.setting, b.report.section("compiled_extra")
    model = b.get_dit()
    one, two = dit_inputs(s, 1), dit_inputs(s, 2)
    if s.device.type == "cuda":
        with torch.no_grad():
            sec["breakdown_1spk"] = kernel_breakdown(lambda: model(**one))
        b.report.save()
    with torch.no_grad():
        model(**two)  # compile the 2-speaker graph
    stats, out = b.timed_forward(model, two, "forward bf16 2spk compiled", warm=True)
    del out
    sec["bf16_2spk"] = stats
    b.report.set(forward_bf16_2spk_compiled_s=stats["median_s"])
    if b.ref_out is None:
        with torch.no_grad():
            b.ref_out = model(**one).float()
    if b.compiled_ref is None:
        with torch.no_grad():
            b.compiled_ref = model(**one).float()
    variants = {
        "ffn": (ffn_fp8_filter, False),
        "ffn_cross": (ffn_cross_fp8_filter, False),
        "all": (fp8_filter(s.tiny), False),
        "attention": (None, True),             # cuDNN fp8 self-attention (runtime.attention_fp8), linears bf16
    }
    for label, (include, fp8_attention) in variants.items():
        originals = ({n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and include(n, m)}
                     if include is not None else {})
        try:
            if include is not None:
                sec[f"fp8_{label}_quantized"] = quantize_linears_fp8(model, include=include, out_dtype=s.dtype)
            if fp8_attention:
                from multitalk.runtime.attention_fp8 import availability, enable_fp8_self_attention

                ok, why = availability(s.device)
                if not ok:
                    raise Skipped(f"fp8 attention: {why}")
                sec[f"fp8_{label}_blocks"] = enable_fp8_self_attention(model)
            with torch.no_grad():
                out = model(**one)  # recompile with the fp8 operations
            err = rel_l2(out.float(), b.compiled_ref)
            err_eager = rel_l2(out.float(), b.ref_out)
            del out
            stats, out = b.timed_forward(model, one, f"forward fp8[{label}] 1spk compiled", warm=True)
            del out
            sec[f"fp8_{label}_1spk"] = dict(stats, rel_err=err, rel_err_vs_eager=err_eager)
            b.log(f"fp8[{label}] compiled: {stats['median_s']:.3f}s, rel err {err:.4f} (vs eager {err_eager:.4f})")
            if label == "ffn":  # the production --fp8 default (runtime.fp8.default_fp8_filter)
                b.report.set(forward_fp8_1spk_s=stats["median_s"], fp8_rel_err=err, fp8_rel_err_vs_eager=err_eager)
            b.report.save()
        except Skipped as exc:
            sec[f"fp8_{label}_skipped"] = str(exc)
        except Exception as exc:
            sec[f"fp8_{label}_error"] = f"{type(exc).__name__}: {exc}"[:800]
        finally:
            restore_modules(model, originals)
            if fp8_attention:
                from multitalk.runtime.attention_fp8 import disable_fp8_self_attention

                disable_fp8_self_attention(model)
            free_memory(s.device)
