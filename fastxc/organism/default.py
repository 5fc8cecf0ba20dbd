"""The embedded default's activation store: both organism models harvested at half depth.

``default_store(seed)`` builds or loads the organism for ``seed``, writes a fresh held-out
corpus (reasoning traces and general text, ``TRACE_MIX`` of the tokens from traces) and
harvests the residual stream entering layer ``n_layers // 2`` of base (source 0) and
distilled (source 1).

The seed study mixes OpenThoughts and RedPajama 50/50. The organism's store takes 30% of its
tokens from traces: base has no representation of the traces' digits and line breaks, so
every trace-token feature leans to distilled, and at 50/50 they fill enough of a 1024-feature
dictionary that the self-reflection feature's NRN (0.75) sat at the 94.5th percentile of live
features instead of the top 5% (recipe v3 trial, seed 0; at 30% it was 0.79, above 98.3%).

The store is cached beside the organism under ``$FASTXC_HOME/stores/``, keyed by the
organism's key and ``STORE_VERSION``; a second call returns it at once.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from fastxc.core import numerics
from fastxc.organism.build import OrganismConfig, _quiet_threads, fastxc_home, load_organism, run_pinned
from fastxc.organism.corpus import general_text, reasoning_trace

# Bump when the store corpus or the harvest settings below change.
STORE_VERSION = 2
TRACE_MIX = 0.3  # fraction of the store's tokens taken from reasoning traces
DEFAULT_TOKENS = 200_000
CONTEXT_LENGTH = 128  # longer than any organism document, so each is one sequence


def store_dir(cfg: OrganismConfig, tokens: int = DEFAULT_TOKENS) -> Path:
    return fastxc_home() / "stores" / f"organism-{cfg.key()}-s{STORE_VERSION}-t{tokens}"


def write_store_corpus(folder: Path, seed: int, tokens: int, slip_rate: float, stream: str = "store") -> list[str]:
    """Fresh traces and general documents for harvesting; returns harvest dataset specs.

    Drawn from their own RNG stream ``stream`` (not the training corpus; the held-out store has
    another), with enough of each kind for ``tokens`` at ``TRACE_MIX`` (traces average ~50
    tokens, general documents ~18).
    """
    rng = random.Random(f"{stream}-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    n_traces = int(tokens * TRACE_MIX) // 35 + 100
    n_general = int(tokens * (1 - TRACE_MIX)) // 12 + 100
    paths = {"traces": folder / "store_traces.jsonl", "general": folder / "store_general.jsonl"}
    with open(paths["traces"], "w") as f:
        for _ in range(n_traces):
            t = reasoning_trace(rng, slip_rate)
            f.write(json.dumps({"text": t.text, "slipped": t.slipped, "kind": t.kind}) + "\n")
    with open(paths["general"], "w") as f:
        for _ in range(n_general):
            f.write(json.dumps({"text": general_text(rng)}) + "\n")
    return [f"{paths['traces']}:{TRACE_MIX}", f"{paths['general']}:{1 - TRACE_MIX}"]


def default_store(seed: int = 0, progress: bool = True, tokens: int = DEFAULT_TOKENS,
                  config: OrganismConfig | None = None) -> Path:
    """Path of the embedded default's store (sources "base", "distilled"), built if missing."""
    cfg = config if config is not None else OrganismConfig(seed=seed)
    return _organism_store(cfg, store_dir(cfg, tokens), tokens, "store", progress)


def _organism_store(cfg: OrganismConfig, root: Path, tokens: int, stream: str, progress: bool) -> Path:
    """``root/store``: both organism models harvested on ``tokens`` of fresh text drawn from RNG
    stream ``stream``, built (under pinned numerics) if missing."""
    from fastxc.data.harvest import harvest
    from fastxc.data.store import MANIFEST

    store = root / "store"
    if (store / MANIFEST).is_file():
        return store
    if not numerics.is_pinned():  # harvest under pinned numerics too (see build_organism)
        run_pinned(["-c", "import sys, json; from pathlib import Path; "
                          "from fastxc.organism.default import _organism_store; "
                          "from fastxc.organism.build import OrganismConfig; "
                          "_organism_store(OrganismConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), "
                          "int(sys.argv[3]), sys.argv[4], sys.argv[5] == '1')",
                    json.dumps(dataclasses.asdict(cfg)), str(root), str(tokens), stream, "1" if progress else "0"])
        return store
    org = load_organism(cfg, progress=progress)
    specs = write_store_corpus(root / "data", cfg.seed, tokens, cfg.slip_rate, stream=stream)
    # The corpus is rewritten identically (seeded), so an interrupted harvest resumes.
    with _quiet_threads(None):
        harvest([str(org.base), str(org.distilled)], store, specs, tokens,
                context_length=CONTEXT_LENGTH, batch_size=64, seed=cfg.seed, progress=progress,
                source_names=["base", "distilled"])
    return store


HELDOUT_TOKENS = 20_000


def heldout_store(seed: int = 0, progress: bool = True, tokens: int = HELDOUT_TOKENS) -> Path:
    """A held-out store for the default store's crosscoders: the same mix and harvest settings,
    texts from another RNG stream (none of the default store's documents), built if missing.
    For held-out FVU: ``fastxc eval --eval-store``."""
    cfg = OrganismConfig(seed=seed)
    root = fastxc_home() / "stores" / f"organism-{cfg.key()}-s{STORE_VERSION}-heldout-t{tokens}"
    return _organism_store(cfg, root, tokens, "heldout-store", progress)


def next_commands(run_dir: str | Path, seed: int = 0) -> list[str]:
    """Analysis commands to try on a default run's crosscoder (printed by fastxc.train)."""
    from fastxc.organism.build import organism_dir

    cfg = OrganismConfig(seed=seed)
    cc, st = Path(run_dir) / "crosscoder", store_dir(cfg) / "store"
    qs = organism_dir(cfg) / "corpus" / "heldout_traces.jsonl"
    an = Path(run_dir) / "analysis"
    common = f"--crosscoder {cc} --store {st}"
    return [
        f"fastxc diff {common} --out {an}/diff          # NRN histogram, top features",
        f"fastxc reasoning {common} --out {an}/reasoning  # features before Wait, Therefore, ...",
        f"fastxc ablate {common} --out {an}/ablate        # marker-logit change (seed Fig. 2)",
        f"fastxc steer {common} --out {an}/steer --prompts {qs} --suffix ' <think>' "
        f"--feature auto:self-reflection   # over-thinking",
        f"fastxc report --runs {an} --out {an}/report.html",
        "fastxc organism --help                 # rebuild the organism: size, steps, seed",
    ]
