"""Stability across seeds: do crosscoders trained alike (other seeds, other data orders) find the
same features, with the same NRN, and do the analysis conclusions hold in every run?

Features of two crosscoders are paired by a Hungarian (optimal one-to-one) assignment that
maximises the summed cosine of their decoder rows, the *concatenated* rows over all sources
(the whole [D] vector a feature writes: its direction in every model and how its norm splits
between them, so a shared feature does not pair with a B-only one that has its B-direction). A
pair counts as matched when its cosine is at least ``MATCH_COSINE`` = 0.7, the threshold of
Paulo & Belrose (2025, "Sparse autoencoders trained on the same data learn different features"),
who match SAE features the same way. Dead features keep random decoders and so count as
unmatched: the fraction is a lower bound on the live features' agreement. Each pair of runs
holds one [F_i, F_j] float64 cosine matrix (128 MiB at F = 4096).

Reported per pair of runs: the fraction of features matched (of the smaller dictionary), and for
the matched pairs the NRN agreement: Pearson correlation, mean |NRN_i - NRN_j| and the fraction
in the same NRN class (shared / only-A / only-B at the diff cut-offs). Per run: named values
(``run_values``) and named yes/no conclusions (``default_conclusions``, plus any the caller adds,
e.g. ``fastxc study``'s); ``holds_in_every_run`` says which hold in all runs.
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from fastxc.core.crosscoder import Crosscoder
from fastxc.core.norms import CLASS_NAMES, ONLY_A_MAX, ONLY_B_MIN, classify, relative_norms

MATCH_COSINE = 0.7  # Paulo & Belrose 2025
EXCLUSIVE_NRN = 0.9  # a feature with NRN above this (below 1 - this) counts as exclusive to B (A)


# ---------------------------------------------------------------------------- assignment
def linear_sum_assignment(cost) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment of the rows of ``cost`` [n, m] to distinct columns
    (all min(n, m) of them matched): (rows, cols), sorted by row, like
    ``scipy.optimize.linear_sum_assignment``, without the dependency.

    Shortest augmenting paths with potentials (the O(n^2 m) Hungarian algorithm of Jonker and
    Volgenant as usually written), one row at a time, each step vectorised over the columns.
    Measured on one CPU thread, n = m = 4096 decoder cosines: 2.4 s for a permuted noisy copy
    (about one step per row), 12 s for an unrelated dictionary, the slow case (scipy's C version
    is ~5x faster there; it is not a fastxc dependency).
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"cost must be a 2-d matrix, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("cost has non-finite entries")
    if c.shape[0] > c.shape[1]:  # the algorithm wants rows <= columns
        cols, rows = linear_sum_assignment(c.T)
        order = np.argsort(rows)
        return rows[order], cols[order]
    n, m = c.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # row and column potentials (index 0: the virtual start)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: 1-based row holding column j (0: free)
    way = np.zeros(m + 1, dtype=np.int64)  # previous column on the shortest path
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)  # shortest reduced distance to each column so far
        used = np.zeros(m + 1, dtype=bool)
        while True:  # Dijkstra over columns until a free one is reached
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            reduced = c[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            dist = np.where(free, minv[1:], np.inf)
            j1 = int(dist.argmin()) + 1
            delta = dist[j1 - 1]
            u[owner[used]] += delta  # rows on the tree (distinct, so fancy-index += is exact)
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = np.nonzero(owner[1:])[0]
    rows = owner[1:][cols] - 1
    order = np.argsort(rows)
    return rows[order], cols[order]


# ---------------------------------------------------------------------------- matching
class Match(NamedTuple):
    """The Hungarian pairing of two crosscoders' features (min(F_i, F_j) pairs)."""

    rows: np.ndarray  # [K] int64 features of the first crosscoder, ascending
    cols: np.ndarray  # [K] int64 their partners in the second
    cosine: np.ndarray  # [K] float64 decoder cosine of each pair


