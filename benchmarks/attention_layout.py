"""Does the memory layout of q/k/v change cuDNN SDPA speed at the DiT's self-attention shape?

[B, L, H, D] storage passed as a transposed view (what diffusers' dispatch hands to SDPA) versus
contiguous [B, H, L, D]; plus the cost of the transpose copy itself. Prints a small table.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ceilings import cuda_time  # noqa: E402


def main(tokens: int = 33600, heads: int = 40, dim: int = 128) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    blhd = [torch.randn(1, tokens, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
    bhld = [t.transpose(1, 2).contiguous() for t in blhd]
    flops = 4 * tokens * tokens * dim * heads
    res = {}
    t = cuda_time(lambda: F.scaled_dot_product_attention(*[x.transpose(1, 2) for x in blhd]), 2, 5)
    res["strided_blhd_s"], res["strided_blhd_tflops"] = t, flops / t / 1e12
    t = cuda_time(lambda: F.scaled_dot_product_attention(*bhld), 2, 5)
    res["contiguous_bhld_s"], res["contiguous_bhld_tflops"] = t, flops / t / 1e12
    t = cuda_time(lambda: [x.transpose(1, 2).contiguous() for x in blhd], 2, 5)
    res["transpose_copy_qkv_s"] = t
    with torch.no_grad():
        a = F.scaled_dot_product_attention(*[x.transpose(1, 2) for x in blhd]).float()
        b = F.scaled_dot_product_attention(*bhld).float()
    res["rel_diff"] = float((a - b).norm() / b.norm())
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
