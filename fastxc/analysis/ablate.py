"""Feature ablation (seed Figure 2): zero features in a model's residual stream and watch the
target-token logit.

For a token window and a feature set S, every model's layer-L input is encoded (all sources
together, as in training) and, in model i, the decoder contribution of S is removed:

    h_i  <-  h_i - sum_{k in S} f_k * W_dec[k, src_i] / input_scale_i

which equals the reconstruction without S plus the reconstruction error (the error is kept).
BOS / pad positions are left alone. The reported number is the mean change of the target
token's logit (ablated - clean) at the last position of each window, which predicts the target.

Category ablation takes N random positions just before a marker (``fastxc.analysis.reasoning``) and the
feature sets (a) active features with NRN > 0.5 and (b) the top-k% most frequently active
features (k% of the dictionary, among features active on the category).
CLI: ``python -m fastxc.analysis.ablate --crosscoder DIR --store DIR --category self-reflection``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastxc.analysis.inputs import Inputs, decoder_slice, encode_raw, source_activations
from fastxc.core.crosscoder import Crosscoder
from fastxc.analysis.diff import relative_norms
from fastxc.analysis.hooks import AnalysisError, bos_prefix, edit_residual, pad_id_of, special_mask, store_contexts
from fastxc.data.models import pad_batch
from fastxc.analysis.reasoning import category_activity, load_categories, marker_rows

PERCENTS = (0.5, 1, 2, 5, 10, 20)


@torch.no_grad()
def ablation_logits(cc: Crosscoder, models: Sequence, tokenizer, layer: int, contexts: Sequence[Sequence[int]],
                    targets: Sequence[int], feature_sets: dict[str, Sequence[int]], batch_size: int = 16,
                    positions: str = "all", only: Sequence[int] | None = None) -> dict:
    """Target logits at each window's last position, clean and with each feature set ablated.

    Returns {"clean": tensor [n_models, N], name: tensor [n_models, N] for each feature set}.
    ``positions="all"`` ablates at every real position of the window, ``"last"`` only at the
    predicting position. ``only`` restricts the logits to those models (the others' rows stay 0;
    every model still runs once, since the code needs all sources).
    """
    if positions not in ("all", "last"):
        raise AnalysisError(f"positions must be 'all' or 'last', got {positions!r}")
    if len(contexts) != len(targets):
        raise AnalysisError(f"{len(contexts)} contexts but {len(targets)} targets")
    n = cc.n_sources
    res = {name: torch.zeros(n, len(contexts)) for name in ["clean", *feature_sets]}
    dec = [decoder_slice(cc, i) for i in range(n)]  # [F, d_i] raw units
    sets = {name: torch.as_tensor(list(f), dtype=torch.long) for name, f in feature_sets.items()}
    pad = pad_id_of(tokenizer)
    dev = next(models[0].parameters()).device
    for lo in range(0, len(contexts), batch_size):
        batch = contexts[lo : lo + batch_size]
        ids, mask = pad_batch(batch, pad)
        ids, mask = ids.to(dev), mask.to(dev)
        last = torch.as_tensor([len(s) - 1 for s in batch], device=dev)
        tgt = torch.as_tensor(list(targets[lo : lo + batch_size]), device=dev)
        rows = torch.arange(len(batch), device=dev)
        code = encode_raw(cc, source_activations(models, layer, ids, mask))  # [B, T, F]
        where = ~special_mask(ids, mask, tokenizer)
        if positions == "last":
            only = torch.zeros_like(where)
            only[rows, last] = True
            where &= only
        where = where.unsqueeze(-1).float()
        for i, m in enumerate(models):
            if only is not None and i not in only:
                continue
            logits = m(input_ids=ids, attention_mask=mask).logits
            res["clean"][i, lo : lo + len(batch)] = logits[rows, last, tgt].float().cpu()
            for name, S in sets.items():
                if S.numel() == 0:
                    res[name][i, lo : lo + len(batch)] = res["clean"][i, lo : lo + len(batch)]
                    continue
                S = S.to(dev)
                delta = (code[..., S] @ dec[i][S].to(dev)) * where  # [B, T, d_i]
                with edit_residual(m, layer, lambda h, d=delta: h - d.to(h.dtype)):
                    logits = m(input_ids=ids, attention_mask=mask).logits
                res[name][i, lo : lo + len(batch)] = logits[rows, last, tgt].float().cpu()
    return res


def category_feature_sets(freq: torch.Tensor, nrn: torch.Tensor, percents: Sequence[float] = PERCENTS,
                          nrn_min: float = 0.5, min_freq: float = 0.0) -> dict[str, list[int]]:
    """(a) features active on the category (freq > min_freq) with NRN > nrn_min; (b) for each k
    in ``percents``, the ceil(k% of F) most frequently active features (fewer if fewer are active)."""
    F = freq.numel()
    active = torch.nonzero(freq > min_freq).flatten()
    order = active[torch.argsort(freq[active], descending=True, stable=True)]
    sets = {f"nrn>{nrn_min:g}": sorted(int(k) for k in active if nrn[k] > nrn_min)}
    for p in percents:
        n = max(1, math.ceil(p / 100 * F))
        sets[f"top{p:g}%"] = order[:n].tolist()
    return sets


def sample_positions(reader, tokenizer, words: Sequence[str], n: int, seed: int = 0) -> np.ndarray:
    """``n`` random store rows just before one of ``words`` (all of them if fewer)."""
    rows = marker_rows(reader, tokenizer, words, "before")
    if len(rows) == 0:
        raise AnalysisError(f"no position before the markers {list(words)} in store {reader.path}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, min(n, len(rows)), replace=False))


def windows(reader, tokenizer, rows: np.ndarray, context: int) -> tuple[list[list[int]], list[int]]:
    """Token windows ending at ``rows`` (BOS re-attached) and the token that follows each."""
    ctx = store_contexts(reader, rows, context, bos_prefix(tokenizer))
    tokens = reader.tokens
    return ctx, [int(tokens[r + 1]) for r in rows]


def ablate_category(inp: Inputs, category: str, words: Sequence[str] | None = None, n_positions: int = 100,
                    percents: Sequence[float] = PERCENTS, context: int = 128, seed: int = 0,
                    batch_size: int = 16, ord: int = 1, positions: str = "all",
                    extra_sets: dict[str, Sequence[int]] | None = None, min_freq: float = 0.0) -> dict:
    """Seed Figure 2 for one category: mean target-logit change per feature set and model.

    A feature is active on the category when it fires on more than ``min_freq`` of its positions
    (the seed study: any firing, min_freq 0).
    """
    cc, reader = inp.crosscoder, inp.reader
    if reader is None:
        raise AnalysisError("ablation needs --store (marker positions and token windows come from it)")
    if words is None:
        cats = load_categories(None)
        if category not in cats:
            raise AnalysisError(f"unknown category {category!r}; defaults are {', '.join(cats)} (or pass --markers)")
        words = cats[category]
    models, tok = inp.models(), inp.tokenizer()
    all_rows = marker_rows(reader, tok, words, "before")
    if len(all_rows) == 0:
        raise AnalysisError(f"no position before the markers {list(words)} in store {reader.path}")
    act = category_activity(cc, reader, all_rows)
    nrn = relative_norms(cc, 0, 1, ord).nrn
    sets = category_feature_sets(act.freq, nrn, percents, min_freq=min_freq)
    if extra_sets:
        sets.update({k: list(v) for k, v in extra_sets.items()})
    rows = sample_positions(reader, tok, words, n_positions, seed)
    ctx, tgt = windows(reader, tok, rows, context)
    logits = ablation_logits(cc, models, tok, inp.layer, ctx, tgt, sets, batch_size, positions)
    clean = logits["clean"]
    out = {"category": category, "markers": list(words), "n_positions": len(rows), "sources": inp.source_names,
           "positions": positions, "min_freq": min_freq, "clean_logit": clean.mean(1).tolist(), "sets": {}}
    for name, feats in sets.items():
        d = logits[name] - clean
        out["sets"][name] = {"n_features": len(feats), "features": list(feats), "delta": d.mean(1).tolist(),
                             "delta_sem": (d.std(1) / math.sqrt(max(d.shape[1], 1))).tolist()}
    return out


@torch.no_grad()
def rank_features(inp: Inputs, words: Sequence[str], candidates: Sequence[int], source: int, n_positions: int = 64,
                  context: int = 128, seed: int = 0, batch_size: int = 16) -> list[tuple[int, float]]:
    """Candidates sorted by how much ablating each one alone lowers the marker's logit in model
    ``source`` at positions before the marker: [(feature, mean logit change)], most negative first."""
    rows = sample_positions(inp.reader, inp.tokenizer(), words, n_positions, seed)
    ctx, tgt = windows(inp.reader, inp.tokenizer(), rows, context)
    models = inp.models()
    sets = {str(k): [int(k)] for k in candidates}
    logits = ablation_logits(inp.crosscoder, models, inp.tokenizer(), inp.layer, ctx, tgt, sets, batch_size,
                             only=[source])
    effect = [(int(k), float((logits[str(k)][source] - logits["clean"][source]).mean())) for k in candidates]
    return sorted(effect, key=lambda t: t[1])


def plot_ablation(results: Sequence[dict], path: Path) -> Path:
    """Seed Figure 2: per category, grouped bars of the mean target-logit change per feature set."""
    from fastxc.analysis.inputs import pyplot, savefig

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(max(4.5, 4.2 * len(results)), 3.4), squeeze=False)
    colors = ["#4477aa", "#cc3311", "#228833", "#aa3377"]
    for ax, r in zip(axes[0], results):
        names = list(r["sets"])
        x = np.arange(len(names))
        n_src = len(r["sources"])
        w = 0.8 / n_src
        for i, src in enumerate(r["sources"]):
            vals = [r["sets"][s]["delta"][i] for s in names]
            err = [r["sets"][s]["delta_sem"][i] for s in names]
            ax.bar(x + (i - (n_src - 1) / 2) * w, vals, w, yerr=err, label=src, color=colors[i % len(colors)])
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{r['category']} ({r['n_positions']} positions)", fontsize=9)
        ax.set_ylabel("mean target-logit change")
        ax.legend(fontsize=7)
    return savefig(fig, path)


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``fastxc ablate``."""
    from fastxc.analysis.inputs import parser

    p = parser("fastxc ablate", "Zero-ablate reasoning features and report the marker-logit change (seed Fig. 2).",
               store_required=True)
    p.add_argument("--category", action="append", default=None,
                   help="category to ablate (repeatable; default: all of --categories / the seed's four)")
    p.add_argument("--categories", default=None, help='JSON file {"name": ["Marker", ...]}')
    p.add_argument("--features", default=None, help="also ablate this comma-separated feature set")
    p.add_argument("--n-positions", type=int, default=100, help="marker positions sampled per category")
    p.add_argument("--percents", default=",".join(f"{v:g}" for v in PERCENTS), help="top-k%% sets")
    p.add_argument("--positions", default="all", choices=("all", "last"), help="ablate at every position or only the predicting one")
    p.add_argument("--min-freq", type=float, default=0.0,
                   help="a feature is active on a category when it fires on more than this fraction of its positions")
    p.add_argument("--context", type=int, default=128, help="tokens of context before each marker position")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fastxc.analysis.inputs import inputs_from_args, out_dir, run_cli, write_json

    args = build_parser().parse_args(argv)

    def body() -> int:
        try:
            percents = [float(v) for v in args.percents.split(",") if v.strip()]
            extra = {"custom": [int(v) for v in args.features.split(",") if v.strip()]} if args.features else None
        except ValueError:
            raise AnalysisError("--percents and --features take comma-separated numbers") from None
        inp = inputs_from_args(args)
        cats = load_categories(args.categories)  # before the models load: a bad file fails at once
        names = args.category or list(cats)
        for c in names:
            if c not in cats:
                raise AnalysisError(f"unknown category {c!r}; known: {', '.join(cats)}")
        inp.models()
        out = out_dir(args, "runs/fastxc-ablate")
        results = []
        for c in names:
            try:
                r = ablate_category(inp, c, cats[c], args.n_positions, percents, args.context, args.seed,
                                    args.batch_size, positions=args.positions, extra_sets=extra,
                                    min_freq=args.min_freq)
            except AnalysisError as e:
                if "no position before" in str(e) and len(names) > 1:
                    print(f"{c}: skipped ({e})")
                    continue
                raise
            results.append(r)
            print(f"{c} ({r['n_positions']} positions; clean logit " +
                  ", ".join(f"{s} {v:.2f}" for s, v in zip(r["sources"], r["clean_logit"])) + ")")
            for name, s in r["sets"].items():
                print(f"  {name:10s} {s['n_features']:5d} features  logit change " +
                      ", ".join(f"{src} {d:+.3f}" for src, d in zip(r["sources"], s["delta"])))
        if not results:
            raise AnalysisError("no category has marker positions in the store")
        write_json(out / "ablate.json", {"results": results})
        plot_ablation(results, out / "ablate.png")
        print(f"wrote {out}/ablate.json, ablate.png")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