def decoder_directions(cc: Crosscoder) -> Tensor:
    """[F, D] float32: each feature's concatenated decoder row at unit L2 norm (zero rows stay 0)."""
    w = cc.W_dec.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def match_features(first: Crosscoder, second: Crosscoder) -> Match:
    """Pair the features of two crosscoders of equal widths, maximising the summed cosine."""
    if list(first.widths) != list(second.widths):
        raise ValueError(f"crosscoders of widths {first.widths} and {second.widths} cannot be matched")
    dev = first.W_dec.device
    cos = (decoder_directions(first) @ decoder_directions(second).to(dev).t()).double().cpu().numpy()
    rows, cols = linear_sum_assignment(-cos)
    return Match(rows, cols, cos[rows, cols])


def nrn_agreement(nrn_i: Tensor, nrn_j: Tensor, only_a_max: float = ONLY_A_MAX,
                  only_b_min: float = ONLY_B_MIN) -> dict:
    """How well the NRNs of matched pairs agree (both [K], pair k = (nrn_i[k], nrn_j[k])):
    Pearson correlation (None for fewer than 2 pairs or a constant side), mean |difference| and
    the fraction of pairs in the same NRN class. Pairs with a NaN NRN are left out."""
    ok = ~(torch.isnan(nrn_i) | torch.isnan(nrn_j))
    x, y = nrn_i[ok].double(), nrn_j[ok].double()
    out = {"pairs": int(ok.sum()), "correlation": None, "mean_abs_diff": None, "same_class": None}
    if x.numel() == 0:
        return out
    out["mean_abs_diff"] = float((x - y).abs().mean())
    out["same_class"] = float((classify(x, only_a_max, only_b_min) == classify(y, only_a_max, only_b_min)).double().mean())
    if x.numel() >= 2 and x.std() > 0 and y.std() > 0:
        out["correlation"] = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    return out


# ---------------------------------------------------------------------------- per-run results
def run_values(cc: Crosscoder, a: int = 0, b: int = 1, ord: int = 1, exclusive_nrn: float = EXCLUSIVE_NRN,
               only_a_max: float = ONLY_A_MAX, only_b_min: float = ONLY_B_MIN) -> dict:
    """Named numbers of one run, from its decoder alone: feature count, mean NRN, class counts
    and the counts of features exclusive to each model (NRN beyond ``exclusive_nrn``)."""
    nrn = relative_norms(cc, a, b, ord).nrn
    ok = ~torch.isnan(nrn)
    cls = classify(nrn, only_a_max, only_b_min)
    return {"n_features": cc.n_features, "nrn_mean": float(nrn[ok].mean()) if ok.any() else None,
            **{f"class_{n}": int(((cls == i) & ok).sum()) for i, n in enumerate(CLASS_NAMES)},
            "n_exclusive_b": int((nrn > exclusive_nrn).sum()), "n_exclusive_a": int((nrn < 1 - exclusive_nrn).sum())}


