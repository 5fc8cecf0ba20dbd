"""Feature geometry (seed section 6, eq. 8, Figure 4): parallelogram loss of word-pair analogies.

For a function class (pairs (a, b) related by one function, e.g. he:she, Tom:Ann), every two
pairs (a, b), (c, d) form a parallelogram a:b :: c:d. With E the PCA-reduced layer-L input
activations of the words,

    loss = ||E_a - E_b - E_c + E_d|| / sqrt(||E_a||^2 + ||E_b||^2 + ||E_c||^2 + ||E_d||^2)   (eq. 8)

over all unordered pairs of pairs. A word's activation is the layer input at its token when the
model reads ``[BOS] word`` (single-token words only, the seed's rule; " word" with a leading space
is preferred, as in running text). PCA is fitted per model on all the words it is evaluated on.
The word-pair set shipped in ``fastxc/analysis/word_pairs.json``; users pass their own JSON
``{"class": [["a", "b"], ...]}``.

A class is skipped for a model (and says so: JSON ``degenerate``, stdout, plot legend) where the
model cannot tell the words of one side apart: all its first words, or all its second words,
sit at one point (pairwise distances below ``DEGENERATE_TOL`` x the model's median distance
between the evaluated words). A model whose digit embeddings are all zero would otherwise score
a perfect loss 0 on "successor" (1:2 :: 2:3 is then 0 - 0 - 0 + 0).
CLI: ``python -m fastxc.analysis.geometry --model-a A --model-b B --layer L [--pairs FILE] [--dims 2,10,20]``.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastxc.analysis.hooks import AnalysisError, bos_prefix, capture_residual, pad_id_of, read_json
from fastxc.data.models import pad_batch

DEFAULT_PAIRS = Path(__file__).parent / "word_pairs.json"
DEFAULT_DIMS = (2, 10, 20)
# Relative distance below which words' activations count as one point. Measured on the organism
# (recipe v4, seed 0, layer 2): base's zeroed digit embeddings spread 2.2e-8 of the median word
# distance (float32 rounding); the closest two distinct words of either model sit 0.156 apart.
DEGENERATE_TOL = 1e-3


def parallelogram_loss(Ea: torch.Tensor, Eb: torch.Tensor, Ec: torch.Tensor, Ed: torch.Tensor) -> torch.Tensor:
    """Seed eq. 8 over the last dimension: [..., k] x 4 -> [...]."""
    num = (Ea - Eb - Ec + Ed).norm(dim=-1)
    den = (Ea.pow(2).sum(-1) + Eb.pow(2).sum(-1) + Ec.pow(2).sum(-1) + Ed.pow(2).sum(-1)).sqrt()
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def pca(X: torch.Tensor, dims: int) -> torch.Tensor:
    """Project the rows of X [N, d] on their top ``dims`` principal components: [N, dims].

    The data are centred first (the projection of the mean is the origin).
    """
    if X.dim() != 2:
        raise AnalysisError(f"PCA needs a [N, d] matrix, got shape {tuple(X.shape)}")
    N, d = X.shape
    if not 1 <= dims <= min(N, d):
        raise AnalysisError(f"cannot reduce {N} points of width {d} to {dims} PCA dims (at most {min(N, d)})")
    Xc = X.double() - X.double().mean(0)
    U, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    return (Xc @ Vh[:dims].T).to(X.dtype)


def load_word_pairs(path: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Function classes from a JSON file {"class": [["a", "b"], ...]} (keys starting with _ ignored)."""
    p = Path(path) if path is not None else DEFAULT_PAIRS
    raw = read_json(p, "word-pair file")
    if not isinstance(raw, dict):
        raise AnalysisError(f"{p}: expected an object {{class: [[a, b], ...]}}")
    out = {}
    for name, pairs in raw.items():
        if name.startswith("_"):
            continue
        if not isinstance(pairs, list) or not all(isinstance(q, (list, tuple)) and len(q) == 2
                                                  and all(isinstance(w, str) and w for w in q) for q in pairs):
            raise AnalysisError(f"{p}: class {name!r} must be a list of [word, word] pairs")
        out[name] = [(a, b) for a, b in pairs]
    if not out:
        raise AnalysisError(f"{p}: no function class")
    return out


