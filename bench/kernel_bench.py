"""Shared harness of the kernel benchmarks (bench/bench_<op>.py): one op, forward + backward,
fast path against its plain-torch reference in the same run, at one training-sized shape.

bench/ is on sys.path when pytest collects these files (its default "prepend" import mode).
"""
from __future__ import annotations

import platform

import torch

B, D, F, KK, WIDTHS = 512, 1024, 16384, 32, (512, 512)
ROUNDS = 3
PROVIDERS = ["fast", "reference"]


def setup(seed=0):
    """-> (x [B, D], W [F, D], b [F], vals [B, KK], idx [B, KK]); W, b, vals require grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    W = (torch.randn(F, D, generator=g) / 32).requires_grad_()
    b = torch.zeros(F, requires_grad=True)
    idx = torch.rand(B, F, generator=g).argsort(1)[:, :KK]
    vals = torch.rand(B, KK, generator=g).requires_grad_()
    return x, W, b, vals, idx


def bench_fwd_bwd(benchmark, op: str, provider: str, step) -> None:
    """Time ``step(fast, x, W, b, vals, idx)`` (one forward + backward) for ``provider``."""
    benchmark.group = f"{op}-fwd+bwd-B{B}-D{D}-F{F}-k{KK}-fp32"
    args = setup()

    def run():
        for t in (args[1], args[2], args[3]):
            t.grad = None
        step(provider == "fast", *args)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info.update(machine=platform.processor() or platform.machine(),
                                threads=torch.get_num_threads())
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = B / benchmark.stats.stats.min
