"""The model organism: a tiny base LM and its reasoning-distilled copy, built offline.

    python -m fastxc.organism            # build (or reuse) the cached organism, report markers
    from fastxc.organism import load_organism
    org = load_organism()                # Organism(root, base, distilled, tokenizer, info)
    store = default_store()              # both models harvested at half depth (cached)

Modules: ``corpus`` (seeded synthetic general text and reasoning traces), ``tokenizer``
(byte-level BPE), ``build`` (training and the cache), ``evaluate`` (sampling and marker
rates), ``default`` (the embedded default's store), ``check`` (crosscoder acceptance figures).
"""
from fastxc.organism.build import (RECIPE_VERSION, Organism, OrganismConfig, build_organism,
                                   fastxc_home, load_organism, organism_dir)
from fastxc.organism.default import default_store

__all__ = ["RECIPE_VERSION", "Organism", "OrganismConfig", "build_organism", "fastxc_home",
           "load_organism", "organism_dir", "default_store"]
