"""Acceptance of the analysis layer on the model organism (slow: builds/loads the organism, its
default store and a default crosscoder once per module).

``FASTXC_TEST_CROSSCODER=DIR`` (with ``FASTXC_TEST_STORE=DIR``) reuses an already trained
crosscoder instead of training one here.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _default_store():
    try:
        from fastxc.organism import default_store
    except ImportError:
        from fastxc.organism.default import default_store
    return default_store(progress=False)


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    from fastxc.analysis.inputs import open_inputs

    store = Path(os.environ.get("FASTXC_TEST_STORE") or _default_store())
    cc_dir = os.environ.get("FASTXC_TEST_CROSSCODER")
    if not cc_dir:
        from fastxc.train import main

        out = tmp_path_factory.mktemp("default_run")
        assert main(["--store", str(store), "--out", str(out), "--no-progress"]) == 0
        cc_dir = out / "crosscoder"
    inp = open_inputs(cc_dir, store)
    inp.models()
    # the organism folder holds both models (base/, distilled/) and its held-out corpus
    root = Path(inp.model_names[1]).parent
    assert (root / "corpus" / "heldout_traces.jsonl").is_file(), root
    return {"inp": inp, "root": root, "store": store, "cc": Path(cc_dir)}


def test_ablating_distilled_self_reflection_features_lowers_wait(organism):
    """Seed Figure 2: features active before "Wait" with NRN > 0.5, zero-ablated."""
    from fastxc.analysis.ablate import ablate_category

    r = ablate_category(organism["inp"], "self-reflection", ["Wait"], n_positions=100, percents=(1, 5))
    d_base, d_dist = r["sets"]["nrn>0.5"]["delta"]
    print(f"\nablation ({r['sets']['nrn>0.5']['n_features']} features, {r['n_positions']} positions): "
          f"Wait logit change base {d_base:+.3f}, distilled {d_dist:+.3f}; "
          + "; ".join(f"{k}: {v['delta'][0]:+.3f} / {v['delta'][1]:+.3f}" for k, v in r["sets"].items()))
    assert d_dist <= -1.0
    assert -d_dist >= 3 * (-d_base)


def test_steering_with_wait_feature_overthinks(organism):
    """Seed section 5: steer's default pick (the most active feature before "Wait" among the top
    5% NRN toward distilled) raises "Wait" per token >= 5x at some alpha <= 8 x its mean
    activation, and thinking gets longer."""
    from fastxc.analysis.inputs import read_texts
    from fastxc.analysis.diff import feature_activity
    from fastxc.analysis.steer import feature_direction, most_predictive_feature, steer_sweep

    inp = organism["inp"]
    best, ranking = most_predictive_feature(inp, ["Wait"], source=1)
    mean_act = float(feature_activity(inp.crosscoder, inp.reader, n_top=1).mean_act[best])
    heldout = organism["root"] / "corpus" / "heldout_traces.jsonl"
    prompts = [q + " <think>" for q in read_texts(heldout, "question", 50)]
    answers = read_texts(heldout, "answer", 50)
    mults = [0, 2, 4, 8]
    sweep = steer_sweep(inp.models()[1], inp.tokenizer(), prompts, inp.layer, feature_direction(inp.crosscoder, [best], 1),
                        mults, {"self-reflection": ("Wait",)}, unit=mean_act, answers=answers, max_new_tokens=160,
                        temperature=0.7, seed=0)
    base = sweep[0]
    print(f"\nfeature {best} (mean activation before Wait {ranking[0][1]:.3f}), mean activation {mean_act:.3f}")
    for r in sweep:
        c = r["coherence"]
        print(f"  alpha {r['multiple']:g} x mean: Wait/token {r['rate']['self-reflection']:.4f} "
              f"(text {r['text_rate']['self-reflection']:.4f}), thinking {r['mean_think_tokens']:.1f} tokens, "
              f"closed {c['closed']:.2f}, answered {c['answered']:.2f}, correct {c['correct']:.2f}")
    hits = [r for r in sweep[1:] if r["rate"]["self-reflection"] >= 5 * base["rate"]["self-reflection"]]
    assert base["rate"]["self-reflection"] > 0 and hits, "no alpha <= 8 x mean activation raised Wait/token 5x"
    assert max(r["mean_think_tokens"] for r in hits) > base["mean_think_tokens"]


def test_fraction_of_loss_recovered(organism):
    from fastxc.analysis.inputs import read_texts
    from fastxc.analysis.evaluate import evaluate, text_sequences

    inp = organism["inp"]
    corpus = organism["root"] / "corpus"
    texts = read_texts(corpus / "heldout_traces.jsonl", limit=64) + read_texts(corpus / "heldout_general.jsonl", limit=64)
    res = evaluate(inp, text_sequences(texts, inp.tokenizer(), 128), metric_rows=8192)
    print(f"\nspliced-in CE: clean {res['clean']}, spliced {res['spliced']}, zero {res['zero']}; "
          f"fraction recovered {res['frac_recovered']}; FVU {res['store']['fvu']}, L0 {res['store']['l0']:.1f}")
    assert min(res["frac_recovered"]) >= 0.95


def test_every_command_rejects_a_mismatched_crosscoder(organism, tmp_path, capsys):
    from fastxc.analysis import ablate, diff, evaluate, geometry, reasoning, steer
    from fastxc.core.crosscoder import Crosscoder

    inp = organism["inp"]
    w = inp.crosscoder.widths[0]
    bad = Crosscoder([w // 2, w // 2], 64, k=4).save(tmp_path / "bad")
    (tmp_path / "p.txt").write_text("What is 2 plus 3? <think>\n")
    models = ["--model-a", inp.model_names[0], "--model-b", inp.model_names[1], "--layer", str(inp.layer)]
    with_store = ["--store", str(organism["store"])]
    runs = {
        diff: with_store, reasoning: with_store, ablate: with_store, evaluate: models + ["--data", str(tmp_path / "p.txt")],
        steer: models + ["--prompts", str(tmp_path / "p.txt"), "--feature", "1", "--alpha-unit", "raw"],
        geometry: models,
    }
    for mod, args in runs.items():
        rc = mod.main(["--crosscoder", str(bad), "--out", str(tmp_path / mod.__name__)] + args)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and "width" in err and err.count("\n") == 1, (mod.__name__, err)
