"""Triton kernels of the encoder GEMM (``encode.py``; ``batchtopk.py`` uses ``pre``).

Imported only when a call takes the Triton backend, so ``fastxc.kernels`` works without triton.

Casting rule of the GEMM (every backend): the products are those of the operands in fp32.
bf16 x bf16 and fp16 x fp16 feed the tensor cores as they are (their products are exact in
fp32; accumulation is fp32); any other pair (fp32, or a mix such as x fp32 with W bf16) is cast
to fp32 right after the load, and an fp32 dot follows ``torch.get_float32_matmul_precision()``:
"highest" keeps exact IEEE products, "high" / "medium" run TF32 on the tensor cores.

W is read in place through its strides (stride_wf, stride_wd): row-major [F, D], or the .T view
of a row-major [D, F] tensor; Triton specialises a stride of 1, so each layout compiles to its
own kernel (the AOT registry lists both; the row-major one holds the main configs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _dispatch
from ._registry import TL, AotCase, from_triton_configs

# GEMM tiles (names: fastxc/kernels/__init__.py). On a GPU the autotuned configs below are
# searched; under the interpreter one small config runs (autotune would need a CPU timer and
# costs minutes there). Every config fits each dtype it runs in, on sm_80 and sm_90a: no
# spills, shared memory within the limit (``python -m fastxc.kernels.aot``; tests/test_aot.py).
# Tensor-core dots (bf16, fp16, TF32) and exact IEEE fp32 dots (CUDA-core FMAs: the whole
# [BLOCK_M, BLOCK_N] accumulator and both operands live in registers) take different tiles.
# Dropped (measured with the AOT tool): 128x64x64 w4 s4 (IEEE fp32: 144 KiB shared, 1.5 KB
# spilled per thread; bf16: 0.75 KB), 64x64x64 w4 s3 (IEEE 156 B, bf16 4 B spilled),
# 64x128x32 w4 s4 (IEEE 72 B, TF32 4 B spilled). IEEE fp32 (and x fp32 with W bf16, cast in
# registers) spills with any BLOCK_K 32 tile somewhere (128x128 w8 20 B, 128x64 w8 20 B on
# sm_80, 64x64 w4 80 B on sm_80; the mix 0.5-0.9 KB): its tile is 64x64x16 with 8 warps.
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
IEEE_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=3),
]
INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}
# the top-k GEMM picks its BLOCK_N from k (see ``topk``), so only BLOCK_M, BLOCK_K are tuned.
# Its epilogue sorts a [BLOCK_M, BLOCK_N] tile of int64 keys in registers: 8 warps for 64 rows
# (32 keys per thread). Dropped (sm_90a): 64-row tiles with 4 warps (IEEE fp32 152 B, bf16
# 92 B spilled), 128-row tiles with 8 or 16 warps (IEEE fp32 80 B spilled with 16), 64x64 K
# with 8 warps (IEEE 72 B spilled). IEEE fp32 (and the fp32 / bf16 mix) spills with every
# BLOCK_K 32 tile on sm_80 (24 B; the mix 0.7-5 KB): its tile is 32 rows, BLOCK_K 16.
TOPK_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=4),
]
TOPK_IEEE_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 16}, num_warps=8, num_stages=3),
]
INTERP_TOPK_CONFIG = {"BLOCK_M": 16, "BLOCK_K": 32}
# the fused top-k keeps BLOCK_TOPK = next_power_of_2(k) candidates per tile and row; above
# this the [BLOCK_M, BLOCK_N] int64 sort no longer fits the registers, and larger k run the
# GEMM alone (``pre``) and select with torch.topk
TOPK_FUSED_MAX = 128


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _pre_tile(x_ptr, w_ptr, b_ptr, B, F, D, stride_wf, stride_wd, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] float32 tile of pre = x @ W.T + b -> (tile, row offsets,
    feature offsets, row mask, feature mask); program ids (0, 1) pick the row / feature block."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < B
    mask_n = offs_n < F
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * D + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wf + offs_k[:, None].to(tl.int64) * stride_wd,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
        if UPCAST:  # the casting rule (module docstring); the interpreter computes bf16 wrongly
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        # PRECISION: "ieee" or "tf32" for fp32 operands (torch's float32 matmul precision)
        acc += tl.dot(a, w, input_precision=PRECISION)
    acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc, offs_m, offs_n, mask_m, mask_n


@triton.jit
def _encode_fwd_kernel(
    x_ptr,  # [B, D] input rows
    w_ptr,  # [F, D] encoder; (f, d) at f * stride_wf + d * stride_wd
    b_ptr,  # [F] bias
    theta_ptr,  # [F] float32 thresholds (ACT == 1 only)
    out_ptr,  # [B, F] float32 pre-activation (ACT 0) or thresholded activation (ACT 1)
    B, F, D, stride_wf, stride_wd,
    ACT: tl.constexpr,  # 0: pre as is; 1: pre * (pre > theta)
    UPCAST: tl.constexpr,  # cast both operands to fp32 after the load (the casting rule)
    PRECISION: tl.constexpr,  # "ieee" | "tf32": the fp32 dot
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    acc, offs_m, offs_n, mask_m, mask_n = _pre_tile(x_ptr, w_ptr, b_ptr, B, F, D, stride_wf, stride_wd,
                                                    UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if ACT == 1:
        theta = tl.load(theta_ptr + offs_n, mask=mask_n, other=0.0)
        acc = tl.where(acc > theta[None, :], acc, 0.0)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * F + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])


# the layout (which stride is 1) keys the tuning too: each compiles to its own kernel
_encode_fwd_tuned = triton.autotune(configs=GPU_CONFIGS,
                                    key=["B", "F", "D", "stride_wd", "PRECISION"])(_encode_fwd_kernel)
_encode_fwd_ieee = triton.autotune(configs=IEEE_GPU_CONFIGS, key=["B", "F", "D", "stride_wd"])(_encode_fwd_kernel)


@triton.jit
def _encode_topk_kernel(
    x_ptr,  # [B, D] input rows
    w_ptr,  # [F, D] encoder; (f, d) at f * stride_wf + d * stride_wd
    b_ptr,  # [F] bias
    cand_ptr,  # [B, n_tiles * BLOCK_TOPK] int64: each tile's top (value, feature) keys per row
    B, F, D, n_cand, stride_wf, stride_wd,
    BLOCK_TOPK: tl.constexpr,  # candidates per tile and row: next power of two >= k, <= BLOCK_N
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    acc, offs_m, offs_n, mask_m, mask_n = _pre_tile(x_ptr, w_ptr, b_ptr, B, F, D, stride_wf, stride_wd,
                                                    UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    # float -> int32 with the same order (negative floats: flip the magnitude bits), then the
    # feature id in the low 32 bits: one int64 sort key carries value and index together
    bits = acc.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    key = (key << 32) | offs_n.to(tl.int64)[None, :]
    key = tl.where(mask_n[None, :], key, -9223372036854775807 - 1)  # padding columns: never picked
    top = tl.topk(key, BLOCK_TOPK)  # [BLOCK_M, BLOCK_TOPK]
    offs_c = tl.program_id(1) * BLOCK_TOPK + tl.arange(0, BLOCK_TOPK)
    tl.store(cand_ptr + offs_m[:, None].to(tl.int64) * n_cand + offs_c[None, :], top, mask=mask_m[:, None])


_encode_topk_tuned = triton.autotune(configs=TOPK_GPU_CONFIGS,
                                     key=["B", "F", "D", "stride_wd", "BLOCK_TOPK", "PRECISION"])(_encode_topk_kernel)
_encode_topk_ieee = triton.autotune(configs=TOPK_IEEE_GPU_CONFIGS,
                                    key=["B", "F", "D", "stride_wd", "BLOCK_TOPK"])(_encode_topk_kernel)


# ----------------------------------------------------------------------------- launchers
def dot_precision() -> str:
    """The fp32 dot's input precision from torch's setting: "highest" -> "ieee", else "tf32"."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def gemm_flags(x_dtype, w_dtype) -> dict:
    """The constexprs UPCAST and PRECISION of a launch on x, W of these dtypes (the casting
    rule of the module docstring; under the interpreter always fp32, which computes bf16
    wrongly otherwise)."""
    same_half = x_dtype == w_dtype and x_dtype in (torch.float16, torch.bfloat16)
    fp32 = x_dtype == w_dtype == torch.float32
    upcast = _dispatch.interpreting() or not (same_half or fp32)
    return {"UPCAST": upcast, "PRECISION": dot_precision()}


