"""batchtopk_encode (fastxc/kernels/batchtopk.py) against its reference, running threshold
included."""
from __future__ import annotations

import pytest
import torch

import fastxc.kernels as K
from fastxc.kernels import batchtopk as BT
from kernel_cases import PARAMS, cases, check_encode, close, f64, params


@pytest.mark.parametrize(PARAMS, cases(heavy_interp=True))
def test_batchtopk_encode(backend, B, D, F, k, widths, dtype, kernel_tol, poison):
    x, W, b = params(B, D, F, dtype)
    th_fast, th_ref = torch.tensor(0.5), torch.tensor(0.5)
    check_encode(lambda *a: K.batchtopk_encode(*a, k, th_fast, momentum=0.1, backend=backend),
                 lambda *a: BT.batchtopk_encode_ref(*a, k, th_ref, momentum=0.1), x, W, b, F,
                 dtype, kernel_tol)
    assert th_ref.item() != 0.5, "the reference threshold should have moved"
    close("threshold", th_fast, th_ref, dtype, kernel_tol)


def test_batchtopk_reference_gradcheck():
    """The reference's own gradients, in float64, against finite differences."""
    B, D, F, k = 3, 7, 11, 3
    x, W, b = f64((B, D), (F, D), (F,))
    assert torch.autograd.gradcheck(lambda *a: BT.batchtopk_encode_ref(*a, k)[0], (x, W, b))
