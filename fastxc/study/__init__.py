"""The organism study in one command: ``python -m fastxc.study``.

For one organism seed it loads (or builds) the model organism and its default store, trains the
default crosscoder once per crosscoder seed, runs every analysis on each (eval, diff with latent
scaling, reasoning, ablate, steer), geometry and the organism's own evaluation once, matches the
crosscoders' features across seeds (stability), and writes:

    OUT/study.json                    every number below, each stage's sha256, the command
    OUT/report.html                   the first crosscoder seed's analyses (fastxc report)
    OUT/crosscoder-seed<C>/           the training run (crosscoder/, metrics, summary.json)
    OUT/crosscoder-seed<C>/analysis/  eval/ diff/ reasoning/ ablate/ steer/ (geometry/ for the
                                      first seed), each command's JSON and PNGs
    OUT/crosscoder-seed<C>/report.html
    OUT/stability/                    stability.json, stability.png

Each stage records the sha256 of its output (the organism's weights, the store's files, each
crosscoder's weights), so two machines whose figures differ can see which stage first differs.
A stage whose output exists is reused (a study killed half-way continues where it stopped).

The acceptance of the study (``ACCEPTANCE``) is evaluated per crosscoder run and written to
``study.json``: ablation before "Wait", the pre-"Wait" feature, and steering with it.
"""
from __future__ import annotations

from fastxc.study.run import ACCEPTANCE, StudyConfig, run_study, tree_sha256

__all__ = ["ACCEPTANCE", "StudyConfig", "run_study", "tree_sha256"]
