"""``python -m fastxc.study``: the organism study, end to end (see ``fastxc.study``).

    python -m fastxc.study --out runs/study                       # organism seed 0, crosscoders 0,1,2
    python -m fastxc.study --organism-seed 1 --crosscoder-seeds 0 --out runs/study-o1
    python -m fastxc.study --distill-steps 2000 --out runs/study-d2000   # a longer fine-tuned organism

The process pins its CPU numerics before torch starts (``fastxc.core.numerics``), like the
embedded default, so the stages give the same bytes on every x86-64 machine; ``study.json``
records each stage's sha256 and whether the numerics were pinned.
"""
from __future__ import annotations

import sys
from typing import Sequence


def _seeds(text: str) -> tuple[int, ...]:
    import argparse

    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return seeds


def build_parser():
    from fastxc.core.cli import Parser

    p = Parser(prog="fastxc study", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (study.json, report.html, one folder per crosscoder)")
    p.add_argument("--organism-seed", type=int, default=0, help="seed of the model organism")
    p.add_argument("--crosscoder-seeds", type=_seeds, default="0,1,2",
                   help="comma-separated crosscoder seeds: one run of fastxc train's config each")
    p.add_argument("--n-questions", type=int, default=50,
                   help="held-out questions of the organism's own evaluation")
    p.add_argument("--max-new-tokens", type=int, default=160,
                   help="tokens generated per question, organism eval and steering")
    p.add_argument("--k", type=int, default=None,
                   help="k of the TopK crosscoders (default: fastxc train's); the ReLU + L1 one has none")
    p.add_argument("--distill-steps", type=int, default=None,
                   help="fine-tuning steps of the organism's distilled model (default: the organism's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fastxc.core import numerics

    numerics.pin()  # before torch starts (a no-op when it already has: the caller's choice)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    optional = (args.k, args.distill_steps)
    if args.organism_seed < 0 or args.n_questions < 1 or args.max_new_tokens < 1 or \
            any(v is not None and v < 1 for v in optional):
        print("error: --organism-seed must be >= 0, --n-questions, --max-new-tokens, --k and --distill-steps >= 1",
              file=sys.stderr)
        return 2
    from pathlib import Path

    from fastxc.study.run import StudyConfig, StudyError, run_study

    cfg = StudyConfig(out=Path(args.out), organism_seed=args.organism_seed,
                      crosscoder_seeds=args.crosscoder_seeds, n_questions=args.n_questions,
                      max_new_tokens=args.max_new_tokens, progress=not args.no_progress, k=args.k,
                      distill_steps=args.distill_steps)
    try:
        run_study(cfg, argv)
    except (StudyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