def _ieee(x, flags) -> bool:
    """Whether the dot runs exact fp32 (CUDA cores): it takes the IEEE configs."""
    return flags["PRECISION"] == "ieee" and (flags["UPCAST"] or x.dtype == torch.float32)


def block_n_topk(block_topk: int) -> int:
    """BLOCK_N of the top-k GEMM for BLOCK_TOPK candidates: the candidate buffer holds
    F / BLOCK_N * BLOCK_TOPK keys per row, so a wide tile keeps it small; under the
    interpreter the sort's cost grows with the width."""
    bn = max(64 if _dispatch.interpreting() else 128, block_topk)
    return bn


def topk(x, W, b, k: int):
    """Fused GEMM + bias + top-k -> (pre values [B, k] float32, idx [B, k] int64), unsorted."""
    B, D = x.shape
    F = W.shape[0]
    block_topk = triton.next_power_of_2(k)
    if block_topk > TOPK_FUSED_MAX:
        vals, idx = pre(x, W, b).topk(k, dim=1, sorted=False)
        return vals, idx
    block_n = block_n_topk(block_topk)
    n_tiles = triton.cdiv(F, block_n)
    n_cand = n_tiles * block_topk
    if B == 0:
        return (torch.empty(0, k, dtype=torch.float32, device=x.device),
                torch.empty(0, k, dtype=torch.int64, device=x.device))
    cand = torch.empty(B, n_cand, dtype=torch.int64, device=x.device)
    x, b = x.contiguous(), b.contiguous()  # W: read in place through its strides
    args = (x, W, b, cand, B, F, D, n_cand, *W.stride())
    flags = gemm_flags(x.dtype, W.dtype)
    if _dispatch.interpreting():
        grid = (triton.cdiv(B, INTERP_TOPK_CONFIG["BLOCK_M"]), n_tiles)
        _encode_topk_kernel[grid](*args, BLOCK_TOPK=block_topk, BLOCK_N=block_n, **flags,
                                  **INTERP_TOPK_CONFIG)
    else:
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), n_tiles)  # noqa: E731
        tuned = _encode_topk_ieee if _ieee(x, flags) else _encode_topk_tuned
        tuned[grid](*args, BLOCK_TOPK=block_topk, BLOCK_N=block_n, **flags)
    keys = cand.topk(k, dim=1, sorted=False).values if n_cand > k else cand[:, :k]
    return _unpack_keys(keys)


