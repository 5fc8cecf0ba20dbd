"""Shared cases and checks of the kernel tests (tests/test_<op>.py): every fastxc.kernels op
against its plain-torch reference, forward and every gradient, fp32 and bf16, through the
Triton kernels (interpreter on CPU) and through the CPU path.

Sparse codes are compared as dense [B, F] codes (order within a row and padding are free), and
the upstream gradient of vals is read from one dense [B, F] random tensor at idx, so it is the
same gradient whatever order a backend returns the entries in.
"""
from __future__ import annotations

import math

import pytest
import torch

BACKENDS = ["cpu", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
# (B, D, F, k, widths): primes / non powers of two, a single row, unequal source widths.
SMALL = [
    pytest.param(1, 96, 257, 1, (96,), id="B1-D96-F257-k1"),
    pytest.param(37, 96, 257, 7, (40, 56), id="B37-D96-F257-k7-w40+56"),
    pytest.param(5, 96, 4099, 64, (33, 63), id="B5-D96-F4099-k64-w33+63"),
]
BIG = [pytest.param(37, 1000, 4099, 64, (600, 400), id="B37-D1000-F4099-k64-w600+400")]
PARAMS = "backend,B,D,F,k,widths,dtype"

# Kernel tolerances per dtype (the kernel tests and tests/test_kernels_crosscoder.py; the
# ``kernel_tol`` fixture of conftest.py): a result passes when
# max|got - want| <= atol + rtol * max|want|, against the reference run in float32 on the same
# (possibly bf16) inputs. Measured worst max|err| / max|want| over the kernel tests: fp32
# 1.3e-6 (dvals, fp32 sums in another order); bf16 1.5e-2 (dvals: bf16-rounded outputs and
# upstream gradients feed sums with cancellation; bf16 eps = 2^-8 = 3.9e-3).
KERNEL_TOL = {
    torch.float32: {"rtol": 4e-6, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-3},
}


def cases(heavy_interp: bool = False):
    """(backend, shape, dtype) combos. The Triton interpreter is ~200x slower than torch, so
    under it the F=4099 shape runs in fp32 by default (bf16, and all of it for the ops that
    share the kernels tested with topk_encode / sparse_decode / crosscoder_loss, under
    -m slow) and the D=1000 shape only under -m slow; the CPU path runs everything, bf16 at
    D=1000 under -m slow."""
    out = []
    for bk in BACKENDS:
        for p in SMALL + BIG:
            for dt, dname in zip(DTYPES, ("fp32", "bf16")):
                slow = (bk == "triton" and (p in BIG or (p.values[2] > 1000 and (heavy_interp or dt != torch.float32)))
                        or (p in BIG and dt != torch.float32))
                out.append(pytest.param(bk, *p.values, dt, id=f"{bk}-{p.id}-{dname}",
                                        marks=[pytest.mark.slow] if slow else []))
    return out


CASES = cases()


def close(name, got, want, dtype, tol):
    """Assert got ~ want: max|got - want| <= atol + rtol * max|want| (tol[dtype]), all finite."""
    got, want = got.detach().float(), want.detach().float()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    t = tol[dtype]
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= t["atol"] + t["rtol"] * scale, f"{name} ({dtype}): max err {err:.3g}, scale {scale:.3g}"


def dense(vals, idx, F):
    """A sparse code (vals, idx) [B, k] as a dense float32 [B, F]."""
    return torch.zeros(vals.shape[0], F).scatter_add(1, idx.long(), vals.detach().float())


def params(B, D, F, dtype, scale=0.1):
    """x [B, D], W [F, D], b [F] in dtype, requiring grad; pre = x @ W.T + b ~ N(0, 1)."""
    x = torch.randn(B, D).to(dtype).requires_grad_()
    W = (torch.randn(F, D) * scale / math.sqrt(D) * 10).to(dtype).requires_grad_()
    b = (torch.randn(F) * scale).to(dtype).requires_grad_()
    return x, W, b


def as_ref(*ts):
    """float32 leaf copies of ts, for the reference side."""
    return [t.detach().float().requires_grad_() for t in ts]


def code(B, F, k, dtype):
    """A random sparse code with distinct features per row (k <= F)."""
    idx = torch.rand(B, F).argsort(1)[:, :k]
    vals = torch.rand(B, k).to(dtype).requires_grad_()
    return vals, idx


def check_encode(fast, ref, x, W, b, F, dtype, tol):
    """Compare a (vals, idx) encode and the grads of x, W, b under one dense upstream grad."""
    G = torch.randn(x.shape[0], F)
    v, i = fast(x, W, b)
    assert v.dtype == x.dtype and i.dtype in (torch.int32, torch.int64)
    grads = torch.autograd.grad((v.float() * G.gather(1, i.long())).sum(), (x, W, b))
    xr, Wr, br = as_ref(x, W, b)
    vr, ir = ref(xr, Wr, br)
    gr = torch.autograd.grad((vr * G.gather(1, ir)).sum(), (xr, Wr, br))
    close("code", dense(v, i, F), dense(vr, ir, F), dtype, tol)
    for name, g, w in zip(("dx", "dW_enc", "db_enc"), grads, gr):
        close(name, g, w, dtype, tol)


def f64(*shapes):
    """float64 leaves of the given shapes (gradcheck inputs)."""
    return [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
