"""fastxc.kernels against its plain-torch reference: forward and every gradient, fp32 and bf16,
through the Triton kernels (interpreter on CPU) and through the CPU path.

Sparse codes are compared as dense [B, F] codes (order within a row and padding are free), and
the upstream gradient of vals is read from one dense [B, F] random tensor at idx, so it is the
same gradient whatever order a backend returns the entries in.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastxc.kernels as K
from fastxc.kernels import _dispatch
from fastxc.kernels import reference as R

BACKENDS = ["cpu", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
# (B, D, F, k, widths): primes / non powers of two, a single row, unequal source widths.
SMALL = [
    pytest.param(1, 96, 257, 1, (96,), id="B1-D96-F257-k1"),
    pytest.param(37, 96, 257, 7, (40, 56), id="B37-D96-F257-k7-w40+56"),
    pytest.param(5, 96, 4099, 64, (33, 63), id="B5-D96-F4099-k64-w33+63"),
]
BIG = [pytest.param(37, 1000, 4099, 64, (600, 400), id="B37-D1000-F4099-k64-w600+400")]


def cases(heavy_interp: bool = False):
    """(backend, shape, dtype) combos. The Triton interpreter is ~200x slower than torch, so
    under it the F=4099 shape runs in fp32 by default (bf16, and all of it for the ops that
    share the kernels tested there, under -m slow) and the D=1000 shape only under -m slow;
    the CPU path runs everything, bf16 at D=1000 under -m slow."""
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
PARAMS = "backend,B,D,F,k,widths,dtype"


@pytest.fixture
def poison(monkeypatch):
    """Fresh float allocations made by the kernels' Python layer are NaN-filled, so a kernel
    that forgets to write part of its output fails."""
    orig = torch.empty

    def empty(*a, **kw):
        t = orig(*a, **kw)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def close(name, got, want, dtype, tol):
    got, want = got.detach().float(), want.detach().float()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    t = tol[dtype]
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= t["atol"] + t["rtol"] * scale, f"{name} ({dtype}): max err {err:.3g}, scale {scale:.3g}"


def dense(vals, idx, F):
    return torch.zeros(vals.shape[0], F).scatter_add(1, idx.long(), vals.detach().float())


def params(B, D, F, dtype, scale=0.1):
    x = torch.randn(B, D).to(dtype).requires_grad_()
    W = (torch.randn(F, D) * scale / math.sqrt(D) * 10).to(dtype).requires_grad_()
    b = (torch.randn(F) * scale).to(dtype).requires_grad_()
    return x, W, b


def as_ref(*ts):
    return [t.detach().float().requires_grad_() for t in ts]


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


@pytest.mark.parametrize(PARAMS, CASES)
def test_topk_encode(backend, B, D, F, k, widths, dtype, kernel_tol, poison):
    x, W, b = params(B, D, F, dtype)
    check_encode(lambda *a: K.topk_encode(*a, k, backend=backend),
                 lambda *a: R.topk_encode_ref(*a, k), x, W, b, F, dtype, kernel_tol)


@pytest.mark.parametrize("theta", ["relu", "scalar", "per-feature"])
@pytest.mark.parametrize(PARAMS, cases(heavy_interp=True))
def test_relu_encode(backend, B, D, F, k, widths, dtype, theta, kernel_tol, poison):
    x, W, b = params(B, D, F, dtype)
    # pre ~ N(0, 1): thresholds near 2 keep ~2% of F active (the interpreter loops over m)
    th = {"relu": None, "scalar": 2.0, "per-feature": 1.8 + 0.4 * torch.rand(F)}[theta]
    if theta == "relu":
        b = (b.detach() - 2.0).requires_grad_()
    check_encode(lambda *a: K.relu_encode(*a, th, backend=backend),
                 lambda *a: R.relu_encode_ref(*a, th), x, W, b, F, dtype, kernel_tol)


@pytest.mark.parametrize(PARAMS, cases(heavy_interp=True))
def test_batchtopk_encode(backend, B, D, F, k, widths, dtype, kernel_tol, poison):
    x, W, b = params(B, D, F, dtype)
    th_fast, th_ref = torch.tensor(0.5), torch.tensor(0.5)
    check_encode(lambda *a: K.batchtopk_encode(*a, k, th_fast, beta=0.9, backend=backend),
                 lambda *a: R.batchtopk_encode_ref(*a, k, th_ref, beta=0.9), x, W, b, F, dtype,
                 kernel_tol)
    assert th_ref.item() != 0.5, "the reference threshold should have moved"
    close("threshold", th_fast, th_ref, dtype, kernel_tol)


def code(B, F, k, dtype):
    """A random sparse code with distinct features per row (k <= F)."""
    idx = torch.rand(B, F).argsort(1)[:, :k]
    vals = torch.rand(B, k).to(dtype).requires_grad_()
    return vals, idx


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(PARAMS, CASES)
def test_sparse_decode(backend, B, D, F, k, widths, dtype, bias, kernel_tol, poison):
    vals, idx = code(B, F, k, dtype)
    _, W, _ = params(1, D, F, dtype)
    bd = torch.randn(D).to(dtype).requires_grad_() if bias else None
    g = torch.randn(B, D)
    out = K.sparse_decode(vals, idx, W, bd, backend=backend)
    assert out.dtype == dtype
    ins = [vals, W] + ([bd] if bias else [])
    grads = torch.autograd.grad((out.float() * g).sum(), ins)
    refs = as_ref(*ins)
    ref = R.sparse_decode_ref(refs[0], idx, refs[1], refs[2] if bias else None)
    gr = torch.autograd.grad((ref * g).sum(), refs)
    close("recon", out, ref, dtype, kernel_tol)
    for name, a, w in zip(("dvals", "dW_dec", "db_dec"), grads, gr):
        close(name, a, w, dtype, kernel_tol)


def check_loss(out, ref, ins, refs, S, dtype, tol, B):
    """Compare LossOutputs and the grads of ins under one combined upstream gradient."""
    names = ("loss", "recon", "mse", "fvu", "penalty")
    up = [torch.tensor(1.3), torch.randn(*out.recon.shape), torch.randn(S), torch.randn(S),
          torch.tensor(0.7)]
    if B == 1:  # one row has no variance: fvu is inf in both; leave it out of the gradient
        up[3] = torch.zeros(S)
    for name, a, w in zip(names, out, ref):
        if name == "fvu" and B == 1:
            assert torch.isinf(a).all() and torch.isinf(w).all()
            continue
        close(name, a, w, dtype, tol)

    def total(o):
        return sum((t.float() * u).sum() for t, u, n in zip(o, up, names) if not (n == "fvu" and B == 1))

    grads = torch.autograd.grad(total(out), ins)
    gr = torch.autograd.grad(total(ref), refs)
    for name, a, w in zip(("dvals", "dW_dec", "db_dec"), grads, gr):
        close(name, a, w, dtype, tol)


@pytest.mark.parametrize("coef", [0.0, 0.3], ids=["nopen", "pen"])
@pytest.mark.parametrize(PARAMS, CASES)
def test_crosscoder_loss(backend, B, D, F, k, widths, dtype, coef, kernel_tol, poison):
    vals, idx = code(B, F, k, dtype)
    _, W, _ = params(1, D, F, dtype)
    bd = (torch.randn(D) * 0.1).to(dtype).requires_grad_()
    x = torch.randn(B, D).to(dtype)
    out = K.crosscoder_loss(vals, idx, W, bd, x, widths, coef, with_penalty=True, backend=backend)
    refs = as_ref(vals, W, bd)
    ref = R.crosscoder_loss_ref(refs[0], idx, refs[1], refs[2], x.float(), widths, coef,
                                with_penalty=True)
    check_loss(out, ref, [vals, W, bd], refs, len(widths), dtype, kernel_tol, B)


@pytest.mark.parametrize(PARAMS, cases(heavy_interp=True))
def test_source_mse(backend, B, D, F, k, widths, dtype, kernel_tol, poison):
    recon = torch.randn(B, D).to(dtype).requires_grad_()
    x = (torch.randn(B, D) + 0.5).to(dtype)
    mse, fvu = K.source_mse(recon, x, widths, backend=backend)
    (rr,) = as_ref(recon)
    mr, fr = R.source_mse_ref(rr, x.float(), widths)
    close("mse", mse, mr, dtype, kernel_tol)
    gm, gf = torch.randn(len(widths)), torch.randn(len(widths))
    if B > 1:
        close("fvu", fvu, fr, dtype, kernel_tol)
    else:  # one row has no variance: fvu is inf in both and stays out of the gradient
        assert torch.isinf(fvu).all() and torch.isinf(fr).all()
        gf = None
    (g,) = torch.autograd.grad((mse * gm).sum() + (0 if gf is None else (fvu * gf).sum()), recon)
    (w,) = torch.autograd.grad((mr * gm).sum() + (0 if gf is None else (fr * gf).sum()), rr)
    close("drecon", g, w, dtype, kernel_tol)


@pytest.mark.parametrize(PARAMS, cases(heavy_interp=True))
def test_decoder_norm_penalty(backend, B, D, F, k, widths, dtype, kernel_tol, poison):
    vals, idx = code(B, F, k, dtype)
    _, W, _ = params(1, D, F, dtype)
    with torch.no_grad():
        W[3] = 0  # a zero decoder row: its norm has no gradient (0, not NaN)
    pen = K.decoder_norm_penalty(vals, idx, W, widths, backend=backend)
    vr, Wr = as_ref(vals, W)
    pr = R.decoder_norm_penalty_ref(vr, idx, Wr, widths)
    close("penalty", pen, pr, dtype, kernel_tol)
    for name, a, w in zip(("dvals", "dW_dec"), torch.autograd.grad(pen * 0.7, (vals, W)),
                          torch.autograd.grad(pr * 0.7, (vr, Wr))):
        close(name, a, w, dtype, kernel_tol)
    # dense code (the relu path before compression)
    dcode = torch.relu(torch.randn(B, F) - 1).to(dtype).requires_grad_()
    pen = K.dense_decoder_norm_penalty(dcode, W, widths, backend=backend)
    cr, Wr = as_ref(dcode, W)
    pr = R.dense_decoder_norm_penalty_ref(cr, Wr, widths)
    close("dense penalty", pen, pr, dtype, kernel_tol)
    for name, a, w in zip(("dcode", "dW_dec"), torch.autograd.grad(pen, (dcode, W)),
                          torch.autograd.grad(pr, (cr, Wr))):
        close(name, a, w, dtype, kernel_tol)


# ----------------------------------------------------------------------------- references
def test_references_gradcheck():
    """The references' own gradients, in float64, against finite differences."""
    B, D, F, k, widths = 3, 7, 11, 3, (3, 4)
    dd = dict(dtype=torch.float64)
    x = torch.randn(B, D, **dd, requires_grad=True)
    W = torch.randn(F, D, **dd, requires_grad=True)
    b = torch.randn(F, **dd, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: R.topk_encode_ref(*a, k)[0], (x, W, b))
    assert torch.autograd.gradcheck(lambda *a: R.relu_encode_ref(*a, 0.1)[0], (x, W, b))
    assert torch.autograd.gradcheck(lambda *a: R.batchtopk_encode_ref(*a, k)[0], (x, W, b))
    vals = torch.rand(B, k, **dd, requires_grad=True)
    idx = torch.randint(0, F, (B, k))
    bd = torch.randn(D, **dd, requires_grad=True)
    assert torch.autograd.gradcheck(R.sparse_decode_ref, (vals, idx, W, bd))
    assert torch.autograd.gradcheck(
        lambda v, w, bb: R.crosscoder_loss_ref(v, idx, w, bb, x.detach(), widths, 0.5)[:4:2],
        (vals, W, bd))
    assert torch.autograd.gradcheck(lambda v, w: R.decoder_norm_penalty_ref(v, idx, w, widths),
                                    (vals, W))


