"""Spliced-in evaluation: how much of each model's next-token loss the crosscoder keeps.

For model i, over the same token windows:

    clean   = CE of the unmodified model
    spliced = CE with layer L's input replaced by the crosscoder reconstruction of source i
              (the code comes from *all* sources' activations at those tokens, as in training)
    zero    = CE with layer L's input set to zero
    fraction of loss recovered = (zero - spliced) / (zero - clean)

A fraction outside [0, 1] (or NaN) is not a fraction: ``eval.json`` marks it
(``frac_recovered_in_range``, ``warnings``) and the command prints a ``warning:`` line.
BOS / pad / special positions keep their clean activation (the harvester never stores them).
Per-source FVU and L0 come from store rows (``fastxc.train``'s definition of FVU).
CLI: ``python -m fastxc.analysis.evaluate --crosscoder DIR --store DIR [--data FILE] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import sys
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F_

from fastxc.analysis.inputs import (Inputs, encode_raw, inputs_from_args, out_dir, parser, read_texts, run_cli,
                             source_activations, write_json)
from fastxc.core.crosscoder import Crosscoder
from fastxc.analysis.hooks import AnalysisError, bos_prefix, edit_residual, pad_id_of, special_mask, store_contexts
from fastxc.data.models import pad_batch


class SpliceResult(NamedTuple):
    """Per source (lists of length n_sources), mean next-token CE in nats."""

    clean: list[float]
    spliced: list[float]
    zero: list[float]
    frac_recovered: list[float]
    n_tokens: int


def _ce_sum(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token CE over positions whose target is a real token, and their count."""
    tgt_ok = mask[:, 1:].bool()
    lp = F_.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return float(lp[tgt_ok].sum()), int(tgt_ok.sum())


@torch.no_grad()
def spliced_loss(cc: Crosscoder, models: Sequence, tokenizer, layer: int, sequences: Sequence[Sequence[int]],
                 batch_size: int = 8) -> SpliceResult:
    """Clean / spliced / zero-ablated CE of every model on ``sequences`` (token id lists)."""
    n = cc.n_sources
    if len(models) != n:
        raise AnalysisError(f"{len(models)} models for a crosscoder with {n} sources")
    sums = np.zeros((3, n))
    count = 0
    pad = pad_id_of(tokenizer)
    dev = next(models[0].parameters()).device
    for lo in range(0, len(sequences), batch_size):
        ids, mask = pad_batch(sequences[lo : lo + batch_size], pad)
        ids, mask = ids.to(dev), mask.to(dev)
        acts = source_activations(models, layer, ids, mask)
        code = encode_raw(cc, acts)
        B, T = ids.shape
        recon = cc.denormalize(cc.decode(code.view(B * T, -1)))
        keep = special_mask(ids, mask, tokenizer).unsqueeze(-1)  # [B, T, 1]: leave these positions clean
        for i, m in enumerate(models):
            rec_i = recon[:, cc.offsets[i] : cc.offsets[i + 1]].view(B, T, -1)
            s, c = _ce_sum(m(input_ids=ids, attention_mask=mask).logits, ids, mask)
            sums[0, i] += s
            with edit_residual(m, layer, lambda h, r=rec_i: torch.where(keep, h, r.to(h.dtype))):
                sums[1, i] += _ce_sum(m(input_ids=ids, attention_mask=mask).logits, ids, mask)[0]
            with edit_residual(m, layer, lambda h: torch.where(keep, h, torch.zeros_like(h))):
                sums[2, i] += _ce_sum(m(input_ids=ids, attention_mask=mask).logits, ids, mask)[0]
        count += c
    if count == 0:
        raise AnalysisError("no target tokens to evaluate (sequences of length < 2)")
    clean, spliced, zero = (sums / count).tolist()
    frac = [(z - s) / (z - c) if z != c else float("nan") for c, s, z in zip(clean, spliced, zero)]
    return SpliceResult(clean, spliced, zero, frac, count)


def frac_warnings(names: Sequence[str], res: SpliceResult) -> list[str]:
    """One line per source whose fraction of loss recovered lies outside [0, 1] (or is NaN):
    such a number is not a fraction, and reading it as one misleads."""
    out = []
    for name, f, c, s, z in zip(names, res.frac_recovered, res.clean, res.spliced, res.zero):
        if f != f:  # NaN
            why = "undefined: zero-ablating the layer does not change the loss"
        elif f < 0:
            why = "below 0: the spliced-in reconstruction is worse than zero-ablating the layer"
        elif f > 1:
            why = "above 1: the spliced-in reconstruction beats the clean model (too few tokens, or a bug)"
        else:
            continue
        out.append(f"{name}: fraction of loss recovered {f:.4f} is {why} "
                   f"(CE clean {c:.4f}, spliced {s:.4f}, zero {z:.4f})")
    return out


