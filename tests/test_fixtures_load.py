"""Files written by earlier versions still load and read the same (tests/fixtures/).

The fixtures are a committed activation store and a saved crosscoder, made once by
tests/fixtures/make_fixtures.py; expected.json holds what reading them gave then. A change of
either file format (or of how a store's rows are decoded and normalised) that breaks files
users already have fails here. Regenerate the fixtures only on a deliberate format change.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastxc.core.crosscoder import Crosscoder
from fastxc.data.store import open_store

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def reader():
    r = open_store(FIXTURES / "store")
    r.validate(checksums=True)
    return r


def test_old_store_reads_the_same(reader):
    e = EXPECTED
    assert (len(reader), list(reader.widths), reader.dtype, list(reader.source_names)) == \
        (e["n_rows"], e["widths"], e["dtype"], e["source_names"])
    assert reader.scales.tolist() == pytest.approx(e["scales"], rel=0, abs=0)  # read from the manifest, bit for bit
    raw = reader.read_rows(np.arange(len(reader)), normalise=False)
    assert raw.shape == (48, 2, 8)
    assert raw[0].flatten().tolist() == e["raw_row0"]  # bf16 decoded to float32: exact
    assert _digest(raw) == e["raw_sha256"]
    assert hashlib.sha256(reader.tokens.astype(np.int64).tobytes()).hexdigest() == e["tokens_sha256"]
    x = reader.read_rows(np.arange(len(reader)))
    # one float32 multiply per element: the sums agree far inside this (float64 sums of 384 values)
    np.testing.assert_allclose(x.double().sum(dim=(0, 2)).numpy(), e["normalised_sum_per_source"], rtol=1e-6)
    b = next(iter(reader.batches(16, seed=0, prefetch=0)))  # the training read path
    assert b.shape == (16, 2, 8)
    assert {_digest(row) for row in b} <= {_digest(row) for row in x}  # rows of the store, normalised


def test_old_crosscoder_loads_and_runs(reader):
    cc = Crosscoder.load(FIXTURES / "crosscoder").eval()
    assert cc.widths == [8, 8] and cc.n_features == 16 and cc.source_names == ["base", "finetuned"]
    np.testing.assert_allclose(cc.input_scale.numpy(), EXPECTED["scales"], rtol=0)
    x = reader.read_rows(np.arange(len(reader)))
    with torch.no_grad():
        out = cc(x)
    active = (out.code > 0).to(torch.int64)
    assert hashlib.sha256(active.numpy().tobytes()).hexdigest() == EXPECTED["active_sha256"]  # same TopK picks
    # float32 matmuls in another summation order move these by ~1e-7 relative
    np.testing.assert_allclose(out.fvu.numpy(), EXPECTED["fvu"], rtol=1e-5)
    np.testing.assert_allclose(out.recon.flatten(1).norm(dim=1).numpy(), EXPECTED["recon_row_norms"], rtol=1e-5)
