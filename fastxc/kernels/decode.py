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


# ----------------------------------------------------------------------------- layouts, codes
LAYOUTS = ("fd", "df")


def weight_view(W, layout: str, op: str, name: str = "W_dec") -> torch.Tensor:
    """The [F, D] table the kernels read, as a view of ``W`` (no copy).

    layout "fd": W is [F, D], row-major or the ``.T`` view of a row-major [D, F] tensor;
    layout "df": W is itself [D, F] (e.g. ``nn.Linear(F, D).weight``) and is read as ``W.T``.
    A W in neither memory layout (a strided slice) is copied once, with ``.contiguous()``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be 'fd' ({name} [F, D], or the .T view of a [D, F] "
                         f"tensor) or 'df' ({name} given as [D, F]), got {layout!r}")
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"{op}: {name} must be [F, D] (or [D, F] with layout='df'), got {shape}")
    if layout == "df":
        W = W.t()
    if not (W.is_contiguous() or W.t().is_contiguous()):
        W = W.contiguous()  # neither row- nor column-major: the kernels read one of the two
    return W


def is_transposed(W: torch.Tensor) -> bool:
    """True when the [F, D] table W (from ``weight_view``) is the ``.T`` view of a row-major
    [D, F] buffer, False when it is row-major itself (a size-1 dim counts as row-major)."""
    return not W.is_contiguous()


def table_buffer(W: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(row-major buffer, transposed): W itself, or the [D, F] tensor W is the ``.T`` of."""
    return (W.t(), True) if is_transposed(W) else (W, False)


def empty_table(like: torch.Tensor | None, n_rows: int, D: int, dtype, device=None,
                pooled: bool = False) -> torch.Tensor:
    """An uninitialised [n_rows, D] table in ``like``'s layout: row-major when like is None or
    row-major, else the .T view of a row-major [D, n_rows] buffer (a gradient autograd then
    stores in the [D, F] parameter as it is). pooled: from ``_pool`` (CPU only)."""
    tr = like is not None and is_transposed(like)
    shape = (D, n_rows) if tr else (n_rows, D)
    buf = _pool.empty(shape, dtype) if pooled else torch.empty(shape, dtype=dtype, device=device)
    return buf.t() if tr else buf


def _layout_hint(W, name: str) -> str:
    return (f"; if {name} is a [D, F] tensor, pass {name}.T or layout='df'"
            if W.shape[0] != W.shape[1] else "")


def flat_code(op: str, vals, idx, W, name: str = "W_dec"):
    """Check a sparse code against the [F, D] table W and flatten it.

    vals, idx [..., k] -> (vals [N, k], idx [N, k] int64 contiguous, leading shape). Padding
    entries (idx -1) become feature 0 with value 0 (masked_fill: their dvals are 0). On CPU
    tensors any other id outside [0, F) is a ValueError; on CUDA they are not checked (the
    check would cost a device sync per call).
    """
    if not isinstance(vals, torch.Tensor) or not isinstance(idx, torch.Tensor) \
            or vals.dim() < 1 or idx.shape != vals.shape:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in (vals, idx)]
        raise ValueError(f"{op}: vals and idx must both be [..., k] (e.g. [B, k]); got "
                         f"{shapes[0]} and {shapes[1]}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: idx must be int32 or int64, got {idx.dtype}")
    lead, k = vals.shape[:-1], vals.shape[-1]
    F = W.shape[0]
    v = vals.reshape(-1, k)
    i = idx.reshape(-1, k).long()
    if i.device.type == "cuda":
        pad = i < 0  # no sync: the masks run whatever the ids are
        return v.masked_fill(pad, 0), i.masked_fill(pad, 0).contiguous(), lead
    if i.numel():
        lo, hi = (int(t) for t in torch.aminmax(i))
        if hi >= F:
            raise ValueError(f"{op}: idx holds feature id {hi}, but {name} [F, D] = "
                             f"{list(W.shape)} has F={F} (ids must be in [0, F), or -1 for "
                             f"padding){_layout_hint(W, name) if hi < W.shape[1] else ''}")
        if lo < -1:
            raise ValueError(f"{op}: idx holds {lo}; ids must be in [0, F={F}), or -1 for padding")
        if lo == -1:
            pad = i < 0
            v, i = v.masked_fill(pad, 0), i.masked_fill(pad, 0)
    return v, i.contiguous(), lead


def unflatten(t: torch.Tensor, lead) -> torch.Tensor:
    """t [N, m] -> [*lead, m]; t itself when that is its shape already (no view node)."""
    shape = (*lead, t.shape[-1])
    return t if tuple(t.shape) == shape else t.reshape(shape)


