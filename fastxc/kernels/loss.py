"""Fused crosscoder loss: sparse decode + per-source squared error (FVU as a by-product) +
the decoder-norm-weighted sparsity penalty, with every gradient written once.

    recon   = sum_j vals[b,j] W_dec[idx[b,j]] + b_dec                 (sparse decode)
    mse_i   = mean_b ||recon_i - x_i||^2        fvu_i = sum_b ||recon_i - x_i||^2 / sum_b ||x_i - mean x_i||^2
    penalty = sum_b sum_j vals[b,j] * sum_i ||W_dec[idx[b,j], src_i]||_2   (``penalty.py``)
    loss    = sum_i mse_i + penalty_coef * penalty / B

Sources are column ranges of widths d_i (unequal widths allowed); x is the target (no grad).
Backward: with G = dL/drecon (the residual times a per-source factor),
    dvals[b,j] = <G[b], W_dec[idx[b,j]]> + g_pen * sum_i ||W_dec[idx[b,j], src_i]||
    dW_dec[f]  = sum_{idx[b,j]=f} vals[b,j] G[b] + g_pen c_f W_dec[f, src_i] / ||W_dec[f, src_i]||
                 (c_f = sum of the vals of feature f): one CSR-by-feature pass writes it once.
``source_mse`` is the per-source error alone, for a reconstruction made elsewhere.

Shapes: vals, idx [..., k] (idx -1: padding), x [..., D]; the means are over all N leading
positions (B above = N). W_dec [F, D] is read in place, row-major or the .T view of a [D, F]
tensor (``layout="df"`` for a [D, F] tensor passed as it is); dW_dec comes back in its layout.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from . import _cext, _dispatch
from ._sources import check_decoder_widths, check_widths, col_src, col_src_long, offsets_of, source_sums
from .decode import (check_bias, csr_by_feature, flat_code, gather_dot, gather_sum, scatter_rows,
                     sparse_decode_ref, table_buffer, unflatten, weight_view)
from .penalty import decoder_norm_penalty_ref, decoder_norms, feature_sums, inverse_norms

BLOCK_M = 32  # batch rows per step of the column-statistics loop (triton_loss.py)


class LossOutput(NamedTuple):
    """Output of ``crosscoder_loss``.

    loss    scalar: sum_i mse_i + penalty_coef * penalty / B
    recon   [B, D] reconstruction (dtype of W_dec)
    mse     [n_sources] float32: mean over the batch of the per-source squared-error sum
    fvu     [n_sources] float32: fraction of variance unexplained per source
    penalty scalar float32: sum_b sum_j vals[b,j] * sum_i ||W_dec[idx[b,j], src_i]||_2
            (0 when penalty_coef == 0 and it was not asked for)
    """

    loss: torch.Tensor
    recon: torch.Tensor
    mse: torch.Tensor
    fvu: torch.Tensor
    penalty: torch.Tensor


# ----------------------------------------------------------------------------- forward pieces
def _source_stats(recon, x, widths, backend):
    """-> (err [S], var [S]) float32: per-source squared error sum and total variance sum."""
    B, D = x.shape
    if backend == "triton":
        from . import triton_loss  # imported on the first Triton call

        st = triton_loss.col_stats(recon, x)
        seg = source_sums(st, widths)  # [3, S]
        return seg[0], seg[2] - source_sums(st[1] ** 2, widths) / max(B, 1)
    xf = x.float()
    resid = recon.float() - xf
    xc = xf - xf.mean(0)
    return source_sums(resid.pow(2).sum(0), widths), source_sums(xc.pow(2).sum(0), widths)


def _fused_decode_loss(vals, idx, W_dec, b_dec, x, widths, backend):
    """CPU + C++: decode, residual and per-source sums in one pass.

    -> (recon, resid [B, D] fp32, err [S], var [S]) or None when the C++ kernel does not apply.
    """
    if backend != "cpu" or idx.dtype != torch.int64:
        return None
    wbuf, tr = table_buffer(W_dec)
    C = _cext.usable(vals, wbuf, x, *((b_dec,) if b_dec is not None else ()))
    if C is None or any(t.dtype != torch.float32 for t in (vals, wbuf, x)):
        return None
    B, D = x.shape
    recon = torch.empty(B, D)
    resid = torch.empty(B, D)
    stats = torch.empty(len(widths), dtype=torch.float64)
    colsum = torch.empty(2, D, dtype=torch.float64)
    a = _cext.as_numpy
    C.decode_loss_fwd(a(idx), a(vals), a(wbuf), tr, a(b_dec if b_dec is not None else torch.empty(0)),
                      a(x), a(col_src(widths, x.device)), a(recon), a(resid), a(stats), a(colsum))
    colvar = (colsum[1] - colsum[0].pow(2) / max(B, 1)).clamp_min_(0)
    return recon, resid, stats.float(), source_sums(colvar, widths).float()


def _mse_grad_factor(gmse, gfvu, var, B: int) -> torch.Tensor:
    """[S] factor f_i with dL/drecon_i = f_i * (recon_i - x_i), from the upstream gradients of
    mse [S] and fvu [S]. fvu's term only where it is used (var = 0 for B = 1 would give 0/0)."""
    zero_s = torch.zeros_like(var)
    return 2.0 * (gmse / B + torch.where(gfvu != 0, gfvu / var, zero_s))


