"""The ``fastxc`` command: one entry point with a subcommand per job.

    fastxc train [flags]        train a crosscoder (no flags: the embedded default)
    fastxc harvest [flags]      write an activation store from Hugging Face models
    fastxc organism [flags]     build (or reuse) the model organism
    fastxc diff | reasoning | ablate | steer | geometry | eval | report | stability [flags]
    fastxc study [flags]        the organism study end to end (python -m fastxc.study)
    fastxc export | store [flags]   interop formats; the activation store's info and validate

``python -m fastxc <subcommand>`` is the same command; ``python -m fastxc.train`` is the
training subcommand. This module is the top layer: it may import every layer below it, and the
embedded default (the organism's store) is resolved here, so the trainer never imports the
organism.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

# subcommand -> (module holding main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("fastxc.cli", "train a crosscoder (no flags: the embedded default)"),
    "harvest": ("fastxc.data.harvest", "harvest model activations into a store"),
    "organism": ("fastxc.organism.__main__", "build (or reuse) the model organism"),
    "diff": ("fastxc.analysis.diff", "decoder-norm diffing: NRN histogram, feature classes"),
    "stability": ("fastxc.analysis.stability", "match features across crosscoders: fraction matched, NRN agreement"),
    "reasoning": ("fastxc.analysis.reasoning", "features active before reasoning markers"),
    "ablate": ("fastxc.analysis.ablate", "ablate features, measure the marker-logit change"),
    "steer": ("fastxc.analysis.steer", "steer generation with a feature or a direction"),
    "geometry": ("fastxc.analysis.geometry", "word-pair geometry of both models' residuals"),
    "eval": ("fastxc.analysis.evaluate", "spliced-in loss recovered, FVU and L0"),
    "report": ("fastxc.analysis.report", "one HTML page from the analyses' outputs"),
    "study": ("fastxc.study.__main__", "the whole organism study: crosscoders, analyses, study.json"),
    "export": ("fastxc.export.__main__", "a crosscoder to SAELens / dictionary_learning, or back"),
    "store": ("fastxc.store.__main__", "an activation store's metadata (info) or integrity (validate)"),
}


def build_parser(name: str):
    """The argparse parser of ``fastxc NAME`` (each command module's ``build_parser()``; the
    training command's lives in ``fastxc.train.config``), e.g. to list a command's flags."""
    if name == "train":
        from fastxc.train.config import build_parser as train_parser

        return train_parser()
    if name not in COMMANDS:
        raise KeyError(f"unknown command {name!r}; expected one of {', '.join(COMMANDS)}")
    return importlib.import_module(COMMANDS[name][0]).build_parser()


def train_main(argv: Sequence[str] | None = None) -> int:
    """``fastxc train``: ``fastxc.train.main`` with the embedded default (the organism's store)
    when none of --store, --source, --config, --sweep, --model-a, --model-b, --model is given
    (the last three train straight from the models), and the next commands printed after it.

    The embedded default runs under pinned CPU numerics (``fastxc.core.numerics``), so its
    crosscoder is the same on every x86-64 machine; called before torch starts (as the
    command line does), this pins the process.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    data_flags = ("--store", "--source", "--config", "--sweep", "--model-a", "--model-b", "--model")
    if not any(a.split("=")[0] in data_flags for a in args):
        from fastxc.core import numerics

        numerics.pin()

    from fastxc.train import main

    def default_store(progress: bool) -> str:
        from fastxc.organism import default_store as organism_store

        return str(organism_store(progress=progress))

    def next_commands(out) -> list[str]:
        from fastxc.organism.default import next_commands as organism_next

        return organism_next(out)

    return main(args, default_store=default_store, next_commands=next_commands)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: fastxc <command> [flags]   (fastxc <command> --help for its flags)\n\ncommands:\n{rows}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fastxc`` console script; returns the exit code."""
    from fastxc.core.cli import require_full_install

    argv = list(sys.argv[1:] if argv is None else argv)
    # a kernels-only install: one error line and exit status 2, before any command's imports
    require_full_install("fastxc " + argv[0] if argv and argv[0] in COMMANDS else "fastxc")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name == "train":
        return train_main(rest)
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