def check_bias(op: str, b, n: int, name: str, what: str) -> None:
    """ValueError unless b is None or a [n] tensor."""
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (n,)):
        shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"{op}: {name} must be [{what}]=[{n}] or None, got {shape}")


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
    """out[b] = sum_j w[b,j] * table[idx[b,j]] (+ bias). [B,k],[B,k],[F,D],[D] -> [B,D].

    table: row-major or the .T view of a row-major [D, F] tensor (``weight_view``)."""
    out_dtype = out_dtype or table.dtype
    if backend == "triton":
        return _triton().gather_sum(idx, w, table, bias, out_dtype)
    buf, tr = table_buffer(table)
    wf = w if w.dtype == torch.float32 else w.float()
    C = _cext.usable(idx, wf, buf, *((bias,) if bias is not None else ()))
    if C is not None and idx.dtype == torch.int64 and buf.dtype == out_dtype == torch.float32 \
            and (bias is None or bias.dtype == torch.float32):
        out = torch.empty(idx.shape[0], table.shape[1], dtype=torch.float32)
        a = _cext.as_numpy
        C.gather_sum(a(idx), a(wf.contiguous()), a(buf), tr,
                     a(bias if bias is not None else torch.empty(0)), a(out))
        return out
    # torch path (no C++ extension, or bf16): embedding_bag reads a row-major table, so a
    # transposed view is copied here (only here: the C++ kernel reads it in place)
    out = embedding_bag(idx, table.contiguous(), per_sample_weights=w.to(table.dtype), mode="sum")
    if bias is not None:
        out += bias
    return out.to(out_dtype)


