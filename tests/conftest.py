"""Shared test setup.

With no GPU, the Triton kernels run on CPU tensors through the interpreter; the variable must
be set before triton is first imported, which is why it sits at the top of this file.
"""
import math
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

# tests/ is on sys.path (pytest's default 'prepend' import mode), under `pytest` and
# `python -m pytest` alike; below numerics.pin() because it imports torch
from kernel_cases import KERNEL_TOL  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so a failure reproduces."""
    torch.manual_seed(0)
    import numpy as np
    import random

    np.random.seed(0)
    random.seed(0)
    yield


@pytest.fixture
def kernel_tol():
    """The per-dtype kernel tolerance table (``kernel_cases.KERNEL_TOL``)."""
    return KERNEL_TOL


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


# ----------------------------------------------------------------------------- GPU cases
# Kernel and crosscoder tests parametrized with backend="triton" run on CUDA tensors when a GPU
# is present (the default device is switched for the test), on CPU tensors through the
# interpreter otherwise; they carry the ``gpu`` marker on a GPU machine (``pytest -m gpu``).
# Tests marked ``gpu`` by hand are skipped where there is no GPU.
def _backend_of(item):
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("backend") if callspec is not None else None


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if _HAS_GPU and _backend_of(item) == "triton":
            item.add_marker(pytest.mark.gpu)
        elif not _HAS_GPU and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _triton_cases_on_the_gpu(request):
    """backend="triton" cases build their tensors on the GPU when there is one."""
    if not (_HAS_GPU and _backend_of(request.node) == "triton"):
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)
