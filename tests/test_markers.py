"""Markers counted as tokens, coherence, multiples of the unit (steer, organism metrics), and
honest plots (steer, reasoning, geometry) and report wrapping. Issue #14, items 3 and 8."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from test_analysis import LAYER, WIDTH, random_crosscoder, shared_world


@pytest.fixture(scope="module")
def world():
    return shared_world()


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE (the organism's trainer) where "However" is "How" + "ever" and "Wait" one token."""
    from fastxc.organism.tokenizer import train_tokenizer

    texts = (["How many cats are there? Wait, two.\nWait, three."] * 40 + ["It will ever be so. Did it ever rain?"] * 40
             + ["\nHowever, no."] * 3 + ["So. However, yes."] * 20)
    tok = train_tokenizer(texts, vocab_size=300)
    ids = tok("However", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids] == ["How", "ever"]  # the premise of the tests below
    return tok


class _Reader:
    """The two things marker_rows reads from a store: token ids and (absent) document metadata."""

    def __init__(self, tokens):
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.path = "fake"

    def __len__(self):
        return len(self.tokens)

    def meta(self, name):
        return None


# ---------------------------------------------------------------------------- counting
def test_marker_starts_longest_first_without_overlap():
    from fastxc.analysis.reasoning import count_marker_tokens, marker_starts

    seqs = [(7,), (7, 8)]
    assert marker_starts([7, 8, 7, 9, 7, 8], seqs).tolist() == [0, 2, 4]  # (7, 8) claims its 7 first
    assert marker_starts([5, 5, 5], [(5, 5)]).tolist() == [0]  # a spelling does not overlap itself
    assert count_marker_tokens([3, 3, 3], [(3,)]) == 3
    assert count_marker_tokens([], [(3,)]) == 0


def test_waitwait_is_two_marker_tokens(bpe):
    from fastxc.analysis.reasoning import count_marker_tokens, marker_sequences

    seqs = marker_sequences(bpe, ["Wait"])
    assert len(seqs) == 2 and all(len(q) == 1 for q in seqs)  # "Wait" and " Wait"
    for text, want in (("WaitWait", 2), ("WaitWaitWait.", 3), (" Wait, x.\nWait", 2), ("Waiting", 1)):
        assert count_marker_tokens(bpe(text, add_special_tokens=False)["input_ids"], seqs) == want, text


def test_a_multi_token_marker_counts_only_whole(bpe):
    """ "How" alone is not "However": the old first-token rule counted every "How many"."""
    from fastxc.analysis.reasoning import count_marker_tokens, marker_rows, marker_sequences

    seqs = marker_sequences(bpe, ["However"])
    assert seqs == [tuple(bpe("However", add_special_tokens=False)["input_ids"])]
    ids = bpe("How many? However, no.\nHowever yes. How so?", add_special_tokens=False)["input_ids"]
    assert count_marker_tokens(ids, seqs) == 2
    how = bpe("How", add_special_tokens=False)["input_ids"][0]
    starts = [i for i, t in enumerate(ids) if t == how]
    assert len(starts) == 4
    on = marker_rows(_Reader(ids), bpe, ["However"], "on")
    assert on.tolist() == starts[1:3]
    assert marker_rows(_Reader(ids), bpe, ["However"], "before").tolist() == [s - 1 for s in starts[1:3]]


def _gen(text, tok, closed=None):
    from fastxc.analysis.steer import Generation

    ids = tok(text, add_special_tokens=False)["input_ids"]
    closed = "</think>" in text if closed is None else closed
    return Generation("p", text, len(ids) + 1, len(ids), closed, ids)


def test_marker_stats_counts_tokens_and_text(bpe):
    from fastxc.analysis.steer import marker_stats

    g = [_gen("WaitWait", bpe), _gen("x.\nWait, How many?", bpe)]
    s = marker_stats(g, bpe, {"self-reflection": ("Wait",), "contrastive": ("However",)})
    assert s["markers"] == {"self-reflection": 3, "contrastive": 0}
    assert s["text_markers"] == {"self-reflection": 3, "contrastive": 0}
    assert s["rate"]["self-reflection"] == 3 / s["tokens"] and s["tokens"] == sum(x.n_tokens for x in g)
    # text occurrences are a cross-check: "Waiter" holds "Wait" but spells other tokens
    s = marker_stats([_gen("Waiter", bpe)], bpe, {"w": ("Wait",)})
    assert s["text_markers"]["w"] == 1 and s["markers"]["w"] == len(
        [t for t in bpe("Waiter", add_special_tokens=False)["input_ids"] if bpe.decode([t]) == "Wait"])


