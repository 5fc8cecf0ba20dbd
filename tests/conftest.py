"""Shared test setup.

With no GPU, the Triton kernels run on CPU tensors through the interpreter; the variable must
be set before triton is first imported, which is why it sits at the top of this file.
"""
import os

import pytest

# Pinned CPU numerics before torch starts: the organism acceptance tests then see the same floats
# on every x86-64 machine (fastxc.core.numerics says why and how).
from fastxc.core import numerics

numerics.pin()

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
# (possibly bf16) inputs. Measured worst max|err| / max|want| over the kernel tests: fp32
# 1.3e-6 (dvals, fp32 sums in another order); bf16 1.5e-2 (dvals: bf16-rounded outputs and
# upstream gradients feed sums with cancellation; bf16 eps = 2^-8 = 3.9e-3).
KERNEL_TOL = {
    torch.float32: {"rtol": 4e-6, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-3},
}


@pytest.fixture
def kernel_tol():
    """The per-dtype kernel tolerance table (see KERNEL_TOL)."""
    return KERNEL_TOL
