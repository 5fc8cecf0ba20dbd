"""``python -m fastxc.study`` (issue 14): the organism study in one command.

Fast: the stage hash, the acceptance checks on hand-made figures, the flags. Slow: the study on
the default organism (seed 0) with two crosscoder seeds, its study.json and figures, and a second
call that reuses every stage.
"""
from __future__ import annotations

import json

import pytest

from fastxc.study import ACCEPTANCE, tree_sha256
from fastxc.study.run import acceptance


def test_tree_sha256_changes_with_any_file_name_or_byte(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "x.bin").write_bytes(b"\x00\x01")
    (a / "sub" / "y.json").write_text("{}")
    h = tree_sha256(a)
    b = tmp_path / "b"
    (b / "sub").mkdir(parents=True)
    (b / "sub" / "y.json").write_text("{}")  # written in the other order: same tree, same hash
    (b / "x.bin").write_bytes(b"\x00\x01")
    assert tree_sha256(b) == h
    (b / "x.bin").write_bytes(b"\x00\x02")
    assert tree_sha256(b) != h
    (b / "x.bin").write_bytes(b"\x00\x01")
    (b / "sub" / "y.json").rename(b / "sub" / "z.json")
    assert tree_sha256(b) != h


def _fig(delta=(0.5, -2.0), fire=0.9, quantile=0.97, picked=7, rows=((0, 0.01, 1.0), (2, 0.03, 0.6))):
    return {
        "ablate": {"delta": list(delta)},
        "wait_feature": {"feature": 7, "fire_rate": fire, "nrn_quantile": quantile},
        "steer": {"direction": f"features [{picked}] of distilled",
                  "rows": [{"multiple": m, "ratio": r / rows[0][1], "closed": c} for m, r, c in rows]},
    }


def test_acceptance_checks_each_threshold_at_its_boundary():
    ok = acceptance(_fig(delta=(0.5, -1.5)))  # a drop of exactly 3x |base change| holds
    assert ok == {k: True for k in ACCEPTANCE}
    assert acceptance(_fig(delta=(-0.5, -1.49)))["ablation"] is False  # |base| counts, not its sign
    assert acceptance(_fig(fire=0.79))["wait_feature"] is False
    assert acceptance(_fig(quantile=0.949))["wait_feature"] is False
    assert acceptance(_fig(picked=8))["steer_picks_wait_feature"] is False
    # 3x reached only where </think> closes on fewer than half, or only above 4x: no
    assert acceptance(_fig(rows=((0, 0.01, 1.0), (2, 0.03, 0.49))))["steering"] is False
    assert acceptance(_fig(rows=((0, 0.01, 1.0), (4, 0.029, 0.9), (8, 0.1, 0.9))))["steering"] is False
    fig = _fig()
    del fig["steer"], fig["ablate"]
    got = acceptance(fig)
    assert got["steering"] is None and got["ablation"] is None and got["wait_feature"] is True


def test_seed003_check():
    from fastxc.study.run import seed003_holds

    def side(rows):
        return {"summary": [{"multiple": m, "wait_rate": w, "controls_wait_rate": c,
                             "over_controls": (w / c if c else None)} for m, w, c in rows]}

    dist = side([(0, 0.01, 0.01), (2, 0.04, 0.02)])  # 2x the random directions at 2x
    base_flat = side([(0, 0.0, 0.0), (2, 0.0, 0.0)])
    assert seed003_holds({"distilled": dist, "base": base_flat}) is True
    assert seed003_holds({"distilled": side([(0, 0.01, 0.01), (2, 0.039, 0.02)]), "base": base_flat}) is False
    # raising "Wait" in base more than a random push does: not the seed-003 result
    assert seed003_holds({"distilled": dist, "base": side([(0, 0.0, 0.0), (2, 0.01, 0.002)])}) is False
    assert seed003_holds({"distilled": side([(0, 0.01, 0.01), (8, 0.1, 0.01)]), "base": side([(8, 0, 0)])}) is False
    assert seed003_holds({"distilled": {"error": "error: the difference of means ... is zero"}, "base": base_flat}) is None


@pytest.mark.parametrize("flags,msg", [
    (["--crosscoder-seeds", "a,b"], "expected comma-separated integers"),
    (["--crosscoder-seeds", "1,1"], "expected distinct seeds"),
    (["--n-questions", "0"], "--n-questions"),
    (["--k", "0"], "--k"),
    (["--distill-steps", "0"], "--distill-steps"),
])
def test_bad_flags_are_one_error_line_and_nothing_written(tmp_path, capsys, flags, msg):
    from fastxc.study.__main__ import main

    out = tmp_path / "study"
    try:
        rc = main(["--out", str(out), *flags])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
    assert not out.exists()


def test_a_finished_run_of_another_k_is_refused(tmp_path):
    """--k into a folder whose crosscoders were trained with another k: an error, not a silent reuse."""
    import json

    from fastxc.study.run import StudyError, _train

    run = tmp_path / "crosscoder-seed0"
    (run / "crosscoder").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    (run / "crosscoder" / "model.safetensors").write_bytes(b"x")
    (run / "crosscoder" / "config.json").write_text(json.dumps({"k": 16}))
    _train(tmp_path / "no-store", run, 0, False, k=16)  # the same k: reused, nothing trained
    with pytest.raises(StudyError, match="k 16, not 32"):
        _train(tmp_path / "no-store", run, 0, False, k=32)


