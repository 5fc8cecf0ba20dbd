"""BatchTopK encode: keep the k*B largest relu(pre) entries over the whole batch.

    pre  = x @ W_enc.T + b_enc                        [B, F], the GEMM of ``encode.py``
    keep = the k*B largest entries of relu(pre) over all B*F entries (a variable number per row)
The selection needs the whole batch's values, so the [B, F] pre-activation is materialised
(``encode.encode_pre``) and ``torch.topk`` runs over it flat; the backward is the sparse one of
``topk_encode``.

At inference a BatchTopK model is a JumpReLU with one threshold: the running estimate of the
smallest kept value, updated during training by ``update_threshold``
    theta <- theta + momentum * (min(kept values > 0) - theta)
and then used as ``relu_encode(x, W_enc, b_enc, threshold=theta)``.
"""
from __future__ import annotations

import functools

import torch

from . import _dispatch
from .decode import weight_view
from .encode import _flat, check_encode, encode_pre, encode_pre_ref, pack_active, pack_mask, run_encode


@torch.no_grad()
def update_threshold(threshold: torch.Tensor, kept: torch.Tensor | None, momentum: float) -> torch.Tensor:
    """BatchTopK's running threshold, in place: the one implementation (plain torch, shared by
    the fused and the reference paths, the Crosscoder and the distributed trainer).

    threshold: 0-dim; negative means "not yet measured". kept: this batch's kept values (any
    shape; zeros, e.g. padding, are ignored) or None. With b = min(kept > 0): a negative
    threshold becomes b (the first batch initialises it), otherwise
    theta <- theta + momentum * (b - theta). No positive kept value: unchanged.
    """
    if kept is None:
        return threshold
    positive = kept[kept > 0]
    if positive.numel():
        batch_min = positive.min().to(threshold.dtype)
        if threshold.item() < 0:
            threshold.copy_(batch_min)
        else:
            threshold.lerp_(batch_min, momentum)
    return threshold


def _select_batchtopk(x, W, b, backend: str, *, k: int):
    """-> (vals [B, m] float32, idx [B, m] int64, smallest kept value or None if none kept)."""
    pre = encode_pre(x, W, b, backend)
    flat = pre.view(-1)
    top_v, top_i = torch.topk(flat, min(k * x.shape[0], flat.numel()), sorted=False)
    keep = top_v > 0
    top_v, top_i = top_v[keep], top_i[keep]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[top_i] = True
    kept_min = top_v.min() if top_v.numel() else None
    return (*pack_active(pre, mask.view_as(pre)), kept_min)


def batchtopk_encode(x, W_enc, b_enc, k: int, threshold: torch.Tensor | None = None,
                     momentum: float = 0.001, *, layout: str = "fd", backend: str | None = None):
    """BatchTopK encode over the batch: k*N kept entries in all, a variable number per row.

    x [..., D] (the batch is every leading position, N of them), W_enc [F, D] (row-major or
    the .T view of a [D, F] tensor, read in place; ``layout="df"`` for a [D, F] tensor passed
    as it is), b_enc [F] or None; k features per token on average.
    threshold: optional 0-dim tensor, the running threshold, moved in place (no grad) toward
    the smallest positive kept value by ``update_threshold`` with ``momentum``.
    -> (vals [..., m], idx [..., m] int64), m = max(1, most kept in a row), padding vals 0.
    Differentiable in x, W_enc, b_enc (sparse backward, as ``topk_encode``).

    Example::

        theta = torch.full((), -1.0)                # negative: not measured yet
        vals, idx = batchtopk_encode(x, W_enc, b_enc, k=32, threshold=theta)   # training
        vals, idx = relu_encode(x, W_enc, b_enc, threshold=theta)              # inference
    """
    W = weight_view(W_enc, layout, "batchtopk_encode", "W_enc")
    bk = _dispatch.choose(x, backend=backend)
    check_encode(x, W, b_enc, "batchtopk_encode")
    if k < 1:
        raise ValueError(f"batchtopk_encode: k must be >= 1, got {k}")
    if bk == "reference":
        x2, restore = _flat(x)
        return tuple(restore(t) for t in batchtopk_encode_ref(x2, W, b_enc, k, threshold, momentum))
    stats: dict = {}
    select = functools.partial(_select_batchtopk, k=min(k, W.shape[0]))
    out = run_encode(x, W, b_enc, select, bk, stats)
    if threshold is not None:
        update_threshold(threshold, stats["kept_min"], momentum)
    return out


# ----------------------------------------------------------------------------- reference
def batchtopk_encode_ref(x, W_enc, b_enc, k: int, threshold=None, momentum: float = 0.001):
    """BatchTopK: keep the k*B largest of relu(pre) over the whole batch, packed sparse.

    If ``threshold`` (a 0-dim tensor) is given it is moved toward the smallest positive kept
    value with ``update_threshold``.
    """
    pre = encode_pre_ref(x, W_enc, b_enc)
    B, F = pre.shape
    flat = torch.relu(pre).flatten()
    top = flat.topk(min(k * B, flat.numel())).indices
    mask = torch.zeros(B * F, dtype=torch.bool, device=pre.device)
    mask[top] = True
    mask = mask.view(B, F) & (pre > 0)
    if threshold is not None:
        update_threshold(threshold, pre.detach()[mask], momentum)
    return pack_mask(pre, mask)
