"""The one place a ``--device`` value becomes a torch device (train, harvest, the analyses).

``auto`` (every command's default) is CUDA when ``torch.cuda.is_available()``, else the CPU.
A device that does not parse or is not there raises ``DeviceError`` (a ValueError) with one
line, which the commands print through ``fastxc.core.cli.report``.
"""
from __future__ import annotations

import torch

AUTO = "auto"


class DeviceError(ValueError):
    """A --device value that names no usable device; one-line message."""


def resolve_device(name: str | torch.device | None = AUTO) -> torch.device:
    """``name`` ("auto", "cpu", "cuda", "cuda:1", a torch.device; None: auto) -> torch.device.

    auto: ``cuda`` (the current CUDA device) when CUDA is available, else ``cpu``. A CUDA
    device that is not available, or an index beyond the visible GPUs, raises DeviceError.
    """
    if name is None or (isinstance(name, str) and name.strip().lower() == AUTO):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(name, torch.device):
        dev = name
    else:
        try:
            dev = torch.device(str(name).strip().lower())
        except (RuntimeError, ValueError):
            raise DeviceError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} requested but no CUDA device is available (--device auto picks the CPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu" and not _available(dev):
        raise DeviceError(f"--device {name} requested but this torch has no usable {dev.type} device")
    return dev


def _available(dev: torch.device) -> bool:
    """Whether a non-CUDA accelerator type (mps, xpu, ...) is usable in this process."""
    mod = getattr(torch, dev.type, None)
    try:
        return bool(mod is not None and mod.is_available())
    except Exception:  # a backend module without is_available, or one that fails to probe
        return False
