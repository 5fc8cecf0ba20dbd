"""Sparse decode and the sparse row primitives shared by every op.

Math (sparse code (vals, idx) [B, k], decoder W [F, D], feature-major):
    recon[b]   = sum_j vals[b, j] * W[idx[b, j]] (+ b_dec)                  gather-sum
    dvals[b,j] = <G[b], W[idx[b, j]]>                                      gather-dot
    dW[f]      = sum_{(b,j): idx[b,j] = f} vals[b, j] * G[b]               scatter by feature
The scatter is a transposed sparse product. It is done WITHOUT atomics: a CSR index by feature
(stable argsort of the flat feature ids, histogram, prefix sum) lets one program per feature
write its dW row exactly once (zero rows for unused features), deterministic. The encoder's
dW_enc = G^T x is the same primitive, and the decoder-norm penalty's gradient rides along in it.

Backends: Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) and a CPU path built on
``torch.nn.functional.embedding_bag`` (gather-sum and, with the CSR offsets as bags, the
scatter: one pass that writes every output row once) and chunked ``bmm`` (gather-dot).
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
import triton
import triton.language as tl

from . import _cext, _dispatch, _pool
from .reference import sparse_decode_ref

# Block sizes: one program covers BLOCK_D columns of one row; 128 fp32 columns = 512 B per
# gathered row segment, a full cache line multiple. Under the interpreter every program is a
# Python call, so wider blocks (fewer programs) are faster there.
BLOCK_D = 128
BLOCK_E = 32  # (row, feature) entries gathered per step of the scatter loop
BLOCK_F = 32  # features per program of the scatter (tl.dot needs >= 16)
BLOCK_K = 16  # code entries per program of the gather-dot
# CPU gather-dot: rows per chunk so the gathered [chunk, k, D] block stays ~8 MiB (L3-sized)
_CPU_DOT_CHUNK_BYTES = 8 << 20


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _gather_sum_kernel(
    vals_ptr,  # [B, K] code values
    idx_ptr,  # [B, K] int feature ids
    w_ptr,  # [F, D] rows to gather
    bias_ptr,  # [D] or dummy
    out_ptr,  # [B, D] output
    K, D,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, K):
        v = tl.load(vals_ptr + pid_b * K + j).to(tl.float32)
        f = tl.load(idx_ptr + pid_b * K + j).to(tl.int64)
        row = tl.load(w_ptr + f * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        acc += v * row
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_b.to(tl.int64) * D + offs_d, acc.to(out_ptr.dtype.element_ty),
             mask=mask_d)


@triton.jit
def _gather_dot_kernel(
    g_ptr,  # [B, D] dense rows (upstream gradient)
    idx_ptr,  # [B, K] int feature ids
    w_ptr,  # [F, D] rows to gather
    out_ptr,  # [B, K] float32 <g[b], w[idx[b, j]]>
    K, D,
    BLOCK_KK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_KK + tl.arange(0, BLOCK_KK)
    mask_k = offs_k < K
    f = tl.load(idx_ptr + pid_b * K + offs_k, mask=mask_k, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_KK], dtype=tl.float32)
    for d0 in range(0, D, BLOCK):
        offs_d = d0 + tl.arange(0, BLOCK)
        mask_d = offs_d < D
        g = tl.load(g_ptr + pid_b.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        rows = tl.load(w_ptr + f[:, None] * D + offs_d[None, :],
                       mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(rows * g[None, :], axis=1)
    tl.store(out_ptr + pid_b * K + offs_k, acc, mask=mask_k)


@triton.jit
def _scatter_rows_kernel(
    crow_ptr,  # [F + 1] int64 CSR row pointers (by feature)
    feat_ptr,  # [nnz] int64 feature of each entry, sorted
    tok_ptr,  # [nnz] int64 source row of each entry, feature-sorted
    wgt_ptr,  # [nnz] weight of each entry, feature-sorted
    x_ptr,  # [B, D] dense rows gathered by tok
    out_ptr,  # [F, D] output, every row written once
    pen_ptr,  # [F] float32 penalty weight c_f (PEN only)
    wdec_ptr,  # [F, D] decoder (PEN only)
    inv_ptr,  # [F, S] float32 1 / ||W_dec[f, src_s]|| (0 for a zero slice) (PEN only)
    colsrc_ptr,  # [D] int32 source of each column (PEN only)
    F, D, S,
    PEN: tl.constexpr,
    BLOCK_FF: tl.constexpr,
    BLOCK_EE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program owns BLOCK_FF consecutive features x BLOCK columns. Their entries are one
    # contiguous CSR range; each step multiplies a [features, entries] one-hot of the weights
    # by the [entries, columns] gathered rows (a small dot), so a feature's many entries and
    # a tile's many empty features cost the same loop.
    pid_f = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_f = pid_f * BLOCK_FF + tl.arange(0, BLOCK_FF)
    mask_f = offs_f < F
    offs_d = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask_d = offs_d < D
    start = tl.load(crow_ptr + pid_f * BLOCK_FF)
    end = tl.load(crow_ptr + tl.minimum(pid_f * BLOCK_FF + BLOCK_FF, F))
    acc = tl.zeros([BLOCK_FF, BLOCK], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_EE):
        offs_e = e0 + tl.arange(0, BLOCK_EE)
        mask_e = offs_e < end
        t = tl.load(tok_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
        fe = tl.load(feat_ptr + offs_e, mask=mask_e, other=-1)
        w = tl.load(wgt_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        rows = tl.load(x_ptr + t[:, None] * D + offs_d[None, :],
                       mask=mask_e[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        sel = tl.where(fe[None, :] == offs_f[:, None], w[None, :], 0.0)  # [BLOCK_FF, BLOCK_EE]
        acc += tl.dot(sel, rows, input_precision="ieee")
    row_off = offs_f[:, None].to(tl.int64) * D + offs_d[None, :]
    mask = mask_f[:, None] & mask_d[None, :]
    if PEN:
        c = tl.load(pen_ptr + offs_f, mask=mask_f, other=0.0)
        s = tl.load(colsrc_ptr + offs_d, mask=mask_d, other=0)
        inv = tl.load(inv_ptr + offs_f[:, None] * S + s[None, :], mask=mask, other=0.0)
        wrow = tl.load(wdec_ptr + row_off, mask=mask, other=0.0).to(tl.float32)
        acc += c[:, None] * inv * wrow
    tl.store(out_ptr + row_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- primitives
def csr_by_feature(idx: torch.Tensor, n_features: int):
    """CSR index of the flat code entries by feature.

    idx [B, k] -> (crow [F+1] int64, order [B*k] int64 flat entry ids sorted by feature, stable).
    Entry e = b * k + j, so its token is order // k.
    """
    flat = idx.reshape(-1)
    C = _cext.usable(flat)
    if C is not None and flat.dtype == torch.int64:
        crow = torch.empty(n_features + 1, dtype=torch.int64)
        order = torch.empty(flat.numel(), dtype=torch.int64)
        C.csr_by_feature(_cext.np(flat), n_features, _cext.np(crow), _cext.np(order))
        return crow, order
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_features)
    crow = torch.zeros(n_features + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow, order


def gather_sum(idx, w, table, bias, backend: str, out_dtype=None):
    """out[b] = sum_j w[b,j] * table[idx[b,j]] (+ bias). [B,k],[B,k],[F,D],[D] -> [B,D]."""
    B, k = idx.shape
    D = table.shape[1]
    out_dtype = out_dtype or table.dtype
    if backend == "triton":
        out = torch.empty(B, D, dtype=out_dtype, device=table.device)
        if B == 0:
            return out
        grid = (B, triton.cdiv(D, BLOCK_D))
        _gather_sum_kernel[grid](w.contiguous(), idx.contiguous(), table.contiguous(),
                                 bias if bias is not None else table, out, k, D,
                                 HAS_BIAS=bias is not None, BLOCK=BLOCK_D)
        return out
    out = Fn.embedding_bag(idx, table, per_sample_weights=w.to(table.dtype), mode="sum")
    if bias is not None:
        out += bias
    return out.to(out_dtype)


def gather_dot(idx, g, table, backend: str):
    """out[b, j] = <g[b], table[idx[b, j]]> in float32. [B,k],[B,D],[F,D] -> [B,k]."""
    B, k = idx.shape
    D = table.shape[1]
    if backend == "triton":
        out = torch.empty(B, k, dtype=torch.float32, device=table.device)
        if B == 0:
            return out
        grid = (B, triton.cdiv(k, BLOCK_K))
        _gather_dot_kernel[grid](g.contiguous(), idx.contiguous(), table.contiguous(), out, k, D,
                                 BLOCK_KK=BLOCK_K, BLOCK=BLOCK_D)
        return out
    out = torch.empty(B, k, dtype=torch.float32, device=table.device)
    C = _cext.usable(idx, g, table)
    if C is not None and idx.dtype == torch.int64:
        C.gather_dot(_cext.np(idx), _cext.np(g), _cext.np(table), _cext.np(out))
        return out
    rows = max(1, _CPU_DOT_CHUNK_BYTES // max(1, k * D * table.element_size()))
    gd = g.to(table.dtype)
    for s in range(0, B, rows):
        e = min(B, s + rows)
        blk = table[idx[s:e]]  # [c, k, D] stays cache-sized
        out[s:e] = torch.bmm(blk, gd[s:e].unsqueeze(-1)).squeeze(-1).float()
    return out


def scatter_rows(idx, crow, order, w, x, n_rows: int, backend: str, out_dtype, pen=None,
                 dot_table=None):
    """out[f] = sum_{e in CSR row f} w_flat[e] * x[e // k]  (+ penalty term), every row once.

    crow/order from ``csr_by_feature``; w [B, k]; x [B, D]; -> [n_rows, D] in ``out_dtype``.
    pen: None or (c [F] float32, W_dec [F, D], inv_norm [F, S] float32, col_src [D] int32);
    adds c[f] * W_dec[f, d] * inv_norm[f, src(d)].
    dot_table: None or [F, D]; then also returns dots [B, k] float32 with
    dots[b, j] = <x[b], dot_table[idx[b, j]]> (the decoder's dvals, computed in the same pass
    over each active row by the C++ kernel) -> (out, dots).
    """
    D = x.shape[1]
    k = max(1, idx.shape[1]) if idx.dim() == 2 else 1
    dots = gather_dot(idx, x, dot_table, backend) if dot_table is not None and (
        backend == "triton" or _cext.get() is None) else None
    if backend == "triton":
        out = torch.empty(n_rows, D, dtype=out_dtype, device=x.device)
        if n_rows == 0:
            return out if dot_table is None else (out, dots)
        tok = order // k
        wgt = w.reshape(-1)[order]
        if pen is None:
            dummy = torch.empty(1, dtype=torch.float32, device=x.device)
            pen_args = (dummy, x, dummy, torch.zeros(1, dtype=torch.int32, device=x.device), 1)
        else:
            c, wdec, inv, colsrc = pen
            pen_args = (c.contiguous(), wdec.contiguous(), inv.contiguous(), colsrc, inv.shape[1])
        feat = idx.reshape(-1)[order]
        grid = (triton.cdiv(n_rows, BLOCK_F), triton.cdiv(D, BLOCK_D))
        _scatter_rows_kernel[grid](crow, feat.contiguous(), tok, wgt.contiguous(), x.contiguous(),
                                   out, pen_args[0], pen_args[1], pen_args[2], pen_args[3],
                                   n_rows, D, pen_args[4], PEN=pen is not None, BLOCK_FF=BLOCK_F,
                                   BLOCK_EE=BLOCK_E, BLOCK=BLOCK_D)
        return out if dot_table is None else (out, dots)
    C = _cext.usable(idx, x, w, *(pen if pen is not None else ()),
                     *((dot_table,) if dot_table is not None else ()))
    if C is not None and out_dtype == torch.float32 and idx.dtype == torch.int64:
        out = _pool.empty((n_rows, D), torch.float32)
        e0 = torch.empty(0, dtype=torch.float32)
        dots = torch.empty(idx.shape, dtype=torch.float32) if dot_table is not None else e0
        wdec = pen[1] if pen is not None else dot_table
        C.scatter_rows(_cext.np(crow), _cext.np(order), k, _cext.np(w.reshape(-1)), _cext.np(x),
                       _cext.np(out), _cext.np(wdec) if wdec is not None else _cext.np(e0.view(0, 0)),
                       _cext.np(dots.view(-1)), _cext.np(pen[0]) if pen is not None else _cext.np(e0),
                       _cext.np(pen[2]) if pen is not None else _cext.np(e0.view(0, 0)),
                       _cext.np(pen[3]) if pen is not None else _cext.np(torch.empty(0, dtype=torch.int32)))
        return (out, dots) if dot_table is not None else out
    # CPU: embedding_bag with one bag per feature (offsets = crow) writes each row once;
    # empty bags come out as zero rows.
    tok = order // k
    wgt = w.reshape(-1)[order]
    xt = x if x.dtype == out_dtype else x.to(out_dtype)
    out = Fn.embedding_bag(tok, xt, crow, mode="sum", per_sample_weights=wgt.to(out_dtype),
                           include_last_offset=True)
    if pen is not None:
        c, wdec, inv, colsrc = pen
        rows = torch.nonzero(c).squeeze(1)
        if rows.numel():
            scale = (c[rows, None] * inv[rows])[:, colsrc.long()]  # [R, D]
            out.index_add_(0, rows, (scale * wdec[rows].float()).to(out_dtype))
    if dot_table is not None:
        return out, (dots if dots is not None else gather_dot(idx, x, dot_table, backend))
    return out


# ----------------------------------------------------------------------------- autograd
class _SparseDecodeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, idx, W_dec, b_dec, backend):
        ctx.backend = backend
        ctx.has_bias = b_dec is not None
        ctx.save_for_backward(vals, idx, W_dec)
        return gather_sum(idx, vals, W_dec, b_dec, backend)

    @staticmethod
    def backward(ctx, g):
        vals, idx, W_dec = ctx.saved_tensors
        bk = ctx.backend
        dvals = dW = db = None
        g = g.contiguous()
        if ctx.needs_input_grad[2]:
            crow, order = csr_by_feature(idx, W_dec.shape[0])
            dW = scatter_rows(idx, crow, order, vals, g, W_dec.shape[0], bk, W_dec.dtype,
                              dot_table=W_dec if ctx.needs_input_grad[0] else None)
            if ctx.needs_input_grad[0]:
                dW, dvals = dW
                dvals = dvals.to(vals.dtype)
        elif ctx.needs_input_grad[0]:
            dvals = gather_dot(idx, g, W_dec, bk).to(vals.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = g.sum(0, dtype=torch.float32).to(W_dec.dtype)
        return dvals, None, dW, db, None


def check_code(vals, idx, W):
    if vals.dim() != 2 or idx.shape != vals.shape:
        raise ValueError(f"vals and idx must both be [B, k]; got {tuple(vals.shape)} and "
                         f"{tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 or int64, got {idx.dtype}")
    if W.dim() != 2:
        raise ValueError(f"decoder must be [F, D], got shape {tuple(W.shape)}")


def sparse_decode(vals, idx, W_dec, b_dec=None, *, backend: str | None = None):
    """Decode a sparse code: recon[b] = sum_j vals[b,j] * W_dec[idx[b,j]] + b_dec.

    vals [B, k] float, idx [B, k] int32/int64, W_dec [F, D] (feature-major), b_dec [D] or None
    -> recon [B, D] in W_dec's dtype (fp32 accumulation). fp32 and bf16.
    Differentiable in vals, W_dec and b_dec. dW_dec is written once per row through a CSR
    index by feature (sorted, deterministic, no atomics).

    Example::

        vals, idx = topk_encode(x, W_enc, b_enc, k=32)
        recon = sparse_decode(vals, idx, W_dec, b_dec)
    """
    check_code(vals, idx, W_dec)
    bk = _dispatch.choose(W_dec, backend=backend)
    if bk == "reference":
        return sparse_decode_ref(vals, idx, W_dec, b_dec)
    # contiguous operands: the C++ / Triton kernels index raw row-major buffers
    return _SparseDecodeFn.apply(vals.contiguous(), idx.long().contiguous(), W_dec.contiguous(),
                                 b_dec, bk)
