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
generated tokens alike. A sweep is given as multiples of a unit (alpha = multiple x unit): the
features' mean activation where they fire, or the difference of means itself (its norm); the
JSON records both the multiple and alpha.

Markers are counted as tokens: occurrences of each marker's token spelling in the generated ids
("WaitWait" is two), with substring occurrences in the decoded text beside them as a cross-check.
Coherence is reported with the rates: the fraction of generations whose ``</think>`` closed,
that gave an answer after it, and (where the prompts come with answers) whose answer is right.
CLI: ``python -m fastxc.analysis.steer --crosscoder DIR --store DIR --feature K --prompts FILE``.
Its defaults are the protocol of ``fastxc study`` and the README: the first 50 prompts, up to 160
generated tokens each, at ``DEFAULT_MULTIPLES`` of the mean activation.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
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
from fastxc.analysis.reasoning import DEFAULT_CATEGORIES, count_marker_tokens, marker_rows, marker_sequences

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


PREDICT_METHODS = ("activation", "f1", "ablation")
# "activation" candidates: the live features NRN puts in this top fraction toward the steered
# model, the seed study's "unique to the distilled model" end of the NRN ordering (its section 4).
TOP_NRN = 0.05
# Steering strengths, multiples of the unit: steps of 0.5 up to 2 and then doubling, so that the
# strength where over-thinking starts to break </think> (between 1x and 2x on the organism) is
# resolved, and 8x shows the saturated end.
DEFAULT_MULTIPLES = "0,0.5,1,1.5,2,3,4,8"


