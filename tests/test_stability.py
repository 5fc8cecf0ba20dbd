"""Stability across seeds (issue #14 item 5): the assignment is optimal, permuted noisy copies of
one dictionary match ~100% and an unrelated one does not, the NRN agreement of matched pairs, the
conclusions that hold in every run, and ``fastxc stability``'s output and errors."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from fastxc.analysis import stability as S
from fastxc.core.crosscoder import Crosscoder
from fastxc.core.norms import classify, relative_norms

D, F = 32, 256  # width per source, features


def crosscoder_from(w_dec: torch.Tensor) -> Crosscoder:
    cc = Crosscoder([D, D], w_dec.shape[0], activation="topk", k=4, source_names=["base", "tuned"])
    with torch.no_grad():
        cc.W_dec.copy_(w_dec)
    return cc.eval()


def dictionary(seed: int) -> torch.Tensor:
    """[F, 2D] unit decoder rows whose A-slices are scaled by factors in [0.25, 2] (NRN ~1/3 to
    ~0.8) and, for the first 40 features, zeroed (NRN 1: exclusive to B)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(F, 2 * D, generator=g)
    w[:, :D] *= 0.25 + 1.75 * torch.rand(F, 1, generator=g)
    w[:40, :D] = 0
    return w / w.norm(dim=1, keepdim=True)


