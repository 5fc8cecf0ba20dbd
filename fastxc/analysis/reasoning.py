"""Reasoning categories (seed section 5): the features active at reasoning markers and their NRN.

A category is a set of marker words (defaults below), each matched by its whole token spelling
(``marker_sequences``). Its positions are the store rows whose
*next* token is a marker (``at="before"``: the position that predicts the marker, where
ablating features changes the marker's logit) or the marker tokens themselves (``at="on"``).
For each category: how often each feature fires there, which features are active, and the NRN
distribution of those features (PNG + JSON).
CLI: ``python -m fastxc.analysis.reasoning --crosscoder DIR --store DIR [--categories FILE.json]``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from fastxc.core.crosscoder import Crosscoder
from fastxc.analysis.diff import relative_norms
from fastxc.analysis.hooks import AnalysisError, read_json, same_doc_next

# The target markers of the seed study, by category.
DEFAULT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "self-reflection": ("Wait",),
    "deductive": ("Therefore", "Thus"),
    "alternative": ("Alternatively",),
    "contrastive": ("But", "However"),
}
POSITIONS = ("before", "on")


def load_categories(spec: str | Path | dict | None) -> dict[str, tuple[str, ...]]:
    """Categories from a dict, a JSON file ``{"name": ["Word", ...]}`` or None (the defaults)."""
    if spec is None:
        return dict(DEFAULT_CATEGORIES)
    if not isinstance(spec, dict):
        spec = read_json(spec, "categories file")
    if not isinstance(spec, dict) or not spec:
        raise AnalysisError("categories must be a non-empty JSON object {name: [marker words]}")
    out = {}
    for name, words in spec.items():
        if isinstance(words, str):
            words = [words]
        if not isinstance(words, (list, tuple)) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise AnalysisError(f"category {name!r}: expected a non-empty list of marker words")
        out[str(name)] = tuple(w.strip() for w in words)
    return out


def _is_space(tokenizer, token_id: int) -> bool:
    return not tokenizer.decode([token_id]).strip()


def marker_sequences(tokenizer, words: Sequence[str]) -> list[tuple[int, ...]]:
    """The token-id sequences that spell a marker word in running text, longest first.

    Each word is encoded alone, after a space and after a line break ("Wait", " Wait",
    "\nWait"); leading whitespace-only tokens are dropped, and what is left must decode to the
    word itself (a multi-token word such as "How" + "ever" is one sequence of two ids). A form
    with a comma ("Wait,") counts too where the tokenizer merges the comma into the word's last
    token. "WaitWait" is two occurrences of ("Wait",).
    """
    seqs: set[tuple[int, ...]] = set()
    for w in words:
        for text in (w, " " + w, "\n" + w, w + ",", " " + w + ","):
            enc = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
            while enc and _is_space(tokenizer, enc[0]):
                enc = enc[1:]
            if not enc:
                continue
            spelled = tokenizer.decode(enc).strip()
            comma_merged = tokenizer.decode(enc[-1:]).strip() != ","
            if spelled == w or (spelled == w + "," and comma_merged):
                seqs.add(tuple(enc))
    return sorted(seqs, key=lambda q: (-len(q), q))


def marker_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Ids of the first token of each marker spelling (see ``marker_sequences``)."""
    return sorted({q[0] for q in marker_sequences(tokenizer, words)})


def marker_starts(ids, seqs: Sequence[tuple[int, ...]]) -> np.ndarray:
    """Positions in ``ids`` [n] where a marker spelling starts (non-overlapping, longest first): int64 [m]."""
    ids = np.asarray(ids)
    n = len(ids)
    taken = np.zeros(n, dtype=bool)
    starts = []
    for q in sorted(seqs, key=len, reverse=True):
        L = len(q)
        if L > n:
            continue
        hit = np.ones(n - L + 1, dtype=bool)
        for j, t in enumerate(q):  # ids[i + j] == q[j] for every j
            hit &= ids[j : n - L + 1 + j] == t
        cand = np.flatnonzero(hit)
        claimed = np.concatenate([[0], np.cumsum(taken)])
        cand = cand[claimed[cand + L] == claimed[cand]]  # a longer spelling already holds these tokens
        if L > 1:  # a spelling may overlap itself ("a a" in "a a a"): keep the leftmost
            keep, end = [], -1
            for i in cand:
                if i >= end:
                    keep.append(i)
                    end = i + L
            cand = np.asarray(keep, dtype=np.int64)
        for j in range(L):
            taken[cand + j] = True
        starts.append(cand)
    return np.sort(np.concatenate(starts)).astype(np.int64) if starts else np.zeros(0, dtype=np.int64)


