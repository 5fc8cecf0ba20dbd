"""Fused encode + activation: pre = x @ W_enc.T + b_enc, then TopK or ReLU / JumpReLU
(BatchTopK, which needs the whole batch's values, is in ``batchtopk.py`` on the same GEMM).

Forward: one GEMM with the bias (and, for relu/jumprelu, the threshold) in its epilogue, then a
selection that keeps a sparse code (vals, idx) [B, m]; the dense [B, F] pre-activation is freed
before the op returns and is never saved for backward.
Backward (G = dL/dvals masked by the activation, k non-zeros per row; never a dense [B, F]):
    dW_enc = G^T x   scatter by feature (``decode.scatter_rows``: each row written once)
    db_enc = scatter-add of G over idx
    dx     = sum_j G[b, j] * W_enc[idx[b, j]]   (the gather-sum of the decoder's forward)
TopK selection is fused into the GEMM: on the Triton path (``triton_encode.py``, imported on
the first Triton call) each [BLOCK_M, BLOCK_N] output tile keeps only its rows' top-k
candidates (``_encode_topk_kernel``: value and feature id packed in one sortable int64,
``tl.topk`` in the epilogue), so no [B, F] tensor is written; a final ``torch.topk`` over the
[B, F / BLOCK_N * BLOCK_TOPK] candidates picks the k (k > 128: the GEMM alone, then
``torch.topk``). On the CPU the GEMM runs in row chunks and a C++ bounded heap selects from
each chunk while it is in cache. ReLU keeps a mask over the [B, F] thresholded pre-activation.

Casting rule of the GEMM, every backend: the products are those of the operands in fp32 (bf16 x
bf16 / fp16 x fp16 on tensor cores as they are; any other pair, e.g. x fp32 with W bf16, cast to
fp32). fp32 products follow ``torch.get_float32_matmul_precision()`` on the GPU: "highest" is
exact IEEE, "high" / "medium" TF32 (tests/test_encode.py measures what TF32 does to the
selection). The CPU path computes in fp32 with torch's own GEMM.

Inputs: x [..., D] (flattened to [N, D], the code restored to [..., k]); W_enc [F, D] read in
place, row-major or the .T view of a row-major [D, F] tensor (``layout="df"`` for a [D, F]
tensor passed as it is: SAELens' W_enc); dW_enc comes back in W_enc's layout; b_enc [F] or
None (no encoder bias).
"""
from __future__ import annotations

import functools

import torch

from . import _cext, _dispatch, _pool
from .decode import check_bias, csr_by_feature, gather_sum, scatter_rows, unflatten, weight_view

# CPU: the encoder GEMM runs over row chunks of at most this many rows, so the live fp32
# pre-activation block is at most [1024, F] (one [B, F] buffer at the benchmark shape) for any
# batch size. Measured at D=1024, F=16384 (CPU time): 1 x 1024 rows 435 ms, 2 x 512 511 ms,
# 4 x 256 587 ms: smaller chunks cost GEMM efficiency.
_CPU_CHUNK_ROWS = 1024


def _triton():
    """The Triton kernels (``triton_encode.py``), imported on the first Triton call."""
    from . import triton_encode

    return triton_encode


# ----------------------------------------------------------------------------- CPU and selection
def _bias(b, W):
    """b, or zeros [F] in W's dtype for an encoder without bias (b None)."""
    return b if b is not None else torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)


def _cpu_pre_chunks(x, W, b):
    """Yield (row start, row end, [rows, F] float32 pre) chunks; MKL GEMM with the bias fused
    (addmm). W [F, D] in either layout (the GEMM reads W.T as it is)."""
    # the casting rule (triton_encode.py): products of the fp32 operands
    x, W, b = (t if t.dtype == torch.float32 else t.float() for t in (x, W, _bias(b, W)))
    Wt = W.t()
    B = x.shape[0]
    for s in range(0, B, _CPU_CHUNK_ROWS):
        e = min(B, s + _CPU_CHUNK_ROWS)
        yield s, e, torch.addmm(b, x[s:e], Wt)


