"""diff / reasoning / ablate / steer mechanics on the tiny world of test_analysis."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_analysis import LAYER, WIDTH, identity_crosscoder, random_crosscoder, shared_world


@pytest.fixture(scope="module")
def world():
    return shared_world()


def _inputs(world, cc):
    from fastxc.analysis.inputs import open_inputs

    return open_inputs(cc, world["store"])


# ---------------------------------------------------------------------------- diff
def test_feature_activity_matches_brute_force(world):
    from fastxc.analysis.diff import feature_activity

    reader = world["reader"]
    cc = random_crosscoder([WIDTH, WIDTH], scales=reader.scales)
    act = feature_activity(cc, reader, batch_size=50, n_top=3)  # 288 rows: several chunks
    x = cc.flatten_input(reader.read_rows(np.arange(len(reader))))
    f = cc.encode(x)
    torch.testing.assert_close(act.freq, (f > 0).float().mean(0))
    torch.testing.assert_close(act.max_act, f.max(0).values)
    v, r = f.topk(3, dim=0)
    live = act.freq > 0
    torch.testing.assert_close(act.top_vals[live], v.t()[live])
    feat = torch.arange(cc.n_features).unsqueeze(1).expand_as(act.top_rows)
    ok = act.top_rows >= 0
    torch.testing.assert_close(f[act.top_rows[ok], feat[ok]], act.top_vals[ok])  # the rows hold those values
    assert torch.equal(ok, act.top_vals > 0)


def test_diff_analysis_outputs(world, tmp_path):
    from fastxc.analysis.diff import diff_analysis

    reader = world["reader"]
    cc = random_crosscoder([WIDTH, WIDTH], scales=reader.scales)
    with torch.no_grad():  # make feature 0 B-only and feature 1 A-only, both firing on every row
        cc.W_dec[0, :WIDTH] = 0
        cc.W_dec[1, WIDTH:] = 0
        cc.b_enc[:2] = 100.0  # pre-activation far above any other: always among the top k
    calls = []
    s = diff_analysis(cc, reader, world["tok"], tmp_path, top_n=3, n_examples=2,
                      annotate=lambda rec: calls.append(rec["feature"]) or f"feature {rec['feature']}")
    assert sum(s["classes"].values()) == s["live_features"]
    # the printed histogram counts the live features, like diff.json and nrn_hist.png
    assert s["live_features"] < cc.n_features  # dead features exist here, so the check can fail
    assert sum(int(line.split()[-1]) for line in s["nrn_text"].splitlines()) == s["live_features"]
    assert (tmp_path / "nrn_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = [json.loads(l) for l in (tmp_path / "features.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and len(calls) == 6
    top = [r for r in recs if r["group"] == "top"]
    assert [r["rank"] for r in top] == [0, 1, 2]
    assert all(top[i]["nrn"] >= top[i + 1]["nrn"] for i in range(2))
    assert s["top_features"][0] == 0 and top[0]["nrn"] == 1.0  # the only B-only feature: NRN exactly 1
    assert s["bottom_features"][0] == 1 and s["records"][3]["nrn"] == 0.0  # the only A-only feature: NRN 0
    for r in recs:
        assert r["annotation"] == f"feature {r['feature']}"
        for c in r["contexts"]:
            assert c["text"].count("[[") == 1 and c["tokens"][c["focus"]] in c["text"]
            assert abs(c["acts"][c["focus"]] - c["activation"]) < 1e-4 and c["activation"] > 0


def test_diff_cli_rejects_width_mismatch(world, tmp_path, capsys):
    from fastxc.analysis.diff import main

    bad = identity_crosscoder([8, 8]).save(tmp_path / "bad")
    assert main(["--crosscoder", str(bad), "--store", str(world["store"]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "widths" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ---------------------------------------------------------------------------- reasoning
def test_marker_rows_before_and_on(world):
    from fastxc.analysis.reasoning import marker_rows, marker_token_ids

    reader, tok = world["reader"], world["tok"]
    wait = tok.convert_tokens_to_ids("Wait")
    assert marker_token_ids(tok, ["Wait"]) == [wait]
    t = reader.tokens
    on = marker_rows(reader, tok, ["Wait"], "on")
    before = marker_rows(reader, tok, ["Wait"], "before")
    assert len(on) > 0 and np.array_equal(on, np.flatnonzero(t == wait))
    # the store has no doc ids: every next row continues (sequences of 12 are back to back)
    assert np.array_equal(before, np.flatnonzero(t[1:] == wait))


def test_reasoning_analysis_outputs(world, tmp_path):
    from fastxc.analysis.reasoning import reasoning_analysis

    reader = world["reader"]
    cc = random_crosscoder([WIDTH, WIDTH], scales=reader.scales)
    cats = {"self-reflection": ["Wait"], "nothing": ["Nonexistentword"]}
    with pytest.raises(ValueError, match="no token for the markers"):
        reasoning_analysis(cc, reader, world["tok"], cats, out=tmp_path)
    s = reasoning_analysis(cc, reader, world["tok"], {"self-reflection": ["Wait"], "deductive": ["Therefore", "Thus"]},
                           out=tmp_path)
    r = s["categories"]["self-reflection"]
    assert r["n_positions"] > 0 and len(r["active"]) == len(r["active_nrn"]) == len(r["active_freq"])
    assert all(r["active_freq"][i] >= r["active_freq"][i + 1] for i in range(len(r["active"]) - 1))
    assert (tmp_path / "reasoning_nrn.png").exists() and (tmp_path / "reasoning.json").exists()


# ---------------------------------------------------------------------------- ablate
def test_ablating_nothing_changes_nothing(world):
    from fastxc.analysis.ablate import ablation_logits, windows
    from fastxc.analysis.reasoning import marker_rows

    reader, tok = world["reader"], world["tok"]
    cc = random_crosscoder([WIDTH, WIDTH], scales=reader.scales)
    rows = marker_rows(reader, tok, ["Wait"])[:5]
    ctx, tgt = windows(reader, tok, rows, 8)
    res = ablation_logits(cc, world["models"], tok, LAYER, ctx, tgt, {"none": [], "all": list(range(cc.n_features))})
    assert torch.equal(res["none"], res["clean"])
    assert (res["all"] - res["clean"]).abs().max() > 1e-4


def test_ablation_matches_hand_computation(world):
    """Ablating features {3, 7} equals subtracting f_k * W_dec[k, src] / input_scale by hand."""
    from fastxc.analysis.ablate import ablation_logits
    from fastxc.analysis.inputs import encode_raw
    from fastxc.analysis.hooks import capture_residual, edit_residual

    reader, tok = world["reader"], world["tok"]
    cc = random_crosscoder([WIDTH, WIDTH], n_features=16, k=8, scales=reader.scales)
    ids = world["ids"][:2, :7]
    tgt = [5, 9]
    res = ablation_logits(cc, world["models"], tok, LAYER, ids.tolist(), tgt, {"s": [3, 7]})
    acts = [capture_residual(m, LAYER, ids) for m in world["models"]]
    code = encode_raw(cc, acts)
    for i, m in enumerate(world["models"]):
        w = cc.W_dec.detach()[[3, 7], i * WIDTH:(i + 1) * WIDTH] / cc.input_scale[i]
        delta = code[..., [3, 7]] @ w
        delta[:, 0] = 0  # BOS untouched
        with edit_residual(m, LAYER, lambda h: h - delta), torch.no_grad():
            logits = m(input_ids=ids).logits
        torch.testing.assert_close(res["s"][i], logits[torch.arange(2), -1, tgt], rtol=0, atol=1e-5)


def test_feature_with_zero_base_decoder_leaves_base_unchanged(world):
    from fastxc.analysis.ablate import ablation_logits

    reader, tok = world["reader"], world["tok"]
    cc = random_crosscoder([WIDTH, WIDTH], scales=reader.scales)
    with torch.no_grad():
        cc.W_dec[:10, :WIDTH] = 0  # features 0-9 write only into the distilled model
    res = ablation_logits(cc, world["models"], tok, LAYER, world["ids"][:4, :9].tolist(), [5] * 4, {"b": list(range(10))})
    assert torch.equal(res["b"][0], res["clean"][0])


def test_category_feature_sets():
    from fastxc.analysis.ablate import category_feature_sets

    freq = torch.tensor([0.0, 0.5, 0.9, 0.1, 0.3] + [0.0] * 195)
    nrn = torch.tensor([0.9, 0.8, 0.2, 0.6, 0.4] + [0.5] * 195)
    sets = category_feature_sets(freq, nrn, percents=(0.5, 1, 2, 5))
    assert sets["nrn>0.5"] == [1, 3]  # feature 0 has NRN 0.9 but never fires
    assert sets["top0.5%"] == [2] and sets["top1%"] == [2, 1]
    assert sets["top2%"] == [2, 1, 4, 3] and sets["top5%"] == [2, 1, 4, 3]
    strict = category_feature_sets(freq, nrn, percents=(5,), min_freq=0.2)
    assert strict["nrn>0.5"] == [1] and strict["top5%"] == [2, 1, 4]


def test_ablate_cli(world, tmp_path, capsys):
    from fastxc.analysis.ablate import main

    cc = random_crosscoder([WIDTH, WIDTH], scales=world["reader"].scales).save(tmp_path / "cc")
    rc = main(["--crosscoder", str(cc), "--store", str(world["store"]), "--category", "self-reflection",
               "--n-positions", "6", "--context", "6", "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "o" / "ablate.json").read_text())["results"][0]
    assert res["n_positions"] == 6 and "nrn>0.5" in res["sets"] and "top20%" in res["sets"]
    assert (tmp_path / "o" / "ablate.png").exists()
    bad = identity_crosscoder([WIDTH, WIDTH]).save(tmp_path / "bad")
    rc = main(["--crosscoder", str(bad), "--store", str(world["store"]), "--model-a", world["paths"][0],
               "--model-b", str(tmp_path / "nowhere"), "--category", "self-reflection"])
    assert rc == 2 and capsys.readouterr().err.startswith("error: cannot load model")


# ---------------------------------------------------------------------------- steer
def test_steer_alpha_zero_equals_unsteered(world):
    from fastxc.analysis.steer import feature_direction, generate

    reader, tok = world["reader"], world["tok"]
    cc = random_crosscoder([WIDTH, WIDTH], scales=reader.scales)
    m = world["models"][1]
    prompts = ["he is", "Wait , two plus", "so we add"]
    d = feature_direction(cc, [4], 1)
    plain = generate(m, tok, prompts, LAYER, None, 0.0, max_new_tokens=6, temperature=1.0, seed=3)
    zero = generate(m, tok, prompts, LAYER, d, 0.0, max_new_tokens=6, temperature=1.0, seed=3)
    assert [g.text for g in plain] == [g.text for g in zero]
    big = generate(m, tok, prompts, LAYER, d / d.norm(), 50.0, max_new_tokens=6, temperature=0.0)
    greedy = generate(m, tok, prompts, LAYER, None, 0.0, max_new_tokens=6, temperature=0.0)
    assert [g.text for g in big] != [g.text for g in greedy]
    with pytest.raises(ValueError, match="residual width"):
        generate(m, tok, prompts, LAYER, torch.zeros(WIDTH + 1), 1.0)


def test_most_predictive_feature_is_the_strongest_ablation(world):
    from fastxc.analysis.ablate import rank_features
    from fastxc.analysis.inputs import open_inputs
    from fastxc.analysis.diff import relative_norms
    from fastxc.analysis.steer import most_predictive_feature

    cc = random_crosscoder([WIDTH, WIDTH], scales=world["reader"].scales)
    inp = open_inputs(cc, world["store"])
    best, ranking = most_predictive_feature(inp, ["Wait"], 1, method="ablation", n_positions=8, context=6)
    nrn = relative_norms(cc).nrn
    assert best == ranking[0][0] and all(nrn[k] > 0.5 for k, _ in ranking)
    assert all(ranking[i][1] <= ranking[i + 1][1] for i in range(len(ranking) - 1))
    again = dict(rank_features(inp, ["Wait"], [k for k, _ in ranking], 1, n_positions=8, context=6))
    assert abs(again[best] - ranking[0][1]) < 1e-5


def test_most_predictive_feature_by_f1(world):
    """F1 of "feature fires" against "next token is Wait", checked by brute force over the store."""
    from fastxc.analysis.inputs import open_inputs
    from fastxc.analysis.diff import relative_norms
    from fastxc.analysis.reasoning import marker_rows
    from fastxc.analysis.steer import most_predictive_feature

    reader = world["reader"]
    cc = random_crosscoder([WIDTH, WIDTH], scales=reader.scales)
    best, ranking = most_predictive_feature(open_inputs(cc, world["store"]), ["Wait"], 1, method="f1")
    fired = cc.encode(cc.flatten_input(reader.read_rows(np.arange(len(reader))))) > 0  # [N, F]
    target = torch.zeros(len(reader), dtype=torch.bool)
    target[marker_rows(reader, world["tok"], ["Wait"])] = True
    tp = (fired & target[:, None]).sum(0).float()
    f1 = 2 * tp / (fired.sum(0) + target.sum()).float()  # 2PR / (P + R) = 2 tp / (fired + positives)
    nrn = relative_norms(cc).nrn
    want = max((k for k in range(cc.n_features) if nrn[k] > 0.5 and tp[k] > 0), key=lambda k: float(f1[k]))
    assert float(f1[best]) == pytest.approx(float(f1[want]), rel=1e-5)
    assert ranking[0][1] == pytest.approx(float(f1[best]), rel=1e-5)


@pytest.mark.parametrize("source", [1, 0])
def test_most_predictive_feature_by_activation(world, source):
    """The default pick (the seed study's): among the live features in the top fraction of NRN
    toward the steered model (5% by default; 30% here, where few random features fire before
    "Wait"), the largest mean activation right before "Wait", by brute force."""
    from fastxc.analysis.inputs import open_inputs
    from fastxc.analysis.diff import relative_norms
    from fastxc.analysis.reasoning import marker_rows
    from fastxc.analysis.steer import most_predictive_feature

    reader = world["reader"]
    cc = random_crosscoder([WIDTH, WIDTH], scales=reader.scales)
    best, ranking = most_predictive_feature(open_inputs(cc, world["store"]), ["Wait"], source, top_nrn=0.3)
    code = cc.encode(cc.flatten_input(reader.read_rows(np.arange(len(reader))))).float()  # [N, F]
    nrn = relative_norms(cc).nrn
    toward = nrn if source == 1 else 1 - nrn
    live = [k for k in range(cc.n_features) if code[:, k].max() > 0 and not torch.isnan(nrn[k])]
    top = [k for k in live if sum(float(toward[j]) < float(toward[k]) for j in live) >= 0.7 * len(live)]
    before = code[marker_rows(reader, world["tok"], ["Wait"])].mean(0)
    want = max((k for k in top if before[k] > 0), key=lambda k: float(before[k]))
    assert best == want and ranking[0][1] == pytest.approx(float(before[want]), rel=1e-5)
    assert {k for k, _ in ranking} == {k for k in top if before[k] > 0}
    from fastxc.analysis.hooks import AnalysisError

    with pytest.raises(AnalysisError, match="top_nrn"):
        most_predictive_feature(open_inputs(cc, world["store"]), ["Wait"], source, top_nrn=0)


def test_feature_direction_units(world):
    from fastxc.analysis.steer import feature_direction

    cc = random_crosscoder([WIDTH, WIDTH], scales=[2.0, 4.0])
    d = feature_direction(cc, [1, 2], 1)
    torch.testing.assert_close(d, (cc.W_dec[1, WIDTH:] + cc.W_dec[2, WIDTH:]).detach() / 4.0)


def test_marker_stats_and_think_length(world):
    from fastxc.analysis.steer import Generation, marker_stats

    tok = world["tok"]

    def gen(text, n, think, closed):
        return Generation("p", text, n, think, closed, tok(text, add_special_tokens=False)["input_ids"])

    g = [gen("a Wait , b Thus c </think> d", 10, 6, True), gen("Wait Wait Alternatively x", 6, 6, False)]
    s = marker_stats(g, tok)
    assert s["markers"]["self-reflection"] == 3 and s["markers"]["alternative"] == 1 and s["markers"]["deductive"] == 1
    assert s["text_markers"] == s["markers"]
    assert s["rate"]["self-reflection"] == 3 / 16 and s["mean_think_tokens"] == 6 and s["close_rate"] == 0.5
    assert s["coherence"] == {"closed": 0.5, "answered": 0.5, "correct": None}


def test_diff_means_direction(world):
    from fastxc.analysis.reasoning import marker_rows
    from fastxc.analysis.steer import diff_means_direction

    reader, tok = world["reader"], world["tok"]
    d = diff_means_direction(reader, tok, ["Wait"], source=0)
    pos = marker_rows(reader, tok, ["Wait"])
    x = reader.read_rows(np.arange(len(reader)), normalise=False)[:, 0].double()
    mask = np.zeros(len(reader), dtype=bool)
    mask[pos] = True
    torch.testing.assert_close(d, (x[mask].mean(0) - x[~mask].mean(0)).float(), rtol=1e-5, atol=1e-6)


def test_random_controls_match_the_direction_norm_and_are_seeded():
    from fastxc.analysis.steer import control_summary, random_directions

    d = torch.randn(48) * 3
    vs = random_directions(d, 3, seed=1)
    assert len(vs) == 3 and all(abs(float(v.norm() / d.norm()) - 1) < 1e-6 for v in vs)
    assert all(abs(float(torch.nn.functional.cosine_similarity(v, d, dim=0))) < 0.6 for v in vs)
    assert all(torch.equal(a, b) for a, b in zip(vs, random_directions(d, 3, seed=1)))
    assert not torch.equal(vs[0], random_directions(d, 1, seed=2)[0])
    sweep = [{"multiple": 0.0, "rate": {"w": 0.01}}, {"multiple": 2.0, "rate": {"w": 0.06}}]
    ctl = [[{"rate": {"w": 0.01}}, {"rate": {"w": 0.02}}], [{"rate": {"w": 0.01}}, {"rate": {"w": 0.0}}]]
    rows = control_summary(sweep, ctl)
    assert rows[1]["controls_rate"]["w"] == pytest.approx(0.01) and rows[1]["over_controls"]["w"] == pytest.approx(6.0)
    assert control_summary(sweep, [[{"rate": {"w": 0.0}}, {"rate": {"w": 0.0}}]])[1]["over_controls"]["w"] is None


def test_steer_cli_random_controls(world, tmp_path, capsys):
    """--random-controls N steers with N matched-norm random directions at the same alphas and
    reports the direction's marker rate over theirs (the seed-003 experiment's controls)."""
    from fastxc.analysis.steer import main

    cc = random_crosscoder([WIDTH, WIDTH], scales=world["reader"].scales).save(tmp_path / "cc")
    (tmp_path / "p.txt").write_text("he is\nso we add\n")
    rc = main(["--crosscoder", str(cc), "--store", str(world["store"]), "--prompts", str(tmp_path / "p.txt"),
               "--diff-means", "self-reflection", "--multiples", "0,2", "--max-new-tokens", "3",
               "--random-controls", "2", "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "o" / "steer.json").read_text())
    ctl = res["controls"]
    assert ctl["n"] == 2 and len(ctl["sweeps"]) == 2
    assert [r["multiple"] for r in ctl["summary"]] == [0.0, 2.0]
    assert [[r["alpha"] for r in sw] for sw in ctl["sweeps"]] == [[r["alpha"] for r in res["sweep"]]] * 2
    # multiple 0 adds nothing: the controls' unsteered run is the direction's, token for token
    assert all(sw[0]["rate"] == res["sweep"][0]["rate"] for sw in ctl["sweeps"])
    assert "random directions of the same norm" in capsys.readouterr().out
    assert main(["--crosscoder", str(cc), "--store", str(world["store"]), "--prompts", str(tmp_path / "p.txt"),
                 "--diff-means", "self-reflection", "--random-controls", "-1"]) == 2


def test_steer_cli(world, tmp_path, capsys):
    from fastxc.analysis.steer import main

    cc = random_crosscoder([WIDTH, WIDTH], scales=world["reader"].scales).save(tmp_path / "cc")
    (tmp_path / "p.txt").write_text("he is\nso we add\n")
    rc = main(["--crosscoder", str(cc), "--store", str(world["store"]), "--prompts", str(tmp_path / "p.txt"),
               "--feature", "3", "--multiples", "0,4", "--max-new-tokens", "4", "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "o" / "steer.json").read_text())
    assert [(r["multiple"], r["alpha"]) for r in res["sweep"]] == [(0.0, 0.0), (4.0, 4 * res["unit"]["value"])]
    rc = main(["--crosscoder", str(cc), "--store", str(world["store"]), "--prompts", str(tmp_path / "p.txt"),
               "--diff-means", "self-reflection", "--multiples", "0,1", "--max-new-tokens", "3", "--out", str(tmp_path / "o2")])
    assert rc == 0, capsys.readouterr().err
    rc = main(["--crosscoder", str(cc), "--store", str(world["store"]), "--prompts", str(tmp_path / "p.txt"),
               "--feature", "auto:self-reflection", "--top-nrn", "0.3", "--multiples", "0,1", "--max-new-tokens", "2",
               "--out", str(tmp_path / "o3")])
    assert rc == 0, capsys.readouterr().err
    assert "most self-reflection-predictive feature of distilled" in capsys.readouterr().out
    rc = main(["--crosscoder", str(cc), "--store", str(world["store"]), "--prompts", str(tmp_path / "p.txt"),
               "--feature", "auto:self-reflection", "--top-nrn", "1.5", "--out", str(tmp_path / "o4")])
    assert rc == 2 and "top_nrn must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o4").exists()
    bad = identity_crosscoder([8, 8]).save(tmp_path / "bad")
    rc = main(["--crosscoder", str(bad), "--model-a", world["paths"][0], "--model-b", world["paths"][1],
               "--layer", str(LAYER), "--prompts", str(tmp_path / "p.txt"), "--feature", "1", "--alpha-unit", "raw"])
    err = capsys.readouterr().err
    assert rc == 2 and "width" in err and err.count("\n") == 1
