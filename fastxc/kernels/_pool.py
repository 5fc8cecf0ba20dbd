"""A small pool of large CPU output buffers (the [B, F] GEMM output, the [F, D] weight gradients).

Why: a fresh 64 MiB tensor is a fresh mmap; first-touching its pages costs ~22 ms of CPU per
buffer on the 2-core machine (measured: fill of a fresh [16384, 1024] fp32 tensor 30 ms, of a
reused one 8 ms), and freeing it another munmap. A training step makes three such tensors.

Buffers are pooled by capacity, not by shape: a request takes the smallest free buffer that
holds it (and is at most twice its size), so the encoder's [B, F] pre-activation, freed once
the code is selected, is the same memory as the [F, D] gradients of backward. With the
optimizer stepping each parameter as soon as its gradient is complete
(``fastxc.core.optim.AdamInBackward``) a whole training step then needs one large buffer.

The pool hands out a buffer only when nobody else holds its storage any more (a dropped
``.grad``, a returned temporary); a buffer still referenced anywhere is never reused, so handing
one out can never overwrite live data. ``empty_cache()`` releases the pool.
"""
from __future__ import annotations

import torch

_MIN_BYTES = 8 << 20  # only buffers large enough to be mmapped by malloc
_PER_DTYPE = 6
_pool: dict[torch.dtype, list[torch.Tensor]] = {}


def _free(base: torch.Tensor) -> bool:
    # use count = the pooled tensor + the temporary storage handle of this call
    return torch._C._storage_Use_Count(base.untyped_storage()._cdata) <= 2


def empty(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An uninitialised contiguous tensor, on a pooled buffer when a free one fits."""
    shape = tuple(int(s) for s in shape)
    dev = torch.device(device)
    numel = 1
    for s in shape:
        numel *= s
    if dev.type != "cpu" or numel * torch.empty((), dtype=dtype).element_size() < _MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=dev)
    bufs = _pool.setdefault(dtype, [])
    fits = [b for b in bufs if numel <= b.numel() <= 2 * numel and _free(b)]
    if fits:
        base = min(fits, key=lambda b: b.numel())
    else:
        base = torch.empty(numel, dtype=dtype)
        if len(bufs) >= _PER_DTYPE:
            return base.view(shape)
        bufs.append(base)
    return torch.empty(0, dtype=dtype).set_(base.untyped_storage(), 0, shape)


def empty_cache() -> None:
    """Release every pooled buffer (tensors handed out stay valid)."""
    _pool.clear()
