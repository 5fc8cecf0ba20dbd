"""Steering (seed section 5, Figure 3; seed 003): add a direction to a model's residual stream
while it generates, and measure thinking length and reasoning-marker counts.

Directions, all in the model's raw residual units [d]:

- a crosscoder feature k for source i: W_dec[k, src_i] / input_scale_i, so alpha is in units
  of the feature's activation (alpha = the feature's mean activation adds what the feature adds
  when it fires at its mean); several features add their rows;
- difference of means (seed 003): mean activation of one model at positions just before a
  marker minus its mean at all other positions (raw store rows), to be applied to *another*
  model of the same width.

The direction is added (times alpha) to the input of layer L at every position, prompt and
generated tokens alike. CLI: ``python -m fastxc.analysis.steer --crosscoder DIR --store DIR --feature K
--prompts FILE``.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastxc.analysis.inputs import decoder_slice
from fastxc.core.crosscoder import Crosscoder
from fastxc.analysis.hooks import AnalysisError, edit_residual
from fastxc.data.models import hidden_size
from fastxc.analysis.reasoning import DEFAULT_CATEGORIES, marker_rows

THINK_CLOSE = "</think>"


def feature_direction(cc: Crosscoder, features: Sequence[int], source: int) -> torch.Tensor:
    """Sum of the features' decoder rows for ``source`` in raw model units: [d_source]."""
    if not features:
        raise AnalysisError("no feature to steer with")
    return decoder_slice(cc, source, list(features)).sum(0)


@torch.no_grad()
def diff_means_direction(reader, tokenizer, words: Sequence[str], source: int, n_other: int = 20000,
                         seed: int = 0) -> torch.Tensor:
    """Mean raw activation of ``source`` just before a marker minus its mean elsewhere: [d]."""
    pos = marker_rows(reader, tokenizer, words, "before")
    if len(pos) == 0:
        raise AnalysisError(f"no position before the markers {list(words)} in store {reader.path}")
    rng = np.random.default_rng(seed)
    is_pos = np.zeros(len(reader), dtype=bool)
    is_pos[pos] = True
    others = np.flatnonzero(~is_pos)
    others = np.sort(rng.choice(others, min(n_other, len(others)), replace=False))
    pos = np.sort(rng.choice(pos, min(n_other, len(pos)), replace=False))

    def mean(rows):
        x = reader.read_rows(rows, normalise=False)
        x = x.reshape(len(rows), -1)
        lo = int(np.sum(reader.widths[:source]))
        return x[:, lo : lo + reader.widths[source]].double().mean(0)

    return (mean(pos) - mean(others)).float()


PREDICT_METHODS = ("f1", "ablation")


def most_predictive_feature(inp, words: Sequence[str], source: int = 1, nrn_min: float = 0.5,
                            method: str = "f1", max_candidates: int = 32, n_positions: int = 64,
                            context: int = 128, seed: int = 0, max_rows: int | None = 200_000
                            ) -> tuple[int, list[tuple[int, float]]]:
    """The ``source``-leaning feature that best predicts the markers.

    Candidates: features active just before the markers whose NRN leans to ``source`` (NRN >
    nrn_min for source 1, NRN < 1 - nrn_min for source 0). ``method``:

    - ``"f1"``: "the feature fires" as a predictor of "the next token is a marker" over store
      rows: F1 of its precision and recall (score higher = better);
    - ``"ablation"``: how much ablating the feature alone lowers the marker's logit in model
      ``source`` (the ``max_candidates`` most frequent candidates; score = logit change, more
      negative = better).

    Returns (feature, [(feature, score)] best first).
    """
    from fastxc.analysis.diff import feature_activity, relative_norms
    from fastxc.analysis.reasoning import category_activity

    if method not in PREDICT_METHODS:
        raise AnalysisError(f"method must be one of {PREDICT_METHODS}, got {method!r}")
    cc, reader = inp.crosscoder, inp.reader
    if reader is None:
        raise AnalysisError("choosing a feature needs --store")
    rows = marker_rows(reader, inp.tokenizer(), words, "before")
    if len(rows) == 0:
        raise AnalysisError(f"no position before the markers {list(words)} in store {reader.path}")
    act = category_activity(cc, reader, rows)
    nrn = relative_norms(cc, 0, 1).nrn
    lean = nrn > nrn_min if source == 1 else nrn < 1 - nrn_min
    cand = [int(k) for k in act.active if lean[k]]
    if not cand:
        raise AnalysisError(f"no feature active before {list(words)} leans to source {source}")
    if method == "ablation":
        from fastxc.analysis.ablate import rank_features

        ranking = rank_features(inp, words, cand[:max_candidates], source, n_positions, context, seed)
        return ranking[0][0], ranking
    scan = min(len(reader), max_rows) if max_rows else len(reader)
    rows_in = rows[rows < scan]
    if len(rows_in) == 0:
        raise AnalysisError(f"no marker position among the first {scan} store rows")
    fired_all = feature_activity(cc, reader, n_rows=scan, n_top=1).freq * scan  # rows where each fires
    recall = category_activity(cc, reader, rows_in).freq
    hits = recall * len(rows_in)
    precision = hits / fired_all.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    ranking = sorted(((k, float(f1[k])) for k in cand), key=lambda t: -t[1])
    return ranking[0][0], ranking