def single_token_id(tokenizer, word: str) -> int | None:
    """The id of `` word`` (preferred) or ``word`` when it is one token, else None.

    The token must decode back to the word: an unknown word that a word-level vocabulary maps to
    its unknown token is no token of the word.
    """
    for form in (" " + word, word):
        ids = tokenizer(form, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and tokenizer.decode(ids).strip() == word:
            return int(ids[0])
    return None


def usable_pairs(tokenizer, classes: dict, min_pairs: int = 2) -> tuple[dict, dict[str, int]]:
    """Keep the pairs whose two words are single tokens; drop classes with < min_pairs of them.

    Returns ({class: [(a, b), ...]}, {word: token id}).
    """
    ids: dict[str, int] = {}
    kept = {}
    for name, pairs in classes.items():
        ok = []
        for a, b in pairs:
            ta, tb = single_token_id(tokenizer, a), single_token_id(tokenizer, b)
            if ta is not None and tb is not None and ta != tb:
                ids[a], ids[b] = ta, tb
                ok.append((a, b))
        if len(ok) >= min_pairs:
            kept[name] = ok
    return kept, {w: ids[w] for name in kept for p in kept[name] for w in p}


def pair_coverage(tokenizer, classes: dict) -> dict[str, dict]:
    """Per class: pairs given, pairs usable (both words single tokens, distinct), and the words
    that are not single tokens for this tokenizer."""
    out = {}
    for name, pairs in classes.items():
        tid = {w: single_token_id(tokenizer, w) for p in pairs for w in p}
        usable = sum(tid[a] is not None and tid[b] is not None and tid[a] != tid[b] for a, b in pairs)
        out[name] = {"pairs": len(pairs), "usable": int(usable),
                     "not_single_tokens": sorted(w for w, t in tid.items() if t is None)}
    return out


@torch.no_grad()
def word_activations(model, tokenizer, layer: int, token_ids: Sequence[int], batch_size: int = 64) -> torch.Tensor:
    """Layer-``layer`` input at each word's token when the model reads ``[BOS] word``: [n, d]."""
    prefix = bos_prefix(tokenizer)
    seqs = [prefix + [int(t)] for t in token_ids]
    dev = next(model.parameters()).device
    out = []
    for lo in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[lo : lo + batch_size], pad_id_of(tokenizer))
        h = capture_residual(model, layer, ids.to(dev), mask.to(dev))
        out.append(h[:, len(prefix)].cpu())
    return torch.cat(out)


