"""A small pool of large CPU output buffers (the [F, D] weight gradients).

Why: a fresh 64 MiB tensor is a fresh mmap; first-touching its pages costs ~22 ms of CPU per
buffer on the 2-core machine (measured: fill of a fresh [16384, 1024] fp32 tensor 30 ms, of a
reused one 8 ms), and freeing it another munmap. A training step makes two such gradients.
The pool hands out a tensor that shares a pooled storage only when nobody else holds that
storage any more (``optimizer.zero_grad(set_to_none=True)`` dropped the old .grad); a buffer
still referenced anywhere is never reused, so handing one out can never overwrite live data.
``empty_cache()`` releases the pool.
"""
from __future__ import annotations

import torch

_MIN_BYTES = 8 << 20  # only buffers large enough to be mmapped by malloc
_PER_KEY = 4
_pool: dict[tuple, list[torch.Tensor]] = {}


def _free(base: torch.Tensor) -> bool:
    # use count = the pooled tensor + the temporary storage handle of this call
    return torch._C._storage_Use_Count(base.untyped_storage()._cdata) <= 2


def empty(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An uninitialised tensor, from the pool when a free buffer of that shape exists."""
    shape = tuple(int(s) for s in shape)
    dev = torch.device(device)
    numel = 1
    for s in shape:
        numel *= s
    if dev.type != "cpu" or numel * torch.empty((), dtype=dtype).element_size() < _MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=dev)
    key = (shape, dtype)
    bufs = _pool.setdefault(key, [])
    for base in bufs:
        if _free(base):
            break
    else:
        base = torch.empty(shape, dtype=dtype)
        if len(bufs) < _PER_KEY:
            bufs.append(base)
        else:
            return base
    stride = base.stride()
    return torch.empty(0, dtype=dtype).set_(base.untyped_storage(), 0, shape, stride)


def empty_cache() -> None:
    """Release every pooled buffer (tensors handed out stay valid)."""
    _pool.clear()