@dataclass
class Generation:
    prompt: str
    text: str  # generated text (special tokens kept, EOS and padding removed)
    n_tokens: int  # generated tokens (EOS included)
    think_tokens: int  # tokens until </think> (n_tokens when it never closes)
    closed: bool  # </think> was generated


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], layer: int, direction: torch.Tensor | None = None,
             alpha: float = 0.0, max_new_tokens: int = 96, temperature: float = 0.7, seed: int = 0,
             batch_size: int = 16) -> list[Generation]:
    """Sample a completion of every prompt with ``alpha * direction`` added at layer ``layer``.

    temperature 0 is greedy. Sampling is plain (no top-k / top-p) and seeded per batch, so the
    steered and unsteered runs draw from the same random stream.
    """
    if direction is not None and direction.numel() != hidden_size(model):
        raise AnalysisError(f"steering direction has {direction.numel()} entries but the model's residual width is "
                            f"{hidden_size(model)}")
    dev = next(model.parameters()).device
    tokenizer.padding_side = "left"  # generation appends on the right
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE) if THINK_CLOSE in tokenizer.get_vocab() else None
    vec = None if direction is None else (float(alpha) * direction.float()).to(dev)
    out: list[Generation] = []
    for lo in range(0, len(prompts), batch_size):
        batch = list(prompts[lo : lo + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(dev)
        torch.manual_seed(seed + lo)
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        ctx = edit_residual(model, layer, lambda h: h + vec.to(h.dtype)) if vec is not None else contextlib.nullcontext()
        with ctx:
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **kw)
        gen = gen[:, enc["input_ids"].shape[1] :].tolist()
        for p, row in zip(batch, gen):
            ended = eos is not None and eos in row
            row = row[: row.index(eos) + 1] if ended else row
            body = [t for t in row if t != eos and t != pad]
            if close_id is not None and close_id in row:
                think, closed = row.index(close_id), True
            else:
                text_so_far = tokenizer.decode(body, skip_special_tokens=False)
                closed = THINK_CLOSE in text_so_far
                think = len(row) if not closed else len(tokenizer(text_so_far.split(THINK_CLOSE)[0], add_special_tokens=False)["input_ids"])
            out.append(Generation(p, tokenizer.decode(body, skip_special_tokens=False), len(row), think, closed))
    return out


def count_words(text: str, words: Sequence[str]) -> int:
    return len(re.findall(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", text))


def marker_stats(gens: Sequence[Generation], categories: dict | None = None) -> dict:
    """Thinking length, close rate and marker counts / rates per generated token."""
    cats = categories or DEFAULT_CATEGORIES
    tokens = sum(g.n_tokens for g in gens)
    n = max(len(gens), 1)
    s = {"n": len(gens), "tokens": tokens, "mean_tokens": tokens / n,
         "mean_think_tokens": sum(g.think_tokens for g in gens) / n,
         "close_rate": sum(g.closed for g in gens) / n, "markers": {}, "rate": {}}
    for name, words in cats.items():
        c = sum(count_words(g.text, words) for g in gens)
        s["markers"][name] = c
        s["rate"][name] = c / max(tokens, 1)
    return s


def steer_sweep(model, tokenizer, prompts: Sequence[str], layer: int, direction: torch.Tensor,
                alphas: Sequence[float], categories: dict | None = None, **gen_kw) -> list[dict]:
    """``marker_stats`` of the generations at each alpha (alpha 0: the unsteered run)."""
    res = []
    for a in alphas:
        gens = generate(model, tokenizer, prompts, layer, direction, float(a), **gen_kw)
        res.append({"alpha": float(a), **marker_stats(gens, categories), "samples": [asdict(g) for g in gens]})
    return res


def plot_sweep(sweep: Sequence[dict], path: Path, title: str = "") -> Path:
    """Marker rates and thinking length against alpha."""
    from fastxc.analysis.inputs import pyplot, savefig

    plt = pyplot()
    a = [r["alpha"] for r in sweep]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.5, 3.2))
    for name in sweep[0]["rate"]:
        ax1.plot(a, [r["rate"][name] for r in sweep], marker="o", label=name)
    ax1.set_xlabel("alpha")
    ax1.set_ylabel("markers per generated token")
    ax1.legend(fontsize=7)
    ax2.plot(a, [r["mean_think_tokens"] for r in sweep], marker="o", color="#cc3311")
    ax2.set_xlabel("alpha")
    ax2.set_ylabel("mean thinking length (tokens)")
    return savefig(fig, path, title, title_size=9)


def _cli_direction(args, inp, cats: dict, target: int, feats: list[int],
                   auto: str | None) -> tuple[torch.Tensor, str, float]:
    """The steering direction the flags ask for -> (direction [d], description, alpha unit)."""
    cc, unit = inp.crosscoder, 1.0
    if auto:
        if auto not in cats:
            raise AnalysisError(f"unknown category {auto!r}; known: {', '.join(cats)}")
        best, ranking = most_predictive_feature(inp, cats[auto], target, method=args.predict_by, seed=args.seed)
        print(f"most {auto}-predictive feature of {cc.source_names[target]}: {best} "
              f"({args.predict_by} score {ranking[0][1]:+.3f})")
        feats = [best]
    if not feats:
        if args.diff_means not in cats:
            raise AnalysisError(f"unknown category {args.diff_means!r}; known: {', '.join(cats)}")
        if inp.reader is None:
            raise AnalysisError("--diff-means needs --store")
        src = 0 if args.direction_from == "a" else 1
        direction = diff_means_direction(inp.reader, inp.tokenizer(), cats[args.diff_means], src, seed=args.seed)
        return direction, f"difference of means before {args.diff_means} markers in {cc.source_names[src]}", unit
    direction = feature_direction(cc, feats, target)
    if args.alpha_unit == "mean":
        if inp.reader is None:
            raise AnalysisError("--alpha-unit mean needs --store (to measure the features' mean activation)")
        from fastxc.analysis.diff import feature_activity

        act = feature_activity(cc, inp.reader, n_rows=min(len(inp.reader), 50000), n_top=1)
        unit = float(act.mean_act[feats].mean())
        if unit <= 0:
            raise AnalysisError(f"features {feats} never fire in the store: no mean activation to scale by")
    return direction, f"features {feats} of {cc.source_names[target]}", unit


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``fastxc steer``."""
    from fastxc.analysis.inputs import parser

    p = parser("fastxc steer", "Steer a model with crosscoder features or difference-of-means directions.")
    p.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl with --prompt-field")
    p.add_argument("--prompt-field", default="question", help="field of the --prompts .jsonl records holding the prompt")
    p.add_argument("--suffix", default="", help="appended to every prompt, e.g. ' <think>'")
    p.add_argument("--n-prompts", type=int, default=32, help="prompts read from --prompts (the first N)")
    p.add_argument("--steer", default="b", choices=("a", "b"), help="which model to steer (source 0 = a, 1 = b)")
    p.add_argument("--feature", default=None,
                   help="comma-separated crosscoder features to add, or 'auto:CATEGORY': the steered model's "
                        "most marker-predictive leaning feature (see --predict-by)")
    p.add_argument("--predict-by", default="f1", choices=PREDICT_METHODS,
                   help="how --feature auto picks: F1 of firing vs the next token being a marker, or single-feature ablation")
    p.add_argument("--diff-means", default=None, metavar="CATEGORY",
                   help="steer with the difference-of-means direction of a marker category instead")
    p.add_argument("--direction-from", default="a", choices=("a", "b"), help="model whose activations give --diff-means")
    p.add_argument("--categories", default=None, help='JSON file {"name": ["Marker", ...]}')
    p.add_argument("--alphas", default="0,1,2,4,8", help="comma-separated steering strengths")
    p.add_argument("--alpha-unit", default="mean", choices=("mean", "raw"),
                   help="mean: alphas are multiples of the features' mean activation (needs --store); raw: as given")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument("--show", type=int, default=3, help="completions printed steered vs unsteered")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fastxc.analysis.inputs import inputs_from_args, out_dir, read_texts, run_cli, write_json
    from fastxc.analysis.reasoning import load_categories

    args = build_parser().parse_args(argv)

    def body() -> int:
        auto = args.feature.split(":", 1)[1] if args.feature and args.feature.startswith("auto:") else None
        try:
            alphas = [float(v) for v in args.alphas.split(",") if v.strip()]
            feats = [int(v) for v in args.feature.split(",") if v.strip()] if args.feature and not auto else []
        except ValueError:
            raise AnalysisError("--alphas and --feature take comma-separated numbers (or --feature auto:CATEGORY)") from None
        if bool(feats or auto) == bool(args.diff_means):
            raise AnalysisError("give exactly one of --feature or --diff-means")
        inp = inputs_from_args(args)
        cc = inp.crosscoder
        target = 0 if args.steer == "a" else 1
        if target >= cc.n_sources:
            raise AnalysisError(f"the crosscoder has {cc.n_sources} source(s): no model {args.steer}")
        # the small inputs first: a bad prompts or categories file fails before any model loads
        prompts = [q + args.suffix for q in read_texts(args.prompts, args.prompt_field, args.n_prompts)]
        cats = load_categories(args.categories)
        models, tok = inp.models(), inp.tokenizer()
        direction, desc, unit = _cli_direction(args, inp, cats, target, feats, auto)
        sweep = steer_sweep(models[target], tok, prompts, inp.layer, direction, [a * unit for a in alphas], cats,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
        out = out_dir(args, "runs/fastxc-steer")
        res = {"direction": desc, "steered_model": inp.model_names[target], "layer": inp.layer, "alpha_unit": unit,
               "alphas": alphas, "sweep": sweep}
        write_json(out / "steer.json", res)
        plot_sweep(sweep, out / "steer.png", f"steering {cc.source_names[target]} with {desc}")
        base = next((r for r in sweep if r["alpha"] == 0), None)
        for r in sweep:
            print(f"alpha {r['alpha']:8.3f}: think {r['mean_think_tokens']:6.1f} tok, closed {r['close_rate']:.2f}, "
                  + ", ".join(f"{k} {v:.4f}/tok" for k, v in r["rate"].items()))
        strongest = sweep[-1]
        for j in range(min(args.show, len(prompts))):
            print(f"\n--- prompt: {prompts[j]}")
            if base is not None:
                print(f"unsteered:      {base['samples'][j]['text']}")
            print(f"alpha {strongest['alpha']:.3g}: {strongest['samples'][j]['text']}")
        print(f"\nwrote {out}/steer.json, steer.png")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
