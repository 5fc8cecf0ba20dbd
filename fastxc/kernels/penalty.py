"""The decoder-norm-weighted sparsity penalty of a crosscoder (Anthropic's L1 of the code
weighted by each feature's decoder norms), for a sparse or a dense code.

    n_f     = sum_i ||W_dec[f, src_i]||_2                    (sum over the sources' slices)
    penalty = sum_b sum_j vals[b,j] * n_{idx[b,j]}           sparse code (vals, idx) [B, k]
            = sum_b sum_f code[b,f] * n_f                    dense code [B, F]
Backward, with c_f = sum of the code values of feature f:
    dvals[b,j] = n_{idx[b,j]}
    dW_dec[f, d] = c_f * W_dec[f, d] / ||W_dec[f, src(d)]||  (0 for a zero slice, not NaN)
No Triton kernel of its own: the Triton path writes dW_dec with ``decode.scatter_rows``'s
penalty epilogue over an empty code (the fused loss adds the same term to its scatter).

Shapes: vals, idx [..., k] (idx -1: padding), a dense code [..., F]; W_dec [F, D] is read in
place, row-major or the .T view of a [D, F] tensor (``layout="df"`` for a [D, F] tensor
passed as it is), and dW_dec comes back in its layout.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _dispatch
from ._sources import check_decoder_widths, col_src, offsets_of
from .decode import empty_table, flat_code, scatter_rows, weight_view


def decoder_norms(W_dec, widths, *, layout: str = "fd") -> torch.Tensor:
    """[F, n_sources] float32 L2 norm of each source's slice of each decoder row (no grad).

    W_dec [F, D] (row-major or the .T view of a [D, F] tensor; ``layout="df"``: [D, F])."""
    W_dec = weight_view(W_dec, layout, "decoder_norms")
    widths = check_decoder_widths("decoder_norms", widths, W_dec)
    o = offsets_of(widths)
    Wf = W_dec.detach()
    return torch.stack([torch.linalg.vector_norm(Wf[:, o[i]:o[i + 1]], dim=1, dtype=torch.float32)
                        for i in range(len(widths))], 1)


def inverse_norms(norms: torch.Tensor) -> torch.Tensor:
    """1 / norms, 0 where a norm is 0 (a zero slice has no direction, so no gradient)."""
    return torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))


def feature_sums(vals, idx, n_features: int) -> torch.Tensor:
    """c [F] float32: c_f = sum of the code values of feature f. [B, k], [B, k] -> [F]."""
    c = torch.zeros(n_features, dtype=torch.float32, device=vals.device)
    c.index_add_(0, idx.reshape(-1), vals.reshape(-1).float())
    return c


def _penalty_grad_W(c, W_dec, norms, widths, backend):
    """dW[f, d] = c[f] * W_dec[f, d] / ||W_dec[f, src(d)]|| -> [F, D] in W_dec's dtype."""
    colsrc = col_src(widths, W_dec.device)
    if backend == "triton":
        F, D = W_dec.shape
        crow = torch.zeros(F + 1, dtype=torch.int64, device=W_dec.device)
        empty = torch.zeros(0, dtype=torch.int64, device=W_dec.device)
        no_rows = torch.zeros(0, D, dtype=W_dec.dtype, device=W_dec.device)  # an empty code's x
        return scatter_rows(empty.view(0, 1), crow, empty, torch.zeros(0, device=W_dec.device),
                            no_rows, F, backend, W_dec.dtype,
                            pen=(c, W_dec, inverse_norms(norms), colsrc), like=W_dec)
    scale = (c[:, None] * inverse_norms(norms))[:, colsrc.long()]
    # written into W_dec's layout (autograd then stores it in the parameter without a copy)
    out = empty_table(W_dec, W_dec.shape[0], W_dec.shape[1], W_dec.dtype, W_dec.device)
    return out.copy_(W_dec.float() * scale)


class _PenaltyFn(torch.autograd.Function):
    """Sparse (vals, idx) or dense (code, idx None) decoder-norm penalty -> scalar float32."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec, widths, backend):
        norms = decoder_norms(W_dec, widths)
        ns = norms.sum(1)
        if idx is None:  # dense code [B, F]
            c = vals.float().sum(0)
            pen = (c * ns).sum()
        else:
            c = feature_sums(vals, idx, W_dec.shape[0])
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


def decoder_norm_penalty(vals, idx, W_dec, widths: Sequence[int], *, layout: str = "fd",
                         backend: str | None = None):
    """sum_b sum_j vals[b,j] * sum_i ||W_dec[idx[b,j], src_i]||_2 (scalar float32).

    vals [..., k], idx [..., k] int (-1: padding), W_dec [F, D] (row-major or the .T view of a
    [D, F] tensor; ``layout="df"``: [D, F]), widths sum to D. Gradients into vals and W_dec.
    Example: ``pen = decoder_norm_penalty(vals, idx, W_dec, [512, 512])``.
    """
    op = "decoder_norm_penalty"
    W = weight_view(W_dec, layout, op)
    widths = check_decoder_widths(op, widths, W)
    v, i, _ = flat_code(op, vals, idx, W)
    bk = _dispatch.choose(W, backend=backend)
    if bk == "reference":
        return decoder_norm_penalty_ref(v, i, W, widths)
    return _PenaltyFn.apply(v.contiguous(), i, W, widths, bk)


def dense_decoder_norm_penalty(code, W_dec, widths: Sequence[int], *, layout: str = "fd",
                               backend: str | None = None):
    """The same penalty for a dense code [..., F]: sum over rows and f of
    code[.., f] * sum_i ||W_dec[f, src_i]||; W_dec as in ``decoder_norm_penalty``.

    Example: ``pen = dense_decoder_norm_penalty(torch.relu(pre), W_dec, [512, 512])``.
    """
    op = "dense_decoder_norm_penalty"
    W = weight_view(W_dec, layout, op)
    if not isinstance(code, torch.Tensor) or code.dim() < 1 or code.shape[-1] != W.shape[0]:
        shape = tuple(code.shape) if isinstance(code, torch.Tensor) else type(code).__name__
        raise ValueError(f"{op}: code must be [..., F={W.shape[0]}] (W_dec [F, D] = "
                         f"{list(W.shape)}), got {shape}")
    widths = check_decoder_widths(op, widths, W)
    code = code.reshape(-1, W.shape[0])
    bk = _dispatch.choose(W, backend=backend)
    if bk == "reference":
        return dense_decoder_norm_penalty_ref(code, W, widths)
    return _PenaltyFn.apply(code, None, W, widths, bk)


# ----------------------------------------------------------------------------- reference
def decoder_norms_ref(W_dec, widths):
    """[F, n_sources] L2 norm of each source's slice of each decoder row."""
    o = offsets_of(widths)
    return torch.stack([W_dec[:, o[i]:o[i + 1]].norm(dim=1) for i in range(len(widths))], 1)


def decoder_norm_penalty_ref(vals, idx, W_dec, widths):
    """sum_b sum_j vals[b,j] * sum_i ||W_dec[idx[b,j], src_i]||_2 (scalar)."""
    return (vals * decoder_norms_ref(W_dec, widths).sum(1)[idx]).sum()


def dense_decoder_norm_penalty_ref(code, W_dec, widths):
    """sum_b sum_f code[b,f] * sum_i ||W_dec[f, src_i]||_2 for a dense code [B, F]."""
    return (code * decoder_norms_ref(W_dec, widths).sum(1)).sum()
