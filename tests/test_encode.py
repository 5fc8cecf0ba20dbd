"""topk_encode and relu_encode (fastxc/kernels/encode.py) against their references."""
from __future__ import annotations

import pytest
import torch

import fastxc.kernels as K
from fastxc.kernels import encode as E
from kernel_cases import CASES, PARAMS, cases, check_encode, f64, params


@pytest.mark.parametrize(PARAMS, CASES)
def test_topk_encode(backend, B, D, F, k, widths, dtype, kernel_tol, poison):
    x, W, b = params(B, D, F, dtype)
    check_encode(lambda *a: K.topk_encode(*a, k, backend=backend),
                 lambda *a: E.topk_encode_ref(*a, k), x, W, b, F, dtype, kernel_tol)


@pytest.mark.parametrize("theta", ["relu", "scalar", "per-feature"])
@pytest.mark.parametrize(PARAMS, cases(heavy_interp=True))
def test_relu_encode(backend, B, D, F, k, widths, dtype, theta, kernel_tol, poison):
    x, W, b = params(B, D, F, dtype)
    # pre ~ N(0, 1): thresholds near 2 keep ~2% of F active (the interpreter loops over m)
    th = {"relu": None, "scalar": 2.0, "per-feature": 1.8 + 0.4 * torch.rand(F)}[theta]
    if theta == "relu":
        b = (b.detach() - 2.0).requires_grad_()
    check_encode(lambda *a: K.relu_encode(*a, th, backend=backend),
                 lambda *a: E.relu_encode_ref(*a, th), x, W, b, F, dtype, kernel_tol)


def test_encode_references_gradcheck():
    """The references' own gradients, in float64, against finite differences."""
    B, D, F, k = 3, 7, 11, 3
    x, W, b = f64((B, D), (F, D), (F,))
    assert torch.autograd.gradcheck(lambda *a: E.topk_encode_ref(*a, k)[0], (x, W, b))
    assert torch.autograd.gradcheck(lambda *a: E.relu_encode_ref(*a, 0.1)[0], (x, W, b))


def test_encode_bad_inputs():
    x, W, b = params(4, 16, 33, torch.float32)
    with pytest.raises(ValueError, match="W_enc"):
        K.topk_encode(x[:, :5], W, b, 3)
    with pytest.raises(ValueError, match="k must be"):
        K.topk_encode(x, W, b, 0)
    with pytest.raises(ValueError, match="b_enc"):
        K.topk_encode(x, W, b[:5], 3)


def test_fast_grads_are_written_once():
    """dW from the sparse backward becomes .grad itself (no zero-fill + add, no copy)."""
    x, W, b = params(8, 16, 33, torch.float32)
    W2 = torch.randn(33, 16, requires_grad=True)
    v, i = K.topk_encode(x, W, b, 4, backend="cpu")
    out = K.crosscoder_loss(v, i, W2, None, x.detach(), [16], backend="cpu")
    out.loss.backward()
    assert W.grad is not None and W2.grad is not None and b.grad is not None
    assert W.grad.is_contiguous() and W2.grad.shape == W2.shape