def test_a_study_of_another_organism_is_refused(tmp_path, capsys, monkeypatch):
    """--distill-steps into a folder studied on the default organism: one error line, exit 2,
    before any organism is built or anything in the folder changes."""
    from fastxc.organism.build import OrganismConfig
    from fastxc.study.__main__ import main
    from fastxc.study.run import ORGANISM_KEY_FILE, StudyConfig, organism_config

    monkeypatch.setenv("FASTXC_HOME", str(tmp_path / "home"))
    assert organism_config(StudyConfig(out=tmp_path, organism_seed=1)) == OrganismConfig(seed=1)
    assert organism_config(StudyConfig(out=tmp_path, distill_steps=7)).distill_steps == 7
    out = tmp_path / "study"
    out.mkdir()
    (out / ORGANISM_KEY_FILE).write_text(OrganismConfig(seed=0).key() + "\n")
    before = (out / ORGANISM_KEY_FILE).read_bytes()
    assert main(["--out", str(out), "--distill-steps", "7", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a study of organism v" in err[0] and "choose another --out" in err[0], err
    assert (out / ORGANISM_KEY_FILE).read_bytes() == before and sorted(p.name for p in out.iterdir()) == [ORGANISM_KEY_FILE]
    assert not (tmp_path / "home").exists()  # nothing built


def test_steer_defaults_are_the_study_protocol():
    """The README quotes steer's defaults as the study's protocol (50 prompts, 160 tokens)."""
    from fastxc.analysis.steer import DEFAULT_MULTIPLES, build_parser

    args = build_parser().parse_args(["--crosscoder", "c", "--store", "s", "--prompts", "p"])
    assert (args.n_prompts, args.max_new_tokens, args.multiples) == (50, 160, DEFAULT_MULTIPLES)
    ms = [float(m) for m in DEFAULT_MULTIPLES.split(",")]
    assert ms[0] == 0 and ms == sorted(ms) and 4.0 in ms  # unsteered first; the acceptance's 4x measured


@pytest.mark.slow
def test_study_on_the_default_organism(tmp_path):
    """Organism seed 0, crosscoder seeds 0 and 1 (and the ReLU + L1 crosscoder): every stage's
    sha256 and every figure the README quotes land in study.json; the organism is the recorded one; ablation before "Wait" holds in
    both runs (measured: distilled -13.2 / -15.0 against base +0.82 / +0.15); a second call reuses
    every stage and gives the same numbers."""
    from fastxc.organism.build import RECORDED_SHA256
    from fastxc.study.__main__ import main

    out = tmp_path / "study"
    argv = ["--out", str(out), "--crosscoder-seeds", "0,1", "--no-progress"]
    assert main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["numerics_pinned"] is True
    st = study["stages"]
    assert st["organism"]["sha256"] == RECORDED_SHA256[0] and st["organism"]["reproduces_recorded"] is True
    assert len(st["store"]["sha256"]) == 64 and set(st["crosscoders"]) == {"0", "1", "relu-l1-0"}
    assert st["crosscoders"]["0"] != st["crosscoders"]["1"]
    for name in ("base", "distilled"):
        r = study["organism"]["eval"][name]
        assert r["n"] == 50 and r["correct_rate"] is not None and 0 <= r["p_wait_after_slip"] <= 1
    for seed, run in study["runs"].items():
        assert set(run) >= {"eval", "diff", "reasoning", "ablate", "steer", "wait_feature", "acceptance"}
        assert run["acceptance"]["ablation"] is True, (seed, run["ablate"]["delta"])
        assert [r["multiple"] for r in run["steer"]["rows"]][0] == 0
        for png in ("diff/nrn_hist.png", "diff/latent_scaling.png", "reasoning/reasoning_nrn.png",
                    "ablate/ablate.png", "steer/steer.png"):
            assert (out / f"crosscoder-seed{seed}" / "analysis" / png).stat().st_size > 1000, png
    assert (out / "crosscoder-seed0" / "analysis" / "geometry" / "geometry_pca2.png").is_file()
    assert (out / "stability" / "stability.png").is_file() and study["stability"]["pairs"]
    assert (out / "report.html").stat().st_size > 10_000
    # the seed study's ReLU + L1 crosscoder beside TopK, both NRN histograms on one plot
    relu = study["relu_l1"]
    assert relu["flags"] == ["--activation", "relu"] and sum(relu["diff"]["nrn_histogram_20"]) > 0
    assert (out / "nrn_topk_vs_relu.png").stat().st_size > 1000
    assert study["acceptance"]["holds"]["ablation"] == 2
    s3 = study["seed003"]  # ran (a summary with controls) or says why not, for both models
    assert all(("summary" in s3[m] and len(s3[m]["summary"]) == 4) or "error" in s3[m] for m in ("distilled", "base"))

    # a second call finds every stage's output and reuses it: the same numbers
    assert main(argv) == 0
    again = json.loads((out / "study.json").read_text())
    for key in ("stages", "runs", "organism", "geometry", "acceptance"):
        assert again[key] == study[key], key