# ----------------------------------------------------------------------------- dispatch, errors
def test_dispatch(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.delenv("FASTXC_BACKEND", raising=False)
    assert _dispatch.choose(x) == "cpu"
    monkeypatch.setenv("FASTXC_BACKEND", "reference")
    assert _dispatch.choose(x) == "reference"
    monkeypatch.setenv("FASTXC_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.choose(x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET"):
        assert _dispatch.choose(x) == "cpu"
    monkeypatch.setenv("FASTXC_BACKEND", "gpu-please")
    with pytest.raises(K.BackendError, match="FASTXC_BACKEND"):
        _dispatch.choose(x)


def test_env_backend_routes_ops(monkeypatch):
    """FASTXC_BACKEND=reference makes the public op return the reference's autograd graph."""
    x, W, b = params(4, 16, 33, torch.float32)
    monkeypatch.setenv("FASTXC_BACKEND", "reference")
    v, _ = K.topk_encode(x, W, b, 3)
    assert "TopkBackward" in type(v.grad_fn.next_functions[0][0]).__name__ or v.grad_fn is not None
    monkeypatch.setenv("FASTXC_BACKEND", "cpu")
    v2, _ = K.topk_encode(x, W, b, 3)
    assert "EncodeFn" in type(v2.grad_fn).__name__


def test_bad_inputs():
    x, W, b = params(4, 16, 33, torch.float32)
    with pytest.raises(ValueError, match="W_enc"):
        K.topk_encode(x[:, :5], W, b, 3)
    with pytest.raises(ValueError, match="k must be"):
        K.topk_encode(x, W, b, 0)
    with pytest.raises(ValueError, match="b_enc"):
        K.topk_encode(x, W, b[:5], 3)
    vals, idx = code(4, 33, 3, torch.float32)
    with pytest.raises(ValueError, match="vals and idx"):
        K.sparse_decode(vals, idx[:, :2], W)
    with pytest.raises(ValueError, match="sum to D"):
        K.crosscoder_loss(vals, idx, W, None, torch.randn(4, 16), [8, 9])
    with pytest.raises(ValueError, match="int32 or int64"):
        K.sparse_decode(vals, idx.float(), W)


def test_fast_grads_are_written_once():
    """dW from the sparse backward becomes .grad itself (no zero-fill + add, no copy)."""
    x, W, b = params(8, 16, 33, torch.float32)
    W2 = torch.randn(33, 16, requires_grad=True)
    v, i = K.topk_encode(x, W, b, 4, backend="cpu")
    out = K.crosscoder_loss(v, i, W2, None, x.detach(), [16], backend="cpu")
    out.loss.backward()
    assert W.grad is not None and W2.grad is not None and b.grad is not None
    assert W.grad.is_contiguous() and W2.grad.shape == W2.shape
