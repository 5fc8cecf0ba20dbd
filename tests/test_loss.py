"""crosscoder_loss and source_mse (fastxc/kernels/loss.py) against their references."""
from __future__ import annotations

import pytest
import torch

import fastxc.kernels as K
from fastxc.kernels import loss as L
from kernel_cases import CASES, PARAMS, as_ref, cases, close, code, f64, params


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
    ref = L.crosscoder_loss_ref(refs[0], idx, refs[1], refs[2], x.float(), widths, coef,
                                with_penalty=True)
    check_loss(out, ref, [vals, W, bd], refs, len(widths), dtype, kernel_tol, B)


@pytest.mark.parametrize(PARAMS, cases(heavy_interp=True))
def test_source_mse(backend, B, D, F, k, widths, dtype, kernel_tol, poison):
    recon = torch.randn(B, D).to(dtype).requires_grad_()
    x = (torch.randn(B, D) + 0.5).to(dtype)
    mse, fvu = K.source_mse(recon, x, widths, backend=backend)
    (rr,) = as_ref(recon)
    mr, fr = L.source_mse_ref(rr, x.float(), widths)
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


def test_crosscoder_loss_reference_gradcheck():
    """The reference's own gradients, in float64, against finite differences."""
    B, D, F, k, widths = 3, 7, 11, 3, (3, 4)
    x, W, bd = f64((B, D), (F, D), (D,))
    vals = torch.rand(B, k, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, F, (B, k))
    assert torch.autograd.gradcheck(
        lambda v, w, bb: L.crosscoder_loss_ref(v, idx, w, bb, x.detach(), widths, 0.5)[:4:2],
        (vals, W, bd))


def test_crosscoder_loss_bad_inputs():
    _, W, _ = params(4, 16, 33, torch.float32)
    vals, idx = code(4, 33, 3, torch.float32)
    with pytest.raises(ValueError, match="sum to D"):
        K.crosscoder_loss(vals, idx, W, None, torch.randn(4, 16), [8, 9])
