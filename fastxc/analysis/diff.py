"""Model diffing from a crosscoder's decoder norms (seed paper eqs. 6-7).

RDN_k = ||W_dec[k, B]|| / ||W_dec[k, A]||  and  NRN_k = RDN_k / (1 + RDN_k) = |B| / (|A| + |B|).
NRN ~ 0.5: shared; -> 1: unique to B; -> 0: unique to A. The seed study uses the L1 norm of the
decoder vectors; ``ord=2`` gives the L2 variant. ``--latent-scaling`` checks the latents whose
NRN calls them exclusive for the sparsity artefacts of Minder et al. 2025
(``fastxc.analysis.latent_scaling``).
"""
from __future__ import annotations

import argparse
from typing import Callable, NamedTuple, Sequence

import numpy as np

import torch
from torch import Tensor

from fastxc.analysis import latent_scaling as LS
from fastxc.core.crosscoder import Crosscoder
from fastxc.core.norms import (CLASS_NAMES, ONLY_A_MAX, ONLY_B_MIN, classify, decoder_cosine, relative_norms,
                               text_histogram)


class FeatureActivity(NamedTuple):
    """Per-feature statistics over store rows."""

    freq: Tensor  # [F] fraction of rows where the feature is active
    mean_act: Tensor  # [F] mean activation over the rows where it is active (0 if never)
    max_act: Tensor  # [F] largest activation seen
    top_rows: Tensor  # [F, n_top] int64 rows of the largest activations (-1: fewer seen)
    top_vals: Tensor  # [F, n_top] their activations
    rows: int  # rows scanned