def count_marker_tokens(ids: Sequence[int], seqs: Sequence[tuple[int, ...]]) -> int:
    """Marker occurrences in a list of generated token ids (each spelling counted once)."""
    return len(marker_starts(ids, seqs))


def marker_rows(reader, tokenizer, words: Sequence[str], at: str = "before") -> np.ndarray:
    """Store rows of a category: before a marker (next token starts one) or on its first token. int64 [n].

    A multi-token marker counts only where its whole spelling follows ("How" alone is not "However").
    """
    if at not in POSITIONS:
        raise AnalysisError(f"at must be one of {POSITIONS}, got {at!r}")
    tokens = reader.tokens
    if tokens is None:
        raise AnalysisError(f"store {reader.path} keeps no token ids: cannot find marker positions")
    seqs = marker_sequences(tokenizer, words)
    if not seqs:
        raise AnalysisError(f"the tokenizer has no token for the markers {list(words)}")
    hit = np.zeros(len(tokens), dtype=bool)
    hit[marker_starts(tokens, seqs)] = True
    if at == "on":
        return np.flatnonzero(hit).astype(np.int64)
    nxt = np.zeros_like(hit)
    nxt[:-1] = hit[1:]
    return np.flatnonzero(nxt & same_doc_next(reader)).astype(np.int64)


class CategoryActivity(NamedTuple):
    rows: np.ndarray  # [n] store rows of the category
    freq: torch.Tensor  # [F] fraction of those rows where each feature is active
    mean_act: torch.Tensor  # [F] mean activation over the rows where it is active
    active: torch.Tensor  # [n_active] feature ids with freq >= min_freq, most frequent first


@torch.no_grad()
def category_activity(cc: Crosscoder, reader, rows: np.ndarray, min_freq: float = 0.0,
                      batch_size: int = 2048) -> CategoryActivity:
    """How often each feature fires on ``rows``; ``active`` = features with freq > min_freq."""
    F = cc.n_features
    count = torch.zeros(F, dtype=torch.float64)
    total = torch.zeros(F, dtype=torch.float64)
    for lo in range(0, len(rows), batch_size):
        x = cc.flatten_input(reader.read_rows(rows[lo : lo + batch_size]).to(cc.W_enc.device, cc.W_enc.dtype))
        f = cc.encode(x).float().cpu()
        count += (f > 0).sum(0).double()
        total += f.sum(0).double()
    n = max(len(rows), 1)
    freq = (count / n).float()
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)).float()
    active = torch.nonzero(freq > min_freq).flatten()
    active = active[torch.argsort(freq[active], descending=True, stable=True)]
    return CategoryActivity(rows, freq, mean, active)


def category_nrn_figure(results: dict, names: Sequence[str]):
    """One panel per category: histogram of the NRN of its active features (count, left axis)
    and the same weighted by each feature's firing frequency there (right axis). Returns the Figure."""
    from fastxc.analysis.inputs import pyplot

    plt = pyplot()
    cats = list(results)
    cols = min(len(cats), 4)
    rows = math.ceil(len(cats) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows), squeeze=False)
    for ax, c in zip(axes.flat, cats):
        r = results[c]
        nrn = np.asarray(r["active_nrn"], dtype=float)
        w = np.asarray(r["active_freq"], dtype=float)
        ok = ~np.isnan(nrn)
        ax.hist(nrn[ok], bins=20, range=(0, 1), color="#4477aa", alpha=0.75, label="active features (left)")
        ax2 = ax.twinx()
        ax2.hist(nrn[ok], bins=20, range=(0, 1), weights=w[ok], histtype="step", color="#cc3311",
                 label="weighted by firing frequency (right)")
        ax.set_title(f"{c} ({r['n_positions']} pos., {len(nrn)} feat.)", fontsize=9)
        ax.set_xlabel(f"NRN (0 {names[0]}, 1 {names[1]})", fontsize=8)
        ax.set_ylabel("active features", fontsize=8)
        ax2.set_ylabel("sum of firing frequencies", fontsize=8, color="#cc3311")
        ax.axvline(0.5, color="grey", lw=0.5, ls="--")
        # one legend for both axes (a twin axis keeps its own handles)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(cats):]:
        ax.axis("off")
    return fig