def _unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys of ``_encode_topk_kernel`` -> (float32 values, int64 feature ids)."""
    hi = (keys >> 32).to(torch.int32)
    bits = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def pre(x, W, b, theta=None):
    """[B, F] float32 pre-activation (thresholded when theta [F] is given)."""
    B, D = x.shape
    F = W.shape[0]
    out = torch.empty(B, F, dtype=torch.float32, device=x.device)
    if B == 0:
        return out
    x, b = x.contiguous(), b.contiguous()  # W: read in place through its strides
    act = 0 if theta is None else 1
    args = (x, W, b, theta if theta is not None else b, out, B, F, D, *W.stride())
    flags = gemm_flags(x.dtype, W.dtype)
    if _dispatch.interpreting():
        c = INTERP_CONFIG
        grid = (triton.cdiv(B, c["BLOCK_M"]), triton.cdiv(F, c["BLOCK_N"]))
        _encode_fwd_kernel[grid](*args, ACT=act, **flags, **c)
    else:
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), triton.cdiv(F, meta["BLOCK_N"]))  # noqa: E731
        (_encode_fwd_ieee if _ieee(x, flags) else _encode_fwd_tuned)[grid](*args, ACT=act, **flags)
    return out


# ----------------------------------------------------------------------------- AOT registry
# dtype variants of the GEMM: (x, W) element types and the constexprs gemm_flags gives them
GEMM_DTYPES = {
    "fp32-ieee": ("fp32", "fp32", {"UPCAST": False, "PRECISION": "ieee"}),
    "fp32-tf32": ("fp32", "fp32", {"UPCAST": False, "PRECISION": "tf32"}),
    "bf16": ("bf16", "bf16", {"UPCAST": False, "PRECISION": "tf32"}),
    "fp16": ("fp16", "fp16", {"UPCAST": False, "PRECISION": "tf32"}),
    "x-fp32/w-bf16-tf32": ("fp32", "bf16", {"UPCAST": True, "PRECISION": "tf32"}),
    "x-fp32/w-bf16-ieee": ("fp32", "bf16", {"UPCAST": True, "PRECISION": "ieee"}),
}
_MAIN_GEMM_DTYPES = ("fp32-ieee", "fp32-tf32", "bf16", "x-fp32/w-bf16-tf32")


def _gemm_sig(dtype: str, out: dict) -> dict:
    xt, wt, _ = GEMM_DTYPES[dtype]
    return {"x_ptr": f"*{TL[xt]}", "w_ptr": f"*{TL[wt]}", "b_ptr": f"*{TL[wt]}", **out}


def _topk_configs(configs):
    out = []
    for bt in (1 << i for i in range(TOPK_FUSED_MAX.bit_length())):  # every BLOCK_TOPK shipped
        # main: k = 32 (the default shapes), the first autotune config
        for c in _with_layouts(configs, {"BLOCK_TOPK": bt, "BLOCK_N": max(128, bt)},
                               main_index=0 if bt == 32 else -1):
            out.append(c)
    return tuple(out)


_IEEE = tuple(d for d in GEMM_DTYPES if d.endswith("ieee"))
_TC = tuple(d for d in GEMM_DTYPES if not d.endswith("ieee"))
_STRIDES = {"stride_wf": "i32", "stride_wd": "i32"}
_FWD_SIG = {"theta_ptr": "*fp32", "out_ptr": "*fp32", "B": "i32", "F": "i32", "D": "i32", **_STRIDES}
_TOPK_SIG = {"cand_ptr": "*i64", "B": "i32", "F": "i32", "D": "i32", "n_cand": "i32", **_STRIDES}
# W's two layouts as the unit stride Triton specialises: row-major [F, D] (the main configs) and
# the .T view of a row-major [D, F] tensor
_ROW_MAJOR, _TRANSPOSED = {"stride_wd": 1}, {"stride_wf": 1}


def _with_layouts(configs, extra: dict, main_index: int):
    """``from_triton_configs`` in both W layouts; only row-major ones can be main."""
    return (from_triton_configs(configs, {**extra, **_ROW_MAJOR}, main_index=main_index)
            + from_triton_configs(configs, {**extra, **_TRANSPOSED}, main_index=-1))


def _fwd_configs(configs):
    # ACT 1 (relu / jumprelu) only adds a compare to the epilogue of ACT 0 (batchtopk)
    return tuple(c for act in (0, 1) for c in _with_layouts(
        configs, {"ACT": act}, main_index=0 if act == 1 else -1))


def _gemm_case(kernel, dtypes, sig, configs) -> AotCase:
    """The registry entry of one encoder GEMM kernel for a group of dtypes (tensor-core or IEEE)."""
    return AotCase(
        kernel=kernel, gemm=True, dtypes=dtypes,
        main_dtypes=tuple(d for d in _MAIN_GEMM_DTYPES if d in dtypes),
        signature=lambda dt: _gemm_sig(dt, sig), constexprs=lambda dt: GEMM_DTYPES[dt][2],
        configs=configs)


AOT_CASES = [
    _gemm_case(_encode_fwd_kernel, _TC, _FWD_SIG, _fwd_configs(GPU_CONFIGS)),
    _gemm_case(_encode_fwd_kernel, _IEEE, _FWD_SIG, _fwd_configs(IEEE_GPU_CONFIGS)),
    _gemm_case(_encode_topk_kernel, _TC, _TOPK_SIG, _topk_configs(TOPK_GPU_CONFIGS)),
    _gemm_case(_encode_topk_kernel, _IEEE, _TOPK_SIG, _topk_configs(TOPK_IEEE_GPU_CONFIGS)),
]
