"""FP8 (e4m3) linears: fp8 weight storage with per-output-channel scales, fp8 or dequantised compute.

``quantize_linears_fp8(model)`` swaps the selected ``nn.Linear`` layers of a model for
:class:`Fp8Linear`. The weight is quantised once, one scale per output row (``amax / 448``), and
kept as e4m3 (half the bytes of bf16, on the GPU, in the pinned host copy and over PCIe when the
blocks are streamed: ``runtime.block_streaming``). Each layer computes in one of two ways:

* ``"scaled_mm"`` (Hopper / Ada, compute capability 8.9+): the activation is quantised per token
  (one scale per row, computed on the fly) and ``torch._scaled_mm`` multiplies the two e4m3
  operands with row-wise scales, accumulating in float32 (the ``--fp8`` compute path);
* ``"dequant"`` (everything else, the CPU included): the layer's weight is dequantised to the
  activation dtype just before its matmul (``w = e4m3 * scale``), so only the weight is rounded.

Two uses share the layer: ``--fp8`` (compute) quantises the feed-forward linears of the blocks
(:func:`ffn_fp8_filter`, measured at 2.3e-2 relative error of the compiled DiT output on the
H200); ``--weights fp8`` (storage) quantises every linear of the blocks
(:func:`block_linears_filter`), merged LoRAs included (quantisation comes after the merge).
This changes precision only, never the maths: the golden parity tests run the unquantised model,
and the GPU benchmarks measure the relative error against bf16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
MATMUL_MODES = ("scaled_mm", "dequant")


def _rowwise_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_weight(weight: torch.Tensor, rows_per_chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` weight -> (e4m3 ``[out, in]``, float32 scales ``[out, 1]``), on the weight's device.

    Works through ``rows_per_chunk`` rows at a time, so the float32 working copy stays small (a
    13824 x 5120 weight never exists in float32 as a whole)."""
    q = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    scale = torch.empty(weight.shape[0], 1, dtype=torch.float32, device=weight.device)
    for r0 in range(0, weight.shape[0], rows_per_chunk):
        q[r0:r0 + rows_per_chunk], scale[r0:r0 + rows_per_chunk] = _rowwise_quant(weight[r0:r0 + rows_per_chunk])
    return q, scale


