"""Shared test setup.

With no GPU, the Triton kernels run on CPU tensors through the interpreter; the variable must
be set before triton is first imported, which is why it sits at the top of this file.
"""
import os

import pytest

try:  # torch.cuda needs torch; importing it here is cheap and happens once
    import torch

    _HAS_GPU = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_GPU = False

if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so a failure reproduces."""
    torch.manual_seed(0)
    import numpy as np
    import random

    np.random.seed(0)
    random.seed(0)
    yield


# Kernel tolerances per dtype (tests/test_kernels*.py): a result passes when
# max|got - want| <= atol + rtol * max|want|, against the reference run in float32 on the same
# (possibly bf16) inputs. Measured worst cases over the kernel test shapes: fp32 ~3e-7
# relative; bf16 ~5e-3 relative (one bf16 rounding of the output, eps = 2^-8).
KERNEL_TOL = {
    torch.float32: {"rtol": 2e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}


@pytest.fixture
def kernel_tol():
    """The per-dtype kernel tolerance table (see KERNEL_TOL)."""
    return KERNEL_TOL