def plot_category_nrn(results: dict, path: Path, names: Sequence[str]) -> Path:
    """``category_nrn_figure`` saved as PNG."""
    from fastxc.analysis.inputs import savefig

    return savefig(category_nrn_figure(results, names), path)


def reasoning_analysis(cc: Crosscoder, reader, tokenizer, categories: dict | None = None, at: str = "before",
                       min_freq: float = 0.0, out: str | Path | None = None, ord: int = 1,
                       max_rows: int | None = 20000, seed: int = 0) -> dict:
    """Per category: positions, active features (with frequency and NRN), NRN distribution.

    Writes ``reasoning.json`` and ``reasoning_nrn.png`` into ``out`` when given. Categories with
    no position in the store are reported with ``n_positions`` 0.
    """
    if list(reader.widths) != list(cc.widths):
        raise AnalysisError(f"crosscoder widths {cc.widths} do not match the store's widths {list(reader.widths)}")
    if cc.n_sources < 2:
        raise AnalysisError("reasoning categories need a crosscoder with at least 2 sources")
    cats = load_categories(categories)
    nrn = relative_norms(cc, 0, 1, ord).nrn
    rng = np.random.default_rng(seed)
    results = {}
    for name, words in cats.items():
        rows = marker_rows(reader, tokenizer, words, at)
        n_all = len(rows)
        if max_rows is not None and n_all > max_rows:
            rows = np.sort(rng.choice(rows, max_rows, replace=False))
        act = category_activity(cc, reader, rows, min_freq) if len(rows) else None
        active = act.active.tolist() if act is not None else []
        a_nrn = nrn[active] if active else torch.zeros(0)
        results[name] = {
            "markers": list(words), "n_positions": n_all, "n_used": len(rows),
            "active": active,
            "active_freq": [float(act.freq[k]) for k in active] if act else [],
            "active_mean_act": [float(act.mean_act[k]) for k in active] if act else [],
            "active_nrn": [float(v) for v in a_nrn],
            "nrn_mean": float(a_nrn.nanmean()) if len(active) else float("nan"),
            "frac_nrn_gt_0.5": float((a_nrn > 0.5).float().mean()) if len(active) else float("nan"),
            "nrn_histogram_10": torch.histc(a_nrn[~torch.isnan(a_nrn)], bins=10, min=0, max=1).int().tolist() if len(active) else [0] * 10,
        }
    summary = {"sources": cc.source_names[:2], "at": at, "min_freq": min_freq, "ord": ord, "categories": results}
    if out is not None:
        from fastxc.analysis.inputs import write_json

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "reasoning.json", summary)
        if any(r["n_positions"] for r in results.values()):
            plot_category_nrn({k: v for k, v in results.items() if v["n_positions"]}, out / "reasoning_nrn.png",
                              cc.source_names[:2])
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``fastxc reasoning``."""
    from fastxc.analysis.inputs import parser

    p = parser("fastxc reasoning", "Features active at reasoning markers and their NRN, per category.",
               store_required=True)
    p.add_argument("--categories", default=None, help='JSON file {"name": ["Marker", ...]} (default: the seed study\'s)')
    p.add_argument("--at", default="before", choices=POSITIONS, help="position: before the marker (predicts it) or on it")
    p.add_argument("--min-freq", type=float, default=0.0, help="a feature is active on a category above this firing frequency")
    p.add_argument("--max-rows", type=int, default=20000, help="positions sampled per category")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fastxc.analysis.inputs import inputs_from_args, out_dir, run_cli

    args = build_parser().parse_args(argv)

    def body() -> int:
        inp = inputs_from_args(args)
        out = out_dir(args, "runs/fastxc-reasoning")
        s = reasoning_analysis(inp.crosscoder, inp.reader, inp.tokenizer(), args.categories, args.at, args.min_freq,
                               out, max_rows=args.max_rows, seed=args.seed)
        for name, r in s["categories"].items():
            print(f"{name:16s} {r['n_positions']:7d} positions  {len(r['active']):5d} active features  "
                  f"mean NRN {r['nrn_mean']:.3f}  NRN>0.5: {r['frac_nrn_gt_0.5']:.2f}")
        print(f"wrote {out}/reasoning.json, reasoning_nrn.png")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
