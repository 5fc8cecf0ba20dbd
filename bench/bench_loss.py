"""crosscoder_loss (fused decode + per-source MSE + penalty), forward + backward, against its
plain-torch reference (same run).

    python -m pytest bench/bench_loss.py --benchmark-only
"""
from __future__ import annotations

import pytest

import fastxc.kernels as K
from fastxc.kernels import loss as L
from kernel_bench import PROVIDERS, WIDTHS, bench_fwd_bwd


def _loss(fast, x, W, b, vals, idx):
    fn = K.crosscoder_loss if fast else L.crosscoder_loss_ref
    fn(vals, idx, W, None, x, WIDTHS, 0.5).loss.backward()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_crosscoder_loss_fwd_bwd(benchmark, provider):
    bench_fwd_bwd(benchmark, "crosscoder_loss", provider, _loss)
