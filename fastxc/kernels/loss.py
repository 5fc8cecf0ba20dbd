"""Fused crosscoder loss: sparse decode + per-source squared error (FVU as a by-product) +
the decoder-norm-weighted sparsity penalty, with every gradient written once.

    recon   = sum_j vals[b,j] W_dec[idx[b,j]] + b_dec                 (sparse decode)
    mse_i   = mean_b ||recon_i - x_i||^2        fvu_i = sum_b ||recon_i - x_i||^2 / sum_b ||x_i - mean x_i||^2
    penalty = sum_b sum_j vals[b,j] * sum_i ||W_dec[idx[b,j], src_i]||_2
    loss    = sum_i mse_i + penalty_coef * penalty / B

Sources are column ranges of widths d_i (unequal widths allowed); x is the target (no grad).
Backward: with G = dL/drecon (the residual times a per-source factor),
    dvals[b,j] = <G[b], W_dec[idx[b,j]]> + g_pen * sum_i ||W_dec[idx[b,j], src_i]||
    dW_dec[f]  = sum_{idx[b,j]=f} vals[b,j] G[b] + g_pen c_f W_dec[f, src_i] / ||W_dec[f, src_i]||
                 (c_f = sum of the vals of feature f): one CSR-by-feature pass writes it once.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _cext, _dispatch
from .reference import (LossOutput, crosscoder_loss_ref, decoder_norm_penalty_ref,
                        dense_decoder_norm_penalty_ref, offsets_of, source_mse_ref)
from .sparse_decode import (BLOCK_D, check_code, csr_by_feature, gather_dot, gather_sum,
                            scatter_rows)

BLOCK_ROWS = 32  # rows per step of the column-statistics loop


@triton.jit
def _col_stats_kernel(
    r_ptr,  # [B, D] reconstruction
    x_ptr,  # [B, D] target
    out_ptr,  # [3, D] float32: sum_b (r-x)^2, sum_b x, sum_b x^2
    B, D,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_d = tl.program_id(0)
    offs_d = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask_d = offs_d < D
    se = tl.zeros([BLOCK], dtype=tl.float32)
    sx = tl.zeros([BLOCK], dtype=tl.float32)
    sxx = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, B, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        m = (offs_r < B)[:, None] & mask_d[None, :]
        ptrs = offs_r[:, None].to(tl.int64) * D + offs_d[None, :]
        r = tl.load(r_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        se += tl.sum((r - x) * (r - x), axis=0)
        sx += tl.sum(x, axis=0)
        sxx += tl.sum(x * x, axis=0)
    tl.store(out_ptr + offs_d, se, mask=mask_d)
    tl.store(out_ptr + D + offs_d, sx, mask=mask_d)
    tl.store(out_ptr + 2 * D + offs_d, sxx, mask=mask_d)


def _source_stats(recon, x, widths, backend):
    """-> (err [S], var [S]) float32: per-source squared error sum and total variance sum."""
    o = offsets_of(widths)
    B, D = x.shape
    if backend == "triton":
        st = torch.empty(3, D, dtype=torch.float32, device=x.device)
        _col_stats_kernel[(triton.cdiv(D, BLOCK_D),)](recon.contiguous(), x.contiguous(), st, B, D,
                                                       BLOCK_R=BLOCK_ROWS, BLOCK=BLOCK_D)
        seg = torch.stack([st[:, o[i]:o[i + 1]].sum(1) for i in range(len(widths))])  # [S, 3]
        err = seg[:, 0]
        var = seg[:, 2] - torch.stack([(st[1, o[i]:o[i + 1]] ** 2).sum()
                                       for i in range(len(widths))]) / max(B, 1)
        return err, var
    xf = x.float()
    resid = recon.float() - xf
    colsq = resid.pow(2).sum(0)
    xc = xf - xf.mean(0)
    colvar = xc.pow(2).sum(0)
    err = torch.stack([colsq[o[i]:o[i + 1]].sum() for i in range(len(widths))])
    var = torch.stack([colvar[o[i]:o[i + 1]].sum() for i in range(len(widths))])
    return err, var


def _fused_decode_loss(vals, idx, W_dec, b_dec, x, widths, backend):
    """CPU + C++: decode, residual and per-source sums in one pass.

    -> (recon, resid [B, D] fp32, err [S], var [S]) or None when the C++ kernel does not apply.
    """
    if backend != "cpu" or idx.dtype != torch.int64:
        return None
    C = _cext.usable(vals, W_dec, x, *((b_dec,) if b_dec is not None else ()))
    if C is None:
        return None
    B, D = x.shape
    S = len(widths)
    recon = torch.empty(B, D)
    resid = torch.empty(B, D)
    stats = torch.empty(S, dtype=torch.float64)
    colsum = torch.empty(2, D, dtype=torch.float64)
    e0 = torch.empty(0)
    C.decode_loss_fwd(_cext.np(idx), _cext.np(vals), _cext.np(W_dec),
                      _cext.np(b_dec if b_dec is not None else e0), _cext.np(x),
                      _cext.np(_col_src(widths, x.device)), _cext.np(recon), _cext.np(resid),
                      _cext.np(stats), _cext.np(colsum))
    o = offsets_of(widths)
    colvar = (colsum[1] - colsum[0].pow(2) / max(B, 1)).clamp_min_(0)
    var = torch.stack([colvar[o[i]:o[i + 1]].sum() for i in range(S)])
    return recon, resid, stats.float(), var.float()


@functools.lru_cache(maxsize=64)
def _col_src(widths, device):
    """[D] int32 source of each column (cached: shared, never written)."""
    return torch.repeat_interleave(torch.arange(len(widths), dtype=torch.int32, device=device),
                                   torch.tensor(list(widths), device=device))


@functools.lru_cache(maxsize=64)
def _col_src_long(widths, device):
    return _col_src(widths, device).long()


def decoder_norms(W_dec, widths) -> torch.Tensor:
    """[F, n_sources] float32 L2 norm of each source's slice of each decoder row."""
    o = offsets_of(widths)
    Wf = W_dec.detach()
    return torch.stack([torch.linalg.vector_norm(Wf[:, o[i]:o[i + 1]], dim=1, dtype=torch.float32)
                        for i in range(len(widths))], 1)


