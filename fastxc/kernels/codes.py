"""Dense <-> sparse codes: fastxc's sparse code (vals [..., k], idx [..., k]) and the dense
[..., F] code that other SAE libraries pass between encode and decode.

    to_dense(vals, idx, F)   code[..., f] = sum of vals[..., j] over the j with idx[..., j] == f
                             (idx -1 marks a padding slot and adds nothing)
    to_sparse(code)          every non-zero entry of each row, rows padded to the longest with
                             vals 0 (the shape of relu_encode's output)
    to_sparse(code, k)       the k largest entries of each row (torch.topk)
    code_l0(vals)            non-zero entries per row (padding and zero-valued slots do not count)

A slot whose value is 0 carries no feature: its index is unspecified (topk_encode's zero slots,
the padding of relu_encode and of to_sparse), so compare codes through ``to_dense`` or only
where ``vals != 0``. Both conversions are differentiable in the values (to_dense in vals,
to_sparse in code) and neither index tensor carries a gradient. Plain torch; any device.
"""
from __future__ import annotations

import torch


def to_dense(vals: torch.Tensor, idx: torch.Tensor, n_features: int) -> torch.Tensor:
    """Sparse code -> dense code. vals [..., k] float, idx [..., k] int (-1: padding) ->
    code [..., n_features] in vals' dtype; repeated indices in a row add up, as in sparse_decode.

    Example (an API that wants the dense code)::

        vals, idx = topk_encode(x, W_enc, b_enc, k=32)
        feature_acts = to_dense(vals, idx, W_enc.shape[0])   # [B, F]
    """
    if vals.shape != idx.shape or vals.dim() == 0:
        raise ValueError(f"vals and idx must both be [..., k]; got {tuple(vals.shape)} and {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"idx must be an integer tensor [..., k], got {idx.dtype}")
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if idx.numel() and bool(((idx < -1) | (idx >= n_features)).any()):  # one device sync
        raise ValueError(f"idx must lie in [-1, n_features={n_features}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    pad = idx < 0
    # a padding slot scatters 0 into feature 0 (scatter_add needs a valid index); torch.where
    # also keeps its value's gradient at 0
    safe_idx = idx.masked_fill(pad, 0).long()
    safe_vals = torch.where(pad, torch.zeros_like(vals), vals)
    code = vals.new_zeros(*vals.shape[:-1], n_features)
    return code.scatter_add(-1, safe_idx, safe_vals)


def to_sparse(code: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense code -> sparse code. code [..., F] ->
    k None: (vals [..., m], idx [..., m] int64) holding every non-zero entry of each row, in
        feature order, m = max(1, most non-zeros in a row); the padding slots of shorter rows
        have vals 0 (their idx is unspecified: today a feature whose entry in that row is 0,
        so every op reads them and no index repeats in a row).
    k int: (vals [..., k], idx [..., k] int64), the k largest entries of each row, as
        torch.topk picks them (for a TopK code with at most k non-zeros: all of them).
    vals keep code's dtype and are differentiable in code (k None: through the non-zero
    entries only, so code's zero entries get no gradient, unlike a dense code @ W_dec).

    Example (a library hands you a dense code)::

        vals, idx = to_sparse(feature_acts)                  # or to_sparse(feature_acts, k)
        recon = sparse_decode(vals, idx, W_dec, b_dec)
    """
    if code.dim() == 0 or code.shape[-1] == 0:
        raise ValueError(f"code must be [..., F] with F >= 1, got {tuple(code.shape)}")
    F = code.shape[-1]
    if k is not None:
        if not 1 <= k <= F:
            raise ValueError(f"k must be in [1, F={F}], got {k}")
        vals, idx = code.topk(k, dim=-1, sorted=False)
        return vals, idx
    rows = code.reshape(-1, F)
    nz = rows != 0
    m = max(1, int(nz.sum(-1).max())) if rows.shape[0] else 1
    # a stable sort of the mask puts each row's non-zero columns first, in column order
    idx = torch.sort(nz.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :m]
    keep = nz.gather(-1, idx)
    # padding slots point at zero entries of the row; torch.where writes +0 there (a -0.0
    # entry counts as zero) and sends them no gradient
    vals = torch.where(keep, rows.gather(-1, idx), torch.zeros((), dtype=code.dtype, device=code.device))
    return vals.reshape(*code.shape[:-1], m), idx.reshape(*code.shape[:-1], m)


def code_l0(vals: torch.Tensor) -> torch.Tensor:
    """Active features per row: vals [..., k] -> [...] int64, the count of vals != 0 (padding
    and the zero slots of topk_encode do not count). ``code_l0(vals).float().mean()`` is the
    L0 that SAE trainers log."""
    if vals.dim() == 0:
        raise ValueError("vals must be [..., k], got a scalar")
    return (vals != 0).sum(-1)
