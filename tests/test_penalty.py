"""decoder_norm_penalty and dense_decoder_norm_penalty (fastxc/kernels/penalty.py) against
their references."""
from __future__ import annotations

import pytest
import torch

import fastxc.kernels as K
from fastxc.kernels import penalty as P
from kernel_cases import PARAMS, as_ref, cases, close, code, f64, params


@pytest.mark.parametrize(PARAMS, cases(heavy_interp=True))
def test_decoder_norm_penalty(backend, B, D, F, k, widths, dtype, kernel_tol, poison):
    vals, idx = code(B, F, k, dtype)
    _, W, _ = params(1, D, F, dtype)
    with torch.no_grad():
        W[3] = 0  # a zero decoder row: its norm has no gradient (0, not NaN)
    pen = K.decoder_norm_penalty(vals, idx, W, widths, backend=backend)
    vr, Wr = as_ref(vals, W)
    pr = P.decoder_norm_penalty_ref(vr, idx, Wr, widths)
    close("penalty", pen, pr, dtype, kernel_tol)
    for name, a, w in zip(("dvals", "dW_dec"), torch.autograd.grad(pen * 0.7, (vals, W)),
                          torch.autograd.grad(pr * 0.7, (vr, Wr))):
        close(name, a, w, dtype, kernel_tol)
    # dense code (the relu path before compression)
    dcode = torch.relu(torch.randn(B, F) - 1).to(dtype).requires_grad_()
    pen = K.dense_decoder_norm_penalty(dcode, W, widths, backend=backend)
    cr, Wr = as_ref(dcode, W)
    pr = P.dense_decoder_norm_penalty_ref(cr, Wr, widths)
    close("dense penalty", pen, pr, dtype, kernel_tol)
    for name, a, w in zip(("dcode", "dW_dec"), torch.autograd.grad(pen, (dcode, W)),
                          torch.autograd.grad(pr, (cr, Wr))):
        close(name, a, w, dtype, kernel_tol)


def test_decoder_norm_penalty_reference_gradcheck():
    """The reference's own gradients, in float64, against finite differences."""
    B, D, F, k, widths = 3, 7, 11, 3, (3, 4)
    (W,) = f64((F, D))
    vals = torch.rand(B, k, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, F, (B, k))
    assert torch.autograd.gradcheck(lambda v, w: P.decoder_norm_penalty_ref(v, idx, w, widths),
                                    (vals, W))