@torch.no_grad()
def store_metrics(cc: Crosscoder, reader, n_rows: int = 4096, batch_size: int = 512, seed: int = 1) -> dict:
    """Per-source FVU and mean L0 on ``n_rows`` store rows (normalised, as in training)."""
    xs, rs, l0, seen = [], [], 0.0, 0
    it = reader.batches(batch_size, seed=seed, start=0, prefetch=0)
    try:
        while seen < n_rows:
            x = cc.flatten_input(next(it)).to(cc.W_enc.device, cc.W_enc.dtype)
            f = cc.encode(x)
            xs.append(x)
            rs.append(cc.decode(f))
            l0 += float((f > 0).sum())
            seen += x.shape[0]
    finally:
        it.close()
    return {"fvu": cc.fvu(torch.cat(xs), torch.cat(rs)).tolist(), "l0": l0 / seen, "rows": seen}


def store_sequences(reader, tokenizer, n: int, context: int, seed: int = 0) -> list[list[int]]:
    """``n`` token windows (up to ``context`` tokens, BOS re-attached) ending at random store rows."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(reader), size=min(n, len(reader)), replace=False))
    return store_contexts(reader, rows, context, bos_prefix(tokenizer))


def text_sequences(texts: Sequence[str], tokenizer, context: int) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=True)["input_ids"][:context] for t in texts]


def evaluate(inp: Inputs, sequences: Sequence[Sequence[int]], batch_size: int = 8, metric_rows: int = 4096,
             eval_reader=None) -> dict:
    """Spliced-in loss on ``sequences`` plus FVU / L0 on store rows; a JSON-ready dict."""
    models = inp.models()
    res = spliced_loss(inp.crosscoder, models, inp.tokenizer(), inp.layer, sequences, batch_size)
    out = {"sources": inp.source_names, "models": inp.model_names, "layer": inp.layer, **res._asdict(),
           "n_sequences": len(sequences)}
    out["frac_recovered_in_range"] = [0.0 <= f <= 1.0 for f in res.frac_recovered]  # NaN: False
    out["warnings"] = frac_warnings(inp.source_names, res)
    reader = eval_reader if eval_reader is not None else inp.reader
    if reader is not None:
        out["store"] = store_metrics(inp.crosscoder, reader, metric_rows)
        out["store"]["held_out"] = eval_reader is not None
    return out


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``fastxc eval``."""
    p = parser("fastxc eval", "Spliced-in next-token loss (fraction of loss recovered), FVU and L0.")
    p.add_argument("--data", default=None, help="held-out texts (.jsonl with --text-field, or .txt lines); default: windows of the store's tokens")
    p.add_argument("--text-field", default="text", help="field of the --data .jsonl records holding the text")
    p.add_argument("--eval-store", default=None, help="held-out store for FVU/L0 (default: --store)")
    p.add_argument("--n-sequences", type=int, default=64, help="texts (or store windows) the spliced-in loss is measured on")
    p.add_argument("--context", type=int, default=128, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--metric-rows", type=int, default=4096, help="store rows for FVU and L0")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        inp = inputs_from_args(args)
        # the cheap inputs first: a bad --data file or --eval-store fails before any model loads
        texts = read_texts(args.data, args.text_field, args.n_sequences) if args.data else None
        eval_reader = None
        if args.eval_store:
            from fastxc.data.store import open_store

            eval_reader = open_store(args.eval_store)
            if list(eval_reader.widths) != list(inp.crosscoder.widths):
                raise AnalysisError(f"--eval-store widths {eval_reader.widths} do not match the crosscoder's {inp.crosscoder.widths}")
        inp.models()  # fail on a width/layer mismatch before any other work
        tok = inp.tokenizer()
        if texts is not None:
            seqs = text_sequences(texts, tok, args.context)
        elif inp.reader is not None:
            seqs = store_sequences(inp.reader, tok, args.n_sequences, args.context, args.seed)
        else:
            raise AnalysisError("nothing to evaluate on: pass --data FILE or --store DIR")
        res = evaluate(inp, seqs, args.batch_size, args.metric_rows, eval_reader)
        out = out_dir(args, "runs/fastxc-eval")
        write_json(out / "eval.json", res)
        for i, name in enumerate(res["sources"]):
            print(f"{name}: CE clean {res['clean'][i]:.4f}  spliced {res['spliced'][i]:.4f}  zero {res['zero'][i]:.4f}"
                  f"  -> fraction of loss recovered {res['frac_recovered'][i]:.4f}")
        for w in res["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        if "store" in res:
            s = res["store"]
            print("FVU " + ", ".join(f"{n} {v:.4f}" for n, v in zip(res["sources"], s["fvu"])) + f"   L0 {s['l0']:.2f}"
                  + ("" if s["held_out"] else "   (rows of the training store; pass --eval-store for held-out rows)"))
        print(f"wrote {out / 'eval.json'}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