def test_coherence_closed_answered_correct(world):
    from fastxc.analysis.steer import Generation, answer_of, coherence, is_correct

    mk = lambda text: Generation("p", text, 5, 3, "</think>" in text, [])  # noqa: E731
    g = [mk("a </think> 79"), mk("a </think> 80."), mk("a </think>  "), mk("a b c")]
    assert [answer_of(x.text) for x in g] == ["79", "80.", "", None]
    assert is_correct("80.", "80") and not is_correct("79", "80") and not is_correct(None, "80")
    c = coherence(g, ["79", "80", "1", "2"])
    assert c == {"closed": 0.75, "answered": 0.5, "correct": 0.5}
    assert coherence(g)["correct"] is None  # no answers: not judged, not guessed
    with pytest.raises(ValueError, match="2 answers for 4"):
        coherence(g, ["1", "2"])


# ---------------------------------------------------------------------------- sweep, plot, CLI
def test_sweep_records_multiples_and_the_plot_uses_them(world):
    from fastxc.analysis.steer import feature_direction, steer_sweep, sweep_figure

    cc = random_crosscoder([WIDTH, WIDTH], scales=world["reader"].scales)
    sweep = steer_sweep(world["models"][1], world["tok"], ["he is", "so we"], LAYER, feature_direction(cc, [2], 1),
                        [0, 2], unit=1.5, answers=["she", "add"], max_new_tokens=3)
    assert [(r["multiple"], r["alpha"]) for r in sweep] == [(0.0, 0.0), (2.0, 3.0)]
    assert all(r["coherence"]["correct"] is not None for r in sweep)
    assert all(len(x["ids"]) <= 3 for x in sweep[1]["samples"])
    fig = sweep_figure(sweep, "multiple of the mean activation (1.5)")
    try:
        axes = fig.axes
        assert len(axes) == 3
        for ax in axes:
            assert ax.get_xlabel() == "multiple of the mean activation (1.5)" and ax.get_ylabel()
            assert ax.get_legend() is not None
            assert all(list(line.get_xdata()) in ([0.0, 2.0], []) for line in ax.get_lines())
        labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
        assert "self-reflection (tokens)" in labels and "self-reflection (text)" in labels
        labels = [t.get_text() for t in axes[2].get_legend().get_texts()]
        assert labels == ["</think> closed", "answer given", "answer correct"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_steer_cli_multiples_units_and_answers(world, tmp_path, capsys):
    from fastxc.analysis.steer import main

    cc = random_crosscoder([WIDTH, WIDTH], scales=world["reader"].scales).save(tmp_path / "cc")
    (tmp_path / "p.jsonl").write_text('{"question": "he is", "answer": "she"}\n{"question": "so we", "answer": "add"}\n')
    common = ["--crosscoder", str(cc), "--store", str(world["store"]), "--max-new-tokens", "3"]
    rc = main(common + ["--prompts", str(tmp_path / "p.jsonl"), "--feature", "3", "--multiples", "0,2",
                        "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "o" / "steer.json").read_text())
    u = res["unit"]["value"]
    assert u > 0 and res["multiples"] == [0.0, 2.0] and res["alphas"] == [0.0, 2 * u]
    assert res["unit"]["label"].startswith("multiple of the mean activation where it fires")
    assert res["correctness"].startswith("judged against field 'answer'")
    assert res["sweep"][1]["coherence"]["correct"] is not None
    out = capsys.readouterr().out
    assert "x2     (alpha" in out and "correct " in out and "in text)" in out
    # plain-text prompts have no answers: said so, not guessed
    (tmp_path / "p.txt").write_text("he is\nso we\n")
    rc = main(common + ["--prompts", str(tmp_path / "p.txt"), "--diff-means", "self-reflection", "--multiples", "0,1",
                        "--alpha-unit", "raw", "--out", str(tmp_path / "o2")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "o2" / "steer.json").read_text())
    assert res["correctness"].startswith("not judged") and res["sweep"][0]["coherence"]["correct"] is None
    assert res["unit"]["label"] == "norm added to the residual stream (raw units)"
    from fastxc.analysis.inputs import open_inputs
    from fastxc.analysis.steer import diff_means_direction

    inp = open_inputs(tmp_path / "cc", world["store"])
    d = diff_means_direction(inp.reader, inp.tokenizer(), ["Wait"], 0)
    assert res["alphas"][1] == pytest.approx(1 / float(d.norm()), rel=1e-6)  # alpha x |d| = 1 residual unit
    capsys.readouterr()
    assert main(common + ["--prompts", str(tmp_path / "p.txt"), "--feature", "3", "--multiples", "a,b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --multiples") and err.count("\n") == 1


# ---------------------------------------------------------------------------- organism metrics
def test_organism_sample_counts_marker_tokens(world):
    from fastxc.organism.evaluate import sample

    tok = world["tok"]
    comps = sample(world["models"][1], ["he is", "so we add"], max_new_tokens=5, seed=0, tokenizer=tok)
    wait = tok.convert_tokens_to_ids("Wait")
    for c in comps:
        assert tok.decode(c.ids, skip_special_tokens=False) == c.text
        assert c.marker_tokens["Wait"] == c.ids.count(wait)


def test_marker_report_tokens_text_and_coherence(bpe):
    from fastxc.organism.evaluate import Completion, marker_report

    def comp(text):
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        from fastxc.analysis.reasoning import count_marker_tokens, marker_sequences

        return Completion("q <think>", text, len(ids) + 1, True, ids,
                          {w: count_marker_tokens(ids, marker_sequences(bpe, [w])) for w in ("Wait", "Alternatively")})

    cs = [comp("WaitWait </think> 12"), comp("x. </think> 9"), comp("Wait, no")]
    r = marker_report(cs)
    assert r.markers == 3 and r.text_markers == 3 and r.marker_rate == 3 / r.tokens
    assert r.close_rate == pytest.approx(2 / 3) and r.answered_rate == pytest.approx(2 / 3) and r.correct_rate is None
    assert marker_report(cs, answers=["12", "8", "1"]).correct_rate == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="not counted when sampling"):
        marker_report(cs, words=("Wait", "However"))


# ---------------------------------------------------------------------------- reasoning plot
def test_reasoning_nrn_figure_has_legend_and_labels():
    from fastxc.analysis.reasoning import category_nrn_figure

    res = {c: {"active_nrn": [0.2, 0.7, 0.9], "active_freq": [0.5, 0.1, 0.3], "n_positions": 9}
           for c in ("self-reflection", "deductive")}
    fig = category_nrn_figure(res, ["base", "distilled"])
    try:
        panels = [ax for ax in fig.axes if ax.get_legend() is not None]
        assert len(panels) == 2
        for ax in panels:
            assert ax.get_xlabel() == "NRN (0 base, 1 distilled)" and ax.get_ylabel() == "active features"
            assert [t.get_text() for t in ax.get_legend().get_texts()] == [
                "active features (left)", "weighted by firing frequency (right)"]
        twins = [ax for ax in fig.axes if ax.get_legend() is None]
        assert len(twins) == 2 and all(ax.get_ylabel() == "sum of firing frequencies" for ax in twins)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


# ---------------------------------------------------------------------------- geometry
def _zeroed(model, tok, words):
    """A copy of ``model`` whose input embeddings of ``words`` are zero (all at one point)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for w in words:
            m.get_input_embeddings().weight[tok.convert_tokens_to_ids(w)] = 0
    return m


CLASSES = {"gender": [("he", "she"), ("him", "her"), ("king", "queen"), ("man", "woman")],
           "plural": [("dog", "dogs"), ("cat", "cats")]}


def test_degenerate_class_is_skipped_not_scored(world, tmp_path):
    from fastxc.analysis.geometry import cdf_figure, degenerate_classes, geometry_analysis

    tok = world["tok"]
    base = _zeroed(world["models"][0], tok, ["dogs", "cats"])
    res = geometry_analysis([base, world["models"][1]], ["base", "distilled"], tok, LAYER, CLASSES, dims=(2, 4),
                            out=tmp_path)
    assert list(res["degenerate"]["base"]) == ["plural"] and res["degenerate"]["distilled"] == {}
    assert "second words (cats, dogs) are one point" in res["degenerate"]["base"]["plural"]
    for k in ("2", "4"):
        assert res["losses"][k]["plural"]["base"] is None and res["median"][k]["plural"]["base"] is None
        assert len(res["losses"][k]["plural"]["distilled"]) == 1 and len(res["losses"][k]["gender"]["base"]) == 6
    saved = json.loads((tmp_path / "geometry.json").read_text())
    assert saved["median"]["2"]["plural"]["base"] is None and "plural" in saved["degenerate"]["base"]
    fig = cdf_figure(res["losses"]["2"])
    try:
        ax = fig.axes[list(res["losses"]["2"]).index("plural")]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["base: skipped (degenerate)", "distilled (1 quads)"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    # one word at the same point as another is no collapse of a side
    X = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert degenerate_classes(X, ["a", "b", "c", "d"], {"k": [("a", "c"), ("b", "d")]}) != {}
    assert degenerate_classes(X, ["a", "b", "c", "d"], {"k": [("a", "b"), ("c", "d")]}) == {}


def test_geometry_cli_says_what_it_skipped(world, tmp_path, capsys):
    from fastxc.analysis.geometry import main

    tok = world["tok"]
    _zeroed(world["models"][0], tok, ["dogs", "cats"]).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cc = random_crosscoder([WIDTH, WIDTH]).save(tmp_path / "cc")
    (tmp_path / "pairs.json").write_text(json.dumps({**CLASSES, "places": [["Paris", "France"], ["he", "she"]]}))
    rc = main(["--crosscoder", str(cc), "--model-a", str(tmp_path / "base"), "--model-b", world["paths"][1],
               "--layer", str(LAYER), "--pairs", str(tmp_path / "pairs.json"), "--dims", "2",
               "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "  plural           base skipped  distilled " in out
    assert "skipped for base: plural: all 2 second words (cats, dogs) are one point" in out
    assert "places: 1 of 2 pairs usable; not single tokens: France, Paris" in out
    cov = json.loads((tmp_path / "o" / "geometry.json").read_text())["coverage"]
    assert cov["places"] == {"pairs": 2, "usable": 1, "not_single_tokens": ["France", "Paris"]}
