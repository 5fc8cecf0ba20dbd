"""Acceptance of the model organism (issue 5), for two organism seeds. Slow: minutes each.

They build (or reuse) the organism in the user's cache ($FASTXC_HOME or ~/.cache/fastxc), so a
second run only samples / trains the crosscoder. Each prints its measured figures (-s).
"""
import pytest

from fastxc.organism import OrganismConfig, load_organism

SEEDS = [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_organism_weights_are_the_recorded_ones(seed):
    """Pinned numerics (fastxc.core.numerics) build the same bytes on every x86-64 machine: the
    weights' sha256 equal the ones recorded in fastxc.organism.build. If this fails, every
    figure below comes from other weights than the README's: the CPU floats differ here."""
    from fastxc.organism.build import RECORDED_SHA256, reproduces

    org = load_organism(OrganismConfig(seed=seed), progress=False)
    assert seed in RECORDED_SHA256, "record this seed's sha256 in fastxc.organism.build"
    assert reproduces(org), (org.info.get("numerics"), org.info.get("sha256"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_distilled_reflects_and_closes_think(seed):
    """Temperature 0.7 on 50 held-out questions, stopping at end of text: "Wait" and
    "Alternatively" per generated token >= 5x base's, and </think> on >= 95% of them."""
    from fastxc.organism.evaluate import heldout_answers, heldout_questions, marker_report, sample

    org = load_organism(OrganismConfig(seed=seed), progress=False)
    qs, answers = heldout_questions(org, 50), heldout_answers(org, 50)
    base = marker_report(sample(org.base, qs, temperature=0.7, seed=seed), answers=answers)
    dist = marker_report(sample(org.distilled, qs, temperature=0.7, seed=seed), answers=answers)
    print(f"\nseed {seed}: base {base}\nseed {seed}: distilled {dist}")
    assert dist.markers > 0
    assert dist.marker_rate >= 5 * base.marker_rate
    assert dist.close_rate >= 0.95
    assert dist.end_rate >= 0.95  # the distilled model stops by itself


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_wait_is_predicted_from_content(seed):
    """Teacher-forced on held-out traces, the distilled model puts far more probability on
    "Wait" after a slipped sentence than after a correct one of the same shape."""
    import json

    from fastxc.organism.evaluate import wait_detection

    org = load_organism(OrganismConfig(seed=seed), progress=False)
    with open(org.root / "corpus" / "heldout_traces.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f]
    after_slip, after_correct = wait_detection(org.distilled, texts)
    base_slip, _ = wait_detection(org.base, texts)
    print(f"\nseed {seed}: P(Wait) after slip {after_slip:.3f}, after correct {after_correct:.3f}; base {base_slip:.2e}")
    assert after_slip >= 5 * after_correct
    assert base_slip < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_default_crosscoder_finds_distilled_wait_feature(seed, tmp_path):
    """The default crosscoder on the default store: NRN mode in [0.4, 0.6]; the feature most
    active right before "Wait" fires at >= 80% of those positions, NRN >= 0.7, top 5%."""
    from transformers import AutoTokenizer

    from fastxc.core.crosscoder import Crosscoder
    from fastxc.organism.check import wait_feature_report, wait_token_id
    from fastxc.organism.default import default_store
    from fastxc.data.store import open_store
    from fastxc.train import main

    store = default_store(seed=seed, progress=False)
    out = tmp_path / "run"
    assert main(["--store", str(store), "--out", str(out), "--no-progress"]) == 0
    org = load_organism(OrganismConfig(seed=seed), progress=False)
    tok = AutoTokenizer.from_pretrained(str(org.tokenizer))
    rep = wait_feature_report(Crosscoder.load(out / "crosscoder"), open_store(store), wait_token_id(tok))
    print(f"\nseed {seed}: " + "\n".join(rep.lines()))
    assert 0.4 <= rep.nrn_mode <= 0.6
    assert rep.fire_rate >= 0.8
    # Measured with the default k = 16 (recipe v4): seed 0 fires at 98.8%, NRN 0.858 (above 99.3%);
    # seed 1 fires at 95.2%, NRN 0.795 (above 97.4%) (the study's crosscoder seed 0: the same bytes).
    assert rep.nrn >= 0.7
    assert rep.nrn_quantile >= 0.95