def _inv(norms):
    return torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))


def _penalty_grad_W(c, W_dec, norms, widths, backend):
    """dW[f, d] = c[f] * W_dec[f, d] / ||W_dec[f, src(d)]|| -> [F, D] in W_dec's dtype."""
    colsrc = _col_src(widths, W_dec.device)
    if backend == "triton":
        F = W_dec.shape[0]
        crow = torch.zeros(F + 1, dtype=torch.int64, device=W_dec.device)
        empty = torch.zeros(0, dtype=torch.int64, device=W_dec.device)
        return scatter_rows(empty.view(0, 1), crow, empty, torch.zeros(0, device=W_dec.device), W_dec, F,
                            backend, W_dec.dtype, pen=(c, W_dec, _inv(norms), colsrc))
    scale = (c[:, None] * _inv(norms))[:, colsrc.long()]
    return (W_dec.float() * scale).to(W_dec.dtype)


def _check_widths(widths, D):
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1 or sum(widths) != D:
        raise ValueError(f"source widths {list(widths)} must be positive and sum to D={D}")
    return widths


# ----------------------------------------------------------------------------- fused loss
class _CrosscoderLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, idx, W_dec, b_dec, x, widths, coef, want_pen, backend):
        B = x.shape[0]
        ctx.set_materialize_grads(False)  # unused outputs (recon, fvu) cost nothing backward
        resid = _fused_decode_loss(vals, idx, W_dec, b_dec, x, widths, backend)
        if resid is not None:
            recon, resid, err, var = resid
        else:
            recon = gather_sum(idx, vals, W_dec, b_dec, backend)
            err, var = _source_stats(recon, x, widths, backend)
            resid = recon.float() - x.float()
        mse = err / B
        fvu = err / var
        norms = None
        if want_pen:
            norms = decoder_norms(W_dec, widths)
            pen = (vals.float() * norms.sum(1)[idx]).sum()
        else:
            pen = torch.zeros((), dtype=torch.float32, device=x.device)
        loss = mse.sum() + coef * pen / B
        ctx.widths, ctx.coef, ctx.backend, ctx.has_bias = widths, coef, backend, b_dec is not None
        ctx.save_for_backward(vals, idx, W_dec, resid, var, norms)
        return loss, recon, mse, fvu, pen

    @staticmethod
    def backward(ctx, gloss, grecon, gmse, gfvu, gpen):
        vals, idx, W, resid, var, norms = ctx.saved_tensors
        bk, widths = ctx.backend, ctx.widths
        B = resid.shape[0]
        dev = resid.device
        S = len(widths)
        zero_s = torch.zeros(S, dtype=torch.float32, device=dev)
        gl = gloss.float() if gloss is not None else torch.zeros((), device=dev)
        gm = gmse.float() if gmse is not None else zero_s
        gf = gfvu.float() if gfvu is not None else zero_s
        # fvu's factor only where it is used (var = 0 for B = 1 would give 0/0)
        fvu_fac = torch.where(gf != 0, gf / var, zero_s)
        fac = 2.0 * ((gl + gm) / B + fvu_fac)  # [S]
        G = resid * fac[_col_src_long(widths, dev)]
        if grecon is not None:
            G += grecon.float()
        gp = None
        if norms is not None:
            gp = gl * ctx.coef / B + (gpen.float() if gpen is not None else 0.0)
        dvals = dW = db = None
        if ctx.needs_input_grad[2]:
            crow, order = csr_by_feature(idx, W.shape[0])
            pen = None
            if gp is not None:
                c = torch.zeros(W.shape[0], dtype=torch.float32, device=dev)
                c.index_add_(0, idx.reshape(-1), vals.reshape(-1).float())
                pen = (c * gp, W, _inv(norms), _col_src(widths, dev))
            dW = scatter_rows(idx, crow, order, vals, G, W.shape[0], bk, W.dtype, pen,
                              dot_table=W if ctx.needs_input_grad[0] else None)
            if ctx.needs_input_grad[0]:
                dW, dvals = dW
        elif ctx.needs_input_grad[0]:
            dvals = gather_dot(idx, G, W, bk)
        if dvals is not None:
            if gp is not None:
                dvals += gp * norms.sum(1)[idx]
            dvals = dvals.to(vals.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = G.sum(0).to(W.dtype)
        return dvals, None, dW, db, None, None, None, None, None


def crosscoder_loss(vals, idx, W_dec, b_dec, x, widths: Sequence[int], penalty_coef: float = 0.0,
                    with_penalty: bool | None = None, *, backend: str | None = None) -> LossOutput:
    """Decode a sparse code and compute the crosscoder loss in one op (see module docstring).

    vals [B, k], idx [B, k] int, W_dec [F, D], b_dec [D] or None, x [B, D] (target, no grad),
    widths: the source widths (sum = D, unequal allowed). fp32 / bf16 (fp32 accumulation).
    penalty_coef: weight of the decoder-norm penalty (the penalty is computed when it is
    non-zero, or when with_penalty=True).
    -> LossOutput(loss, recon [B, D], mse [n], fvu [n], penalty); every output differentiable
    into vals, W_dec and b_dec.

    Example::

        vals, idx = relu_encode(x, W_enc, b_enc)
        out = crosscoder_loss(vals, idx, W_dec, b_dec, x, widths=[512, 512], penalty_coef=2.0)
        out.loss.backward()
    """
    check_code(vals, idx, W_dec)
    widths = _check_widths(widths, W_dec.shape[1])
    if x.shape != (vals.shape[0], W_dec.shape[1]):
        raise ValueError(f"x must be [B, D]=[{vals.shape[0]}, {W_dec.shape[1]}], got {tuple(x.shape)}")
    want_pen = penalty_coef != 0.0 if with_penalty is None else bool(with_penalty)
    bk = _dispatch.choose(W_dec, backend=backend)
    if bk == "reference":
        return crosscoder_loss_ref(vals, idx, W_dec, b_dec, x, widths, penalty_coef, want_pen)
    # contiguous operands: the C++ / Triton kernels index raw row-major buffers
    idx = idx.long().contiguous()
    return LossOutput(*_CrosscoderLossFn.apply(vals.contiguous(), idx, W_dec.contiguous(), b_dec, x.detach().contiguous(), widths,
                                               float(penalty_coef), want_pen, bk))


# ----------------------------------------------------------------------------- pieces
class _SourceMseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, recon, x, widths, backend):
        err, var = _source_stats(recon, x, widths, backend)
        ctx.widths = widths
        ctx.save_for_backward(recon, x, var)
        return err / x.shape[0], err / var

    @staticmethod
    def backward(ctx, gmse, gfvu):
        recon, x, var = ctx.saved_tensors
        B = x.shape[0]
        S = len(ctx.widths)
        zero_s = torch.zeros(S, dtype=torch.float32, device=x.device)
        gm = gmse.float() if gmse is not None else zero_s
        gf = gfvu.float() if gfvu is not None else zero_s
        fac = 2.0 * (gm / B + torch.where(gf != 0, gf / var, zero_s))
        colfac = fac[_col_src_long(ctx.widths, x.device)]
        return ((recon.float() - x.float()) * colfac).to(recon.dtype), None, None, None


