"""Fused encode + activation: pre = x @ W_enc.T + b_enc, then TopK / ReLU / JumpReLU / BatchTopK.

Forward: one GEMM with the bias (and, for relu/jumprelu, the threshold) in its epilogue, then a
selection that keeps a sparse code (vals, idx) [B, m]; the dense [B, F] pre-activation is freed
before the op returns and is never saved for backward.
Backward (G = dL/dvals masked by the activation, k non-zeros per row; never a dense [B, F]):
    dW_enc = G^T x   scatter by feature (``sparse_decode.scatter_rows``: each row written once)
    db_enc = scatter-add of G over idx
    dx     = sum_j G[b, j] * W_enc[idx[b, j]]   (the gather-sum of the decoder's forward)
TopK selection is fused into the GEMM: on the Triton path each [BLOCK_M, BLOCK_N] output tile
keeps only its rows' top-k candidates (``_encode_topk_kernel``: value and feature id packed in
one sortable int64, ``tl.topk`` in the epilogue), so no [B, F] tensor is written; a final
``torch.topk`` over the [B, F / BLOCK_N * k'] candidates picks the k. On the CPU the GEMM runs
in row chunks and a C++ bounded heap selects from each chunk while it is in cache.
BatchTopK and ReLU keep ``torch.topk`` / a mask over the [B, F] pre-activation (BatchTopK needs
the whole batch's values).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _cext, _dispatch, _pool
from .reference import relu_encode_ref, topk_encode_ref
from .sparse_decode import csr_by_feature, gather_sum, scatter_rows

# GEMM tiles. On a GPU the autotuned configs below are searched; under the interpreter one
# small config runs (autotune would need a CPU timer and costs minutes there).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
_INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}
# CPU: the encoder GEMM runs over row chunks of at most this many rows, so the live fp32
# pre-activation block is at most [1024, F] (one [B, F] buffer at the benchmark shape) for any
# batch size. Measured at D=1024, F=16384 (CPU time): 1 x 1024 rows 435 ms, 2 x 512 511 ms,
# 4 x 256 587 ms: smaller chunks cost GEMM efficiency.
_CPU_CHUNK_ROWS = 1024


@triton.jit
def _pre_tile(x_ptr, w_ptr, b_ptr, B, F, D,
              UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * D + offs_k[:, None],
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
        if UPCAST:  # the interpreter computes bf16 wrongly: fp32 right after the load
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        # fp32 inputs: exact ieee products, so the selection matches the fp32 reference
        acc += tl.dot(a, w, input_precision="ieee")
    acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc, offs_m, offs_n, mask_m, mask_n


@triton.jit
def _encode_fwd_kernel(
    x_ptr,  # [B, D] input rows
    w_ptr,  # [F, D] encoder, feature-major
    b_ptr,  # [F] bias
    theta_ptr,  # [F] float32 thresholds (ACT == 1 only)
    out_ptr,  # [B, F] float32 pre-activation (ACT 0) or thresholded activation (ACT 1)
    B, F, D,
    ACT: tl.constexpr,  # 0: pre as is; 1: pre * (pre > theta)
    UPCAST: tl.constexpr,  # interpreter: bf16 must become fp32 right after the load
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    acc, offs_m, offs_n, mask_m, mask_n = _pre_tile(x_ptr, w_ptr, b_ptr, B, F, D, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    if ACT == 1:
        theta = tl.load(theta_ptr + offs_n, mask=mask_n, other=0.0)
        acc = tl.where(acc > theta[None, :], acc, 0.0)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * F + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])


_encode_fwd_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["B", "F", "D"])(_encode_fwd_kernel)


@triton.jit
def _encode_topk_kernel(
    x_ptr,  # [B, D] input rows
    w_ptr,  # [F, D] encoder, feature-major
    b_ptr,  # [F] bias
    cand_ptr,  # [B, n_tiles * KP] int64: each tile's top-KP (value, feature) keys per row
    B, F, D, n_cand,
    KP: tl.constexpr,  # candidates per tile and row: next power of two >= k, <= BLOCK_N
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    acc, offs_m, offs_n, mask_m, mask_n = _pre_tile(x_ptr, w_ptr, b_ptr, B, F, D, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    # float -> int32 with the same order (negative floats: flip the magnitude bits), then the
    # feature id in the low 32 bits: one int64 sort key carries value and index together
    bits = acc.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    key = (key << 32) | offs_n.to(tl.int64)[None, :]
    key = tl.where(mask_n[None, :], key, -9223372036854775807 - 1)  # padding columns: never picked
    top = tl.topk(key, KP)  # [BLOCK_M, KP]
    offs_c = tl.program_id(1) * KP + tl.arange(0, KP)
    tl.store(cand_ptr + offs_m[:, None].to(tl.int64) * n_cand + offs_c[None, :], top, mask=mask_m[:, None])


_TOPK_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
_encode_topk_tuned = triton.autotune(configs=_TOPK_GPU_CONFIGS, key=["B", "F", "D", "KP"])(_encode_topk_kernel)


def _unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys of ``_encode_topk_kernel`` -> (float32 values, int64 feature ids)."""
    hi = (keys >> 32).to(torch.int32)
    bits = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def _triton_topk(x, W, b, k: int):
    """Fused GEMM + bias + top-k -> (pre values [B, k] float32, idx [B, k] int64), unsorted."""
    B, D = x.shape
    F = W.shape[0]
    kp = triton.next_power_of_2(k)
    # the candidate buffer holds F / BLOCK_N * kp keys per row: a wide tile keeps it small
    bn = max(64 if _dispatch.interpreting() else 128, kp)  # interpreter: its sort cost grows with the width
    n_tiles = triton.cdiv(F, bn)
    n_cand = n_tiles * kp
    cand = torch.empty(B, n_cand, dtype=torch.int64, device=x.device)
    if B == 0:
        return torch.empty(0, k, dtype=torch.float32, device=x.device), torch.empty(0, k, dtype=torch.int64, device=x.device)
    x, W, b = x.contiguous(), W.contiguous(), b.contiguous()
    if _dispatch.interpreting():
        c = {"BLOCK_M": 16, "BLOCK_K": 32}
        _encode_topk_kernel[(triton.cdiv(B, c["BLOCK_M"]), n_tiles)](
            x, W, b, cand, B, F, D, n_cand, KP=kp, UPCAST=True, BLOCK_N=bn, **c)
    else:
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), n_tiles)  # noqa: E731
        _encode_topk_tuned[grid](x, W, b, cand, B, F, D, n_cand, KP=kp, BLOCK_N=bn,
                                 UPCAST=x.dtype not in (torch.float16, torch.bfloat16, torch.float32))
    keys = cand.topk(k, dim=1, sorted=False).values if n_cand > k else cand[:, :k]
    return _unpack_keys(keys)


