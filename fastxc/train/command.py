"""The training command: ``main(argv)`` parses flags, trains and prints the summary; errors
follow fastxc's one-line contract (``fastxc.core.cli``)."""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from fastxc.core.cli import report
from fastxc.train.config import TrainError, config_from_flags, parse_flags
from fastxc.train.loop import TrainResult, train


def print_summary(result: TrainResult, file=None) -> None:
    file = file or sys.stdout  # looked up now, not at import (a redirected or captured stdout)
    s = result.summary
    names = s["source_names"]
    print(f"\nOutputs in {result.out}/: crosscoder/ (Crosscoder.load), metrics.jsonl, summary.json, checkpoint/", file=file)
    print("FVU per source: " + ", ".join(f"{n} {v:.4f}" for n, v in zip(names, s["fvu"])), file=file)
    print(f"L0: {s['l0']:.2f}   live features: {s['live_features']} / {s['n_features']}   skipped batches: {s['skipped_batches']}", file=file)
    if "classes" in s:
        a, b = names[0], names[1]
        print(f"NRN = |{b}| / (|{a}| + |{b}|) of live features (0: only {a}, 1: only {b}), mean {s['nrn_mean']:.3f}:", file=file)
        print(s["_nrn_text"], file=file)
        c = s["classes"]
        print(f"classes: shared {c['shared']}, only-{a} {c['only-A']}, only-{b} {c['only-B']}", file=file)
    if "planted_mmcs" in s:  # the synthetic source: recovery of the planted features
        line = f"planted features: MMCS {s['planted_mmcs']:.3f} (mean max cosine with a learned decoder direction)"
        if "planted_right_class" in s:
            by = ", ".join(f"{k} {v:.0%}" for k, v in s["planted_right_class_by_kind"].items())
            line += f", {s['planted_right_class']:.1%} in the right NRN class ({by})"
        print(line, file=file)


def main(argv: Sequence[str] | None = None, default_store: Callable[[bool], str] | None = None,
         next_commands: Callable[[Path], list[str]] | None = None) -> int:
    """CLI entry point; returns the process exit code.

    With neither --store nor --source, ``default_store(progress)`` names the store to train on
    (``fastxc.cli`` passes the organism's; without one the planted synthetic source is used),
    and ``next_commands(out)`` lists the commands printed after the run.
    """
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        try:
            args = parse_flags(argv)
        except SystemExit as e:  # argparse: --help (0) or a bad flag (2, message already printed)
            return int(e.code or 0)
        if "sweep" in args:
            from fastxc.train.sweep import sweep_from_flags, train_sweep

            results = train_sweep(sweep_from_flags(args))
            for name, result in results.items():
                print(f"\n== {name} ==")
                print_summary(result)
            return 0
        cfg = config_from_flags(args)
        embedded = cfg.store is None and cfg.source is None and not cfg.on_the_fly
        if embedded and default_store is not None:
            cfg = dataclasses.replace(cfg, store=default_store(cfg.progress))
        result = train(cfg)
    except KeyboardInterrupt:
        print("error: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except (TrainError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as e:
        return report(e)
    if result.summary:  # empty on ranks other than 0
        print_summary(result)
        if embedded and next_commands is not None:
            print("\nNext, try:", *next_commands(result.out), sep="\n  ")
    return 0
