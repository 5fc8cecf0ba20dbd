"""Optional C++ CPU kernels from ``fastxc._C`` (csrc/cpu_kernels.cpp).

fastxc.kernels works without them (torch ops); they are used for fp32 CPU tensors when the
extension is built and ``FASTXC_KERNELS_NO_C`` is unset (bench/bench_step.py compares both).
"""
from __future__ import annotations

import importlib
import os

import torch

_mod = None
_tried = False


def get():
    """The extension module, or None when it is not built (or disabled by the env var)."""
    global _mod, _tried
    if os.environ.get("FASTXC_KERNELS_NO_C", "0") not in ("", "0"):
        return None
    if not _tried:
        _tried = True
        try:
            m = importlib.import_module("fastxc._C")
            # gather_sum and the layout flags came together: an older build is not used
            _mod = m if hasattr(m, "gather_sum") else None
        except ImportError:
            _mod = None
    return _mod


def usable(*tensors: torch.Tensor):
    """The module if every tensor is a contiguous fp32/int CPU tensor, else None."""
    m = get()
    if m is None:
        return None
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in (
                torch.float32, torch.int64, torch.int32):
            return None
    return m


def as_numpy(t: torch.Tensor):
    """A numpy view sharing t's memory (t must be a contiguous CPU tensor)."""
    return t.detach().numpy()
