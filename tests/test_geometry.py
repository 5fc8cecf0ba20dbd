"""Parallelogram loss (seed eq. 8), PCA and the geometry command."""
from __future__ import annotations

import json
import math

import pytest
import torch

from test_analysis import LAYER, WIDTH, random_crosscoder, shared_world


def test_parallelogram_loss_hand_computation():
    Ea, Eb = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    Ec, Ed = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0])
    # a - b - c + d = (1 - 0 - 2 + 0, 0 - 1 - 0 + 3) = (-1, 2): norm sqrt(5); denominator sqrt(1 + 1 + 4 + 9)
    from fastxc.analysis.geometry import parallelogram_loss

    assert parallelogram_loss(Ea, Eb, Ec, Ed).item() == pytest.approx(math.sqrt(5) / math.sqrt(15), rel=1e-7)
    # a perfect parallelogram has loss 0; batched inputs give one loss per row
    E = torch.randn(5, 4, dtype=torch.float64)
    shift = torch.randn(4, dtype=torch.float64)
    L = parallelogram_loss(E, E + shift, E.flip(0), E.flip(0) + shift)
    assert L.shape == (5,) and L.abs().max() < 1e-12


def test_pca_dims_and_projection():
    from fastxc.analysis.geometry import pca

    X = torch.randn(30, 12, dtype=torch.float64)
    for k in (2, 10, 12):
        P = pca(X, k)
        assert P.shape == (30, k)
        assert P.mean(0).abs().max() < 1e-10  # centred
        var = P.var(0)
        assert torch.all(var[:-1] >= var[1:] - 1e-10)  # components ordered by variance
    # full-rank projection keeps all pairwise distances
    P = pca(X, 12)
    torch.testing.assert_close(torch.cdist(P, P), torch.cdist(X, X))
    with pytest.raises(ValueError, match="PCA dims"):
        pca(X, 13)
    with pytest.raises(ValueError, match="PCA dims"):
        pca(X[:5], 6)


def test_class_losses_all_pairs():
    from fastxc.analysis.geometry import class_losses, parallelogram_loss

    E = {w: torch.randn(3) for w in "abcdef"}
    pairs = [("a", "b"), ("c", "d"), ("e", "f")]
    L = class_losses(E, pairs)
    assert L.shape == (3,)
    want = parallelogram_loss(E["c"].double(), E["d"].double(), E["e"].double(), E["f"].double()).float()
    assert L[2] == pytest.approx(float(want), rel=1e-6)


def test_shipped_word_pairs_load():
    from fastxc.analysis.geometry import load_word_pairs

    classes = load_word_pairs()
    assert {"male-female", "antonyms", "present-past", "singular-plural", "country-capital"} <= set(classes)
    assert all(len(v) >= 8 for v in classes.values())


@pytest.fixture(scope="module")
def world():
    return shared_world()


def test_geometry_analysis_on_tiny_models(world, tmp_path_factory):
    from fastxc.analysis.geometry import geometry_analysis

    w = world
    classes = {"gender": [("he", "she"), ("him", "her"), ("king", "queen"), ("man", "woman")],
               "plural": [("dog", "dogs"), ("cat", "cats")], "missing": [("xyz", "abc"), ("foo", "bar")]}
    out = tmp_path_factory.mktemp("geo_out")
    res = geometry_analysis(w["models"], ["base", "distilled"], w["tok"], LAYER, classes, dims=(2, 4), out=out)
    assert res["skipped"] == ["missing"] and res["n_words"] == 12
    assert len(res["losses"]["2"]["gender"]["base"]) == 6 and len(res["losses"]["4"]["plural"]["distilled"]) == 1
    assert all(0 <= v for v in res["losses"]["4"]["gender"]["base"])
    assert (out / "geometry_pca2.png").exists() and (out / "geometry_pca4.png").exists()
    assert json.loads((out / "geometry.json").read_text())["models"] == ["base", "distilled"]
    with pytest.raises(ValueError, match="at least that many words"):
        geometry_analysis(w["models"], ["base", "distilled"], w["tok"], LAYER, classes, dims=(20,))


def test_geometry_cli_rejects_width_mismatch(world, tmp_path, capsys):
    from fastxc.analysis.geometry import main

    w = world
    bad = random_crosscoder([WIDTH + 2, WIDTH + 2]).save(tmp_path / "cc")
    capsys.readouterr()
    rc = main(["--crosscoder", str(bad), "--model-a", w["paths"][0], "--model-b", w["paths"][1], "--layer", str(LAYER)])
    err = capsys.readouterr().err
    assert rc == 2 and "width" in err and err.count("\n") == 1
