"""JumpReLU with a trainable per-feature threshold (Rajamanoharan et al. 2024, "Jumping Ahead:
Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders").

    pre = x @ W_enc.T + b_enc                        [B, F]
    f   = pre * H(pre - theta)                       theta [F] > 0, H the Heaviside step
    L0  = mean_b sum_f H(pre[b, f] - theta_f)        the sparsity loss the paper trains with

H has no useful derivative in theta, so theta gets the paper's straight-through estimate, a
rectangle kernel K(u) = 1 for -1/2 < u <= 1/2 (else 0) of bandwidth eps:

    d f[b, f] / d theta_f  := -(theta_f / eps) * K((pre[b, f] - theta_f) / eps)
    d L0      / d theta_f  := -(1 / eps) * sum_b K((pre[b, f] - theta_f) / eps) / B

The gradient in pre is the ordinary one: H(pre - theta) for f, none for L0 (the paper's choice:
the sparsity loss reaches the encoder only through theta). theta is passed as given, so a model
that learns log theta (positive by construction) passes ``log_threshold.exp()``.

Sparse form. ``jumprelu_encode`` returns (vals, idx, pre) [B, m]: every entry with
pre > theta - eps/2, i.e. the active entries *and* the band (theta - eps/2, theta] just below the
threshold. Band entries have vals 0 (they add nothing to a reconstruction and receive no
gradient in pre), but the decoder's backward still gives them dL/dvals, which is the g of their
theta gradient. ``pre`` (float32, no grad, -inf at padding) is what the theta gradients and
``jumprelu_l0`` need; ``(vals, idx)`` go to ``sparse_decode`` / ``crosscoder_loss`` as any code.
Entries outside the band have K = 0, so the sparse code loses nothing the gradient needs.

Backward of the encode: x, W_enc and b_enc as ``relu_encode`` (``encode.run_encode``: the
entries with vals != 0); theta: a scatter-add over the band entries (a [B, m] pass, no kernel).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import _dispatch
from .encode import (
    check_encode,
    encode_pre,
    encode_pre_ref,
    pack_active,
    pack_mask,
    run_encode,
)

# rows of x per encoder GEMM of the selection: the live float32 pre-activation block is at
# most [_CHUNK_ROWS, F] (as relu_encode's CPU path)
_CHUNK_ROWS = 1024


class JumpReLUCode(NamedTuple):
    """Output of ``jumprelu_encode``: a sparse code plus the pre-activation of its entries.

    vals [B, m]  x's dtype: pre where pre > theta, 0 in the band and at padding
    idx  [B, m]  int64 feature ids (padding: 0)
    pre  [B, m]  float32, no grad: pre-activation of each entry, -inf at padding
    """

    vals: torch.Tensor
    idx: torch.Tensor
    pre: torch.Tensor


def _check_threshold(threshold, F: int, bandwidth: float):
    if not isinstance(threshold, torch.Tensor) or threshold.shape != (F,):
        shape = tuple(threshold.shape) if isinstance(threshold, torch.Tensor) else type(threshold).__name__
        raise ValueError(f"threshold must be a [F]={F} tensor, got {shape}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")


def _band(pre, theta, eps: float):
    """K((pre - theta) / eps) as a bool mask: -eps/2 < pre - theta <= eps/2."""
    d = pre - theta
    return (d > -eps / 2) & (d <= eps / 2)


def _theta_grad(g, pre, idx, theta, eps: float, F: int):
    """dtheta [F] float32 = sum over band entries of g * (-(1/eps)) (callers scale by theta
    for f's estimate); g, pre, idx [B, m]."""
    th = theta.float()[idx.clamp_min(0)]  # padding has pre = -inf: never in the band
    band = _band(pre, th, eps)
    out = torch.zeros(F, dtype=torch.float32, device=pre.device)
    out.index_add_(0, idx[band], g.float()[band] * (-1.0 / eps))
    return out


# ----------------------------------------------------------------------------- selection
def _select_band(x, W, b, backend: str, *, theta, eps: float, out: dict):
    """-> (vals [B, m] float32, idx [B, m] int64, None): the entries with pre > theta - eps/2,
    vals 0 in the band; out["pre"] receives their pre-activations [B, m] (-inf at padding)."""
    lo = theta - eps / 2
    parts = []
    for s in range(0, max(1, x.shape[0]), _CHUNK_ROWS):
        pre = encode_pre(x[s:s + _CHUNK_ROWS], W, b, backend)
        mask = pre > lo
        pv, pi = pack_active(pre, mask)
        valid = torch.arange(pv.shape[1], device=pv.device) < mask.sum(1, keepdim=True)
        parts.append((torch.where(valid & (pv > theta[pi]), pv, 0.0), pi,
                      torch.where(valid, pv, float("-inf"))))
        del pre, mask
    m = max(p[0].shape[1] for p in parts)
    pad = torch.nn.functional.pad
    vals = torch.cat([pad(v, (0, m - v.shape[1])) for v, _, _ in parts])
    idx = torch.cat([pad(i, (0, m - i.shape[1])) for _, i, _ in parts])
    out["pre"] = torch.cat([pad(p, (0, m - p.shape[1]), value=float("-inf")) for _, _, p in parts])
    return vals, idx, None


class _ThresholdSTE(torch.autograd.Function):
    """(vals, threshold) -> vals unchanged; backward adds the straight-through theta gradient
    -(theta/eps) K((pre - theta)/eps) * g of every band entry. idx and pre are constants."""

    @staticmethod
    def forward(ctx, vals, idx, pre, threshold, eps):
        ctx.eps = eps
        ctx.save_for_backward(idx, pre, threshold)
        return vals.clone()  # a new tensor: autograd Functions must not hand back their input

    @staticmethod
    def backward(ctx, g):
        idx, pre, theta = ctx.saved_tensors
        dtheta = None
        if ctx.needs_input_grad[3]:
            dtheta = (_theta_grad(g, pre, idx, theta, ctx.eps, theta.shape[0]) * theta.float()).to(theta.dtype)
        return g, None, None, dtheta, None


def jumprelu_encode(x, W_enc, b_enc, threshold, bandwidth: float, *, backend: str | None = None) -> JumpReLUCode:
    """JumpReLU encode with a trainable threshold (see module docstring), as a sparse code.

    x [B, D], W_enc [F, D], b_enc [F]; fp32 or bf16. threshold [F] (> 0; it receives the
    straight-through gradient), bandwidth eps > 0 (in pre's units).
    -> JumpReLUCode(vals [B, m], idx [B, m] int64, pre [B, m] float32) with
    m = max(1, most entries with pre > theta - eps/2 in a row). Differentiable in x, W_enc,
    b_enc (through vals) and threshold.

    Example::

        theta = log_threshold.exp()
        vals, idx, pre = jumprelu_encode(x, W_enc, b_enc, theta, bandwidth=0.05)
        out = crosscoder_loss(vals, idx, W_dec, b_dec, x, [x.shape[1]])
        loss = out.loss + l0_coef * jumprelu_l0(pre, idx, theta, bandwidth=0.05)
    """
    bk = _dispatch.choose(x, backend=backend)
    check_encode(x, W_enc, b_enc)
    _check_threshold(threshold, W_enc.shape[0], bandwidth)
    if bk == "reference":
        return jumprelu_encode_ref(x, W_enc, b_enc, threshold, bandwidth)
    holder: dict = {}
    theta = threshold.detach().float().contiguous()
    select = functools.partial(_select_band, theta=theta, eps=float(bandwidth), out=holder)
    vals, idx = run_encode(x, W_enc, b_enc, select, bk)
    pre = holder["pre"]
    if threshold.requires_grad and torch.is_grad_enabled():
        vals = _ThresholdSTE.apply(vals, idx, pre, threshold, float(bandwidth))
    return JumpReLUCode(vals, idx, pre)


class _L0Fn(torch.autograd.Function):
    """threshold -> L0 = mean_b sum_j H(pre - theta[idx]); straight-through theta gradient."""

    @staticmethod
    def forward(ctx, pre, idx, threshold, eps):
        th = threshold.detach().float()[idx.clamp_min(0)]
        ctx.eps = eps
        ctx.save_for_backward(pre, idx, threshold)
        return (pre > th).sum(dtype=torch.float32) / max(1, pre.shape[0])

    @staticmethod
    def backward(ctx, g):
        pre, idx, theta = ctx.saved_tensors
        dtheta = _theta_grad(g.float().expand(pre.shape), pre, idx, theta, ctx.eps, theta.shape[0])
        return None, None, (dtheta / max(1, pre.shape[0])).to(theta.dtype), None


def _dense_idx(pre, idx):
    """idx None: the dense layout, entry (b, f) is feature f."""
    if idx is not None:
        return idx
    return torch.arange(pre.shape[1], device=pre.device).expand(pre.shape)


def jumprelu_l0(pre, idx, threshold, bandwidth: float, *, backend: str | None = None):
    """The L0 sparsity loss mean_b sum_j H(pre[b, j] - theta[idx[b, j]]), with the
    straight-through gradient -(1/eps) K((pre - theta)/eps) / B into threshold (none into pre).

    pre [B, m] float, idx [B, m] int (as ``jumprelu_encode`` returns them; -inf pre at padding),
    or a dense pre [B, F] with idx None; threshold [F]; bandwidth eps > 0. -> scalar float32.
    Example: ``loss = mse + l0_coef * jumprelu_l0(code.pre, code.idx, theta, 0.05)``.
    """
    F = threshold.shape[0] if isinstance(threshold, torch.Tensor) and threshold.dim() == 1 else -1
    _check_threshold(threshold, F, bandwidth)
    if idx is not None and (pre.dim() != 2 or idx.shape != pre.shape):
        raise ValueError(f"pre and idx must both be [B, m]; got {tuple(pre.shape)} and {tuple(idx.shape)}")
    if idx is None and (pre.dim() != 2 or pre.shape[1] != F):
        raise ValueError(f"a dense pre must be [B, F={F}], got {tuple(pre.shape)}")
    bk = _dispatch.choose(pre, backend=backend)
    idx = _dense_idx(pre, idx)
    if bk == "reference":
        return jumprelu_l0_ref(pre, idx, threshold, bandwidth)
    return _L0Fn.apply(pre.detach().float(), idx.long(), threshold, float(bandwidth))


# ----------------------------------------------------------------------------- reference
def _ste(theta_d, coef):
    """A zero whose gradient in theta_d is ``coef`` (per element): coef * (theta - theta.detach())."""
    return coef * (theta_d - theta_d.detach())


def jumprelu_ref(pre, threshold, bandwidth: float):
    """Dense JumpReLU f = pre * H(pre - theta) [B, F] with the straight-through theta gradient
    -(theta/eps) K((pre - theta)/eps), in plain torch autograd (pre [B, F], threshold [F])."""
    th = threshold.to(pre.dtype) if pre.dtype == torch.float64 else threshold
    p = pre.detach()
    h = (p > th.detach()).to(pre.dtype)
    k = _band(p, th.detach(), bandwidth).to(th.dtype)
    return pre * h + _ste(th, -(th.detach() / bandwidth) * k)


def jumprelu_encode_ref(x, W_enc, b_enc, threshold, bandwidth: float) -> JumpReLUCode:
    """JumpReLU encode in plain torch: the dense JumpReLU, packed with the band (see
    ``jumprelu_encode``)."""
    pre = encode_pre_ref(x, W_enc, b_enc)
    f = jumprelu_ref(pre, threshold, bandwidth)
    keep = pre.detach() > threshold.detach().to(pre.dtype) - bandwidth / 2
    vals, idx = pack_mask(f, keep)
    pre_code = torch.where(keep, pre.detach(), float("-inf")).gather(1, idx)
    return JumpReLUCode(vals.to(x.dtype), idx, pre_code)


def jumprelu_l0_ref(pre, idx, threshold, bandwidth: float):
    """mean_b sum_j H(pre - theta[idx]) with the straight-through theta gradient, plain torch."""
    idx = _dense_idx(pre, idx)
    th = threshold[idx.clamp_min(0)]
    p = pre.detach()
    h = (p > th.detach()).to(th.dtype)
    k = _band(p, th.detach(), bandwidth).to(th.dtype)
    return (h + _ste(th, -k / bandwidth)).sum() / max(1, pre.shape[0])
