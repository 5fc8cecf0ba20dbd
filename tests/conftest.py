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