def _triton_pre(x, W, b, theta=None):
    """[B, F] float32 pre-activation (thresholded when theta [F] is given)."""
    B, D = x.shape
    F = W.shape[0]
    out = torch.empty(B, F, dtype=torch.float32, device=x.device)
    if B == 0:
        return out
    x, W, b = x.contiguous(), W.contiguous(), b.contiguous()
    th = theta if theta is not None else b
    act = 0 if theta is None else 1
    if _dispatch.interpreting():
        c = _INTERP_CONFIG
        grid = (triton.cdiv(B, c["BLOCK_M"]), triton.cdiv(F, c["BLOCK_N"]))
        _encode_fwd_kernel[grid](x, W, b, th, out, B, F, D, ACT=act, UPCAST=True, **c)
    else:
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), triton.cdiv(F, meta["BLOCK_N"]))  # noqa: E731
        _encode_fwd_tuned[grid](x, W, b, th, out, B, F, D, ACT=act,
                                UPCAST=x.dtype != torch.float16 and x.dtype != torch.bfloat16
                                and x.dtype != torch.float32)
    return out


def _cpu_pre_chunks(x, W, b):
    """Yield (row slice, [rows, F] float32 pre) chunks; MKL GEMM with the bias fused (addmm)."""
    if x.dtype != torch.float32:  # bf16 on CPU: fp32 GEMM, so selection matches fp32 math
        x, W, b = x.float(), W.float(), b.float()
    Wt = W.t()
    B = x.shape[0]
    for s in range(0, B, _CPU_CHUNK_ROWS):
        e = min(B, s + _CPU_CHUNK_ROWS)
        yield s, e, torch.addmm(b, x[s:e], Wt)


def pack_active(pre: torch.Tensor, mask: torch.Tensor, m: int | None = None):
    """Pack pre[mask] row by row into padded (vals [B, m], idx [B, m]); padding vals 0, idx 0."""
    B = pre.shape[0]
    counts = mask.sum(1)
    if m is None:
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


def select(x, W, b, mode: str, k: int, theta, backend: str):
    """Encode and select -> (vals [B, m] float32, idx [B, m] int64, kept-batch min or None)."""
    B = x.shape[0]
    if mode == "topk":
        if backend == "triton":
            v, i = _triton_topk(x, W, b, k)
            return torch.relu_(v), i, None
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
                C.row_topk(_cext.np(pre), _cext.np(bf), k, _cext.np(vals[s:e]),
                           _cext.np(idx[s:e]))
            else:
                pre += bf
                torch.topk(pre, k, dim=1, sorted=False, out=(vals[s:e], idx[s:e]))
        del buf
        return torch.relu_(vals), idx, None
    if mode == "relu":
        th = _theta_vec(theta, W.shape[0], x.device)
        if backend == "triton":
            act = _triton_pre(x, W, b, th)
            return (*pack_active(act, act != 0), None)
        chunks = []
        for s, e, pre in _cpu_pre_chunks(x, W, b):
            mask = pre > th
            chunks.append(pack_active(pre, mask))
            del pre, mask
        m = max(c[0].shape[1] for c in chunks) if chunks else 1
        vals = torch.cat([torch.nn.functional.pad(v, (0, m - v.shape[1])) for v, _ in chunks])
        idx = torch.cat([torch.nn.functional.pad(i, (0, m - i.shape[1])) for _, i in chunks])
        return vals, idx, None
    if mode == "batchtopk":
        pre = (_triton_pre(x, W, b) if backend == "triton"
               else torch.cat([p for _, _, p in _cpu_pre_chunks(x, W, b)]))
        flat = pre.view(-1)
        top_v, top_i = torch.topk(flat, min(k * B, flat.numel()), sorted=False)
        keep = top_v > 0
        top_v, top_i = top_v[keep], top_i[keep]
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[top_i] = True
        kept_min = top_v.min() if top_v.numel() else None
        return (*pack_active(pre, mask.view_as(pre)), kept_min)
    raise ValueError(f"unknown activation {mode!r}")


