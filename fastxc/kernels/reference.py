"""Plain-torch references of every op in ``fastxc.kernels``: readable first, fast second.

They are the baseline of the tests and of ``bench/``, and the path taken with
``FASTXC_BACKEND=reference``. Every function is differentiable through ordinary autograd and
works in any float dtype (float64 for gradcheck).

Sparse codes are (vals [B, m], idx [B, m] int64): row b's code is
``sum_j vals[b, j] * e_{idx[b, j]}``; padding entries have vals 0 (their idx is arbitrary).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


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


def offsets_of(widths: Sequence[int]) -> list[int]:
    """[0, w0, w0+w1, ...] column offsets of the sources."""
    out = [0]
    for w in widths:
        out.append(out[-1] + int(w))
    return out


def pack_mask(pre: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress the entries of ``pre`` [B, F] where ``mask`` is true into padded (vals, idx).

    m = max(1, max active per row); padding has vals 0. Differentiable w.r.t. ``pre``.
    """
    m = max(1, int(mask.sum(1).max())) if pre.shape[0] else 1
    m = min(m, pre.shape[1])
    # active entries first: topk over (mask, -column) keys is unnecessary; a stable sort of the
    # mask puts the active columns first in column order
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :m]
    vals = torch.where(mask, pre, torch.zeros_like(pre)).gather(1, order)
    return vals, order


def encode_pre_ref(x, W_enc, b_enc):
    """pre = x @ W_enc.T + b_enc  ([B, D] x [F, D] -> [B, F])."""
    return x @ W_enc.t() + b_enc


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


def batchtopk_encode_ref(x, W_enc, b_enc, k: int, threshold=None, beta: float = 0.999):
    """BatchTopK: keep the k*B largest of relu(pre) over the whole batch, packed sparse.

    If ``threshold`` (a 0-dim tensor) is given it is updated in place:
    theta <- beta * theta + (1 - beta) * (smallest positive kept value).
    """
    pre = encode_pre_ref(x, W_enc, b_enc)
    B, F = pre.shape
    flat = torch.relu(pre).flatten()
    top = flat.topk(min(k * B, flat.numel())).indices
    mask = torch.zeros(B * F, dtype=torch.bool, device=pre.device)
    mask[top] = True
    mask = mask.view(B, F) & (pre > 0)
    if threshold is not None:
        update_threshold_ref(threshold, pre.detach()[mask], beta)
    return pack_mask(pre, mask)


@torch.no_grad()
def update_threshold_ref(threshold: torch.Tensor, kept: torch.Tensor, beta: float):
    """theta <- beta * theta + (1 - beta) * min(kept > 0); no change if nothing positive."""
    pos = kept[kept > 0]
    if pos.numel():
        threshold.mul_(beta).add_((1 - beta) * pos.min().to(threshold.dtype))
    return threshold


def sparse_decode_ref(vals, idx, W_dec, b_dec=None):
    """recon[b] = sum_j vals[b, j] * W_dec[idx[b, j]] (+ b_dec). [B,k],[B,k],[F,D] -> [B,D]."""
    recon = (vals.unsqueeze(-1) * W_dec[idx]).sum(1)
    return recon if b_dec is None else recon + b_dec


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
