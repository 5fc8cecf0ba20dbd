"""Per-call backend choice: ``reference`` (plain torch), ``triton`` or ``cpu``.

Rule (evaluated on every call, never at import):
  * ``FASTXC_BACKEND=reference|triton|cpu`` forces one;
  * otherwise CUDA tensors take ``triton`` and CPU tensors take ``cpu``;
  * ``triton`` asked for on CUDA tensors raises when triton cannot run them (never a silent
    fallback); unasked, CUDA tensors without triton take ``reference`` with a warning;
  * float64 tensors always take ``reference`` (the kernels compute in fp32);
  * ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (how the tests check the kernels
    on machines without a GPU); without it the ``cpu`` path is taken and a warning says so once.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings

import torch

BACKENDS = ("reference", "triton", "cpu")
log = logging.getLogger("fastxc.kernels")
_warned: set[str] = set()


class BackendError(ValueError):
    """An unknown FASTXC_BACKEND value or a backend that cannot run these tensors."""


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# tl.topk (the fused top-k encode) first shipped in triton 3.4.0
TRITON_MIN = (3, 4)


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    """True when triton imports and is at least TRITON_MIN (checked once per process)."""
    try:
        triton = importlib.import_module("triton")
    except ImportError:
        return False
    try:
        version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:  # a development build: trust it
        return True
    if version < TRITON_MIN:
        _warn_once("triton-old", f"fastxc.kernels: triton {triton.__version__} is older than "
                   f"{'.'.join(map(str, TRITON_MIN))} (tl.topk); using the non-Triton paths")
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose(*tensors: torch.Tensor, backend: str | None = None) -> str:
    """Return the backend for a call on ``tensors`` (the first tensor's device decides)."""
    want = backend or os.environ.get("FASTXC_BACKEND", "").strip().lower() or None
    if want is not None and want not in BACKENDS:
        raise BackendError(f"FASTXC_BACKEND={want!r}: expected one of {', '.join(BACKENDS)}")
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    dev = first.device if first is not None else torch.device("cpu")
    if want == "reference":
        return "reference"
    if first is not None and first.dtype == torch.float64:
        # the kernels accumulate in fp32; float64 (gradcheck, exact references) stays exact
        return "reference"
    if dev.type == "cuda":
        if want == "cpu":
            raise BackendError("FASTXC_BACKEND=cpu cannot run CUDA tensors; move them to the CPU")
        if _triton_importable():
            return "triton"
        if want == "triton":  # asked for by name: never a silent fallback on a GPU
            raise BackendError("backend 'triton' on CUDA tensors needs triton >= "
                               f"{'.'.join(map(str, TRITON_MIN))}, which is not importable here")
        _warn_once("cuda-no-triton", "fastxc.kernels: triton >= 3.4 is not importable; CUDA tensors "
                   "take the plain-torch reference path")
        return "reference"
    if dev.type != "cpu":
        _warn_once(f"dev-{dev.type}", f"fastxc.kernels: no fast path for {dev.type} tensors; "
                   "using the plain-torch reference")
        return "reference"
    if want == "triton":
        if interpreting() and _triton_importable():
            return "triton"
        _warn_once("triton-cpu", "fastxc.kernels: FASTXC_BACKEND=triton on CPU tensors needs "
                   "TRITON_INTERPRET=1; falling back to the cpu path")
    return "cpu"
