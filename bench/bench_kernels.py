"""Each fastxc.kernels op, forward + backward, against its plain-torch reference (same run).

    pytest bench/bench_kernels.py --benchmark-only
"""
from __future__ import annotations

import platform

import pytest
import torch

import fastxc.kernels as K
from fastxc.kernels import reference as R

B, D, F, KK, WIDTHS = 512, 1024, 16384, 32, (512, 512)
ROUNDS = 3


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    W = (torch.randn(F, D, generator=g) / 32).requires_grad_()
    b = torch.zeros(F, requires_grad=True)
    idx = torch.rand(B, F, generator=g).argsort(1)[:, :KK]
    vals = torch.rand(B, KK, generator=g).requires_grad_()
    return x, W, b, vals, idx


def _topk(fast, x, W, b, vals, idx):
    v, _ = (K.topk_encode(x, W, b, KK) if fast else R.topk_encode_ref(x, W, b, KK))
    v.sum().backward()


def _decode(fast, x, W, b, vals, idx):
    r = (K.sparse_decode(vals, idx, W) if fast else R.sparse_decode_ref(vals, idx, W))
    (r * x).sum().backward()


def _loss(fast, x, W, b, vals, idx):
    fn = K.crosscoder_loss if fast else R.crosscoder_loss_ref
    fn(vals, idx, W, None, x, WIDTHS, 0.5).loss.backward()


OPS = {"topk_encode": _topk, "sparse_decode": _decode, "crosscoder_loss": _loss}


@pytest.mark.parametrize("provider", ["fast", "reference"])
@pytest.mark.parametrize("op", list(OPS))
def test_op_fwd_bwd(benchmark, op, provider):
    benchmark.group = f"{op}-fwd+bwd-B{B}-D{D}-F{F}-k{KK}-fp32"
    args = _setup()

    def run():
        for t in (args[1], args[2], args[3]):
            t.grad = None
        OPS[op](provider == "fast", *args)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info.update(machine=platform.processor() or platform.machine(),
                                threads=torch.get_num_threads(),
                                tokens_per_s=B / benchmark.stats.stats.min)
