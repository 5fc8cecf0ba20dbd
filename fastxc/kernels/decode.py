"""Sparse decode, and the three sparse row primitives every op is built from.

Math (sparse code (vals, idx) [B, k], decoder W [F, D], feature-major):
    recon[b]   = sum_j vals[b, j] * W[idx[b, j]] (+ b_dec)                  gather-sum
    dvals[b,j] = <G[b], W[idx[b, j]]>                                      gather-dot
    dW[f]      = sum_{(b,j): idx[b,j] = f} vals[b, j] * G[b]               scatter by feature
The scatter is a transposed sparse product. It is done WITHOUT atomics: a CSR index by feature
(stable argsort of the flat feature ids, histogram, prefix sum) lets one program per feature
write its dW row exactly once (zero rows for unused features), deterministic. The encoder's
dW_enc = G^T x is the same primitive, and the decoder-norm penalty's gradient rides along in it.

Backends: Triton kernels (``triton_decode.py``, imported on the first Triton call; CUDA, or CPU
under TRITON_INTERPRET=1), the C++ kernels of
``fastxc._C`` for fp32 CPU tensors, and a torch CPU path built on ``embedding_bag``
(gather-sum and, with the CSR offsets as bags, the scatter: one pass that writes every output
row once) and chunked ``bmm`` (gather-dot).
"""
from __future__ import annotations

import torch
from torch.nn.functional import embedding_bag

from . import _cext, _dispatch, _pool

# Block sizes (names as in every kernel of the package, see fastxc/kernels/__init__.py).
# One program covers BLOCK_D columns of one row; 128 fp32 columns = 512 B per gathered row
# segment, a full cache line multiple. Under the interpreter every program is a Python call,
# so wider blocks (fewer programs) are faster there.
BLOCK_D = 128
BLOCK_NNZ = 32  # feature-sorted code entries gathered per step of the scatter loop
BLOCK_F = 32  # features per program of the scatter (tl.dot needs >= 16)
BLOCK_CODE = 16  # entries of one code row per program of the gather-dot
# CPU gather-dot: rows per chunk so the gathered [chunk, k, D] block stays ~8 MiB (L3-sized)
_CPU_DOT_CHUNK_BYTES = 8 << 20




def _triton():
    """The Triton kernels (``triton_decode.py``), imported on the first Triton call."""
    from . import triton_decode

    return triton_decode


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
        C.csr_by_feature(_cext.as_numpy(flat), n_features, _cext.as_numpy(crow),
                         _cext.as_numpy(order))
        return crow, order
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_features)
    crow = torch.zeros(n_features + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow, order


def gather_sum(idx, w, table, bias, backend: str, out_dtype=None):
    """out[b] = sum_j w[b,j] * table[idx[b,j]] (+ bias). [B,k],[B,k],[F,D],[D] -> [B,D]."""
    out_dtype = out_dtype or table.dtype
    if backend == "triton":
        return _triton().gather_sum(idx, w, table, bias, out_dtype)
    out = embedding_bag(idx, table, per_sample_weights=w.to(table.dtype), mode="sum")
    if bias is not None:
        out += bias
    return out.to(out_dtype)


def gather_dot(idx, g, table, backend: str):
    """out[b, j] = <g[b], table[idx[b, j]]> in float32. [B,k],[B,D],[F,D] -> [B,k]."""
    B, k = idx.shape
    D = table.shape[1]
    out = torch.empty(B, k, dtype=torch.float32, device=table.device)
    if backend == "triton":
        return _triton().gather_dot(idx, g, table, out)
    C = _cext.usable(idx, g, table)
    if C is not None and idx.dtype == torch.int64:
        C.gather_dot(_cext.as_numpy(idx), _cext.as_numpy(g), _cext.as_numpy(table),
                     _cext.as_numpy(out))
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
    both = None if backend == "triton" else _scatter_rows_cpp(idx, crow, order, w, x, n_rows,
                                                              out_dtype, pen, dot_table)
    if both is not None:
        out, dots = both
    else:
        dots = gather_dot(idx, x, dot_table, backend) if dot_table is not None else None
        scatter = _triton().scatter_rows if backend == "triton" else _scatter_rows_torch
        out = scatter(idx, crow, order, w, x, n_rows, out_dtype, pen)
    return out if dot_table is None else (out, dots)


def _entries_per_row(idx) -> int:
    """k of a [B, k] code (entry e's row is e // k); 1 for the empty code of the penalty."""
    return max(1, idx.shape[1]) if idx.dim() == 2 else 1


def _scatter_rows_cpp(idx, crow, order, w, x, n_rows, out_dtype, pen, dot_table):
    """The C++ kernel -> (out, dots or None), or None where it does not apply (it takes fp32,
    int64 ids and contiguous CPU tensors); it computes the dots in the same pass."""
    C = _cext.usable(idx, x, w, *(pen if pen is not None else ()),
                     *((dot_table,) if dot_table is not None else ()))
    if C is None or out_dtype != torch.float32 or idx.dtype != torch.int64:
        return None
    out = _pool.empty((n_rows, x.shape[1]), torch.float32)
    none = torch.empty(0, dtype=torch.float32)  # an absent argument is an empty array
    dots = torch.empty(idx.shape, dtype=torch.float32) if dot_table is not None else none
    if pen is not None:
        c, wdec, inv, colsrc = pen
    else:
        c, wdec, inv, colsrc = none, dot_table, none.view(0, 0), torch.empty(0, dtype=torch.int32)
    if wdec is None:
        wdec = none.view(0, 0)
    a = _cext.as_numpy
    C.scatter_rows(a(crow), a(order), _entries_per_row(idx), a(w.reshape(-1)), a(x), a(out),
                   a(wdec), a(dots.view(-1)), a(c), a(inv), a(colsrc))
    return out, (dots if dot_table is not None else None)


def _scatter_rows_torch(idx, crow, order, w, x, n_rows, out_dtype, pen):
    # embedding_bag with one bag per feature (offsets = crow) writes each row once; empty bags
    # come out as zero rows
    tok = order // _entries_per_row(idx)
    wgt = w.reshape(-1)[order]
    xt = x if x.dtype == out_dtype else x.to(out_dtype)
    out = embedding_bag(tok, xt, crow, mode="sum", per_sample_weights=wgt.to(out_dtype),
                        include_last_offset=True)
    if pen is not None:
        c, wdec, inv, colsrc = pen
        rows = torch.nonzero(c).squeeze(1)
        if rows.numel():
            scale = (c[rows, None] * inv[rows])[:, colsrc.long()]  # [R, D]
            out.index_add_(0, rows, (scale * wdec[rows].float()).to(out_dtype))
    return out


# ----------------------------------------------------------------------------- autograd
class _SparseDecodeFn(torch.autograd.Function):
    """(vals, W_dec, b_dec) -> recon; idx is a constant."""

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
    """ValueError unless vals, idx are both [B, k] (idx int32/int64) and W is [F, D]."""
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


# ----------------------------------------------------------------------------- reference
def sparse_decode_ref(vals, idx, W_dec, b_dec=None):
    """recon[b] = sum_j vals[b, j] * W_dec[idx[b, j]] (+ b_dec). [B,k],[B,k],[F,D] -> [B,D]."""
    recon = (vals.unsqueeze(-1) * W_dec[idx]).sum(1)
    return recon if b_dec is None else recon + b_dec
