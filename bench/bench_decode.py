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


def _decode_layout(transposed: bool):
    """One sparse_decode forward + backward with W_dec [F, D] row-major, or as the .T view of
    a row-major [D, F] tensor (nn.Linear(F, D).weight), read in place: the two must time the
    same (within 10%) and give identical results (tests/test_layout_inputs.py)."""
    def step(fast, x, W, b, vals, idx):
        Wd = W if not transposed else W.t()  # W here is the [D, F] leaf, passed as its .T view
        (K.sparse_decode(vals, idx, Wd) * x).sum().backward()
    return step


# Two batch sizes: at B=4096 (sae-lens' default batch of 4096 tokens) every feature has entries
# and both layouts move the same bytes; at B=512 (fastxc.train's default) only ~63% of the F=16384
# features are used, and the [D, F] layout still has to read all of W (a feature's column shares
# its cache lines with 15 others), so it cannot match the [F, D] time there (README, "Layouts").
@pytest.mark.parametrize("batch", [512, 4096])
@pytest.mark.parametrize("layout", ["fd", "df-view"])
def test_sparse_decode_layout(benchmark, layout, batch):
    """sparse_decode fwd+bwd with W_dec [F, D] vs the .T view of a [D, F] tensor, same group."""
    import torch

    import kernel_bench as KB

    transposed = layout == "df-view"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, KB.D, generator=g)
    W = (torch.randn(KB.F, KB.D, generator=g) / 32).requires_grad_()
    idx = torch.rand(batch, KB.F, generator=g).argsort(1)[:, :KB.KK]
    vals = torch.rand(batch, KB.KK, generator=g).requires_grad_()
    if transposed:  # the same values, stored [D, F]
        W = W.detach().t().contiguous().requires_grad_()
    benchmark.group = f"sparse_decode-layout-fwd+bwd-B{batch}-D{KB.D}-F{KB.F}-k{KB.KK}-fp32"
    step = _decode_layout(transposed)

    def run():
        W.grad = vals.grad = None
        step(True, x, W, None, vals, idx)

    # more rounds than the other benches: the two layouts differ by a few ms on a ~100 ms step,
    # under the 2-core machine's run-to-run noise (compare the min column)
    benchmark.pedantic(run, rounds=max(KB.ROUNDS, 9), warmup_rounds=1)