def _or_zeros(g, like: torch.Tensor) -> torch.Tensor:
    """An upstream gradient as float32, zeros where autograd passed None (unused output)."""
    return g.float() if g is not None else torch.zeros_like(like)


# ----------------------------------------------------------------------------- fused loss
class _CrosscoderLossFn(torch.autograd.Function):
    """(vals, W_dec, b_dec) -> (loss, recon, mse, fvu, penalty); idx and x are constants."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec, b_dec, x, widths, coef, want_pen, backend):
        B = x.shape[0]
        ctx.set_materialize_grads(False)  # unused outputs (recon, fvu) cost nothing backward
        fused = _fused_decode_loss(vals, idx, W_dec, b_dec, x, widths, backend)
        if fused is not None:
            recon, resid, err, var = fused
        else:
            recon = gather_sum(idx, vals, W_dec, b_dec, backend)
            err, var = _source_stats(recon, x, widths, backend)
            resid = recon.float() - x.float()
        norms = None
        if want_pen:
            norms = decoder_norms(W_dec, widths)
            pen = (vals.float() * norms.sum(1)[idx]).sum()
        else:
            pen = torch.zeros((), dtype=torch.float32, device=x.device)
        mse = err / B
        loss = mse.sum() + coef * pen / B
        ctx.widths, ctx.coef, ctx.backend, ctx.has_bias = widths, coef, backend, b_dec is not None
        ctx.save_for_backward(vals, idx, W_dec, resid, var, norms)
        return loss, recon, mse, err / var, pen

    @staticmethod
    def backward(ctx, gloss, grecon, gmse, gfvu, gpen):
        vals, idx, W, resid, var, norms = ctx.saved_tensors
        bk, widths, dev = ctx.backend, ctx.widths, resid.device
        B = resid.shape[0]
        gl = _or_zeros(gloss, torch.zeros((), device=dev))
        fac = _mse_grad_factor(gl + _or_zeros(gmse, var), _or_zeros(gfvu, var), var, B)
        G = resid * fac[col_src_long(widths, dev)]
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
                c = feature_sums(vals, idx, W.shape[0])
                pen = (c * gp, W, inverse_norms(norms), col_src(widths, dev))
            dW = scatter_rows(idx, crow, order, vals, G, W.shape[0], bk, W.dtype, pen,
                              dot_table=W if ctx.needs_input_grad[0] else None, like=W)
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
                    with_penalty: bool | None = None, *, layout: str = "fd",
                    backend: str | None = None) -> LossOutput:
    """Decode a sparse code and compute the crosscoder loss in one op (see module docstring).

    vals [..., k], idx [..., k] int (-1: padding), W_dec [F, D] (row-major or the .T view of a
    [D, F] tensor, read in place; ``layout="df"`` for a [D, F] tensor passed as it is),
    b_dec [D] or None, x [..., D] (target, no grad), widths: the source widths (sum = D,
    unequal allowed). fp32 / bf16 (fp32 accumulation). The means are over all leading
    positions. penalty_coef: weight of the decoder-norm penalty (the penalty is computed when
    it is non-zero, or when with_penalty=True).
    -> LossOutput(loss, recon [..., D], mse [n], fvu [n], penalty); every output
    differentiable into vals, W_dec and b_dec.

    Example::

        vals, idx = relu_encode(x, W_enc, b_enc)
        out = crosscoder_loss(vals, idx, W_dec, b_dec, x, widths=[512, 512], penalty_coef=2.0)
        out.loss.backward()
    """
    op = "crosscoder_loss"
    W = weight_view(W_dec, layout, op)
    widths = check_decoder_widths(op, widths, W)
    F, D = W.shape
    v, i, lead = flat_code(op, vals, idx, W)
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (*lead, D):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be [..., D]={[*lead, D]} (vals' leading shape, W_dec's "
                         f"D), got {shape}")
    check_bias(op, b_dec, D, "b_dec", "D")
    x2 = x.reshape(-1, D)
    want_pen = penalty_coef != 0.0 if with_penalty is None else bool(with_penalty)
    bk = _dispatch.choose(W, backend=backend)
    if bk == "reference":
        out = crosscoder_loss_ref(v, i, W, b_dec, x2, widths, penalty_coef, want_pen)
    else:  # the kernels read W in place, in either layout
        out = LossOutput(*_CrosscoderLossFn.apply(v.contiguous(), i, W, b_dec,
                                                  x2.detach().contiguous(), widths,
                                                  float(penalty_coef), want_pen, bk))
    return out._replace(recon=unflatten(out.recon, lead))


# ----------------------------------------------------------------------------- source_mse
class _SourceMseFn(torch.autograd.Function):
    """recon -> (mse [S], fvu [S]); x is a constant."""

    @staticmethod
    def forward(ctx, recon, x, widths, backend):
        err, var = _source_stats(recon, x, widths, backend)
        ctx.widths = widths
        ctx.save_for_backward(recon, x, var)
        return err / x.shape[0], err / var

    @staticmethod
    def backward(ctx, gmse, gfvu):
        recon, x, var = ctx.saved_tensors
        fac = _mse_grad_factor(_or_zeros(gmse, var), _or_zeros(gfvu, var), var, x.shape[0])
        colfac = fac[col_src_long(ctx.widths, x.device)]
        return ((recon.float() - x.float()) * colfac).to(recon.dtype), None, None, None


def source_mse(recon, x, widths: Sequence[int], *, backend: str | None = None):
    """Per-source reconstruction error: recon, x [..., D] (the mean is over every leading
    position); widths sum to D.

    -> (mse [n] float32 = mean ||recon_i - x_i||^2, fvu [n] float32). x gets no gradient.
    Example: ``mse, fvu = source_mse(recon, x, [512, 768])``.
    """
    if not isinstance(recon, torch.Tensor) or recon.dim() < 1:
        raise ValueError(f"source_mse: recon must be a [..., D] tensor, got {type(recon).__name__}")
    widths = check_widths(widths, recon.shape[-1])
    if x.shape != recon.shape:
        raise ValueError(f"source_mse: recon {tuple(recon.shape)} and x {tuple(x.shape)} differ in shape")
    D = recon.shape[-1]
    r2, x2 = recon.reshape(-1, D), x.reshape(-1, D)
    bk = _dispatch.choose(recon, backend=backend)
    if bk == "reference":
        return source_mse_ref(r2, x2, widths)
    return _SourceMseFn.apply(r2.contiguous(), x2.detach().contiguous(), widths, bk)


# ----------------------------------------------------------------------------- reference
def source_mse_ref(recon, x, widths):
    """Per-source reconstruction error; x is the target (no gradient).

    mse_i = mean_b ||recon_i - x_i||^2 ; fvu_i = sum_b ||recon_i - x_i||^2 / sum_b ||x_i - mean x_i||^2
    -> (mse [n], fvu [n]).
    """
    o = offsets_of(widths)
    x = x.detach()
    mse, fvu = [], []
    for i in range(len(widths)):
        r, t = recon[:, o[i]:o[i + 1]], x[:, o[i]:o[i + 1]]
        err = (r - t).pow(2).sum()
        var = (t - t.mean(0)).pow(2).sum()
        mse.append(err / x.shape[0])
        fvu.append(err / var)
    return torch.stack(mse), torch.stack(fvu)


def crosscoder_loss_ref(vals, idx, W_dec, b_dec, x, widths, penalty_coef: float = 0.0,
                        with_penalty: bool | None = None):
    """Decode + per-source loss + decoder-norm-weighted penalty (see LossOutput)."""
    recon = sparse_decode_ref(vals, idx, W_dec, b_dec)
    mse, fvu = source_mse_ref(recon, x, widths)
    want_pen = penalty_coef != 0.0 if with_penalty is None else with_penalty
    pen = (decoder_norm_penalty_ref(vals, idx, W_dec, widths) if want_pen
           else recon.new_zeros(()))
    loss = mse.sum() + penalty_coef * pen / x.shape[0]
    return LossOutput(loss, recon, mse, fvu, pen)