def noisy_copy(w: torch.Tensor, seed: int, noise: float = 0.2):
    """(permuted copy with noise, perm): copy[i] = w[perm[i]] + noise (cosine ~0.98); zero
    entries stay zero, so features exclusive to B stay exclusive."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(F, generator=g)
    w = w[perm]
    return w + (w != 0) * noise / (2 * D) ** 0.5 * torch.randn(F, 2 * D, generator=g), perm


# ------------------------------------------------------------------------- assignment
@pytest.mark.parametrize("shape", [(6, 6), (4, 7), (7, 4)])
def test_assignment_is_optimal(shape):
    """Equal to the brute-force minimum over every assignment, on random and on tied costs."""
    rng = np.random.default_rng(0)
    n, m = shape
    for trial in range(20):
        cost = rng.normal(size=shape) if trial % 2 else rng.integers(0, 3, size=shape).astype(float)  # ties
        rows, cols = S.linear_sum_assignment(cost)
        k = min(n, m)
        assert len(rows) == len(cols) == k and len(set(rows)) == len(set(cols)) == k
        assert list(rows) == sorted(rows)
        if n <= m:
            best = min(cost[np.arange(n), list(p)].sum() for p in itertools.permutations(range(m), n))
        else:
            best = min(cost[list(p), np.arange(m)].sum() for p in itertools.permutations(range(n), m))
        assert abs(cost[rows, cols].sum() - best) < 1e-9


def test_assignment_matches_scipy_on_a_large_matrix():
    scipy_opt = pytest.importorskip("scipy.optimize")
    cost = np.random.default_rng(1).normal(size=(300, 420))
    rows, cols = S.linear_sum_assignment(cost)
    r2, c2 = scipy_opt.linear_sum_assignment(cost)
    assert abs(cost[rows, cols].sum() - cost[r2, c2].sum()) < 1e-9


# ------------------------------------------------------------------------- matching
def test_permuted_noisy_copies_match_and_an_unrelated_run_does_not():
    base = dictionary(0)
    copies = [noisy_copy(base, s) for s in (1, 2, 3)]
    runs = [crosscoder_from(w) for w, _ in copies] + [crosscoder_from(dictionary(9))]
    rep = S.stability(runs, ["r1", "r2", "r3", "other"])
    by_pair = {tuple(p["runs"]): p for p in rep["pairs"]}
    for i, j in itertools.combinations(range(3), 2):
        # the copies pair feature for feature: the Hungarian partner is the planted one
        m = rep["_matches"][(i, j)]
        inv_j = torch.argsort(copies[j][1]).numpy()
        assert np.array_equal(m.cols, inv_j[copies[i][1].numpy()[m.rows]])
        assert by_pair[(f"r{i + 1}", f"r{j + 1}")]["matched_fraction"] == 1.0  # measured min cosine 0.93
    for i in range(3):  # random unit rows in 64 dims: Hungarian cosines 0.19 to 0.52, none reach 0.7
        assert by_pair[(f"r{i + 1}", "other")]["matched_fraction"] == 0.0
    assert rep["matched_fraction_min"] == 0.0 and rep["run1_matched_in_every_run"] == 0.0
    rep3 = S.stability(runs[:3])
    assert rep3["matched_fraction_min"] == 1.0 and rep3["run1_matched_in_every_run"] == 1.0


def test_nrn_agreement_of_matched_pairs():
    """Against a direct computation on the planted pairs, with 30 features moved to another class."""
    base = dictionary(0)
    w2, perm = noisy_copy(base, 1, noise=0.05)
    # 30 shared features with the largest A-slices: B-slice scaled down, they become only-A (and
    # keep a cosine >= 0.8 with their original, so they stay matched)
    nrn = relative_norms(crosscoder_from(base)).nrn
    moved = torch.nonzero(nrn >= 0.3).flatten()[torch.argsort(nrn[nrn >= 0.3])[:30]]
    w2[torch.argsort(perm)[moved], D:] *= 0.05
    runs = [crosscoder_from(base), crosscoder_from(w2)]
    rep = S.stability(runs, threshold=0.5)
    m = rep["_matches"][(0, 1)]
    n1, n2 = relative_norms(runs[0]).nrn, relative_norms(runs[1]).nrn
    good = m.cosine >= 0.5
    x, y = n1[m.rows[good]].double(), n2[m.cols[good]].double()
    ag = rep["pairs"][0]["nrn_agreement"]
    assert ag["pairs"] == rep["pairs"][0]["matched"] == int(good.sum())
    assert ag["correlation"] == pytest.approx(float(np.corrcoef(x.numpy(), y.numpy())[0, 1]), abs=1e-12)
    assert ag["mean_abs_diff"] == pytest.approx(float((x - y).abs().mean()), abs=1e-12)
    same = (classify(x) == classify(y)).double().mean()
    assert ag["same_class"] == pytest.approx(float(same), abs=1e-12)
    # the moved features are matched (their direction in A is unchanged) and change class
    assert set(moved.tolist()) <= set(m.rows[good].tolist())
    assert ag["same_class"] < 1 - 25 / F and ag["correlation"] < 0.99


def test_conclusions_hold_in_every_run_and_take_extra_ones():
    base = dictionary(0)
    w3, _ = noisy_copy(base, 3)
    w3[:, :D] = w3[:, D:]  # run 3: every feature shared (NRN 0.5), so none exclusive to tuned
    runs = [crosscoder_from(base), crosscoder_from(noisy_copy(base, 2)[0]), crosscoder_from(w3)]
    extra = [{"ablation lowers the marker logit": True, "only some": True},
             {"ablation lowers the marker logit": True},
             {"ablation lowers the marker logit": True, "only some": False}]
    rep = S.stability(runs, threshold=0.5, extra_conclusions=extra)
    c = rep["conclusions"]
    excl = c["features exclusive to tuned exist (NRN > 0.9)"]
    assert excl["per_run"] == [True, True, False] and excl["holds_in_every_run"] is False
    recur = c["half of run 1's tuned-exclusive features recur as tuned-exclusive (cosine >= 0.5)"]
    assert recur["per_run"] == [True, True, False]
    assert c["ablation lowers the marker logit"] == {"per_run": [True, True, True], "holds_in_every_run": True}
    assert c["only some"] == {"per_run": [True, None, False], "holds_in_every_run": False}
    assert rep["values"]["run1"]["n_exclusive_b"] == 40 and rep["values"]["run3"]["n_exclusive_b"] == 0
    with pytest.raises(ValueError, match="extra_conclusions has 2 entries for 3 runs"):
        S.stability(runs, extra_conclusions=extra[:2])


# ------------------------------------------------------------------------- command line
def test_stability_cli(tmp_path, capsys):
    base = dictionary(0)
    dirs = [crosscoder_from(noisy_copy(base, s)[0]).save(tmp_path / f"cc{s}") for s in (1, 2, 3)]
    out = tmp_path / "out"
    assert S.main(["--crosscoder", *map(str, dirs), "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert f"{dirs[0]} ~ {dirs[1]}: 100.0% of features matched at cosine >= 0.7" in text
    assert "[holds] features exclusive to tuned exist (NRN > 0.9)  (yyy)" in text
    rep = json.loads((out / "stability.json").read_text())
    assert len(rep["pairs"]) == 3 and rep["matched_fraction_min"] == 1.0 and "_matches" not in rep
    assert (out / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["missing", "one", "widths", "training-run"])
def test_stability_cli_errors(tmp_path, capsys, case):
    a = crosscoder_from(dictionary(0)).save(tmp_path / "a")
    if case == "missing":
        argv, want = [str(a), str(tmp_path / "nope")], f"error: --crosscoder: no such folder: {tmp_path / 'nope'}"
    elif case == "one":
        argv, want = [str(a)], "error: stability needs at least 2 crosscoders, got 1"
    elif case == "widths":
        b = Crosscoder([8, 8], 16, activation="topk", k=2).save(tmp_path / "b")
        argv, want = [str(a), str(b)], f"error: crosscoders differ in widths: {a} has [{D}, {D}], {b} has [8, 8]"
    else:
        crosscoder_from(dictionary(1)).save(tmp_path / "run" / "crosscoder")
        argv, want = [str(a), str(tmp_path / "run")], f"error: --crosscoder {tmp_path / 'run'} is a training run"
    out = tmp_path / "out"
    assert S.main(["--crosscoder", *argv, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(want), err
    assert not out.exists()
