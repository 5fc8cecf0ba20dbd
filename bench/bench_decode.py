"""sparse_decode, forward + backward, against its plain-torch reference (same run).

    python -m pytest bench/bench_decode.py --benchmark-only
"""
from __future__ import annotations

import pytest

import fastxc.kernels as K
from fastxc.kernels import decode as DE
from kernel_bench import PROVIDERS, bench_fwd_bwd


def _decode(fast, x, W, b, vals, idx):
    r = (K.sparse_decode(vals, idx, W) if fast else DE.sparse_decode_ref(vals, idx, W))
    (r * x).sum().backward()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sparse_decode_fwd_bwd(benchmark, provider):
    bench_fwd_bwd(benchmark, "sparse_decode", provider, _decode)
