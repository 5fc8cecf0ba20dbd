"""Sources as column ranges: a crosscoder's D columns are the concatenation of n_sources slices
of widths d_i (unequal widths allowed). Helpers shared by the loss and the penalty ops."""
from __future__ import annotations

import functools
from typing import Sequence

import torch


def offsets_of(widths: Sequence[int]) -> list[int]:
    """[0, w0, w0+w1, ...] column offsets of the sources."""
    out = [0]
    for w in widths:
        out.append(out[-1] + int(w))
    return out


def check_widths(widths, D: int) -> tuple[int, ...]:
    """widths as a tuple of ints (hashable: it keys the column-source cache); ValueError unless
    they are positive and sum to D."""
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1 or sum(widths) != D:
        raise ValueError(f"source widths {list(widths)} must be positive and sum to D={D}")
    return widths


def check_decoder_widths(op: str, widths, W) -> tuple[int, ...]:
    """``check_widths`` against the D of the [F, D] decoder W; a W whose first dim is the
    widths' sum (a [D, F] decoder passed without .T) is named as such."""
    F, D = W.shape
    try:
        total = sum(int(w) for w in widths)
    except (TypeError, ValueError):
        total = None
    if total is not None and total != D and total == F:
        raise ValueError(f"{op}: W_dec {list(W.shape)} looks like [D, F] (its first dim is the "
                         f"widths' sum {total}); pass W_dec.T or layout='df'")
    return check_widths(widths, D)


def source_sums(cols: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """Per-source sums of per-column values: cols [..., D] -> [..., n_sources]."""
    o = offsets_of(widths)
    return torch.stack([cols[..., o[i]:o[i + 1]].sum(-1) for i in range(len(widths))], -1)


@functools.lru_cache(maxsize=64)
def col_src(widths: tuple[int, ...], device) -> torch.Tensor:
    """[D] int32 source of each column (cached: shared, never written)."""
    return torch.repeat_interleave(torch.arange(len(widths), dtype=torch.int32, device=device),
                                   torch.tensor(list(widths), device=device))


@functools.lru_cache(maxsize=64)
def col_src_long(widths: tuple[int, ...], device) -> torch.Tensor:
    """``col_src`` as int64, for indexing a per-source [n_sources] tensor into [D] columns."""
    return col_src(widths, device).long()
