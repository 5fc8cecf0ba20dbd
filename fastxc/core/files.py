"""Files the package writes: safetensors files get the mode the umask asks for.

safetensors writes through a private temporary file and renames it, which leaves the file 0600
whatever the umask; every .safetensors fastxc writes (crosscoders, checkpoints, exports) goes
through ``save_safetensors``, so a run on a shared file system is readable as the umask says.
"""
from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (other threads may be
    creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path: str | os.PathLike) -> None:
    """``safetensors.torch.save_file(tensors, path)``, then mode 0666 minus the umask (as
    ``open()`` would have created it)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    os.chmod(path, 0o666 & ~umask())
