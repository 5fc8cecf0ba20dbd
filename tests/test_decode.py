"""sparse_decode (fastxc/kernels/decode.py) against its reference."""
from __future__ import annotations

import pytest
import torch

import fastxc.kernels as K
from fastxc.kernels import decode as DE
from kernel_cases import CASES, PARAMS, as_ref, close, code, f64, params


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
    ref = DE.sparse_decode_ref(refs[0], idx, refs[1], refs[2] if bias else None)
    gr = torch.autograd.grad((ref * g).sum(), refs)
    close("recon", out, ref, dtype, kernel_tol)
    for name, a, w in zip(("dvals", "dW_dec", "db_dec"), grads, gr):
        close(name, a, w, dtype, kernel_tol)


def test_sparse_decode_reference_gradcheck():
    """The reference's own gradients, in float64, against finite differences."""
    B, D, F, k = 3, 7, 11, 3
    W, bd = f64((F, D), (D,))
    vals = torch.rand(B, k, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, F, (B, k))
    assert torch.autograd.gradcheck(DE.sparse_decode_ref, (vals, idx, W, bd))


def test_sparse_decode_bad_inputs():
    _, W, _ = params(4, 16, 33, torch.float32)
    vals, idx = code(4, 33, 3, torch.float32)
    with pytest.raises(ValueError, match="vals and idx"):
        K.sparse_decode(vals, idx[:, :2], W)
    with pytest.raises(ValueError, match="int32 or int64"):
        K.sparse_decode(vals, idx.float(), W)