def default_conclusions(values: Sequence[Mapping], nrns: Sequence[Tensor], matches_from_first: Sequence[Match | None],
                        names: Sequence[str] = ("A", "B"), threshold: float = MATCH_COSINE,
                        exclusive_nrn: float = EXCLUSIVE_NRN) -> list[dict[str, bool]]:
    """The yes/no conclusions fastxc draws from each run's crosscoder, one dict per run.

    ``matches_from_first[r]``: the Match of run 0 with run r (None for run 0 itself). The
    recurrence conclusion asks whether at least half of run 0's features exclusive to B pair
    (cosine >= threshold) with a feature exclusive to B in run r; it is True for run 0.
    """
    a, b = names
    m = exclusive_nrn
    first_excl = (nrns[0] > m).numpy()
    out = []
    for r, (val, nrn, match) in enumerate(zip(values, nrns, matches_from_first)):
        if match is None:
            recur = True
        else:
            pick = first_excl[match.rows]  # pairs whose run-0 side is exclusive to B
            ok = (match.cosine[pick] >= threshold) & (nrn[match.cols[pick]] > m).numpy()
            recur = bool(first_excl.sum() > 0 and ok.sum() >= 0.5 * first_excl.sum())
        out.append({
            f"features exclusive to {b} exist (NRN > {m:g})": val["n_exclusive_b"] > 0,
            f"features exclusive to {a} exist (NRN < {1 - m:g})": val["n_exclusive_a"] > 0,
            f"more features exclusive to {b} than to {a}": val["n_exclusive_b"] > val["n_exclusive_a"],
            f"mean NRN above 0.5 (the dictionary leans to {b})": val["nrn_mean"] is not None and val["nrn_mean"] > 0.5,
            f"half of run 1's {b}-exclusive features recur as {b}-exclusive (cosine >= {threshold:g})": recur,
        })
    return out


def holds_in_every_run(per_run: Sequence[Mapping[str, bool]]) -> dict[str, dict]:
    """{conclusion: {"per_run": [bool or None], "holds_in_every_run": bool}} over the union of
    the runs' conclusion names; a run without a conclusion (None) does not count as holding it."""
    names: dict[str, None] = {}
    for run in per_run:
        names.update(dict.fromkeys(run))
    out = {}
    for name in names:
        vals = [None if run.get(name) is None else bool(run[name]) for run in per_run]
        out[name] = {"per_run": vals, "holds_in_every_run": all(v is True for v in vals)}
    return out


# ---------------------------------------------------------------------------- the analysis
def check_crosscoders(crosscoders: Sequence[Crosscoder], labels: Sequence[str]) -> None:
    """ValueError with one line unless there are >= 2 crosscoders of equal widths, >= 2 sources."""
    if len(crosscoders) < 2:
        raise ValueError(f"stability needs at least 2 crosscoders, got {len(crosscoders)}")
    for cc, label in zip(crosscoders, labels):
        if list(cc.widths) != list(crosscoders[0].widths):
            raise ValueError(f"crosscoders differ in widths: {labels[0]} has {crosscoders[0].widths}, "
                             f"{label} has {cc.widths}")
        if cc.n_sources < 2:
            raise ValueError(f"{label}: stability compares NRN, which needs at least 2 sources")


