"""topk_encode, forward + backward, against its plain-torch reference (same run).

    python -m pytest bench/bench_encode.py --benchmark-only
"""
from __future__ import annotations

import pytest

import fastxc.kernels as K
from fastxc.kernels import encode as E
from kernel_bench import KK, PROVIDERS, bench_fwd_bwd


def _topk(fast, x, W, b, vals, idx):
    v, _ = (K.topk_encode(x, W, b, KK) if fast else E.topk_encode_ref(x, W, b, KK))
    v.sum().backward()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_topk_encode_fwd_bwd(benchmark, provider):
    bench_fwd_bwd(benchmark, "topk_encode", provider, _topk)