def encode_pre(x, W, b, backend: str) -> torch.Tensor:
    """The whole [B, F] float32 pre-activation x @ W.T + b (for selections over the batch);
    b None: no bias."""
    if backend == "triton":
        return _triton().pre(x, W, _bias(b, W))
    return torch.cat([p for _, _, p in _cpu_pre_chunks(x, W, b)])


def pack_active(pre: torch.Tensor, mask: torch.Tensor):
    """Pack pre[mask] row by row into padded (vals [B, m], idx [B, m]), m = max(1, most active
    in a row); padding vals 0, idx 0."""
    B = pre.shape[0]
    counts = mask.sum(1)
    m = max(1, int(counts.max())) if B else 1
    nz = mask.nonzero()
    rows, cols = nz[:, 0], nz[:, 1]
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=pre.device) - start[rows]
    vals = torch.zeros(B, m, dtype=pre.dtype, device=pre.device)
    idx = torch.zeros(B, m, dtype=torch.int64, device=pre.device)
    vals[rows, pos] = pre[rows, cols]
    idx[rows, pos] = cols
    return vals, idx


def _select_topk(x, W, b, backend: str, *, k: int):
    """-> (relu'd vals [B, k] float32, idx [B, k] int64, None)."""
    b = _bias(b, W)
    if backend == "triton":
        v, i = _triton().topk(x, W, b, k)
        return torch.relu_(v), i, None
    B = x.shape[0]
    vals = torch.empty(B, k, dtype=torch.float32, device=x.device)
    idx = torch.empty(B, k, dtype=torch.int64, device=x.device)
    xf, Wf, bf = (t if t.dtype == torch.float32 else t.float() for t in (x, W, b))
    Wt = Wf.t()
    C = _cext.usable(vals, bf)
    # one reused [chunk, F] GEMM output (no fresh pages per chunk); the bias is added by
    # the selection (C++) or in place, never by a broadcast copy before the GEMM
    buf = _pool.empty((min(B, _CPU_CHUNK_ROWS), W.shape[0]), torch.float32)
    for s in range(0, B, _CPU_CHUNK_ROWS):
        e = min(B, s + _CPU_CHUNK_ROWS)
        pre = torch.mm(xf[s:e], Wt, out=buf[:e - s])
        if C is not None:  # bounded-heap selection, 3-4x faster than torch.topk here
            a = _cext.as_numpy
            C.row_topk(a(pre), a(bf), k, a(vals[s:e]), a(idx[s:e]))
        else:
            pre += bf
            torch.topk(pre, k, dim=1, sorted=False, out=(vals[s:e], idx[s:e]))
    del buf
    return torch.relu_(vals), idx, None


def _select_relu(x, W, b, backend: str, *, theta):
    """-> (vals [B, m] float32, idx [B, m] int64, None): the entries with pre > theta."""
    th = _theta_vec(theta, W.shape[0], x.device)
    if backend == "triton":
        act = _triton().pre(x, W, _bias(b, W), th)
        return (*pack_active(act, act != 0), None)
    chunks = []
    for _, _, pre in _cpu_pre_chunks(x, W, b):
        mask = pre > th
        chunks.append(pack_active(pre, mask))
        del pre, mask
    m = max(v.shape[1] for v, _ in chunks) if chunks else 1
    vals = torch.cat([torch.nn.functional.pad(v, (0, m - v.shape[1])) for v, _ in chunks])
    idx = torch.cat([torch.nn.functional.pad(i, (0, m - i.shape[1])) for _, i in chunks])
    return vals, idx, None