def _theta_vec(theta, F: int, device):
    if theta is None:
        return torch.zeros(F, dtype=torch.float32, device=device)
    if isinstance(theta, torch.Tensor):
        return theta.detach().to(device=device, dtype=torch.float32).expand(F).contiguous()
    return torch.full((F,), float(theta), dtype=torch.float32, device=device)


class _EncodeFn(torch.autograd.Function):
    """(x, W_enc, b_enc) -> (vals, idx); the selection is given as constants."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, mode, k, theta, backend, extra):
        vals, idx, kept_min = select(x, W_enc, b_enc, mode, k, theta, backend)
        extra["kept_min"] = kept_min
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
            dW = scatter_rows(idx, crow, order, g, x, W.shape[0], bk, W.dtype)
        if ctx.needs_input_grad[2]:
            db = torch.zeros(W.shape[0], dtype=torch.float32, device=W.device)
            db.index_add_(0, idx.reshape(-1), g.reshape(-1))
            db = db.to(W.dtype)
        return dx, dW, db, None, None, None, None, None


def check_encode(x, W_enc, b_enc):
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[1]:
        raise ValueError(f"x must be [B, D] and W_enc [F, D]; got {tuple(x.shape)} and "
                         f"{tuple(W_enc.shape)}")
    if b_enc.shape != (W_enc.shape[0],):
        raise ValueError(f"b_enc must be [F]={W_enc.shape[0]}, got {tuple(b_enc.shape)}")


def encode(x, W_enc, b_enc, mode, k=0, theta=None, backend=None, extra=None):
    """Shared entry of the encode ops (see topk_encode / relu_encode / batchtopk_encode)."""
    check_encode(x, W_enc, b_enc)
    if mode in ("topk", "batchtopk") and not 1 <= k <= W_enc.shape[0]:
        raise ValueError(f"k must be in [1, F={W_enc.shape[0]}], got {k}")
    bk = _dispatch.choose(x, backend=backend)
    return bk, _EncodeFn.apply(x.contiguous(), W_enc.contiguous(), b_enc, mode, k, theta, bk,
                               {} if extra is None else extra)


def topk_encode(x, W_enc, b_enc, k: int, *, backend: str | None = None):
    """TopK encode: the k largest entries of pre = x @ W_enc.T + b_enc per row, ReLU applied.

    x [B, D], W_enc [F, D] (feature-major, like nn.Linear.weight), b_enc [F]; fp32 or bf16.
    -> vals [B, k] (x's dtype; entries whose pre <= 0 are 0), idx [B, k] int64 (order within a
    row unspecified). Differentiable in x, W_enc and b_enc; backward never builds a [B, F]
    tensor (dW_enc is a scatter by feature, written once per row).

    Example::

        vals, idx = topk_encode(x, W_enc, b_enc, k=32)
        recon = sparse_decode(vals, idx, W_dec, b_dec)
    """
    bk, out = None, None
    if _dispatch.choose(x, backend=backend) == "reference":
        check_encode(x, W_enc, b_enc)
        return topk_encode_ref(x, W_enc, b_enc, k)
    bk, out = encode(x, W_enc, b_enc, "topk", k, backend=backend)
    return out


def relu_encode(x, W_enc, b_enc, threshold=None, *, backend: str | None = None):
    """ReLU (threshold None) or JumpReLU (f = pre * (pre > theta)) encode, as a sparse code.

    x [B, D], W_enc [F, D], b_enc [F]; threshold None, a float or a [F] tensor (it receives no
    gradient; learn it with your own straight-through estimator).
    -> (vals [B, m], idx [B, m] int64) with m = max(1, most active features in a row); padding
    entries have vals 0. Feed them to ``sparse_decode`` / ``crosscoder_loss``.

    Example::

        vals, idx = relu_encode(x, W_enc, b_enc)            # relu
        vals, idx = relu_encode(x, W_enc, b_enc, theta)     # jumprelu, theta [F]
    """
    if _dispatch.choose(x, backend=backend) == "reference":
        check_encode(x, W_enc, b_enc)
        return relu_encode_ref(x, W_enc, b_enc, threshold)
    return encode(x, W_enc, b_enc, "relu", theta=threshold, backend=backend)[1]