def source_mse(recon, x, widths: Sequence[int], *, backend: str | None = None):
    """Per-source reconstruction error: recon, x [B, D]; widths sum to D.

    -> (mse [n] float32 = mean_b ||recon_i - x_i||^2, fvu [n] float32). x gets no gradient.
    Example: ``mse, fvu = source_mse(recon, x, [512, 768])``.
    """
    widths = _check_widths(widths, recon.shape[1])
    if x.shape != recon.shape:
        raise ValueError(f"recon {tuple(recon.shape)} and x {tuple(x.shape)} differ in shape")
    bk = _dispatch.choose(recon, backend=backend)
    if bk == "reference":
        return source_mse_ref(recon, x, widths)
    return _SourceMseFn.apply(recon.contiguous(), x.detach().contiguous(), widths, bk)


class _PenaltyFn(torch.autograd.Function):
    """Sparse (vals, idx) or dense (code) decoder-norm penalty."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec, widths, backend):
        norms = decoder_norms(W_dec, widths)
        ns = norms.sum(1)
        if idx is None:  # dense code [B, F]
            c = vals.float().sum(0)
            pen = (c * ns).sum()
        else:
            c = torch.zeros(W_dec.shape[0], dtype=torch.float32, device=W_dec.device)
            c.index_add_(0, idx.reshape(-1), vals.reshape(-1).float())
            pen = (vals.float() * ns[idx]).sum()
        ctx.widths, ctx.backend, ctx.dense = widths, backend, idx is None
        ctx.vshape, ctx.vdtype = vals.shape, vals.dtype
        ctx.save_for_backward(idx if idx is not None else c, W_dec, norms, c)
        return pen

    @staticmethod
    def backward(ctx, g):
        idx, W, norms, c = ctx.saved_tensors
        g = g.float()
        dvals = dW = None
        if ctx.needs_input_grad[0]:
            ns = norms.sum(1) * g
            dvals = (ns.expand(ctx.vshape) if ctx.dense else ns[idx]).to(ctx.vdtype)
        if ctx.needs_input_grad[2]:
            dW = _penalty_grad_W(c * g, W, norms, ctx.widths, ctx.backend)
        return dvals, None, dW, None, None


def decoder_norm_penalty(vals, idx, W_dec, widths: Sequence[int], *, backend: str | None = None):
    """sum_b sum_j vals[b,j] * sum_i ||W_dec[idx[b,j], src_i]||_2 (scalar float32).

    vals [B, k], idx [B, k] int, W_dec [F, D], widths sum to D. Gradients into vals and W_dec.
    Example: ``pen = decoder_norm_penalty(vals, idx, W_dec, [512, 512])``.
    """
    check_code(vals, idx, W_dec)
    widths = _check_widths(widths, W_dec.shape[1])
    bk = _dispatch.choose(W_dec, backend=backend)
    if bk == "reference":
        return decoder_norm_penalty_ref(vals, idx, W_dec, widths)
    return _PenaltyFn.apply(vals.contiguous(), idx.long().contiguous(), W_dec.contiguous(), widths, bk)


def dense_decoder_norm_penalty(code, W_dec, widths: Sequence[int], *, backend: str | None = None):
    """The same penalty for a dense code [B, F]: sum_b sum_f code[b,f] * sum_i ||W_dec[f, src_i]||.

    Example: ``pen = dense_decoder_norm_penalty(torch.relu(pre), W_dec, [512, 512])``.
    """
    if code.dim() != 2 or code.shape[1] != W_dec.shape[0]:
        raise ValueError(f"code must be [B, F={W_dec.shape[0]}], got {tuple(code.shape)}")
    widths = _check_widths(widths, W_dec.shape[1])
    bk = _dispatch.choose(W_dec, backend=backend)
    if bk == "reference":
        return dense_decoder_norm_penalty_ref(code, W_dec, widths)
    return _PenaltyFn.apply(code, None, W_dec, widths, bk)