def scaled_mm_supported(device: torch.device | str) -> bool:
    """``torch._scaled_mm`` with e4m3 operands runs on CUDA devices of compute capability 8.9+."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with an e4m3 weight (one scale per output row); see the module docstring.

    ``matmul``: ``"scaled_mm"`` (fp8 x fp8 tensor cores, the activation quantised per row) or
    ``"dequant"`` (the weight dequantised to the activation dtype, then a plain matmul).
    """

    def __init__(self, linear: nn.Linear | None = None, out_dtype: torch.dtype | None = torch.bfloat16, *,
                 matmul: str = "scaled_mm", weight_fp8: torch.Tensor | None = None,
                 weight_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        if matmul not in MATMUL_MODES:
            raise ValueError(f"matmul must be one of {MATMUL_MODES}, got {matmul!r}")
        if linear is not None:
            out_dtype = out_dtype or linear.weight.dtype
            weight_fp8, weight_scale = quantize_weight(linear.weight.detach())
            bias = linear.bias.detach() if linear.bias is not None else None
        elif weight_fp8 is None or weight_scale is None:
            raise ValueError("give a linear, or weight_fp8 and weight_scale")
        self.out_features, self.in_features = weight_fp8.shape
        self.out_dtype = out_dtype or torch.bfloat16
        self.matmul = matmul
        self.register_buffer("weight_fp8", weight_fp8, persistent=False)                        # [out, in]
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).float(), persistent=False)  # [1, out]
        self.register_buffer("bias", None if bias is None else bias.to(self.out_dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul == "dequant":
            return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_q, x_scale = _rowwise_quant(x2)
        y = torch._scaled_mm(x_q, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                             bias=self.bias, out_dtype=self.out_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as stored, back in ``dtype``: ``e4m3 * scale`` (rounded once, from float32)."""
        return (self.weight_fp8.float() * self.weight_scale.t()).to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 per-row, "
                f"matmul={self.matmul}")


def _fits_fp8(module: nn.Linear | Fp8Linear) -> bool:
    """``torch._scaled_mm`` needs both matrix dimensions divisible by 16."""
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def ffn_fp8_filter(name: str, module: nn.Linear) -> bool:
    """Only the feed-forward linears of the blocks (40 % of the DiT's matmul FLOPs): measured on an
    H200 at 2.3e-2 relative error of the compiled DiT output vs compiled bf16 (2.8e-2 vs eager bf16),
    where every block linear gives 6.3e-2."""
    return name.startswith("blocks.") and ".ffn." in name and _fits_fp8(module)


_CROSS_PROJECTIONS = (".attn2.to_q", ".attn2.to_out.0", ".audio_cross_attn.q_linear", ".audio_cross_attn.proj")


def ffn_cross_fp8_filter(name: str, module: nn.Linear) -> bool:
    """The feed-forward linears plus the query/output projections of the text/image and audio
    cross-attentions (the self-attention's projections stay bf16)."""
    cross = name.startswith("blocks.") and any(p in name for p in _CROSS_PROJECTIONS) and _fits_fp8(module)
    return ffn_fp8_filter(name, module) or cross


def all_blocks_fp8_filter(name: str, module: nn.Linear) -> bool:
    """Every big matmul of the transformer blocks; keep embeddings, heads and small layers."""
    return (name.startswith("blocks.") and module.in_features >= 1024 and module.out_features >= 1024
            and _fits_fp8(module))


def block_linears_filter(name: str, module: nn.Linear) -> bool:
    """fp8 weight storage (``--weights fp8``): every linear inside the transformer blocks (99.6 % of
    a block's bytes in the 14B model). Layers whose sizes ``_scaled_mm`` cannot take dequantise."""
    return name.startswith("blocks.")


default_fp8_filter = ffn_fp8_filter  # within the 3e-2 quality budget; see benchmarks/results


def quantize_linears_fp8(model: nn.Module, include: Callable[[str, nn.Linear], bool] = default_fp8_filter,
                         out_dtype: torch.dtype | None = torch.bfloat16, matmul: str = "scaled_mm",
                         scales: dict[str, torch.Tensor] | None = None) -> int:
    """Replace matching ``nn.Linear`` modules in place; returns how many were replaced.

    ``out_dtype`` None keeps each layer's own dtype. ``matmul`` as :class:`Fp8Linear`'s, except that
    a layer ``_scaled_mm`` cannot take (a dimension not divisible by 16) always dequantises.
    Quantises one layer at a time and drops its original weight at once, so the model never holds
    both copies of more than one layer. A layer whose weight is already e4m3 (quantised while
    loading, :class:`LoadQuantizer`) takes its scale from ``scales[name]``.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and include(n, m)]
    for name in names:  # names only: each original layer is freed as soon as it is replaced
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, leaf)
        mode = matmul if _fits_fp8(module) else "dequant"
        if module.weight.dtype == torch.float8_e4m3fn:
            if scales is None or name not in scales:
                raise ValueError(f"{name} holds e4m3 weights but no scale was recorded for it")
            bias = module.bias.detach() if module.bias is not None else None
            new = Fp8Linear(out_dtype=out_dtype, matmul=mode, weight_fp8=module.weight.detach(),
                            weight_scale=scales.pop(name), bias=bias)
        else:
            new = Fp8Linear(module, out_dtype=out_dtype, matmul=mode)
        setattr(parent, leaf, new)
        del module
    return len(names)


class LoadQuantizer:
    """A loader ``transform`` (``models.checkpoint.load_converted``) that stores the weights of the
    layers ``quantize_linears_fp8(..., scales=quantizer.scales)`` will replace as e4m3 as they are
    read: every 2-D ``.weight`` under ``prefix`` (in the DiT's blocks these are exactly the linear
    layers). Host and device memory then never hold the compute-dtype copy of more than one tensor."""

    def __init__(self, prefix: str = "blocks."):
        self.prefix = prefix
        self.scales: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.startswith(self.prefix) and name.endswith(".weight") and tensor.ndim == 2 \
                and tensor.is_floating_point():
            q, scale = quantize_weight(tensor)
            self.scales[name[:-len(".weight")]] = scale.reshape(1, -1)
            return q
        return tensor


def set_fp8_matmul(model: nn.Module, matmul: str) -> int:
    """Set every :class:`Fp8Linear`'s compute mode (``"scaled_mm"`` only where the sizes allow);
    returns how many layers use ``_scaled_mm`` afterwards."""
    if matmul not in MATMUL_MODES:
        raise ValueError(f"matmul must be one of {MATMUL_MODES}, got {matmul!r}")
    n = 0
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.matmul = matmul if _fits_fp8(module) else "dequant"
            n += module.matmul == "scaled_mm"
    return n