def stability(crosscoders: Sequence[Crosscoder], labels: Sequence[str] | None = None, *, a: int = 0, b: int = 1,
              ord: int = 1, threshold: float = MATCH_COSINE, exclusive_nrn: float = EXCLUSIVE_NRN,
              only_a_max: float = ONLY_A_MAX, only_b_min: float = ONLY_B_MIN,
              extra_conclusions: Sequence[Mapping[str, bool]] | None = None) -> dict:
    """Match every pair of runs and gather the per-run values and conclusions.

    ``extra_conclusions``: one dict of named booleans per run (e.g. from other analyses of that
    run) merged with ``default_conclusions`` before ``holds_in_every_run``. Returns the report
    (JSON-ready, plus "_matches": {(i, j): Match} for plots and callers).
    """
    labels = list(labels) if labels is not None else [f"run{i + 1}" for i in range(len(crosscoders))]
    if len(labels) != len(crosscoders):
        raise ValueError(f"{len(labels)} labels for {len(crosscoders)} crosscoders")
    check_crosscoders(crosscoders, labels)
    if not 0 < threshold <= 1:
        raise ValueError(f"the cosine threshold must lie in (0, 1], got {threshold}")
    if extra_conclusions is not None and len(extra_conclusions) != len(crosscoders):
        raise ValueError(f"extra_conclusions has {len(extra_conclusions)} entries for {len(crosscoders)} runs")
    nrns = [relative_norms(cc, a, b, ord).nrn.cpu() for cc in crosscoders]
    matches, pairs = {}, []
    for i in range(len(crosscoders)):
        for j in range(i + 1, len(crosscoders)):
            m = match_features(crosscoders[i], crosscoders[j])
            matches[(i, j)] = m
            good = m.cosine >= threshold
            pairs.append({"runs": [labels[i], labels[j]], "matched": int(good.sum()),
                          "matched_fraction": float(good.mean()), "mean_cosine": float(m.cosine.mean()),
                          "nrn_agreement": nrn_agreement(nrns[i][m.rows[good]], nrns[j][m.cols[good]],
                                                         only_a_max, only_b_min)})
    # features of run 1 matched (cosine >= threshold) in every other run
    every = np.ones(crosscoders[0].n_features, dtype=bool)
    for j in range(1, len(crosscoders)):
        m = matches[(0, j)]
        hit = np.zeros_like(every)
        hit[m.rows[m.cosine >= threshold]] = True
        every &= hit
    names = [crosscoders[0].source_names[a], crosscoders[0].source_names[b]]
    values = [run_values(cc, a, b, ord, exclusive_nrn, only_a_max, only_b_min) for cc in crosscoders]
    per_run = default_conclusions(values, nrns, [None] + [matches[(0, j)] for j in range(1, len(crosscoders))],
                                  names, threshold, exclusive_nrn)
    if extra_conclusions is not None:
        per_run = [{**d, **dict(e)} for d, e in zip(per_run, extra_conclusions)]
    return {"runs": labels, "sources": names, "ord": ord, "threshold": threshold, "exclusive_nrn": exclusive_nrn,
            "matched_by": "Hungarian assignment on the cosine of the concatenated decoder rows",
            "pairs": pairs, "matched_fraction_min": min(p["matched_fraction"] for p in pairs),
            "run1_matched_in_every_run": float(every.mean()),
            "values": dict(zip(labels, values)), "conclusions": holds_in_every_run(per_run), "_matches": matches,
            "_nrns": nrns}


def plot_stability(report: dict, path):
    """Left: the matched cosines of every pair of runs (threshold dashed). Right: NRN in one run
    against NRN in the other for the pairs above the threshold. PNG."""
    from fastxc.analysis.inputs import pyplot, savefig

    plt = pyplot()
    fig, (ax_c, ax_n) = plt.subplots(1, 2, figsize=(10, 4.2))
    labels, nrns, thr = report["runs"], report["_nrns"], report["threshold"]
    for (i, j), m in report["_matches"].items():
        tag = f"{labels[i]} ~ {labels[j]}"
        ax_c.hist(m.cosine, bins=40, range=(-0.2, 1), histtype="step", label=tag)
        good = m.cosine >= thr
        ax_n.scatter(nrns[i][m.rows[good]].numpy(), nrns[j][m.cols[good]].numpy(), s=6, alpha=0.5, label=tag)
    ax_c.axvline(thr, color="#666666", linestyle="--", linewidth=0.8)
    ax_c.set_yscale("log")
    ax_c.set_xlabel("decoder cosine of Hungarian-matched features")
    ax_c.set_ylabel("pairs")
    ax_c.set_title(f"matched >= {thr:g}: {report['matched_fraction_min']:.1%} (worst pair)", fontsize=9)
    ax_n.plot([0, 1], [0, 1], color="#666666", linewidth=0.8)
    ax_n.set_xlim(-0.02, 1.02)
    ax_n.set_ylim(-0.02, 1.02)
    ax_n.set_xlabel("NRN in the first run of the pair")
    ax_n.set_ylabel("NRN in the second run")
    ax_n.set_title("NRN of matched features", fontsize=9)
    for ax in (ax_c, ax_n):
        ax.legend(fontsize=7)
    return savefig(fig, path, title="Stability across runs")


