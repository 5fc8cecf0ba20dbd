"""A synthetic multi-source activation source with planted features and known ground truth.

Each planted feature g has a decoder direction P[g] in the concatenated space [D]:
- shared: a unit direction in every source (independent directions per source)
- only-i: a unit direction in source i and exactly zero in the others
A row is x = sum_g a_g * P[g] + noise, where feature g fires with its own probability p_g
(log-uniformly spread, so some features are rare and some common) and magnitude
a_g ~ Uniform(0.5, 1.5). Batches are a pure function of (seed, batch index), so a resumed
training run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

SHARED = -1  # kind of a shared feature; 0..n-1 is the source an only-i feature lives in


class PlantedTruth(NamedTuple):
    """Ground truth of a planted source."""

    directions: Tensor  # [G, D] planted decoder directions (sources concatenated)
    kind: Tensor  # [G] int64: SHARED (-1) or the index of the only source it lives in
    freq: Tensor  # [G] firing probability per row


@dataclass
class PlantedSource:
    """Planted-feature source.

    Args:
        widths: per-source widths, e.g. ``[64, 64]``.
        n_shared: features present in every source.
        n_unique: features present in only one source, per source (an int for all, or a list).
        freq_range: firing probabilities are log-uniform in this range.
        noise: standard deviation of isotropic Gaussian noise per coordinate, relative to
            1/sqrt(d_i) (so the noise norm per source is about ``noise``).
        seed: fixes the planted dictionary and, with the batch index, every batch.
    """

    widths: Sequence[int] = (64, 64)
    n_shared: int = 32
    n_unique: int | Sequence[int] = 32
    freq_range: tuple[float, float] = (0.01, 0.1)
    noise: float = 0.05
    seed: int = 0

    def __post_init__(self):
        self.widths = [int(w) for w in self.widths]
        n = len(self.widths)
        unique = [int(self.n_unique)] * n if isinstance(self.n_unique, int) else [int(u) for u in self.n_unique]
        if len(unique) != n:
            raise ValueError(f"n_unique has {len(unique)} entries for {n} sources")
        lo, hi = self.freq_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"freq_range must satisfy 0 < lo <= hi <= 1, got {self.freq_range}")
        self.offsets = np.concatenate([[0], np.cumsum(self.widths)]).tolist()
        D = self.offsets[-1]
        g = torch.Generator().manual_seed(self.seed)
        kinds = [SHARED] * self.n_shared + [i for i, u in enumerate(unique) for _ in range(u)]
        G = len(kinds)
        dirs = torch.zeros(G, D)
        for j, kind in enumerate(kinds):
            for i in range(n):
                if kind in (SHARED, i):
                    s = slice(self.offsets[i], self.offsets[i + 1])
                    v = torch.randn(self.widths[i], generator=g)
                    dirs[j, s] = v / v.norm()
        log_f = torch.empty(G).uniform_(np.log(lo), np.log(hi), generator=g)
        self.truth = PlantedTruth(dirs, torch.tensor(kinds, dtype=torch.int64), log_f.exp())

    @property
    def d_total(self) -> int:
        return self.offsets[-1]

    def batch(self, batch_size: int, index: int) -> Tensor:
        """Batch number ``index`` of this source: [batch_size, D] float32, deterministic."""
        g = torch.Generator().manual_seed(hash((self.seed, 7919, int(index))) & 0x7FFF_FFFF_FFFF_FFFF)
        G = self.truth.directions.shape[0]
        fires = torch.rand(batch_size, G, generator=g) < self.truth.freq
        mags = torch.empty(batch_size, G).uniform_(0.5, 1.5, generator=g)
        x = (fires * mags) @ self.truth.directions
        for i, w in enumerate(self.widths):
            s = slice(self.offsets[i], self.offsets[i + 1])
            x[:, s] += torch.randn(batch_size, w, generator=g) * (self.noise / w**0.5)
        return x

    def batches(self, batch_size: int, seed: int = 0, start: int = 0):
        """Infinite iterator of [B, D] batches starting at batch ``start`` (store-like API)."""
        i = start
        while True:
            yield self.batch(batch_size, i + 1_000_003 * seed)
            i += 1


def recovery(W_dec: Tensor, truth: PlantedTruth) -> Tensor:
    """[G]: for each planted feature, the max cosine similarity with any learned decoder row.

    W_dec [F, D] (feature-major), truth.directions [G, D].
    """
    learned = torch.nn.functional.normalize(W_dec.detach().float(), dim=1)
    planted = torch.nn.functional.normalize(truth.directions.float(), dim=1)
    return (planted @ learned.t()).max(dim=1).values


def best_match(W_dec: Tensor, truth: PlantedTruth) -> Tensor:
    """[G] int64: index of the learned feature whose decoder is closest to each planted one."""
    learned = torch.nn.functional.normalize(W_dec.detach().float(), dim=1)
    planted = torch.nn.functional.normalize(truth.directions.float(), dim=1)
    return (planted @ learned.t()).argmax(dim=1)


def recovery_report(model, truth: PlantedTruth) -> dict:
    """How well ``model`` (a Crosscoder) recovered the planted features -> summary fields:

    - ``planted_mmcs``: mean over planted features of the max cosine similarity with any
      learned decoder direction (MMCS; 1: every feature found exactly);
    - with two sources, ``planted_right_class``: the fraction of planted features whose closest
      learned feature falls in the planted kind's NRN class (shared / only-A / only-B,
      ``fastxc.core.norms.classify``), and ``planted_right_class_by_kind`` per class.
    """
    from fastxc.core.norms import CLASS_NAMES, classify, relative_norms

    out: dict = {"planted_mmcs": float(recovery(model.W_dec, truth).mean())}
    if model.n_sources == 2:
        got = classify(relative_norms(model, 0, 1).nrn[best_match(model.W_dec, truth)])
        want = torch.where(truth.kind == SHARED, 0, truth.kind + 1)
        right = got == want
        out["planted_right_class"] = float(right.float().mean())
        out["planted_right_class_by_kind"] = {name: float(right[want == c].float().mean())
                                              for c, name in enumerate(CLASS_NAMES) if (want == c).any()}
    return out
