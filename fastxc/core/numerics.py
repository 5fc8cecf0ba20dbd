"""Pinned CPU numerics: the same floats from the same inputs on every x86-64 machine.

torch picks its CPU kernels by the processor: ATen's vectorised ops (softmax, reductions,
elementwise maths) by its widest vector unit (AVX-512 or AVX2), and MKL's GEMMs by vendor and
ISA. Two machines of the same kind can therefore train the model organism to different weights,
and every later stage (store, crosscoder, the study's figures) inherits the difference. Pinning
fixes each choice to one that every x86-64 CPU since 2013 supports:

* ``ATEN_CPU_CAPABILITY=avx2``: ATen's AVX2 kernels, also on AVX-512 machines;
* ``MKL_CBWR=AVX2,STRICT``: MKL's conditional numerical reproducibility, AVX2 branch, strict
  (bitwise the same for any thread count);
* ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN (used by some CPU ops) capped likewise.

They are read when torch starts, so they must be set before ``import torch``: test sessions
pin in ``tests/conftest.py``, and the organism pipeline re-runs itself in a pinned process
when the current one is not (``fastxc.organism``). This module imports no torch.
"""
from __future__ import annotations

import os
import sys

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def pin() -> bool:
    """Pin this process's CPU numerics if torch has not started yet; True when pinned now.

    A variable the user set already is kept (their choice wins, and ``is_pinned`` then says
    whether the result is the pinned configuration).
    """
    if "torch" in sys.modules:
        return is_pinned()
    for key, value in PINNED_ENV.items():
        os.environ.setdefault(key, value)
    return is_pinned()


def pinned_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default: os.environ) with the pinned variables set."""
    env = dict(os.environ if base is None else base)
    env.update(PINNED_ENV)
    return env


def is_pinned() -> bool:
    """True when this process runs (or, before torch starts, will run) with pinned numerics."""
    if any(os.environ.get(k) != v for k, v in PINNED_ENV.items()):
        return False
    if "torch" in sys.modules:
        import torch

        # torch reads ATEN_CPU_CAPABILITY at its first dispatch; a machine without AVX2 falls
        # back to scalar kernels, which are not the pinned configuration
        return torch.backends.cpu.get_cpu_capability() == "AVX2"
    return True


def describe() -> dict[str, str]:
    """What decides this process's CPU floats, for a stage's metadata."""
    info = {k: os.environ.get(k, "") for k in PINNED_ENV}
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["aten_capability"] = torch.backends.cpu.get_cpu_capability()
    info["pinned"] = str(is_pinned()).lower()
    return info
