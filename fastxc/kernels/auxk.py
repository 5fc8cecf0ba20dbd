"""AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", appendix A.2): an
auxiliary loss that gives dead features a gradient by making them model what the main code
missed.

With dead [F] bool (features that have not fired for a while; the caller keeps the counters),
the main path's residual e = x - recon [B, D] and k_aux <- min(k_aux, n_dead):

    pre_d   = x @ W_enc[dead].T + b_enc[dead]            [B, n_dead]: the dead features' columns only
    code    = the k_aux largest entries of pre_d per row, ReLU applied
    e_hat   = sum_j code[b, j] * W_dec[dead_j]            [B, D]; no b_dec (recon already holds it)
    loss    = mean_b ||e_hat_b - e_b||^2 / denom
    denom   = mean_b ||e_b - mean_b' e_b'||^2             default: this batch's residual variance,
                                                          so the loss's scale does not follow how well
                                                          the main path fits (data parallel passes the
                                                          global batch's)

Gradients reach W_enc and b_enc (dead rows), W_dec (dead rows) and x (when it requires grad);
the residual e is a target and gets none. No dead feature (or k_aux = 0): loss 0.

Fast path: ``topk_encode`` over the gathered dead rows (the fused GEMM + selection, no [B, F]
pre-activation) and ``sparse_decode`` of that code; the reference (``auxk_loss_ref``, and
``auxk_loss_from_pre`` for a caller that already holds the dense pre-activation) masks the
dense [B, F] pre-activation instead.
"""
from __future__ import annotations

import torch

from . import _dispatch
from .decode import sparse_decode
from .encode import check_encode, encode_pre_ref, topk_encode


def _check(x, W_enc, b_enc, W_dec, dead, residual):
    """ValueError unless x [B, D], W_enc / W_dec [F, D], b_enc [F], dead [F] bool, residual [B, D]."""
    check_encode(x, W_enc, b_enc)
    if W_dec.shape != W_enc.shape:
        raise ValueError(f"W_dec must be [F, D]={tuple(W_enc.shape)} like W_enc, got {tuple(W_dec.shape)}")
    if dead.shape != (W_enc.shape[0],) or dead.dtype != torch.bool:
        raise ValueError(f"dead must be a bool mask [F]={W_enc.shape[0]}, got {dead.dtype} {tuple(dead.shape)}")
    if residual.shape != x.shape:
        raise ValueError(f"residual must be [B, D]={tuple(x.shape)} like x, got {tuple(residual.shape)}")


def _exact(t: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16 / fp16 tensors (the loss sums in fp32); float32 / float64 unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def auxk_residual_loss(e_hat, residual, denom=None):
    """mean_b ||e_hat_b - residual_b||^2 / denom: the AuxK loss of a reconstruction of the residual.

    e_hat [B, D] (differentiable), residual [B, D] = x - recon (a target: detached here),
    denom: a scalar, or None for this batch's residual variance mean_b ||e_b - mean e||^2.
    -> scalar, float32 (float64 for float64 inputs).
    """
    e_hat, target = _exact(e_hat), _exact(residual.detach())
    if denom is None:
        denom = (target - target.mean(dim=0)).pow(2).sum(dim=1).mean().clamp_min(1e-12)
    return (e_hat - target).pow(2).sum(dim=1).mean() / denom


def auxk_loss(x, W_enc, b_enc, W_dec, dead, k_aux: int, residual, denom=None, *,
              backend: str | None = None):
    """The AuxK loss (see module docstring) on the sparse path.

    x [B, D], W_enc [F, D], b_enc [F], W_dec [F, D] (feature-major; a ``.T`` view of a [D, F]
    tensor works), dead [F] bool, k_aux >= 0, residual [B, D] = x - recon (no gradient),
    denom: None (this batch's residual variance) or a scalar. fp32 or bf16 (loss in fp32).
    -> scalar float32, differentiable into x, W_enc, b_enc and W_dec; 0 when nothing is dead.

    Example::

        vals, idx = topk_encode(x, W_enc, b_enc, k)
        recon = sparse_decode(vals, idx, W_dec, b_dec)
        aux = auxk_loss(x, W_enc, b_enc, W_dec, steps_since_fired > 1000, 256, x - recon)
        loss = mse + aux / 32
    """
    _check(x, W_enc, b_enc, W_dec, dead, residual)
    if k_aux < 0:
        raise ValueError(f"k_aux must be >= 0, got {k_aux}")
    bk = _dispatch.choose(x, backend=backend)
    if bk == "reference":
        return auxk_loss_ref(x, W_enc, b_enc, W_dec, dead, k_aux, residual, denom)
    dead_idx = dead.nonzero().squeeze(1)
    k = min(int(k_aux), dead_idx.numel())
    if k == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    # only the dead rows enter the GEMM ([B, n_dead]); indexing's backward puts their
    # gradients back into the rows of W_enc / b_enc
    vals, j = topk_encode(x, W_enc[dead_idx], b_enc[dead_idx], k, backend=bk)
    e_hat = sparse_decode(vals, dead_idx[j], W_dec, backend=bk)
    return auxk_residual_loss(e_hat, residual, denom)


# ----------------------------------------------------------------------------- reference
def auxk_code_ref(pre, dead, k_aux: int):
    """The dense AuxK code: the k_aux largest entries of pre [B, F] among the dead features
    (dead [F] bool) per row, ReLU applied, zero elsewhere -> [B, F]. k_aux <= n_dead."""
    masked = pre.masked_fill(~dead, float("-inf"))
    vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))


def auxk_loss_from_pre(pre, W_dec, dead, k_aux: int, residual, denom=None):
    """AuxK from a dense pre-activation pre [B, F] already computed (a dense training path):
    the same loss as ``auxk_loss``, gradients into pre and W_dec."""
    k = min(int(k_aux), int(dead.sum()))
    if k == 0:
        return torch.zeros((), dtype=torch.float32 if pre.dtype != torch.float64 else pre.dtype,
                           device=pre.device)
    code = auxk_code_ref(pre, dead, k)
    W = W_dec if W_dec.dtype == code.dtype else W_dec.to(code.dtype)
    return auxk_residual_loss(code @ W, residual, denom)


def auxk_loss_ref(x, W_enc, b_enc, W_dec, dead, k_aux: int, residual, denom=None):
    """Plain-torch AuxK over the dense pre-activation (any float dtype; float64 for gradcheck)."""
    return auxk_loss_from_pre(encode_pre_ref(x, W_enc, b_enc), W_dec, dead, k_aux, residual, denom)
