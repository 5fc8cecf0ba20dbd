"""The process group of a distributed run and the collectives both parallel modes share.

``setup`` joins the group torchrun describes (gloo on CPU, NCCL on CUDA; without torchrun a
mode other than "none" runs as a world of one) and returns the ``DistContext``; ``shutdown``
leaves it. ``batches`` gives each rank its share of every global batch. The collectives are
looked up as ``parallel.all_gather`` / ``parallel.all_reduce`` by their callers, so a test can
wrap them to count the bytes each step sends.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from fastxc import kernels as K

PARALLEL_MODES = ("none", "data", "features")


class DistributedError(ValueError):
    """A distributed setup or checkpoint that cannot work; one-line message."""


# ---------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job."""

    mode: str  # "data" | "features"
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "gloo" | "nccl"
    owns_group: bool  # this module initialised the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main(ctx: DistContext | None) -> bool:
    """True on rank 0 and in a single-process run."""
    return ctx is None or ctx.is_main


def barrier(ctx: DistContext | None) -> None:
    if ctx is not None and ctx.world_size > 1:
        dist.barrier()


def _device(mode_device: str | torch.device, local_rank: int) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (made current) for a CUDA run, else as given."""
    dev = torch.device(mode_device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise DistributedError("--device cuda requested but no CUDA device is available")
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices on this node")
    dev = torch.device("cuda", local_rank)
    torch.cuda.set_device(dev)
    return dev


def setup(mode: str, device: str | torch.device = "cpu") -> DistContext | None:
    """Join the process group torchrun describes in the environment; None for ``mode="none"``.

    gloo on CPU, NCCL on CUDA (device ``cuda:LOCAL_RANK``). Without torchrun's variables a mode
    other than "none" runs as a world of one. Raises DistributedError when torchrun started
    several processes but ``mode`` is "none" (they would all write the same run).
    """
    if mode not in PARALLEL_MODES:
        raise DistributedError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if world_env > 1:
            raise DistributedError(
                f"{world_env} processes were started (WORLD_SIZE={world_env}) but --parallel is none: "
                "pass --parallel data or --parallel features"
            )
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        if world_env > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:  # one process without torchrun: an in-memory store, no network
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return DistContext(mode, dist.get_rank(), dist.get_world_size(), local_rank, dev, backend, owns)


def from_main(fn: Callable[[], Any], ctx: DistContext | None) -> Any:
    """``fn()`` run on rank 0 only, its (picklable) result given to every rank."""
    if ctx is None or ctx.world_size == 1:
        return fn()
    box = [fn() if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(ctx: DistContext | None) -> None:
    """Leave the process group if ``setup`` created it (call on every rank).

    A barrier first: a rank that destroyed its group while another still talked to it (rank 0
    finishing its evaluation or writing results) made gloo abort that other process with
    "terminate called without an active exception". The barrier waits at most the group's
    collective timeout (10 min by default) for rank 0's evaluation, which reads only
    ``--eval-batches`` batches.
    """
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        barrier(ctx)
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- collectives
def all_gather(t: Tensor) -> Tensor:
    """t [n, ...] from every rank -> [W*n, ...] (rank order); t must have the same shape everywhere."""
    if dist.get_world_size() == 1:
        return t
    out = t.new_empty((dist.get_world_size() * t.shape[0], *t.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10
    gather(out, t.contiguous())
    return out


def all_reduce(t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
    """In place over ranks (sum by default); returns t."""
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def global_batch_threshold(relu_pre: Tensor, n_keep: int) -> tuple[Tensor, Tensor]:
    """relu(pre) [rows, F_r] (this rank's share of the global [B, F]) -> (t, top).

    t: the ``n_keep``-th largest value over all ranks (0-dim); keeping entries >= t is the
    global top-n_keep selection (entries equal to 0 add nothing to the code). top: the global
    top-n_keep values (every rank gets the same), for the running threshold. Each rank sends at
    most n_keep values (4 bytes each): no rank can own more of the winners than that. Both
    modes use it: data parallel splits the batch's rows, feature parallel its columns.
    """
    flat = relu_pre.detach().float().flatten()
    m = min(n_keep, flat.numel())
    vals = flat.topk(m, sorted=False).values
    if m < n_keep:  # fewer local entries than n_keep: pad (relu values are >= 0)
        vals = torch.cat([vals, vals.new_full((n_keep - m,), -1.0)])
    allv = all_gather(vals)
    top = allv.topk(n_keep, sorted=False).values
    return top.min(), top


def global_batchtopk(relu_pre: Tensor, n_keep: int, threshold: Tensor, momentum: float) -> Tensor:
    """relu(pre) [rows, F_r] (this rank's share of the global batch) -> its code [rows, F_r]:
    the entries among the global top-n_keep. Moves the running ``threshold`` toward the
    selection's smallest positive value (``fastxc.kernels.update_threshold``)."""
    t, top = global_batch_threshold(relu_pre, n_keep)
    K.update_threshold(threshold, top, momentum)
    return relu_pre * (relu_pre >= t)


# ---------------------------------------------------------------------------- batches
class _RankRows:
    """Iterator over this rank's rows of global batches start, start+1, ... of a store reader,
    reading only those rows (one batch gathered ahead on a thread)."""

    def __init__(self, reader: Any, batch_size: int, seed: int, start: int, ctx: DistContext):
        self.reader, self.batch_size, self.seed, self.i = reader, batch_size, seed, start
        b = batch_size // ctx.world_size
        self.rows = slice(ctx.rank * b, (ctx.rank + 1) * b)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fastxc-rank-rows")
        self.next = self.pool.submit(self._read, self.i)

    def _read(self, i: int) -> Tensor:
        return self.reader.read_rows(self.reader.batch_rows(self.batch_size, self.seed, i)[self.rows])

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        x = self.next.result()
        self.i += 1
        self.next = self.pool.submit(self._read, self.i)
        return x


def _slice_rows(it: Iterator[Tensor], ctx: DistContext) -> Iterator[Tensor]:
    for x in it:
        b = x.shape[0] // ctx.world_size
        yield x[ctx.rank * b : (ctx.rank + 1) * b]


def _agree_finite(it: Iterator[Tensor], device: torch.device) -> Iterator[Tensor]:
    """Every rank skips a batch if any rank's rows hold NaN/Inf (the trainer skips non-finite
    batches; ranks that disagreed would wait on each other forever)."""
    for x in it:
        bad = torch.tensor([0.0 if torch.isfinite(x).all() else 1.0], device=device)  # NCCL: on the GPU
        all_reduce(bad)
        yield x if bad.item() == 0 else torch.full_like(x, float("nan"))


def agree_finite(it: Iterator[Tensor], ctx: DistContext | None) -> Iterator[Tensor]:
    """``it`` itself, or under --parallel data the batches every rank agrees are finite."""
    if ctx is None or ctx.mode != "data":
        return it
    return _agree_finite(it, ctx.device)


def batches(make: Callable[..., Iterator[Tensor]], batch_size: int, seed: int, start: int,
            ctx: DistContext | None) -> Iterator[Tensor]:
    """The batches this rank trains on, from ``make(batch_size, seed=, start=)`` (a DataSource's
    ``batches``): all of every global batch (none, features) or this rank's rows (data).

    Data parallel reads only this rank's rows when ``make`` is a store reader's ``batches``
    (it has ``batch_rows`` and ``read_rows``); other sources are generated whole and sliced.
    """
    if ctx is None or ctx.mode != "data":
        return make(batch_size, seed=seed, start=start)
    if batch_size % ctx.world_size:
        raise DistributedError(f"--batch-size {batch_size} must be a multiple of the {ctx.world_size} data-parallel ranks")
    reader = getattr(make, "__self__", None)
    if reader is not None and hasattr(reader, "batch_rows") and hasattr(reader, "read_rows"):
        it: Iterator[Tensor] = _RankRows(reader, batch_size, seed, start, ctx)
    else:
        it = _slice_rows(make(batch_size, seed=seed, start=start), ctx)
    return _agree_finite(it, ctx.device)