def _theta_vec(theta, F: int, device):
    """threshold None / float / [F] tensor -> [F] float32 (no grad)."""
    if theta is None:
        return torch.zeros(F, dtype=torch.float32, device=device)
    if isinstance(theta, torch.Tensor):
        return theta.detach().to(device=device, dtype=torch.float32).expand(F).contiguous()
    return torch.full((F,), float(theta), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------- autograd
class _EncodeFn(torch.autograd.Function):
    """(x, W_enc, b_enc) -> (vals, idx). ``select(x, W, b, backend) -> (vals, idx, kept_min)``
    picks the code (a constant for autograd); kept_min goes to ``stats["kept_min"]``."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, select, backend, stats):
        vals, idx, kept_min = select(x, W_enc, b_enc, backend)
        stats["kept_min"] = kept_min
        ctx.backend = backend
        ctx.save_for_backward(x, W_enc, vals, idx)
        ctx.mark_non_differentiable(idx)
        return vals.to(x.dtype), idx

    @staticmethod
    def backward(ctx, gvals, _gidx):
        x, W, vals, idx = ctx.saved_tensors
        bk = ctx.backend
        # active entries only (relu' = 0 at the padding and where the kept value is 0)
        g = torch.where(vals != 0, gvals.float(), 0.0)
        dx = dW = db = None
        if ctx.needs_input_grad[0]:
            dx = gather_sum(idx, g, W, None, bk, out_dtype=x.dtype)
        if ctx.needs_input_grad[1]:
            crow, order = csr_by_feature(idx, W.shape[0])
            dW = scatter_rows(idx, crow, order, g, x, W.shape[0], bk, W.dtype, like=W)
        if ctx.needs_input_grad[2]:
            db = torch.zeros(W.shape[0], dtype=torch.float32, device=W.device)
            db.index_add_(0, idx.reshape(-1), g.reshape(-1))
            db = db.to(W.dtype)
        return dx, dW, db, None, None, None


def check_encode(x, W_enc, b_enc, op: str = "encode"):
    """ValueError unless x is [..., D], W_enc [F, D] (2-D, any layout) and b_enc [F] or None."""
    if not isinstance(W_enc, torch.Tensor) or W_enc.dim() != 2:
        shape = tuple(W_enc.shape) if isinstance(W_enc, torch.Tensor) else type(W_enc).__name__
        raise ValueError(f"{op}: W_enc must be [F, D] (or [D, F] with layout='df'), got {shape}")
    F, D = W_enc.shape
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != D:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        hint = ("; W_enc looks like [D, F]: pass W_enc.T or layout='df'"
                if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == F else "")
        raise ValueError(f"{op}: x must be [..., D] and W_enc [F, D]; got x {shape} and W_enc "
                         f"{tuple(W_enc.shape)}{hint}")
    check_bias(op, b_enc, F, "b_enc", "F")


def run_encode(x, W_enc, b_enc, select, backend: str, stats: dict | None = None):
    """The encode ops' fast path: ``_EncodeFn`` with the selection ``select`` -> (vals, idx).

    x [..., D] (``select`` sees it flattened to [N, D]; the code comes back [..., m]);
    W_enc [F, D] in either layout (read in place); b_enc [F] or None (``select`` gets None).
    """
    W = weight_view(W_enc, "fd", "encode", "W_enc")
    lead, D = x.shape[:-1], x.shape[-1]
    vals, idx = _EncodeFn.apply(x.reshape(-1, D).contiguous(), W, b_enc, select, backend,
                                {} if stats is None else stats)
    return unflatten(vals, lead), unflatten(idx, lead)


def _flat(x):
    """x [..., D] -> ([N, D], restore): restore(t [N, m]) -> [..., m]."""
    lead = x.shape[:-1]
    return x.reshape(-1, x.shape[-1]), lambda t: unflatten(t, lead)


def topk_encode(x, W_enc, b_enc, k: int, *, layout: str = "fd", backend: str | None = None):
    """TopK encode: the k largest entries of pre = x @ W_enc.T + b_enc per row, ReLU applied.

    x [..., D], W_enc [F, D] (like nn.Linear.weight; or the .T view of a [D, F] tensor, read in
    place; ``layout="df"`` for a [D, F] tensor passed as it is), b_enc [F] or None; fp32 or
    bf16. -> vals [..., k] (x's dtype; entries whose pre <= 0 are 0), idx [..., k] int64 (order
    within a row unspecified). Differentiable in x, W_enc and b_enc; backward never builds a
    [B, F] tensor (dW_enc is a scatter by feature, written once per row, in W_enc's layout).

    Example::

        vals, idx = topk_encode(x, W_enc, b_enc, k=32)
        recon = sparse_decode(vals, idx, W_dec, b_dec)
    """
    W = weight_view(W_enc, layout, "topk_encode", "W_enc")
    bk = _dispatch.choose(x, backend=backend)
    check_encode(x, W, b_enc, "topk_encode")
    if not 1 <= k <= W.shape[0]:
        raise ValueError(f"topk_encode: k must be in [1, F={W.shape[0]}], got {k}")
    if bk == "reference":
        x2, restore = _flat(x)
        return tuple(restore(t) for t in topk_encode_ref(x2, W, b_enc, k))
    return run_encode(x, W, b_enc, functools.partial(_select_topk, k=k), bk)


def relu_encode(x, W_enc, b_enc, threshold=None, *, layout: str = "fd", backend: str | None = None):
    """ReLU (threshold None) or JumpReLU (f = pre * (pre > theta)) encode, as a sparse code.

    x [..., D], W_enc [F, D] (either layout, as ``topk_encode``), b_enc [F] or None; threshold
    None, a float or a [F] tensor (it receives no gradient; learn it with your own
    straight-through estimator).
    -> (vals [..., m], idx [..., m] int64) with m = max(1, most active features in a row);
    padding entries have vals 0. Feed them to ``sparse_decode`` / ``crosscoder_loss``.

    Example::

        vals, idx = relu_encode(x, W_enc, b_enc)            # relu
        vals, idx = relu_encode(x, W_enc, b_enc, theta)     # jumprelu, theta [F]
    """
    W = weight_view(W_enc, layout, "relu_encode", "W_enc")
    bk = _dispatch.choose(x, backend=backend)
    check_encode(x, W, b_enc, "relu_encode")
    if bk == "reference":
        x2, restore = _flat(x)
        return tuple(restore(t) for t in relu_encode_ref(x2, W, b_enc, threshold))
    return run_encode(x, W, b_enc, functools.partial(_select_relu, theta=threshold), bk)


# ----------------------------------------------------------------------------- reference
def encode_pre_ref(x, W_enc, b_enc):
    """pre = x @ W_enc.T + b_enc  ([B, D] x [F, D] -> [B, F]; b_enc None: no bias); x and
    W_enc of different dtypes are both cast to their promoted dtype (x fp32 with W bf16: fp32)."""
    if x.dtype != W_enc.dtype:
        dt = torch.promote_types(x.dtype, W_enc.dtype)
        x, W_enc = x.to(dt), W_enc.to(dt)
    pre = x @ W_enc.t()
    return pre if b_enc is None else pre + b_enc


def pack_mask(pre: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress the entries of ``pre`` [B, F] where ``mask`` is true into padded (vals, idx).

    m = max(1, max active per row); padding has vals 0. Differentiable w.r.t. ``pre``.
    """
    m = max(1, int(mask.sum(1).max())) if pre.shape[0] else 1
    m = min(m, pre.shape[1])
    # a stable sort of the mask puts the active columns first, in column order
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :m]
    vals = torch.where(mask, pre, torch.zeros_like(pre)).gather(1, order)
    return vals, order


def topk_encode_ref(x, W_enc, b_enc, k: int):
    """TopK encode: the k largest of pre per row, ReLU applied to them. -> (vals, idx) [B, k]."""
    vals, idx = encode_pre_ref(x, W_enc, b_enc).topk(k, dim=-1)
    return torch.relu(vals), idx


def relu_encode_ref(x, W_enc, b_enc, threshold=None):
    """ReLU (threshold None) or JumpReLU encode: f = pre * (pre > theta), packed sparse.

    threshold: None, a float or a [F] tensor (per-feature theta); it receives no gradient.
    """
    pre = encode_pre_ref(x, W_enc, b_enc)
    theta = 0.0 if threshold is None else threshold
    return pack_mask(pre, pre > theta)
