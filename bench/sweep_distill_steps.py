"""Sweep the organism's fine-tuning length (``OrganismConfig.distill_steps``).

The criterion is the organism's own skill, not any crosscoder figure: how well distilled
detects a slipped step (teacher-forced P("Wait") at the end of a slipped sentence against the
end of a correct one, on the held-out traces), its held-out trace loss, and whether its sampled
answers are correct. Base is the cached default base of the seed (its training does not depend
on ``distill_steps``); each setting fine-tunes a fresh copy of it with ``build_organism``'s own
``distill``.

    python bench/sweep_distill_steps.py --seed 0 --steps 500,1000,2000 --out runs/sweep-distill-seed0.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from fastxc.core import numerics

numerics.pin()  # before torch starts: the same CPU numerics as build_organism

import torch  # noqa: E402

from fastxc.organism.build import OrganismConfig, _quiet_threads, _stream, distill, load_organism
from fastxc.organism.corpus import build_corpus
from fastxc.organism.evaluate import heldout_answers, heldout_questions, marker_report, sample, wait_detection


@torch.no_grad()
def trace_loss(model, tokenizer, texts: list[str], batch_size: int = 64) -> float:
    """Mean next-token loss on ``texts`` (padding masked)."""
    tokenizer.padding_side = "right"
    tot, n = 0.0, 0
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s:s + batch_size], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out = model(**enc, labels=labels)
        k = int((labels[:, 1:] != -100).sum())
        tot, n = tot + out.loss.item() * k, n + k
    return tot / n


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s < 1 for s in steps):
        raise argparse.ArgumentTypeError(f"steps must be >= 1, got {text!r}")
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=_steps, default="500,1000,2000", help="fine-tuning lengths to compare")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg0 = OrganismConfig(seed=args.seed)
    org = load_organism(cfg0)
    tok = AutoTokenizer.from_pretrained(str(org.tokenizer))
    base = AutoModelForCausalLM.from_pretrained(str(org.base))
    corpus = build_corpus(cfg0.seed, cfg0.n_general, cfg0.n_traces, slip_rate=cfg0.slip_rate)
    general_s, trace_s = _stream(tok, corpus.general), _stream(tok, [t.text for t in corpus.traces])
    held = [t.text for t in corpus.heldout_traces]
    qs, answers = heldout_questions(org), heldout_answers(org)
    rows = []
    for steps in args.steps:
        cfg = OrganismConfig(seed=args.seed, distill_steps=steps)
        model = copy.deepcopy(base)
        t0 = time.time()
        with _quiet_threads(None):
            losses = distill(model, trace_s, general_s, cfg, True, desc=f"distill {steps}")
            p_slip, p_ok = wait_detection(model, held, tok)
            # sampled as fastxc.study's organism evaluation samples (its seed is the organism's)
            rep = marker_report(sample(model, qs, seed=args.seed, tokenizer=tok), answers=answers)
            row = {"distill_steps": steps, "train_s": round(time.time() - t0, 1), "train_losses": losses,
                   "heldout_trace_loss": round(trace_loss(model, tok, held), 4),
                   "p_wait_after_slip": round(p_slip, 4), "p_wait_after_correct": round(p_ok, 4),
                   "marker_rate": round(rep.marker_rate, 4), "close_rate": rep.close_rate,
                   "correct_rate": rep.correct_rate}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
