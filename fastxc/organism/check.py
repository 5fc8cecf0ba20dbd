"""Crosscoder acceptance on the organism store: NRN histogram mode and the "Wait" feature.

The seed study finds most features shared (NRN ~ 0.5) and a self-reflection feature unique to
the distilled model (its Table 1). On the organism: the feature most active at the positions
right before "Wait" (where the distilled model decides to reflect) should fire on most of them
and lean to the distilled model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class WaitFeatureReport:
    n_live: int  # features active on at least one of the scanned rows
    nrn_mode: float  # centre of the fullest NRN histogram bin over live features
    n_positions: int  # rows right before a " Wait" token
    feature: int  # the feature with the largest mean activation on those rows
    fire_rate: float  # fraction of those rows where it is active
    nrn: float  # its NRN (distilled / (base + distilled), L1 decoder norms)
    nrn_quantile: float  # fraction of live features with a lower NRN

    def lines(self) -> list[str]:
        return [
            f"NRN histogram mode (live features, {self.n_live}): {self.nrn_mode:.3f}",
            f"\"Wait\" feature: #{self.feature} fires at {100 * self.fire_rate:.1f}% of the "
            f"{self.n_positions} positions right before \"Wait\"; NRN {self.nrn:.3f} "
            f"(above {100 * self.nrn_quantile:.1f}% of live features)",
        ]


def pre_token_rows(reader, token_id: int) -> np.ndarray:
    """Rows whose next row is ``token_id`` at the next position of the same document."""
    tok = reader.tokens
    if tok is None:
        raise ValueError("the store keeps no token ids; harvest it with fastxc.data.harvest")
    doc, pos, ds = reader.meta("doc"), reader.meta("pos"), reader.meta("dataset")
    nxt = np.flatnonzero(tok[1:] == token_id)  # row r where row r+1 is the token
    if doc is not None and pos is not None:
        same = (doc[nxt] == doc[nxt + 1]) & (pos[nxt] + 1 == pos[nxt + 1])
        if ds is not None:
            same &= ds[nxt] == ds[nxt + 1]
        nxt = nxt[same]
    return nxt


@torch.no_grad()
def _codes(model, reader, rows: np.ndarray, batch: int = 4096) -> torch.Tensor:
    out = []
    for s in range(0, len(rows), batch):
        x = reader.read_rows(rows[s:s + batch])
        out.append(model.encode(x.reshape(len(x), -1).to(model.W_enc.dtype)))
    return torch.cat(out)


def nrn_mode(nrn: torch.Tensor, bins: int = 20) -> float:
    """Centre of the fullest of ``bins`` equal bins over [0, 1]."""
    h = torch.histc(nrn.float(), bins=bins, min=0.0, max=1.0)
    return (int(h.argmax()) + 0.5) / bins


@torch.no_grad()
def wait_feature_report(model, reader, wait_id: int, scan_rows: int = 50_000,
                        seed: int = 0) -> WaitFeatureReport:
    """Measure the acceptance figures of a crosscoder trained on an organism store.

    Live features are those active on any of ``scan_rows`` random rows (or all rows).
    """
    from fastxc.analysis.diff import relative_norms

    n = len(reader)
    rng = np.random.default_rng(seed)
    scan = np.sort(rng.choice(n, size=min(n, scan_rows), replace=False))
    live = (_codes(model, reader, scan) > 0).any(0)
    nrn = relative_norms(model, a=0, b=1).nrn
    live &= ~torch.isnan(nrn)
    rows = pre_token_rows(reader, wait_id)
    if len(rows) == 0:
        raise ValueError("no position before \"Wait\" in the store")
    code = _codes(model, reader, rows)
    f = int(code.mean(0).argmax())
    live_nrn = nrn[live]
    return WaitFeatureReport(
        n_live=int(live.sum()), nrn_mode=nrn_mode(live_nrn), n_positions=len(rows), feature=f,
        fire_rate=float((code[:, f] > 0).float().mean()), nrn=float(nrn[f]),
        nrn_quantile=float((live_nrn < nrn[f]).float().mean()),
    )


def wait_token_id(tokenizer) -> int:
    """Id of "Wait" as it occurs in traces (at the start of a reasoning sentence)."""
    from fastxc.organism.corpus import wait_tokens

    return wait_tokens(tokenizer)[1]
