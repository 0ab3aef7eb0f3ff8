"""FP8 self-attention on Hopper: cuDNN's fp8 flash-attention forward, through the cudnn-frontend graph API.

The DiT's self-attention is half of its FLOPs (33,600 tokens at 480p x 81 frames), and PyTorch's
SDPA has no fp8 path. cuDNN (>= 9.1) has one on Hopper: Q, K and V in e4m3 with one scale each,
the softmax probabilities re-quantised to e4m3 for the P.V product (fp32 accumulation), and O
written in e4m3 (bf16 O is Blackwell-only). :func:`enable_fp8_self_attention` installs it on the
MultiTalk blocks' self-attention; everything else (projections, cross-attention, audio attention,
the speaker map) is unchanged, and the golden parity tests run without it.

Scales, chosen so that nothing can overflow and no extra pass over the data is needed for q and k:

* q and k come out of an RMS norm over the whole width ``dim`` followed by a rotation of pairs, so
  ``|x| <= sqrt(dim) * max|w|`` (``w`` the norm weight): ``scale = 448 / that bound``. No amax pass.
* v is a plain projection: per-tensor ``amax`` (one reduction, fused by inductor when compiled).
* the probabilities lie in [0, 1]: ``scale_s = 448``.
* O is a convex combination of rows of v, so ``|O| <= amax(v)``: ``scale_o = 448 / amax(v)``;
  O is dequantised to the compute dtype right after (fused with the output projection's input).

This changes precision, not the maths; the GPU benchmark measures the DiT output's relative error
against bf16 (``benchmarks/bench.py``, ``compiled_extra``). Measured, not offered (README,
"fp8 attention, measured and not offered"): it lives with the benchmarks, not in the package.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from multitalk.models.transformer import self_attention_processors

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
MIN_CUDNN_BACKEND = 90100                               # fp8 SDPA forward (9.10.0 excluded by cuDNN)


def availability(device: torch.device | str | None = None) -> tuple[bool, str]:
    """``(True, "")`` when the fp8 cuDNN attention can run here, else ``(False, why)``."""
    from multitalk.runtime.attention_int8 import hopper_problem

    problem = hopper_problem(device)
    if problem is not None:
        return False, problem
    try:
        import cudnn  # nvidia-cudnn-frontend
    except ImportError:
        return False, "needs the cuDNN frontend: pip install nvidia-cudnn-frontend"
    version = int(cudnn.backend_version())
    if version < MIN_CUDNN_BACKEND or version == 91000:
        return False, f"cuDNN {version} has no fp8 attention forward (9.1+, not 9.10.0)"
    return True, ""


# ----------------------------------------------------------------------------------------------
# cuDNN graph per (shape, strides, device)


class _Fp8SdpaGraph:
    """One built cuDNN fp8 SDPA forward graph for fixed q/k/v geometry (``[B, H, S, D]`` views)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, attn_scale: float):
        import cudnn

        self._cudnn = cudnn
        self.handle = _handle(q.device)
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self.handle)

        def desc(name, t):
            return graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=e4m3)

        self.q, self.k, self.v = desc("q", q), desc("k", k), desc("v", v)
        scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        self.scalars = [graph.tensor(name=n, **scalar)
                        for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        kwargs = dict(q=self.q, k=self.k, v=self.v, descale_q=self.scalars[0], descale_k=self.scalars[1],
                      descale_v=self.scalars[2], descale_s=self.scalars[3], scale_s=self.scalars[4],
                      scale_o=self.scalars[5], attn_scale=attn_scale, use_causal_mask=False, name="sdpa_fp8")
        try:
            outs = graph.sdpa_fp8(generate_stats=False, **kwargs)
        except TypeError:  # older frontends: is_inference instead of generate_stats
            outs = graph.sdpa_fp8(is_inference=True, **kwargs)
        self.o, _stats, self.amax_s, self.amax_o = outs
        self.o.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride())).set_data_type(e4m3)
        for amax in (self.amax_s, self.amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace = torch.empty(max(1, graph.get_workspace_size()), device=q.device, dtype=torch.uint8)
        self.amax_buf = torch.empty(2, device=q.device, dtype=torch.float32)

    def __call__(self, q, k, v, o, scales: torch.Tensor) -> None:
        self._cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        # the frontend reads data pointers through DLPack: uint8 views carry the fp8 buffers
        pack = {self.q: q.view(torch.uint8), self.k: k.view(torch.uint8), self.v: v.view(torch.uint8),
                self.o: o.view(torch.uint8), self.amax_s: self.amax_buf[0:1], self.amax_o: self.amax_buf[1:2]}
        for i, desc in enumerate(self.scalars):
            pack[desc] = scales[i:i + 1]
        self.graph.execute(pack, self.workspace, handle=self.handle)


_HANDLES: dict[int, object] = {}
_GRAPHS: dict[tuple, _Fp8SdpaGraph] = {}
_LOCK = threading.Lock()


def _handle(device: torch.device):
    import cudnn

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HANDLES:
        with torch.cuda.device(index):
            _HANDLES[index] = cudnn.create_handle()
    return _HANDLES[index]


def _geometry(t: torch.Tensor) -> tuple:
    return tuple(t.shape), tuple(t.stride())


@torch.library.custom_op("multitalk::cudnn_sdpa_fp8", mutates_args=())
def cudnn_sdpa_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Attention of e4m3 ``q, k, v [B, S, H, D]`` (any strides with unit last stride) -> e4m3 ``O [B, S, H, D]``.

    ``scales`` (float32, 6 values): descale_q, descale_k, descale_v, descale_s, scale_s, scale_o.
    The softmax scale is ``1/sqrt(D)``.
    """
    out = torch.empty(q.shape, device=q.device, dtype=torch.float8_e4m3fn)
    views = [t.transpose(1, 2) for t in (q, k, v, out)]                     # [B, H, S, D] views
    key = (q.device, *(_geometry(t) for t in views))
    graph = _GRAPHS.get(key)
    if graph is None:
        with _LOCK:
            graph = _GRAPHS.get(key)
            if graph is None:
                graph = _Fp8SdpaGraph(*views, attn_scale=1.0 / math.sqrt(q.shape[-1]))
                _GRAPHS[key] = graph
    graph(*views, scales.contiguous())
    return out


@cudnn_sdpa_fp8.register_fake
def _(q, k, v, scales):
    return torch.empty(q.shape, device=q.device, dtype=torch.float8_e4m3fn)


def reference_sdpa_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: torch.Tensor,
                       chunk: int = 4096) -> torch.Tensor:
    """What :func:`cudnn_sdpa_fp8` computes, in PyTorch on any device (the tests' reference).

    Dequantised q, k, v; float32 scores and softmax; the probabilities quantised to e4m3 with
    ``scale_s`` for the P.V product, normalised by the float32 row sum; O quantised with ``scale_o``.
    """
    dq, dk, dv, ds, ss, so = (float(x) for x in scales.float().cpu())
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))              # [B, H, S, D]
    qf, kf, vf = qf * dq, kf * dk, vf * dv
    scale = 1.0 / math.sqrt(q.shape[-1])
    rows = []
    for i in range(0, qf.shape[2], chunk):
        s = (qf[:, :, i:i + chunk] @ kf.transpose(-1, -2)) * scale
        p = torch.exp(s - s.amax(dim=-1, keepdim=True))
        denom = p.sum(dim=-1, keepdim=True)
        p8 = (p * ss).to(torch.float8_e4m3fn).float() * ds
        rows.append((p8 @ vf) / denom)
    o = torch.cat(rows, dim=2).transpose(1, 2)
    return (o * so).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


# ----------------------------------------------------------------------------------------------
# The self-attention override


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantized_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale_q: torch.Tensor,
                        scale_k: torch.Tensor, scale_v: torch.Tensor, kernel=None) -> torch.Tensor:
    """e4m3 attention of ``[B, S, H, D]`` inputs quantised with the given scales -> float32 output.

    The probabilities use ``scale_s = 448`` and O the scale of v (``|O| <= amax(v)``); ``kernel``:
    :func:`cudnn_sdpa_fp8` (default) or :func:`reference_sdpa_fp8`.
    """
    kernel = kernel if kernel is not None else cudnn_sdpa_fp8
    scale_s = torch.full_like(scale_v, E4M3_MAX)
    scales = torch.stack([1 / scale_q, 1 / scale_k, 1 / scale_v, 1 / scale_s, scale_s, scale_v]).float()
    out = kernel(_quantize(query, scale_q), _quantize(key, scale_k), _quantize(value, scale_v), scales)
    return out.float() * (1 / scale_v)


class Fp8SelfAttention:
    """Callable installed as ``MultiTalkSelfAttnProcessor.sdpa_override``: ``(attn, q, k, v) -> out``.

    q, k, v are ``[B, S, H, D]`` in the compute dtype (q/k normed and rotated); returns the attention
    output ``[B, S, H, D]`` in the same dtype. ``kernel``: :func:`cudnn_sdpa_fp8` (default) or
    :func:`reference_sdpa_fp8`.
    """

    def __init__(self, kernel=None):
        self.kernel = kernel if kernel is not None else cudnn_sdpa_fp8

    def __call__(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = quantized_attention(query, key, value, *fp8_scales(attn, query, value), self.kernel)
        return out.to(query.dtype)


def fp8_scales(attn: nn.Module, query: torch.Tensor, value: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale_q, scale_k, scale_v)``: q and k from their RMS-norm bound ``sqrt(width) * max|w|``
    (no pass over the data), v from its amax; scaled values then lie within e4m3's +-448."""
    width = query.shape[2] * query.shape[3]
    bound_q = attn.norm_q.weight.detach().abs().amax().float() * math.sqrt(width)
    bound_k = attn.norm_k.weight.detach().abs().amax().float() * math.sqrt(width)
    amax_v = value.abs().amax().float().clamp_min(1e-12)
    return E4M3_MAX / bound_q, E4M3_MAX / bound_k, E4M3_MAX / amax_v


def enable_fp8_self_attention(model: nn.Module, kernel=None) -> int:
    """Run every MultiTalk block's self-attention through :class:`Fp8SelfAttention`; returns how many.

    With the default cuDNN kernel, raises ``RuntimeError`` naming the reason when this machine
    cannot run it (see :func:`availability`).
    """
    if kernel is None:
        device = next(model.parameters()).device
        ok, why = availability(device)
        if not ok:
            raise RuntimeError(f"fp8 attention unavailable: {why}")
    processors = self_attention_processors(model)
    override = Fp8SelfAttention(kernel)
    for processor in processors:
        processor.sdpa_override = override
    return len(processors)


def disable_fp8_self_attention(model: nn.Module) -> int:
    """Back to the bf16 attention; returns how many blocks were switched."""
    switched = [p for p in self_attention_processors(model) if p.sdpa_override is not None]
    for processor in switched:
        processor.sdpa_override = None
    return len(switched)