def most_predictive_feature(inp, words: Sequence[str], source: int = 1, nrn_min: float = 0.5,
                            method: str = "activation", max_candidates: int = 32, n_positions: int = 64,
                            context: int = 128, seed: int = 0, max_rows: int | None = 200_000,
                            top_nrn: float = TOP_NRN) -> tuple[int, list[tuple[int, float]]]:
    """The ``source``-leaning feature that best predicts the markers.

    ``method``:

    - ``"activation"`` (the seed study's protocol): among the live features (active on any of
      the first ``max_rows`` store rows) whose NRN is in the ``top_nrn`` fraction toward
      ``source`` (the highest NRN for source 1, the lowest for source 0), the one with the
      largest mean activation over the positions just before the markers (score: that mean);

    For the other two, candidates are the features active just before the markers whose NRN
    leans to ``source`` (NRN > nrn_min for source 1, NRN < 1 - nrn_min for source 0):

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
    scan = min(len(reader), max_rows) if max_rows else len(reader)
    if method == "activation":
        if not 0 < top_nrn <= 1:
            raise AnalysisError(f"top_nrn must be in (0, 1], got {top_nrn}")
        live = (feature_activity(cc, reader, n_rows=scan, n_top=1).freq > 0) & ~torch.isnan(nrn)
        toward = nrn if source == 1 else 1 - nrn
        # a feature's place among the live ones: the fraction of them it leans further than
        # (a sorted search, not an [F, F] comparison: F may be 65k)
        live_toward = toward[live].sort().values
        place = torch.searchsorted(live_toward, toward.contiguous(), side="left").float() / max(len(live_toward), 1)
        score = act.freq * act.mean_act  # mean activation over all the positions before a marker
        ranking = sorted(((int(k), float(score[k])) for k in torch.nonzero(live & (place >= 1 - top_nrn)).flatten()
                          if score[k] > 0), key=lambda t: -t[1])
        if not ranking:
            raise AnalysisError(f"none of the top {100 * top_nrn:g}% NRN features toward source {source} "
                                f"is active before {list(words)}")
        return ranking[0][0], ranking
    lean = nrn > nrn_min if source == 1 else nrn < 1 - nrn_min
    cand = [int(k) for k in act.active if lean[k]]
    if not cand:
        raise AnalysisError(f"no feature active before {list(words)} leans to source {source}")
    if method == "ablation":
        from fastxc.analysis.ablate import rank_features

        ranking = rank_features(inp, words, cand[:max_candidates], source, n_positions, context, seed)
        return ranking[0][0], ranking
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
    ids: list[int]  # generated token ids (EOS and padding removed): what the marker counts read


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
            out.append(Generation(p, tokenizer.decode(body, skip_special_tokens=False), len(row), think, closed, body))
    return out


def count_text(text: str, words: Sequence[str]) -> int:
    """Substring occurrences of the words in ``text`` (no word boundary: "WaitWait" is 2).

    The cross-check of the token counts: it also sees a marker spelled by unusual tokens, and
    also counts a marker inside a longer word ("Butter" holds "But").
    """
    return sum(text.count(w) for w in words)


def answer_of(text: str) -> str | None:
    """The answer a generation gave: its first line after ``</think>``, stripped (None when the
    think block never closed; "" when nothing follows it)."""
    if THINK_CLOSE not in text:
        return None
    rest = text.split(THINK_CLOSE, 1)[1].strip()
    return rest.split("\n", 1)[0].strip()


def _norm_answer(a: str) -> str:
    return " ".join(a.strip().rstrip(".").split()).casefold()


def is_correct(answer: str | None, expected: str) -> bool:
    """The given answer equals the expected one (case, surrounding spaces and a final '.' ignored)."""
    return answer is not None and _norm_answer(answer) == _norm_answer(expected)


def coherence(gens: Sequence[Generation], answers: Sequence[str] | None = None) -> dict:
    """Fractions of the generations whose </think> closed, that answered after it and (when
    ``answers`` [len(gens)] is given) whose answer is correct; ``correct`` is None otherwise."""
    if answers is not None and len(answers) != len(gens):
        raise AnalysisError(f"{len(answers)} answers for {len(gens)} generations")
    n = max(len(gens), 1)
    given = [answer_of(g.text) for g in gens]
    c = {"closed": sum(g.closed for g in gens) / n, "answered": sum(bool(a) for a in given) / n, "correct": None}
    if answers is not None:
        c["correct"] = sum(is_correct(a, e) for a, e in zip(given, answers)) / n
    return c


def marker_stats(gens: Sequence[Generation], tokenizer, categories: dict | None = None,
                 answers: Sequence[str] | None = None) -> dict:
    """Thinking length, coherence, and per category the marker tokens in the generated ids
    (``markers``, ``rate`` per generated token) with the text occurrences beside them
    (``text_markers``, ``text_rate``)."""
    cats = categories or DEFAULT_CATEGORIES
    tokens = sum(g.n_tokens for g in gens)
    n = max(len(gens), 1)
    coh = coherence(gens, answers)
    s = {"n": len(gens), "tokens": tokens, "mean_tokens": tokens / n,
         "mean_think_tokens": sum(g.think_tokens for g in gens) / n, "close_rate": coh["closed"],
         "coherence": coh, "markers": {}, "rate": {}, "text_markers": {}, "text_rate": {}}
    for name, words in cats.items():
        seqs = marker_sequences(tokenizer, words)
        if not seqs:
            raise AnalysisError(f"the tokenizer has no token for the markers {list(words)}")
        c = sum(count_marker_tokens(g.ids, seqs) for g in gens)
        t = sum(count_text(g.text, words) for g in gens)
        s["markers"][name], s["rate"][name] = c, c / max(tokens, 1)
        s["text_markers"][name], s["text_rate"][name] = t, t / max(tokens, 1)
    return s


def steer_sweep(model, tokenizer, prompts: Sequence[str], layer: int, direction: torch.Tensor,
                multiples: Sequence[float], categories: dict | None = None, *, unit: float = 1.0,
                answers: Sequence[str] | None = None, **gen_kw) -> list[dict]:
    """``marker_stats`` of the generations at each multiple (alpha = multiple x ``unit``;
    multiple 0 is the unsteered run). ``answers`` [len(prompts)]: expected answers, if known."""
    res = []
    for m in multiples:
        a = float(m) * float(unit)
        gens = generate(model, tokenizer, prompts, layer, direction, a, **gen_kw)
        res.append({"multiple": float(m), "alpha": a, **marker_stats(gens, tokenizer, categories, answers),
                    "samples": [asdict(g) for g in gens]})
    return res


def random_directions(like: torch.Tensor, n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` Gaussian directions with the norm of ``like`` [d] (the controls of a steering
    direction: the same norm added, no particular direction), seeded."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    norm = like.float().norm()
    out = []
    for _ in range(n):
        v = torch.randn(like.numel(), generator=g)
        out.append((v * (norm / v.norm())).to(like.dtype))
    return out


def control_summary(sweep: Sequence[dict], controls: Sequence[Sequence[dict]]) -> list[dict]:
    """Per multiple: each category's marker rate with the direction, the mean over the random
    controls, and the direction's rate over that mean (None where the controls' mean is 0)."""
    out = []
    for i, r in enumerate(sweep):
        row = {"multiple": r["multiple"], "rate": dict(r["rate"]), "controls_rate": {}, "over_controls": {}}
        for name, v in r["rate"].items():
            mean = sum(c[i]["rate"][name] for c in controls) / len(controls)
            row["controls_rate"][name] = mean
            row["over_controls"][name] = v / mean if mean > 0 else None
        out.append(row)
    return out


COLORS = ("#4477aa", "#cc3311", "#228833", "#aa3377", "#ee7733", "#66ccee", "#bbbbbb")


def sweep_figure(sweep: Sequence[dict], xlabel: str = "multiple of the steering unit",
                 controls: Sequence[Sequence[dict]] = ()):
    """Marker rates (tokens solid, text occurrences dashed; the random controls' mean dotted),
    thinking length and coherence against the multiple of the unit. Returns the Figure."""
    from fastxc.analysis.inputs import pyplot

    plt = pyplot()
    x = [r["multiple"] for r in sweep]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 3.4))
    for name, col in zip(sweep[0]["rate"], itertools.cycle(COLORS)):
        ax1.plot(x, [r["rate"][name] for r in sweep], marker="o", color=col, label=f"{name} (tokens)")
        ax1.plot(x, [r["text_rate"][name] for r in sweep], marker="x", ls="--", lw=0.8, color=col,
                 label=f"{name} (text)")
        if controls:
            ax1.plot(x, [sum(c[i]["rate"][name] for c in controls) / len(controls) for i in range(len(x))],
                     ls=":", lw=1.2, color=col, label=f"{name}, {len(controls)} random directions (mean)")
    ax1.set_ylabel("markers per generated token")
    ax1.legend(fontsize=6)
    ax2.plot(x, [r["mean_think_tokens"] for r in sweep], marker="o", color="#cc3311", label="mean thinking length")
    ax2.set_ylabel("tokens until </think>")
    ax2.legend(fontsize=6)
    coh = [r["coherence"] for r in sweep]
    ax3.plot(x, [c["closed"] for c in coh], marker="o", label="</think> closed")
    ax3.plot(x, [c["answered"] for c in coh], marker="s", label="answer given")
    if all(c["correct"] is not None for c in coh):
        ax3.plot(x, [c["correct"] for c in coh], marker="^", label="answer correct")
    else:
        ax3.plot([], [], ls="none", label="correctness not judged (no answers)")
    ax3.set_ylim(-0.03, 1.03)
    ax3.set_ylabel("fraction of generations")
    ax3.legend(fontsize=6)
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel(xlabel, fontsize=8)
    return fig


def plot_sweep(sweep: Sequence[dict], path: Path, title: str = "",
               xlabel: str = "multiple of the steering unit", controls: Sequence[Sequence[dict]] = ()) -> Path:
    """``sweep_figure`` saved as PNG."""
    from fastxc.analysis.inputs import savefig

    return savefig(sweep_figure(sweep, xlabel, controls), path, title, title_size=9)


def read_answers(path: str | Path, field: str, limit: int) -> tuple[list[str] | None, str]:
    """Expected answers of the first ``limit`` prompts of a .jsonl prompts file (the same records
    ``read_texts`` reads), or None with the reason when the file does not give them all."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        return None, f"not judged: {path.name} is plain text (no answers)"
    out: list[str] = []
    with open(path, encoding="utf-8") as f:  # read_texts already checked UTF-8 and JSON line by line
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            if field not in obj:
                return None, f"not judged: a record of {path.name} has no {field!r} field"
            out.append(str(obj[field]))
            if len(out) >= limit:
                break
    return out, f"judged against field {field!r} of {path.name}"


def _cli_direction(args, inp, cats: dict, target: int, feats: list[int],
                   auto: str | None) -> tuple[torch.Tensor, str, float, str]:
    """The steering direction the flags ask for -> (direction [d], description, unit, unit label).

    alpha = multiple x unit. ``--alpha-unit mean``: a feature's unit is its mean activation where
    it fires (store rows); a difference of means is its own unit (multiple 1 adds the whole
    difference). ``raw``: a feature's alpha is in activation units (unit 1); a difference of
    means is measured by the norm it adds (unit 1 / its norm).
    """
    cc = inp.crosscoder
    if auto:
        if auto not in cats:
            raise AnalysisError(f"unknown category {auto!r}; known: {', '.join(cats)}")
        best, ranking = most_predictive_feature(inp, cats[auto], target, method=args.predict_by, seed=args.seed,
                                                top_nrn=args.top_nrn)
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
        norm = float(direction.norm())
        if norm == 0:
            raise AnalysisError(f"the difference of means before {args.diff_means} markers is zero: nothing to steer with")
        desc = f"difference of means before {args.diff_means} markers in {cc.source_names[src]}"
        if args.alpha_unit == "raw":
            return direction, desc, 1.0 / norm, "norm added to the residual stream (raw units)"
        return direction, desc, 1.0, f"multiple of the difference of means (norm {norm:.3g})"
    direction = feature_direction(cc, feats, target)
    desc = f"features {feats} of {cc.source_names[target]}"
    if args.alpha_unit == "raw":
        return direction, desc, 1.0, f"feature activation added (features {feats})"
    if inp.reader is None:
        raise AnalysisError("--alpha-unit mean needs --store (to measure the features' mean activation)")
    from fastxc.analysis.diff import feature_activity

    act = feature_activity(cc, inp.reader, n_rows=min(len(inp.reader), 50000), n_top=1)
    unit = float(act.mean_act[feats].mean())
    if unit <= 0:
        raise AnalysisError(f"features {feats} never fire in the store: no mean activation to scale by")
    return direction, desc, unit, f"multiple of the mean activation where it fires ({unit:.3g}, features {feats})"


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``fastxc steer``."""
    from fastxc.analysis.inputs import parser

    p = parser("fastxc steer", "Steer a model with crosscoder features or difference-of-means directions.")
    p.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl with --prompt-field")
    p.add_argument("--prompt-field", default="question", help="field of the --prompts .jsonl records holding the prompt")
    p.add_argument("--suffix", default="", help="appended to every prompt, e.g. ' <think>'")
    p.add_argument("--n-prompts", type=int, default=50, help="prompts read from --prompts (the first N)")
    p.add_argument("--steer", default="b", choices=("a", "b"), help="which model to steer (source 0 = a, 1 = b)")
    p.add_argument("--feature", default=None,
                   help="comma-separated crosscoder features to add, or 'auto:CATEGORY': the steered model's "
                        "most marker-predictive leaning feature (see --predict-by)")
    p.add_argument("--predict-by", default="activation", choices=PREDICT_METHODS,
                   help="how --feature auto picks: the most active feature right before the markers among the "
                        f"top {100 * TOP_NRN:g}%% NRN (the seed study's), F1 of firing vs the next token being a "
                        "marker, or single-feature ablation")
    p.add_argument("--top-nrn", type=float, default=TOP_NRN, metavar="FRACTION",
                   help="--predict-by activation: the candidates are the live features in this top fraction of NRN "
                        "toward the steered model")
    p.add_argument("--diff-means", default=None, metavar="CATEGORY",
                   help="steer with the difference-of-means direction of a marker category instead")
    p.add_argument("--direction-from", default="a", choices=("a", "b"), help="model whose activations give --diff-means")
    p.add_argument("--categories", default=None, help='JSON file {"name": ["Marker", ...]}')
    p.add_argument("--answer-field", default="answer",
                   help="field of the --prompts .jsonl records holding the expected answer (without it, "
                        "correctness is reported as not judged)")
    p.add_argument("--multiples", default=DEFAULT_MULTIPLES,
                   help="comma-separated steering strengths, as multiples of the --alpha-unit (0: unsteered)")
    p.add_argument("--alpha-unit", default="mean", choices=("mean", "raw"),
                   help="mean: a feature's mean activation where it fires (needs --store), or the whole "
                        "difference of means; raw: feature activation units, or the norm a difference of means adds")
    p.add_argument("--max-new-tokens", type=int, default=160, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument("--random-controls", type=int, default=0, metavar="N",
                   help="also steer with N random directions of the same norm at the same strengths "
                        "(controls: is it the direction, or any push of that size?)")
    p.add_argument("--show", type=int, default=3, help="completions printed steered vs unsteered")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fastxc.analysis.inputs import inputs_from_args, out_dir, read_texts, run_cli, write_json
    from fastxc.analysis.reasoning import load_categories

    args = build_parser().parse_args(argv)

    def body() -> int:
        auto = args.feature.split(":", 1)[1] if args.feature and args.feature.startswith("auto:") else None
        try:
            multiples = [float(v) for v in args.multiples.split(",") if v.strip()]
            feats = [int(v) for v in args.feature.split(",") if v.strip()] if args.feature and not auto else []
        except ValueError:
            raise AnalysisError("--multiples and --feature take comma-separated numbers (or --feature auto:CATEGORY)") from None
        if not multiples:
            raise AnalysisError("--multiples: no steering strength given")
        if bool(feats or auto) == bool(args.diff_means):
            raise AnalysisError("give exactly one of --feature or --diff-means")
        if args.random_controls < 0:
            raise AnalysisError(f"--random-controls must be >= 0, got {args.random_controls}")
        inp = inputs_from_args(args)
        cc = inp.crosscoder
        target = 0 if args.steer == "a" else 1
        if target >= cc.n_sources:
            raise AnalysisError(f"the crosscoder has {cc.n_sources} source(s): no model {args.steer}")
        # the small inputs first: a bad prompts or categories file fails before any model loads
        prompts = [q + args.suffix for q in read_texts(args.prompts, args.prompt_field, args.n_prompts)]
        answers, judged = read_answers(args.prompts, args.answer_field, len(prompts))
        cats = load_categories(args.categories)
        models, tok = inp.models(), inp.tokenizer()
        direction, desc, unit, unit_label = _cli_direction(args, inp, cats, target, feats, auto)
        sweep = steer_sweep(models[target], tok, prompts, inp.layer, direction, multiples, cats, unit=unit,
                            answers=answers, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            seed=args.seed)
        controls = []
        unsteered = {r["multiple"]: r for r in sweep if r["multiple"] == 0}
        for v in random_directions(direction, args.random_controls, seed=args.seed):
            # multiple 0 adds nothing: the direction's own unsteered run is every control's
            ctl = steer_sweep(models[target], tok, prompts, inp.layer, v, [m for m in multiples if m != 0],
                              cats, unit=unit, answers=answers, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, seed=args.seed)
            by_m = {r["multiple"]: r for r in ctl} | unsteered
            controls.append([{k: val for k, val in by_m[float(m)].items() if k != "samples"} for m in multiples])
        out = out_dir(args, "runs/fastxc-steer")
        res = {"direction": desc, "steered_model": inp.model_names[target], "layer": inp.layer,
               "unit": {"value": unit, "label": unit_label}, "multiples": multiples,
               "alphas": [r["alpha"] for r in sweep], "correctness": judged, "sweep": sweep}
        if controls:
            res["controls"] = {"n": len(controls), "norm": float(direction.float().norm()),
                               "summary": control_summary(sweep, controls), "sweeps": controls}
        write_json(out / "steer.json", res)
        plot_sweep(sweep, out / "steer.png", f"steering {cc.source_names[target]} with {desc}", unit_label,
                   controls=controls)
        print(f"unit: {unit_label}; correctness {judged}")
        base = next((r for r in sweep if r["multiple"] == 0), None)
        for r in sweep:
            c = r["coherence"]
            correct = "not judged" if c["correct"] is None else f"{c['correct']:.2f}"
            print(f"x{r['multiple']:<5g} (alpha {r['alpha']:8.3f}): think {r['mean_think_tokens']:6.1f} tok, "
                  f"closed {c['closed']:.2f}, answered {c['answered']:.2f}, correct {correct}; "
                  + ", ".join(f"{k} {v:.4f}/tok ({r['text_rate'][k]:.4f} in text)" for k, v in r["rate"].items()))
        if controls:
            for row in res["controls"]["summary"]:
                print(f"x{row['multiple']:<5g} vs {len(controls)} random directions of the same norm: "
                      + ", ".join(f"{k} {row['controls_rate'][k]:.4f}/tok"
                                  + (f" ({row['over_controls'][k]:.1f}x)" if row["over_controls"][k] else "")
                                  for k in row["rate"]))
        strongest = sweep[-1]
        for j in range(min(args.show, len(prompts))):
            print(f"\n--- prompt: {prompts[j]}")
            if base is not None:
                print(f"unsteered:      {base['samples'][j]['text']}")
            print(f"x{strongest['multiple']:g}: {strongest['samples'][j]['text']}")
        print(f"\nwrote {out}/steer.json, steer.png")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