def summary_lines(report: dict) -> list[str]:
    """The printed report: one line per pair of runs, then the conclusions."""
    lines = []
    for p in report["pairs"]:
        ag = p["nrn_agreement"]
        corr = "n/a" if ag["correlation"] is None else f"{ag['correlation']:.3f}"
        same = "n/a" if ag["same_class"] is None else f"{ag['same_class']:.1%}"
        lines.append(f"{p['runs'][0]} ~ {p['runs'][1]}: {p['matched_fraction']:.1%} of features matched at cosine >= "
                     f"{report['threshold']:g}; NRN of matched pairs: correlation {corr}, same class {same}")
    lines.append(f"features of {report['runs'][0]} matched in every run: {report['run1_matched_in_every_run']:.1%}")
    for name, c in report["conclusions"].items():
        runs = "".join("?" if v is None else ("y" if v else "n") for v in c["per_run"])
        lines.append(f"  [{'holds' if c['holds_in_every_run'] else 'varies'}] {name}  ({runs})")
    return lines


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The flags of ``fastxc stability``."""
    from fastxc.core.cli import Parser

    p = Parser(prog="fastxc stability",
               description="Match the features of crosscoders trained alike (Hungarian assignment on decoder cosine): "
                           "the fraction matched, the NRN agreement of matched features, and which conclusions "
                           "hold in every run.")
    p.add_argument("--crosscoder", nargs="+", required=True, metavar="DIR",
                   help="two or more crosscoder folders (Crosscoder.save / train's OUT/crosscoder)")
    p.add_argument("--out", default=None, help="output folder (stability.json, stability.png; default: runs/fastxc-stability)")
    p.add_argument("--threshold", type=float, default=MATCH_COSINE,
                   help="decoder cosine at or above which a matched pair counts (Paulo & Belrose 2025)")
    p.add_argument("--ord", type=int, default=1, choices=(1, 2), help="norm of the decoder vectors for NRN (seed: 1)")
    p.add_argument("--exclusive-nrn", type=float, default=EXCLUSIVE_NRN,
                   help="NRN above this (below 1 minus it): exclusive to B (A)")
    p.add_argument("--only-a-max", type=float, default=ONLY_A_MAX, help="NRN class cut-off: below this only in A")
    p.add_argument("--only-b-min", type=float, default=ONLY_B_MIN, help="NRN class cut-off: above this only in B")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when available, else cpu), cpu, cuda, cuda:N")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastxc.analysis.stability``: stability of features across crosscoders."""
    from fastxc.analysis.inputs import check_input_paths, out_dir, run_cli, write_json
    from fastxc.core.device import resolve_device

    args = build_parser().parse_args(argv)

    def body() -> int:
        if len(args.crosscoder) < 2:
            raise ValueError(f"stability needs at least 2 crosscoders, got {len(args.crosscoder)}")
        if not 0 < args.threshold <= 1:
            raise ValueError(f"--threshold must lie in (0, 1], got {args.threshold}")
        if not 0.5 < args.exclusive_nrn < 1:
            raise ValueError(f"--exclusive-nrn must lie in (0.5, 1), got {args.exclusive_nrn}")
        device = str(resolve_device(args.device))
        for path in args.crosscoder:  # every path before any loading
            check_input_paths(SimpleNamespace(crosscoder=path), {"crosscoder": "crosscoder"})
        ccs = [Crosscoder.load(p, device=device).eval() for p in args.crosscoder]
        report = stability(ccs, list(args.crosscoder), ord=args.ord, threshold=args.threshold,
                           exclusive_nrn=args.exclusive_nrn, only_a_max=args.only_a_max, only_b_min=args.only_b_min)
        out = out_dir(args, "runs/fastxc-stability")
        plot_stability(report, out / "stability.png")
        write_json(out / "stability.json", {k: v for k, v in report.items() if not k.startswith("_")})
        for line in summary_lines(report):
            print(line)
        print(f"wrote {out}/stability.json, stability.png")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    import sys

    sys.exit(main())
