"""``python -m fastxc.organism``: (re)build the model organism and report its behaviour.

Flags are the fields of ``OrganismConfig`` (``--hidden-size 128 --base-steps 600 ...``).
Without ``--force`` a cached organism with the same recipe is reused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from fastxc.core.cli import Parser
from fastxc.organism.build import RECIPE_VERSION, OrganismConfig, build_organism, load_organism, reproduces


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``fastxc organism``."""
    p = Parser(prog="fastxc organism", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(OrganismConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f.name.replace("_", " "))
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--out", default=None, help="build into this folder instead of the cache")
    p.add_argument("--threads", type=int, default=None, help="torch threads (None: all cores)")
    p.add_argument("--eval", type=int, default=50, metavar="N",
                   help="sample both models on N held-out questions afterwards (0: skip)")
    p.add_argument("--eval-max-tokens", type=int, default=160, metavar="T",
                   help="stop each sample after T generated tokens if no end of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    try:
        cfg = OrganismConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(OrganismConfig)})
        if args.out is not None:
            org = build_organism(cfg, out=args.out, progress=progress, threads=args.threads)
        else:
            org = load_organism(cfg, progress=progress, rebuild=args.force, threads=args.threads)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"organism: {org.root}")
    same = reproduces(org)
    if same is not None:
        print(f"  weights: {'the recorded' if same else 'NOT the recorded'} sha256 of recipe v{RECIPE_VERSION} seed {cfg.seed}"
              + ("" if same else " (this machine's CPU floats differ: see fastxc.core.numerics)"))
    print(f"  base:      {org.base}")
    print(f"  distilled: {org.distilled}")
    print(f"  build timings (s): {json.dumps(org.info['timings'])}")
    if args.eval > 0:
        from fastxc.organism.evaluate import heldout_answers, heldout_questions, marker_report, sample

        qs, answers = heldout_questions(org, args.eval), heldout_answers(org, args.eval)
        for name in ("base", "distilled"):
            r = marker_report(sample(getattr(org, name), qs, seed=cfg.seed,
                                          max_new_tokens=args.eval_max_tokens), answers=answers)
            print(f"  {name:9s}: {r.markers} Wait/Alternatively in {r.tokens} generated tokens "
                  f"({1000 * r.marker_rate:.2f} per 1k), </think> closed on {100 * r.close_rate:.0f}%"
                  f", EOS reached on {100 * r.end_rate:.0f}% of {r.n} questions; answered "
                  f"{100 * r.answered_rate:.0f}%, correct {100 * r.correct_rate:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
