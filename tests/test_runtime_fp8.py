"""FP8 linears: same function as nn.Linear up to fp8 rounding (precision only, never maths)."""

import torch
from torch import nn

from conftest import rel_l2
from multitalk.runtime.fp8 import Fp8Linear, all_blocks_fp8_filter, ffn_fp8_filter, quantize_linears_fp8


def test_fp8_linear_matches_linear_within_fp8_rounding():
    torch.manual_seed(0)
    lin = nn.Linear(256, 192)
    x = torch.randn(3, 40, 256)
    ref = lin(x)
    out = Fp8Linear(lin, out_dtype=torch.float32)(x)
    assert out.shape == ref.shape
    err = rel_l2(out, ref)
    # e4m3 has 3 mantissa bits: ~2-5 % per GEMM on Gaussian data, far from a wrong result (~1.4)
    assert 1e-4 < err < 6e-2, err


def test_fp8_linear_detects_a_wrong_weight_layout():
    torch.manual_seed(1)
    lin = nn.Linear(128, 128)
    x = torch.randn(16, 128)
    wrong = nn.Linear(128, 128)
    wrong.weight.data = lin.weight.data.t().clone()
    wrong.bias.data = lin.bias.data.clone()
    assert rel_l2(Fp8Linear(wrong, out_dtype=torch.float32)(x), lin(x)) > 0.5


def test_quantize_replaces_only_selected_block_linears():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 8))])
    model.head = nn.Linear(1024, 1024)
    n = quantize_linears_fp8(model, include=all_blocks_fp8_filter)
    assert n == 1
    assert isinstance(model.blocks[0][0], Fp8Linear)
    assert isinstance(model.blocks[0][1], nn.Linear) and isinstance(model.head, nn.Linear)


def test_default_fp8_filter_takes_only_the_feed_forward():
    model = nn.Module()
    block = nn.Module()
    block.ffn = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    block.attn1 = nn.Linear(64, 64)
    model.blocks = nn.ModuleList([block])
    assert quantize_linears_fp8(model) == 2
    assert isinstance(block.ffn[0], Fp8Linear) and isinstance(block.ffn[2], Fp8Linear)
    assert isinstance(block.attn1, nn.Linear)
    assert ffn_fp8_filter("blocks.0.ffn.net.0.proj", nn.Linear(64, 64))