def gather_dot(idx, g, table, backend: str):
    """out[b, j] = <g[b], table[idx[b, j]]> in float32. [B,k],[B,D],[F,D] -> [B,k]."""
    B, k = idx.shape
    F, D = table.shape
    out = torch.empty(B, k, dtype=torch.float32, device=table.device)
    if backend == "triton":
        return _triton().gather_dot(idx, g, table, out)
    buf, tr = table_buffer(table)
    C = _cext.usable(idx, g, buf)
    if C is not None and idx.dtype == torch.int64:
        a = _cext.as_numpy
        if not tr:
            C.gather_dot(a(idx), a(g), a(buf), a(out))
            return out
        # [D, F]: the dots of each feature's entries from one copied block of its columns
        # (the scatter kernel with no output), the same sums as the [F, D] kernel
        crow, order = csr_by_feature(idx, F)
        none = torch.empty(0, dtype=torch.float32)
        C.scatter_rows(a(crow), a(order), _entries_per_row(idx), a(none), a(g), a(none),
                       a(buf), a(out.view(-1)), a(none), a(none.view(0, 0)),
                       a(torch.empty(0, dtype=torch.int32)), True)
        return out
    rows = max(1, _CPU_DOT_CHUNK_BYTES // max(1, k * D * table.element_size()))
    gd = g.to(table.dtype)
    for s in range(0, B, rows):
        e = min(B, s + rows)
        blk = table[idx[s:e]]  # [c, k, D] stays cache-sized (a transposed view is read in place)
        out[s:e] = torch.bmm(blk, gd[s:e].unsqueeze(-1)).squeeze(-1).float()
    return out


def scatter_rows(idx, crow, order, w, x, n_rows: int, backend: str, out_dtype, pen=None,
                 dot_table=None, like=None):
    """out[f] = sum_{e in CSR row f} w_flat[e] * x[e // k]  (+ penalty term), every row once.

    crow/order from ``csr_by_feature``; w [B, k]; x [B, D]; -> [n_rows, D] in ``out_dtype``,
    in the layout of ``like`` (the weight table the output is the gradient of: row-major, or
    the .T view of a row-major [D, n_rows] buffer; None: row-major).
    pen: None or (c [F] float32, W_dec [F, D], inv_norm [F, S] float32, col_src [D] int32);
    adds c[f] * W_dec[f, d] * inv_norm[f, src(d)].
    dot_table: None or [F, D]; then also returns dots [B, k] float32 with
    dots[b, j] = <x[b], dot_table[idx[b, j]]> (the decoder's dvals, computed in the same pass
    over each active row by the C++ kernel) -> (out, dots).
    """
    both = None if backend == "triton" else _scatter_rows_cpp(idx, crow, order, w, x, n_rows,
                                                              out_dtype, pen, dot_table, like)
    if both is not None:
        out, dots = both
    else:
        dots = gather_dot(idx, x, dot_table, backend) if dot_table is not None else None
        scatter = _triton().scatter_rows if backend == "triton" else _scatter_rows_torch
        out = scatter(idx, crow, order, w, x, n_rows, out_dtype, pen, like)
    return out if dot_table is None else (out, dots)


def _entries_per_row(idx) -> int:
    """k of a [B, k] code (entry e's row is e // k); 1 for the empty code of the penalty."""
    return max(1, idx.shape[1]) if idx.dim() == 2 else 1


def _scatter_rows_cpp(idx, crow, order, w, x, n_rows, out_dtype, pen, dot_table, like):
    """The C++ kernel -> (out, dots or None), or None where it does not apply (it takes fp32,
    int64 ids and tables in one layout, ``like``'s); it computes the dots in the same pass."""
    tr = like is not None and is_transposed(like)
    tables = [t for t in (dot_table, pen[1] if pen is not None else None) if t is not None]
    if any(is_transposed(t) != tr for t in tables):
        return None
    C = _cext.usable(idx, x, w, *(pen if pen is not None else ()),
                     *(table_buffer(t)[0] for t in tables))
    if C is None or out_dtype != torch.float32 or idx.dtype != torch.int64:
        return None
    out = empty_table(like, n_rows, x.shape[1], torch.float32, pooled=True)
    none = torch.empty(0, dtype=torch.float32)  # an absent argument is an empty array
    dots = torch.empty(idx.shape, dtype=torch.float32) if dot_table is not None else none
    if pen is not None:
        c, wdec, inv, colsrc = pen
    else:
        c, wdec, inv, colsrc = none, dot_table, none.view(0, 0), torch.empty(0, dtype=torch.int32)
    wdec = table_buffer(wdec)[0] if wdec is not None else none.view(0, 0)
    a = _cext.as_numpy
    C.scatter_rows(a(crow), a(order), _entries_per_row(idx), a(w.reshape(-1)), a(x),
                   a(table_buffer(out)[0]), a(wdec), a(dots.view(-1)), a(c), a(inv), a(colsrc), tr)
    return out, (dots if dot_table is not None else None)


def _scatter_rows_torch(idx, crow, order, w, x, n_rows, out_dtype, pen, like=None):
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
    if like is not None and is_transposed(like):
        # torch path only (no C++ extension, or bf16): one copy into the table's layout, so
        # autograd still stores the gradient in the parameter without another
        out = empty_table(like, n_rows, x.shape[1], out_dtype, out.device).copy_(out)
    return out


# ----------------------------------------------------------------------------- autograd
class _SparseDecodeFn(torch.autograd.Function):
    """(vals, W_dec, b_dec) -> recon; idx is a constant. W_dec [F, D] is read in its own
    layout and dW_dec comes back in it."""

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
                              dot_table=W_dec if ctx.needs_input_grad[0] else None, like=W_dec)
            if ctx.needs_input_grad[0]:
                dW, dvals = dW
                dvals = dvals.to(vals.dtype)
        elif ctx.needs_input_grad[0]:
            dvals = gather_dot(idx, g, W_dec, bk).to(vals.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = g.sum(0, dtype=torch.float32).to(W_dec.dtype)
        return dvals, None, dW, db, None


def sparse_decode(vals, idx, W_dec, b_dec=None, *, layout: str = "fd", backend: str | None = None):
    """Decode a sparse code: recon[..., :] = sum_j vals[..., j] * W_dec[idx[..., j]] + b_dec.

    vals [..., k] float, idx [..., k] int32/int64 (-1: padding, ignored), W_dec [F, D]
    (row-major, or the .T view of a [D, F] tensor: read in place; ``layout="df"`` for a
    [D, F] tensor passed as it is), b_dec [D] or None -> recon [..., D] in W_dec's dtype
    (fp32 accumulation). fp32 and bf16. Differentiable in vals, W_dec and b_dec; dW_dec comes
    back in W_dec's layout, written once per row through a CSR index by feature (sorted,
    deterministic, no atomics).

    Example::

        vals, idx = topk_encode(x, W_enc, b_enc, k=32)
        recon = sparse_decode(vals, idx, W_dec, b_dec)
        recon = sparse_decode(vals, idx, linear.weight.T)   # nn.Linear(F, D) decoder, no copy
    """
    W = weight_view(W_dec, layout, "sparse_decode")
    F, D = W.shape
    v, i, lead = flat_code("sparse_decode", vals, idx, W)
    check_bias("sparse_decode", b_dec, D, "b_dec", "D")
    bk = _dispatch.choose(W, backend=backend)
    if bk == "reference":
        out = sparse_decode_ref(v, i, W, b_dec)
    else:  # the kernels read W in place, in either layout
        out = _SparseDecodeFn.apply(v.contiguous(), i, W, b_dec, bk)
    return unflatten(out, lead)


# ----------------------------------------------------------------------------- reference
def sparse_decode_ref(vals, idx, W_dec, b_dec=None):
    """recon[b] = sum_j vals[b, j] * W_dec[idx[b, j]] (+ b_dec). [B,k],[B,k],[F,D] -> [B,D]."""
    recon = (vals.unsqueeze(-1) * W_dec[idx]).sum(1)
    return recon if b_dec is None else recon + b_dec
