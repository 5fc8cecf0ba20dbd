"""Triton kernel of the fused loss's column statistics (``loss.py``), imported only when a call
takes the Triton backend."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._registry import TL, AotCase, Config, config_name
from .decode import BLOCK_D
from .loss import BLOCK_M


@triton.jit
def _col_stats_kernel(
    r_ptr,  # [B, D] reconstruction
    x_ptr,  # [B, D] target
    out_ptr,  # [3, D] float32: sum_b (r-x)^2, sum_b x, sum_b x^2
    B, D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    se = tl.zeros([BLOCK_D], dtype=tl.float32)
    sx = tl.zeros([BLOCK_D], dtype=tl.float32)
    sxx = tl.zeros([BLOCK_D], dtype=tl.float32)
    for m0 in range(0, B, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m = (offs_m < B)[:, None] & mask_d[None, :]
        ptrs = offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
        r = tl.load(r_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        se += tl.sum((r - x) * (r - x), axis=0)
        sx += tl.sum(x, axis=0)
        sxx += tl.sum(x * x, axis=0)
    tl.store(out_ptr + offs_d, se, mask=mask_d)
    tl.store(out_ptr + D + offs_d, sx, mask=mask_d)
    tl.store(out_ptr + 2 * D + offs_d, sxx, mask=mask_d)


def col_stats(recon, x):
    """[3, D] float32 per-column sum (r - x)^2, sum x, sum x^2 over the batch."""
    B, D = x.shape
    st = torch.empty(3, D, dtype=torch.float32, device=x.device)
    _col_stats_kernel[(triton.cdiv(D, BLOCK_D),)](recon.contiguous(), x.contiguous(), st, B, D,
                                                   BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
    return st


_CX = {"BLOCK_M": BLOCK_M, "BLOCK_D": BLOCK_D}
# recon (the decoder's dtype) and the target x: the same dtype, or x fp32 with a half decoder
_DT = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "fp16": ("fp16", "fp16"),
       "bf16/x-fp32": ("bf16", "fp32"), "fp16/x-fp32": ("fp16", "fp32")}
AOT_CASES = [
    AotCase(
        kernel=_col_stats_kernel, dtypes=tuple(_DT), main_dtypes=("fp32", "bf16"),
        signature=lambda dt: {"r_ptr": f"*{TL[_DT[dt][0]]}", "x_ptr": f"*{TL[_DT[dt][1]]}",
                              "out_ptr": "*fp32", "B": "i32", "D": "i32"},
        configs=(Config(config_name(_CX, 4, 3), _CX, 4, 3, main=True),)),
]