def class_losses(E: dict[str, torch.Tensor], pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Parallelogram loss over all unordered pairs of pairs of one class: [n (n - 1) / 2]."""
    combos = list(itertools.combinations(range(len(pairs)), 2))
    if not combos:
        return torch.zeros(0)
    a = torch.stack([E[pairs[i][0]] for i, _ in combos])
    b = torch.stack([E[pairs[i][1]] for i, _ in combos])
    c = torch.stack([E[pairs[j][0]] for _, j in combos])
    d = torch.stack([E[pairs[j][1]] for _, j in combos])
    return parallelogram_loss(a.double(), b.double(), c.double(), d.double()).float()


def degenerate_classes(X: torch.Tensor, words: Sequence[str], classes: dict,
                       tol: float = DEGENERATE_TOL) -> dict[str, str]:
    """Classes whose first or second words collapse to one point in activations X [n_words, d].

    Returns {class: reason}. The scale is the median distance between distinct evaluated words.
    """
    D = torch.cdist(X.double(), X.double())
    off = D[~torch.eye(len(words), dtype=torch.bool)]
    scale = float(off.median()) if off.numel() else 0.0
    if scale == 0.0:  # most words at one point: nothing in this model can be compared
        return {c: "the model maps most evaluated words to one point" for c in classes}
    at = {w: i for i, w in enumerate(words)}
    out = {}
    for cls, pairs in classes.items():
        for side, name in ((0, "first"), (1, "second")):
            idx = sorted({at[p[side]] for p in pairs})
            if len(idx) < 2:
                continue
            spread = float(D[idx][:, idx].max()) / scale
            if spread < tol:
                ws = sorted({p[side] for p in pairs})
                out[cls] = (f"all {len(ws)} {name} words ({', '.join(ws[:6])}{', ...' if len(ws) > 6 else ''}) "
                            f"are one point (spread {spread:.1e} of the median word distance)")
                break
    return out


def geometry_analysis(models: Sequence, names: Sequence[str], tokenizer, layer: int, classes: dict | None = None,
                      dims: Sequence[int] = DEFAULT_DIMS, out: str | Path | None = None) -> dict:
    """Parallelogram losses per class, model and PCA dimension (+ one CDF PNG per dimension).

    Returns {"classes": {class: pairs}, "losses": {dims: {class: {model: [losses] or None}}},
    "median": ..., "degenerate": {model: {class: reason}}}: None where the class is degenerate
    for that model (see ``degenerate_classes``).
    """
    classes = load_word_pairs(None) if classes is None else classes
    kept, ids = usable_pairs(tokenizer, classes)
    if not kept:
        raise AnalysisError("no function class has 2 pairs of single-token words for this tokenizer")
    words = list(ids)
    if any(k > len(words) for k in dims):
        raise AnalysisError(f"PCA to {max(dims)} dims needs at least that many words; only {len(words)} are single tokens")
    res = {"classes": {k: [list(p) for p in v] for k, v in kept.items()}, "skipped": sorted(set(classes) - set(kept)),
           "coverage": pair_coverage(tokenizer, classes), "models": list(names), "layer": layer,
           "n_words": len(words), "degenerate": {}, "losses": {}, "median": {}}
    acts = [word_activations(m, tokenizer, layer, [ids[w] for w in words]) for m in models]
    for name, a in zip(names, acts):
        res["degenerate"][name] = degenerate_classes(a, words, kept)
    for k in dims:
        res["losses"][str(k)] = {}
        res["median"][str(k)] = {}
        reduced = [pca(a, k) for a in acts]
        for cls, pairs in kept.items():
            res["losses"][str(k)][cls] = {}
            res["median"][str(k)][cls] = {}
            for name, R in zip(names, reduced):
                if cls in res["degenerate"][name]:  # no loss: 0 here would read as a perfect model
                    res["losses"][str(k)][cls][name] = None
                    res["median"][str(k)][cls][name] = None
                    continue
                E = {w: R[i] for i, w in enumerate(words)}
                L = class_losses(E, pairs)
                res["losses"][str(k)][cls][name] = L.tolist()
                res["median"][str(k)][cls][name] = float(L.median()) if L.numel() else float("nan")
    if out is not None:
        from fastxc.analysis.inputs import write_json

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for k in dims:
            plot_cdf(res["losses"][str(k)], out / f"geometry_pca{k}.png", f"parallelogram loss, PCA {k}D")
        write_json(out / "geometry.json", res)
    return res


def cdf_figure(losses: dict, title: str | None = None):
    """Seed Figure 4: cumulative fraction against parallelogram loss, one panel per class. A
    model whose losses are None (degenerate class) gets a legend entry saying it was skipped."""
    import math

    from fastxc.analysis.inputs import pyplot

    plt = pyplot()
    cls = list(losses)
    cols = min(4, len(cls))
    rows = math.ceil(len(cls) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.7 * rows), squeeze=False)
    for ax, c in zip(axes.flat, cls):
        for name, L in losses[c].items():
            if L is None:
                ax.plot([], [], ls="none", label=f"{name}: skipped (degenerate)")
                continue
            v = np.sort(np.asarray(L))
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=f"{name} ({len(v)} quads)")
        ax.set_title(c, fontsize=9)
        ax.set_xlim(0, 1.5)
        ax.set_xlabel("parallelogram loss", fontsize=8)
        ax.set_ylabel("cumulative fraction", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cls):]:
        ax.axis("off")
    if title is not None:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_cdf(losses: dict, path: Path, title: str) -> Path:
    """``cdf_figure`` saved as PNG."""
    from fastxc.analysis.inputs import savefig

    return savefig(cdf_figure(losses, title), path)


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``fastxc geometry``."""
    from fastxc.analysis.inputs import parser

    p = parser("fastxc geometry", "Parallelogram loss of word-pair analogies on PCA-reduced activations (seed Fig. 4).")
    p.add_argument("--pairs", default=None, help='word-pair JSON {"class": [["a", "b"], ...]} (default: the shipped set)')
    p.add_argument("--dims", default=",".join(map(str, DEFAULT_DIMS)), help="PCA dimensions")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fastxc.analysis.inputs import inputs_from_args, out_dir, run_cli

    args = build_parser().parse_args(argv)

    def body() -> int:
        try:
            dims = [int(v) for v in args.dims.split(",") if v.strip()]
        except ValueError:
            raise AnalysisError("--dims takes comma-separated integers") from None
        inp = inputs_from_args(args)
        pairs = load_word_pairs(args.pairs)  # before the models load: a bad file fails at once
        models, tok = inp.models(), inp.tokenizer()
        out = out_dir(args, "runs/fastxc-geometry")
        res = geometry_analysis(models, inp.source_names, tok, inp.layer, pairs, dims, out)
        for k in dims:
            print(f"PCA {k}D: median parallelogram loss")
            for c, per in res["median"][str(k)].items():
                print(f"  {c:16s} " + "  ".join(f"{n} {'skipped' if v is None else f'{v:.3f}'}" for n, v in per.items()))
        for name, bad in res["degenerate"].items():
            for c, why in bad.items():
                print(f"skipped for {name}: {c}: {why}")
        for c, cov in res["coverage"].items():
            if cov["not_single_tokens"]:
                print(f"{c}: {cov['usable']} of {cov['pairs']} pairs usable; not single tokens: "
                      f"{', '.join(cov['not_single_tokens'])}")
        if res["skipped"]:
            print(f"skipped (fewer than 2 single-token pairs): {', '.join(res['skipped'])}")
        print(f"wrote {out}/geometry.json, geometry_pca*.png")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
