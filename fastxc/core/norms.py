"""Relative decoder norms: how much of each feature lives in each source (seed paper eqs. 6-7).

RDN_k = ||W_dec[k, B]|| / ||W_dec[k, A]||  and  NRN_k = RDN_k / (1 + RDN_k) = |B| / (|A| + |B|).
NRN ~ 0.5: shared; -> 1: unique to B; -> 0: unique to A. The seed study uses the L1 norm of the
decoder vectors; ``ord=2`` gives the L2 variant. The trainer's end-of-run summary and the
analysis layer (``fastxc.analysis.diff``) both read them from here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastxc.core.crosscoder import Crosscoder

# Default class cut-offs on NRN: below ONLY_A_MAX the feature belongs to A alone, above
# ONLY_B_MIN to B alone, in between it is shared.
ONLY_A_MAX = 0.3
ONLY_B_MIN = 0.7


class RelativeNorms(NamedTuple):
    rdn: Tensor  # [F] relative decoder norm ||B|| / ||A|| (inf where ||A|| = 0)
    nrn: Tensor  # [F] normalised relative norm in [0, 1] (nan where both norms are 0)


def _source_norm(model: Crosscoder, i: int, ord: int) -> Tensor:
    if not 0 <= i < model.n_sources:
        raise ValueError(f"source index {i} out of range for a crosscoder with {model.n_sources} sources")
    w = model.W_dec.detach()[:, model.offsets[i] : model.offsets[i + 1]].float()
    if ord == 1:
        return w.abs().sum(dim=1)
    if ord == 2:
        return w.norm(dim=1)
    raise ValueError(f"ord must be 1 or 2, got {ord}")


def relative_norms(model: Crosscoder, a: int = 0, b: int = 1, ord: int = 1) -> RelativeNorms:
    """RDN and NRN per feature between sources ``a`` and ``b`` (L1 by default, L2 with ord=2)."""
    na, nb = _source_norm(model, a, ord), _source_norm(model, b, ord)
    total = na + nb
    nrn = torch.where(total > 0, nb / total.clamp_min(torch.finfo(total.dtype).tiny), torch.full_like(total, float("nan")))
    rdn = nb / na  # inf / nan where na == 0, by IEEE rules
    return RelativeNorms(rdn, nrn)


def decoder_cosine(model: Crosscoder, a: int = 0, b: int = 1) -> Tensor:
    """[F] cosine similarity of feature k's decoder vectors for sources a and b (equal widths)."""
    for i in (a, b):
        if not 0 <= i < model.n_sources:
            raise ValueError(f"source index {i} out of range for a crosscoder with {model.n_sources} sources")
    if model.widths[a] != model.widths[b]:
        raise ValueError(f"decoder cosine needs equal widths, sources {a} and {b} have {model.widths[a]} and {model.widths[b]}")
    w = model.W_dec.detach().float()
    wa = w[:, model.offsets[a] : model.offsets[a + 1]]
    wb = w[:, model.offsets[b] : model.offsets[b + 1]]
    return torch.nn.functional.cosine_similarity(wa, wb, dim=1, eps=1e-12)


def classify(nrn: Tensor, only_a_max: float = ONLY_A_MAX, only_b_min: float = ONLY_B_MIN) -> Tensor:
    """[F] int64 class per feature: 0 shared, 1 only-A (NRN < only_a_max), 2 only-B (NRN > only_b_min).

    Features with NaN NRN (an all-zero decoder) count as shared; pass a live mask to exclude them.
    """
    if not 0 <= only_a_max <= only_b_min <= 1:
        raise ValueError(f"cut-offs must satisfy 0 <= only_a_max <= only_b_min <= 1, got {only_a_max}, {only_b_min}")
    cls = torch.zeros_like(nrn, dtype=torch.int64)
    cls[nrn < only_a_max] = 1
    cls[nrn > only_b_min] = 2
    return cls


CLASS_NAMES = ("shared", "only-A", "only-B")


def text_histogram(values: Tensor, bins: int = 10, lo: float = 0.0, hi: float = 1.0, width: int = 40) -> str:
    """A text histogram of ``values`` (NaNs dropped) with ``bins`` equal bins on [lo, hi]."""
    v = values[~torch.isnan(values)].float()
    counts = torch.histc(v, bins=bins, min=lo, max=hi) if v.numel() else torch.zeros(bins)
    peak = max(int(counts.max()), 1)
    lines = []
    for j, c in enumerate(counts.tolist()):
        a, b = lo + (hi - lo) * j / bins, lo + (hi - lo) * (j + 1) / bins
        lines.append(f"  {a:4.2f}-{b:4.2f} | {'#' * round(width * c / peak):<{width}} {int(c)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- feature activity
