"""BatchTopK encode: keep the k*B largest relu(pre) entries over the whole batch.

At inference a BatchTopK model is a JumpReLU with one threshold: the running estimate of the
smallest kept value, updated during training with
    theta <- beta * theta + (1 - beta) * min(kept values > 0)
and then used as ``relu_encode(x, W_enc, b_enc, threshold=theta)``.
"""
from __future__ import annotations

import torch

from . import _dispatch
from .reference import batchtopk_encode_ref
from .topk_encode import check_encode, encode


@torch.no_grad()
def update_threshold(threshold: torch.Tensor, kept_min, beta: float = 0.999) -> torch.Tensor:
    """In place: theta <- beta * theta + (1 - beta) * kept_min (no change when kept_min is None)."""
    if kept_min is not None:
        threshold.mul_(beta).add_((1 - beta) * kept_min.to(threshold.dtype))
    return threshold


def batchtopk_encode(x, W_enc, b_enc, k: int, threshold: torch.Tensor | None = None,
                     beta: float = 0.999, *, backend: str | None = None):
    """BatchTopK encode over the batch: k*B kept entries in all, a variable number per row.

    x [B, D], W_enc [F, D], b_enc [F]; k features per token on average.
    threshold: optional 0-dim tensor, the running threshold, updated in place (no grad) with
    the smallest positive kept value (see module docstring); beta its decay.
    -> (vals [B, m], idx [B, m] int64), m = max(1, most kept in a row), padding vals 0.
    Differentiable in x, W_enc, b_enc (sparse backward, as ``topk_encode``).

    Example::

        theta = torch.zeros(())
        vals, idx = batchtopk_encode(x, W_enc, b_enc, k=32, threshold=theta)   # training
        vals, idx = relu_encode(x, W_enc, b_enc, threshold=theta)              # inference
    """
    if _dispatch.choose(x, backend=backend) == "reference":
        check_encode(x, W_enc, b_enc)
        return batchtopk_encode_ref(x, W_enc, b_enc, k, threshold, beta)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    extra: dict = {}
    _, out = encode(x, W_enc, b_enc, "batchtopk", k=min(k, W_enc.shape[0]), backend=backend,
                    extra=extra)
    if threshold is not None:
        update_threshold(threshold, extra["kept_min"], beta)
    return out