@torch.no_grad()
def feature_activity(model: Crosscoder, reader, n_rows: int | None = None, batch_size: int = 2048,
                     n_top: int = 8) -> FeatureActivity:
    """Scan the first ``n_rows`` store rows (all by default) in order: frequency, mean and max
    activation and the ``n_top`` top-activating rows of every feature."""
    if list(reader.widths) != list(model.widths):
        raise ValueError(f"crosscoder widths {model.widths} do not match the store's widths {list(reader.widths)}")
    n = len(reader) if n_rows is None else min(int(n_rows), len(reader))
    F = model.n_features
    dev = model.W_enc.device
    count = torch.zeros(F, dtype=torch.float64, device=dev)
    total = torch.zeros(F, dtype=torch.float64, device=dev)
    mx = torch.zeros(F, device=dev)
    top_v = torch.full((F, n_top), -1.0, device=dev)
    top_r = torch.full((F, n_top), -1, dtype=torch.long, device=dev)
    for lo in range(0, n, batch_size):
        rows = np.arange(lo, min(lo + batch_size, n))
        x = model.flatten_input(reader.read_rows(rows).to(dev, model.W_enc.dtype))
        f = model.encode(x).float()
        count += (f > 0).sum(0).double()
        total += f.sum(0).double()
        mx = torch.maximum(mx, f.max(0).values)
        k = min(n_top, f.shape[0])
        v, i = f.topk(k, dim=0)  # [k, F]
        cand_v = torch.cat([top_v, v.t()], dim=1)
        cand_r = torch.cat([top_r, torch.as_tensor(rows, device=dev)[i].t()], dim=1)
        top_v, j = cand_v.topk(n_top, dim=1)
        top_r = cand_r.gather(1, j)
    top_r = torch.where(top_v > 0, top_r, torch.full_like(top_r, -1))
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    return FeatureActivity((count / max(n, 1)).float().cpu(), mean.float().cpu(), mx.cpu(), top_r.cpu(),
                           top_v.clamp_min(0).cpu(), n)


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own (special tokens kept), for display."""
    return [tokenizer.decode([int(t)], skip_special_tokens=False) for t in ids]


@torch.no_grad()
def feature_contexts(model: Crosscoder, reader, tokenizer, feature: int, rows: Sequence[int],
                     left: int = 12, right: int = 4) -> list[dict]:
    """Token contexts around ``rows`` (within one document) with ``feature``'s activation per token.

    Each context: {"row", "activation", "tokens" [str], "acts" [float], "focus" (index of the row
    in tokens), "text" (tokens joined, the focus token in [[ ]])}.
    """
    from fastxc.analysis.hooks import same_doc_next

    if reader.tokens is None:
        raise ValueError(f"store {reader.path} keeps no token ids: no contexts")
    tokens = reader.tokens
    cont = same_doc_next(reader)
    out = []
    for r in rows:
        r = int(r)
        if r < 0:
            continue
        lo = r
        while lo > 0 and r - lo < left and cont[lo - 1]:
            lo -= 1
        hi = r
        while hi < len(reader) - 1 and hi - r < right and cont[hi]:
            hi += 1
        span = np.arange(lo, hi + 1)
        x = model.flatten_input(reader.read_rows(span).to(model.W_enc.device, model.W_enc.dtype))
        acts = model.encode(x)[:, feature].float().cpu().tolist()
        toks = token_strings(tokenizer, tokens[span])
        focus = r - lo
        text = "".join(f"[[{t}]]" if j == focus else t for j, t in enumerate(toks))
        out.append({"row": r, "activation": acts[focus], "tokens": toks, "acts": [round(a, 5) for a in acts],
                    "focus": focus, "text": text})
    return out


# ---------------------------------------------------------------------------- report pieces
def plot_nrn_histogram(nrn: Tensor, path, title: str = "", bins: int = 50, names: Sequence[str] = ("A", "B")):
    """Seed Figure 1 (right): the distribution of NRN over features, log count axis. PNG."""
    from fastxc.analysis.inputs import pyplot, savefig

    plt = pyplot()
    v = nrn[~torch.isnan(nrn)].float().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(v, bins=bins, range=(0, 1), color="#4477aa", edgecolor="white", linewidth=0.3)
    ax.set_yscale("log")
    ax.set_xlabel(f"normalised relative norm  (0: only {names[0]}, 1: only {names[1]})")
    ax.set_ylabel("features")
    ax.set_title(title or f"NRN of {len(v)} features, mean {v.mean():.3f}" if len(v) else "no live features")
    return savefig(fig, path, tight_layout=False)


def export_features_jsonl(path, records: Sequence[dict], annotate: Callable[[dict], str] | None = None) -> int:
    """Write one JSON object per feature (ready for annotation by an LLM); returns the count.

    ``annotate(record) -> str`` (e.g. a call to any LLM with the record's contexts) fills the
    record's ``annotation``; none is called unless given.
    """
    import json
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        for rec in records:
            rec = dict(rec)
            rec["annotation"] = annotate(rec) if annotate is not None else None
            fh.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
    return len(records)


ANNOTATION_PROMPT = (
    "Below are the top-activating contexts of one sparse-crosscoder feature; the token where it fires is in "
    "[[ ]]. Describe in one short phrase what the feature detects."
)


def diff_analysis(model: Crosscoder, reader=None, tokenizer=None, out=None, *, a: int = 0, b: int = 1,
                  ord: int = 1, only_a_max: float = ONLY_A_MAX, only_b_min: float = ONLY_B_MIN,
                  top_n: int = 20, n_examples: int = 5, n_rows: int | None = None,
                  annotate: Callable[[dict], str] | None = None, activity: FeatureActivity | None = None,
                  latent_scaling: bool = False, exclusive_nrn: float = LS.EXCLUSIVE_NRN,
                  nu_eps_max: float = LS.NU_EPS_MAX, nu_r_max: float = LS.NU_R_MAX, progress: bool = False) -> dict:
    """RDN/NRN/cosine per feature, classes, average NRN, the NRN histogram (PNG) and the top and
    bottom ``top_n`` live features by NRN with their top-activating contexts (JSONL).

    Live features: those that fire on the scanned store rows (all features without a store).
    Writes into ``out`` (when given): diff.json, nrn_hist.png, features.jsonl. Returns the summary.

    ``latent_scaling=True`` (needs ``reader`` and equal widths of sources a and b) adds the latent
    scaling of every latent (``fastxc.analysis.latent_scaling``): the verdict counts among the
    latents with NRN > ``exclusive_nrn`` (and < 1 - it) in ``summary["latent_scaling"]``, each
    exported record's nu_eps, nu_r and verdict, and latent_scaling.json (every latent) and
    latent_scaling.png in ``out``.
    """
    from pathlib import Path

    from fastxc.analysis.inputs import write_json

    if latent_scaling:  # before any work
        LS.check_sources(model, a, b)
        if reader is None:
            raise ValueError("latent scaling needs the store the crosscoder was trained on (--store)")
    rn = relative_norms(model, a, b, ord)
    cos = decoder_cosine(model, a, b) if model.widths[a] == model.widths[b] else None
    if reader is not None and activity is None:
        activity = feature_activity(model, reader, n_rows, n_top=max(n_examples, 1))
    live = activity.freq > 0 if activity is not None else torch.ones(model.n_features, dtype=torch.bool)
    live &= ~torch.isnan(rn.nrn)
    nrn_live = rn.nrn[live]
    cls = classify(rn.nrn, only_a_max, only_b_min)
    names = [model.source_names[a], model.source_names[b]]
    summary = {
        "sources": names, "ord": ord, "n_features": model.n_features, "live_features": int(live.sum()),
        "rows_scanned": activity.rows if activity is not None else 0,
        "nrn_mean": float(nrn_live.mean()) if nrn_live.numel() else float("nan"),
        "cutoffs": {"only_a_max": only_a_max, "only_b_min": only_b_min},
        "classes": {n: int(((cls == i) & live).sum()) for i, n in enumerate(CLASS_NAMES)},
        "nrn_histogram_20": torch.histc(nrn_live, bins=20, min=0, max=1).int().tolist(),
    }
    ls = verdict = None
    if latent_scaling:
        ls = LS.latent_scaling(model, reader, a, b, ord, n_rows, progress=progress)
        verdict = LS.verdicts(ls, rn.nrn, exclusive_nrn, nu_eps_max, nu_r_max)
        summary["latent_scaling"] = LS.summarize(verdict, rn.nrn, names, exclusive_nrn, nu_eps_max, nu_r_max, ls.rows)
    order = torch.argsort(torch.where(live, rn.nrn, torch.full_like(rn.nrn, float("nan"))).nan_to_num(-1.0), descending=True)
    n_live = int(live.sum())
    top = order[: min(top_n, n_live)].tolist()
    bottom = order[:n_live].flip(0)[: min(top_n, n_live)].tolist()
    records = []
    for group, feats in (("top", top), ("bottom", bottom)):
        for rank, k in enumerate(feats):
            rec = {"feature": k, "group": group, "rank": rank, "nrn": float(rn.nrn[k]), "rdn": float(rn.rdn[k]),
                   "class": CLASS_NAMES[int(cls[k])],
                   "cosine": float(cos[k]) if cos is not None else None,
                   "decoder_norms": model.decoder_norms()[k].tolist()}
            if activity is not None:
                rec.update(freq=float(activity.freq[k]), mean_act=float(activity.mean_act[k]),
                           max_act=float(activity.max_act[k]))
                if tokenizer is not None and reader is not None and reader.tokens is not None and n_examples > 0:
                    rows = [r for r in activity.top_rows[k, :n_examples].tolist() if r >= 0]
                    rec["contexts"] = feature_contexts(model, reader, tokenizer, k, rows)
            if ls is not None:
                rec.update(nu_eps=LS.finite_or_none(ls.nu_eps[k]), nu_r=LS.finite_or_none(ls.nu_r[k]),
                           verdict=verdict[k])
            rec["prompt"] = ANNOTATION_PROMPT
            records.append(rec)
    summary["top_features"] = top
    summary["bottom_features"] = bottom
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_nrn_histogram(nrn_live, out / "nrn_hist.png", names=names)
        export_features_jsonl(out / "features.jsonl", records, annotate)
        if ls is not None:
            write_json(out / "latent_scaling.json", {**summary["latent_scaling"], **LS.per_latent(ls, verdict, rn.nrn)})
            LS.plot_latent_scaling(ls, verdict, rn.nrn, out / "latent_scaling.png", names, exclusive_nrn,
                                   nu_eps_max, nu_r_max)
        write_json(out / "diff.json", summary)
    summary["records"] = records
    summary["nrn_text"] = text_histogram(nrn_live)  # the printed histogram: live features, like the JSON and PNG
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``fastxc diff``."""
    from fastxc.analysis.inputs import parser

    p = parser("fastxc diff", "Relative decoder norms, classes, NRN histogram, top/bottom features with contexts.")
    p.add_argument("--ord", type=int, default=1, choices=(1, 2), help="norm of the decoder vectors (seed: 1)")
    p.add_argument("--only-a-max", type=float, default=ONLY_A_MAX, help="NRN below this: only in model A")
    p.add_argument("--only-b-min", type=float, default=ONLY_B_MIN, help="NRN above this: only in model B")
    p.add_argument("--top-n", type=int, default=20, help="features exported at each end of the NRN order")
    p.add_argument("--examples", type=int, default=5, help="top-activating contexts per exported feature")
    p.add_argument("--rows", type=int, default=None, help="store rows to scan (default: all)")
    p.add_argument("--latent-scaling", action="store_true",
                   help="check the latents NRN calls exclusive for L1 artefacts (Minder et al. 2025; needs --store)")
    p.add_argument("--exclusive-nrn", type=float, default=LS.EXCLUSIVE_NRN,
                   help="latent scaling checks latents with NRN above this or below 1 minus it")
    p.add_argument("--nu-eps-max", type=float, default=LS.NU_EPS_MAX,
                   help="nu_eps above this: complete shrinkage (the other model's error holds the latent)")
    p.add_argument("--nu-r-max", type=float, default=LS.NU_R_MAX,
                   help="nu_r above this: latent decoupling (the other model's reconstruction holds it)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastxc.analysis.diff``: decoder-norm diffing of a crosscoder (seed Figure 1, Table 1)."""
    from fastxc.analysis.inputs import inputs_from_args, out_dir, run_cli

    args = build_parser().parse_args(argv)

    def body() -> int:
        if args.latent_scaling:  # checked before anything is loaded or written
            if args.store is None:
                raise ValueError("--latent-scaling needs --store (the store the crosscoder was trained on)")
            if not 0.5 < args.exclusive_nrn < 1:
                raise ValueError(f"--exclusive-nrn must lie in (0.5, 1), got {args.exclusive_nrn}")
            for flag, v in (("--nu-eps-max", args.nu_eps_max), ("--nu-r-max", args.nu_r_max)):
                if not v > 0:
                    raise ValueError(f"{flag} must be > 0, got {v}")
        inp = inputs_from_args(args)
        cc = inp.crosscoder
        if cc.n_sources < 2:
            raise ValueError("diffing needs a crosscoder with at least 2 sources")
        if args.latent_scaling:
            LS.check_sources(cc)
        tok = None
        if inp.reader is not None and inp.reader.tokens is not None and args.examples > 0:
            tok = inp.tokenizer()
        out = out_dir(args, "runs/fastxc-diff")
        s = diff_analysis(cc, inp.reader, tok, out, ord=args.ord, only_a_max=args.only_a_max,
                          only_b_min=args.only_b_min, top_n=args.top_n, n_examples=args.examples, n_rows=args.rows,
                          latent_scaling=args.latent_scaling, exclusive_nrn=args.exclusive_nrn,
                          nu_eps_max=args.nu_eps_max, nu_r_max=args.nu_r_max, progress=args.latent_scaling)
        a, b = s["sources"]
        print(f"live features {s['live_features']} / {s['n_features']}, mean NRN {s['nrn_mean']:.3f} "
              f"(NRN = |{b}| / (|{a}| + |{b}|), L{args.ord})")
        c = s["classes"]
        print(f"classes: shared {c['shared']}, only-{a} {c['only-A']}, only-{b} {c['only-B']}")
        print(s["nrn_text"])
        if "latent_scaling" in s:
            for line in LS.summary_lines(s["latent_scaling"]):
                print(line)
        extra = ", latent_scaling.json, latent_scaling.png" if "latent_scaling" in s else ""
        print(f"wrote {out}/diff.json, nrn_hist.png, features.jsonl{extra} ({len(s['records'])} features)")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    import sys

    sys.exit(main())
