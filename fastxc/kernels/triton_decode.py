"""Triton kernels of the sparse row primitives (``decode.py``: gather-sum, gather-dot and the
scatter by feature), imported only when a call takes the Triton backend.

Block sizes are ``decode.py``'s (BLOCK_D, BLOCK_NNZ, BLOCK_F, BLOCK_CODE): one fixed config
per kernel, checked on sm_80 and sm_90a by ``python -m fastxc.kernels.aot``.

Weight tables are read (and dW tables written) through their strides (stride_*f, stride_*d),
so an [F, D] table that is the .T view of a row-major [D, F] tensor needs no copy; Triton
specialises a stride of 1, so each layout compiles to its own kernel (the AOT registry lists
both: the row-major one is the main config).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._registry import TL, AotCase, Config, config_name
from .decode import BLOCK_CODE, BLOCK_D, BLOCK_F, BLOCK_NNZ, _entries_per_row, empty_table


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _gather_sum_kernel(
    vals_ptr,  # [B, K] code values
    idx_ptr,  # [B, K] int feature ids
    w_ptr,  # [F, D] rows to gather, element (f, d) at f * stride_wf + d * stride_wd
    bias_ptr,  # [D] or dummy
    out_ptr,  # [B, D] output
    K, D, stride_wf, stride_wd,
    HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(0, K):
        v = tl.load(vals_ptr + pid_b * K + j).to(tl.float32)
        f = tl.load(idx_ptr + pid_b * K + j).to(tl.int64)
        row = tl.load(w_ptr + f * stride_wf + offs_d.to(tl.int64) * stride_wd, mask=mask_d,
                      other=0.0).to(tl.float32)
        acc += v * row
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_b.to(tl.int64) * D + offs_d, acc.to(out_ptr.dtype.element_ty),
             mask=mask_d)


@triton.jit
def _gather_dot_kernel(
    g_ptr,  # [B, D] dense rows (upstream gradient)
    idx_ptr,  # [B, K] int feature ids
    w_ptr,  # [F, D] rows to gather, element (f, d) at f * stride_wf + d * stride_wd
    out_ptr,  # [B, K] float32 <g[b], w[idx[b, j]]>
    K, D, stride_wf, stride_wd,
    BLOCK_CODE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_j = tl.program_id(1) * BLOCK_CODE + tl.arange(0, BLOCK_CODE)
    mask_j = offs_j < K
    f = tl.load(idx_ptr + pid_b * K + offs_j, mask=mask_j, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_CODE], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(g_ptr + pid_b.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        rows = tl.load(w_ptr + f[:, None] * stride_wf + offs_d[None, :].to(tl.int64) * stride_wd,
                       mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(rows * g[None, :], axis=1)
    tl.store(out_ptr + pid_b * K + offs_j, acc, mask=mask_j)


@triton.jit
def _scatter_rows_kernel(
    crow_ptr,  # [F + 1] int64 CSR row pointers (by feature)
    feat_ptr,  # [nnz] int64 feature of each entry, sorted
    tok_ptr,  # [nnz] int64 source row of each entry, feature-sorted
    wgt_ptr,  # [nnz] weight of each entry, feature-sorted
    x_ptr,  # [B, D] dense rows gathered by tok
    out_ptr,  # [F, D] output, every row written once; (f, d) at f * stride_of + d * stride_od
    pen_ptr,  # [F] float32 penalty weight c_f (PEN only)
    wdec_ptr,  # [F, D] decoder (PEN only), in out's layout (the same strides)
    inv_ptr,  # [F, S] float32 1 / ||W_dec[f, src_s]|| (0 for a zero slice) (PEN only)
    colsrc_ptr,  # [D] int32 source of each column (PEN only)
    F, D, S, stride_of, stride_od,
    PEN: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_NNZ: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program owns BLOCK_F consecutive features x BLOCK_D columns. Their entries are one
    # contiguous CSR range; each step multiplies a [features, entries] one-hot of the weights
    # by the [entries, columns] gathered rows (a small dot), so a feature's many entries and
    # a tile's many empty features cost the same loop.
    pid_f = tl.program_id(0)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(crow_ptr + pid_f * BLOCK_F)
    end = tl.load(crow_ptr + tl.minimum(pid_f * BLOCK_F + BLOCK_F, F))
    acc = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_NNZ):
        offs_e = e0 + tl.arange(0, BLOCK_NNZ)
        mask_e = offs_e < end
        t = tl.load(tok_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
        fe = tl.load(feat_ptr + offs_e, mask=mask_e, other=-1)
        w = tl.load(wgt_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        rows = tl.load(x_ptr + t[:, None] * D + offs_d[None, :],
                       mask=mask_e[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        sel = tl.where(fe[None, :] == offs_f[:, None], w[None, :], 0.0)  # [BLOCK_F, BLOCK_NNZ]
        acc += tl.dot(sel, rows, input_precision="ieee")
    # one offset tensor for out and wdec (same layout): a second [BLOCK_F, BLOCK_D] int64 one
    # spilled 372 B on sm_90a
    row_off = offs_f[:, None].to(tl.int64) * stride_of + offs_d[None, :].to(tl.int64) * stride_od
    mask = mask_f[:, None] & mask_d[None, :]
    if PEN:
        c = tl.load(pen_ptr + offs_f, mask=mask_f, other=0.0)
        s = tl.load(colsrc_ptr + offs_d, mask=mask_d, other=0)
        inv = tl.load(inv_ptr + offs_f[:, None] * S + s[None, :], mask=mask, other=0.0)
        wrow = tl.load(wdec_ptr + row_off, mask=mask, other=0.0).to(tl.float32)
        acc += c[:, None] * inv * wrow
    tl.store(out_ptr + row_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
def gather_sum(idx, w, table, bias, out_dtype):
    """out[b] = sum_j w[b,j] * table[idx[b,j]] (+ bias) -> [B, D] in out_dtype."""
    B, k = idx.shape
    D = table.shape[1]
    out = torch.empty(B, D, dtype=out_dtype, device=table.device)
    if B == 0:
        return out
    grid = (B, triton.cdiv(D, BLOCK_D))
    # the table is read in place through its strides (row-major or a transposed view)
    _gather_sum_kernel[grid](w.contiguous(), idx.contiguous(), table,
                             bias if bias is not None else table, out, k, D, *table.stride(),
                             HAS_BIAS=bias is not None, BLOCK_D=BLOCK_D)
    return out


def gather_dot(idx, g, table, out):
    """out[b, j] = <g[b], table[idx[b, j]]> into the float32 [B, k] ``out``."""
    B, k = idx.shape
    D = table.shape[1]
    if B == 0:
        return out
    grid = (B, triton.cdiv(k, BLOCK_CODE))
    _gather_dot_kernel[grid](g.contiguous(), idx.contiguous(), table, out, k, D, *table.stride(),
                             BLOCK_CODE=BLOCK_CODE, BLOCK_D=BLOCK_D)
    return out


def scatter_rows(idx, crow, order, w, x, n_rows, out_dtype, pen, like=None):
    """``decode.scatter_rows`` on the GPU: every output row written once (no atomics), in the
    layout of ``like`` (see there)."""
    D = x.shape[1]
    out = empty_table(like, n_rows, D, out_dtype, x.device)
    if n_rows == 0:
        return out
    tok = order // _entries_per_row(idx)
    wgt = w.reshape(-1)[order]
    feat = idx.reshape(-1)[order]
    if pen is None:  # PEN=False never reads these: any valid pointers do (wdec: out's dtype)
        dummy = torch.empty(1, dtype=torch.float32, device=x.device)
        c, wdec, inv, colsrc, S = dummy, out, dummy, torch.zeros(1, dtype=torch.int32, device=x.device), 1
    else:
        c, wdec, inv, colsrc = pen
        c, inv, S = c.contiguous(), inv.contiguous(), inv.shape[1]
        if wdec.stride() != out.stride():  # the kernel reads wdec with out's strides; every
            wdec = empty_table(like, n_rows, D, wdec.dtype, x.device).copy_(wdec)  # caller has like=wdec
    grid = (triton.cdiv(n_rows, BLOCK_F), triton.cdiv(D, BLOCK_D))
    _scatter_rows_kernel[grid](crow, feat.contiguous(), tok, wgt.contiguous(), x.contiguous(),
                               out, c, wdec, inv, colsrc, n_rows, D, S, *out.stride(),
                               PEN=pen is not None,
                               BLOCK_F=BLOCK_F, BLOCK_NNZ=BLOCK_NNZ, BLOCK_D=BLOCK_D)
    return out


# ----------------------------------------------------------------------------- AOT registry
def _variants(*mixes: tuple[str, ...]) -> dict[str, tuple[str, dict[str, str]]]:
    """dtype variants: the model dtype d of the tensors (fp32, bf16, fp16) and, for the half
    dtypes, the launches that pass some operands in fp32 (a float32 upstream gradient, fp32
    inputs with half weights): name -> (d, {operand role: its dtype})."""
    out = {d: (d, {}) for d in ("fp32", "bf16", "fp16")}
    for d in ("bf16", "fp16"):
        for roles in mixes:
            out[f"{d}/{'+'.join(roles)}-fp32"] = (d, {r: "fp32" for r in roles})
    return out


def _t(variants, dt: str, role: str) -> str:
    d, over = variants[dt]
    return "*" + TL[over.get(role, d)]


def _one(constexprs: dict, num_warps: int = 4, main: bool = True) -> Config:
    """A fixed launch config (Triton's default num_warps 4, num_stages 3)."""
    return Config(config_name(constexprs, num_warps, 3), constexprs, num_warps, 3, main=main)


# The two table layouts as the unit stride Triton specialises: row-major [F, D] (stride along
# D = 1: the main configs) and the .T view of a row-major [D, F] tensor (stride along F = 1).
_ROW_MAJOR = {"stride_wd": 1}
_TRANSPOSED = {"stride_wf": 1}


def _layouts(constexprs: dict, main: bool = True, out: bool = False) -> tuple[Config, ...]:
    """``_one`` in both table layouts (the transposed one never main); out: the scatter, whose
    tables are its output (and the decoder of the penalty, in the same layout)."""
    rm, tr = (({"stride_od": 1}, {"stride_of": 1}) if out else (dict(_ROW_MAJOR), dict(_TRANSPOSED)))
    return (_one({**constexprs, **rm}, main=main), _one({**constexprs, **tr}, main=False))


# gather-sum: decode / loss forward (all d; fp32 vals from an fp32 encoder input), encoder
# backward dx (weights: the fp32 gradient; out: x's dtype, fp32 for x fp32 with W in d)
_GS = _variants(("w",), ("w", "out"))
# gather-dot: decoder backward (g in d), loss backward (G fp32)
_GD = _variants(("g",))
# scatter: decoder backward (w, x in d), loss backward (x = G fp32; w fp32 too for fp32 vals),
# encoder backward and the penalty (w fp32: the gradient / an empty code; x fp32 for x fp32)
_SC = _variants(("x",), ("w",), ("w", "x"))
_MAIN = ("fp32", "bf16")

AOT_CASES = [
    AotCase(
        kernel=_gather_sum_kernel, dtypes=tuple(_GS), main_dtypes=_MAIN,
        signature=lambda dt: {"vals_ptr": _t(_GS, dt, "w"), "idx_ptr": "*i64", "w_ptr": _t(_GS, dt, "table"),
                              "bias_ptr": _t(_GS, dt, "table"), "out_ptr": _t(_GS, dt, "out"),
                              "K": "i32", "D": "i32", "stride_wf": "i32", "stride_wd": "i32"},
        configs=(*_layouts({"HAS_BIAS": True, "BLOCK_D": BLOCK_D}),
                 *_layouts({"HAS_BIAS": False, "BLOCK_D": BLOCK_D}, main=False))),
    AotCase(
        kernel=_gather_dot_kernel, dtypes=tuple(_GD), main_dtypes=_MAIN,
        signature=lambda dt: {"g_ptr": _t(_GD, dt, "g"), "idx_ptr": "*i64", "w_ptr": _t(_GD, dt, "table"),
                              "out_ptr": "*fp32", "K": "i32", "D": "i32", "stride_wf": "i32",
                              "stride_wd": "i32"},
        configs=_layouts({"BLOCK_CODE": BLOCK_CODE, "BLOCK_D": BLOCK_D})),
    AotCase(
        kernel=_scatter_rows_kernel, dtypes=tuple(_SC), main_dtypes=_MAIN,
        signature=lambda dt: {"crow_ptr": "*i64", "feat_ptr": "*i64", "tok_ptr": "*i64",
                              "wgt_ptr": _t(_SC, dt, "w"), "x_ptr": _t(_SC, dt, "x"),
                              "out_ptr": _t(_SC, dt, "out"), "pen_ptr": "*fp32",
                              "wdec_ptr": _t(_SC, dt, "out"), "inv_ptr": "*fp32", "colsrc_ptr": "*i32",
                              "F": "i32", "D": "i32", "S": "i32", "stride_of": "i32", "stride_od": "i32"},
        configs=tuple(c for pen in (True, False) for c in _layouts(
            {"PEN": pen, "BLOCK_F": BLOCK_F, "BLOCK_NNZ": BLOCK_NNZ, "BLOCK_D": BLOCK_D},
            main=pen, out=True))),
]
