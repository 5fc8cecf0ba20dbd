"""Training on several processes with torch.distributed: data parallel and feature parallel.

Launch: ``torchrun --nproc-per-node N -m fastxc.train ... --parallel data|features`` (gloo on
CPU, NCCL on CUDA; several nodes through torchrun's rendezvous flags). ``--parallel`` without
torchrun runs the same code in one process (a world of 1).

Data parallel (``data``): every rank holds the whole crosscoder. Global batch i is split by rows:
rank r trains on rows [r*B/W, (r+1)*B/W) of it (read from the store directly: a rank reads only
its rows), and the gradients are averaged with all_reduce, so W ranks take the same steps as
one process on the same global batch. What is a statistic of the batch is computed over the
global batch: batchtopk's k*B selection (each rank's top k*B candidates are all-gathered and the
(k*B)-th largest value is the global threshold), the AuxK residual variance, the dead-feature
counters and the reported loss / FVU / L0. The forward runs the fused sparse ops of
``fastxc.kernels`` as ``Crosscoder.forward`` does (topk, relu; batchtopk's training step stays
dense, since its threshold needs the whole global batch's pre-activations).

Feature parallel (``features``): rank r owns features [F*r/W, F*(r+1)/W): its rows of W_enc,
b_enc, W_dec, their Adam state and dead-feature counters; b_dec is replicated. Every rank sees
the whole batch. Forward, for x [B, D] and F_r = local features:

    pre_r    = x @ W_enc_r.T + b_enc_r                                 [B, F_r]   local GEMM
    topk:      each row's local top-k (value, global id) -> all_gather [W, B, k] -> the global
               top-k of each row; a rank keeps the winners it owns
    batchtopk: local top k*B values -> all_gather [W, k*B] -> global (k*B)-th value = threshold
    recon    = all_reduce_sum(code_r @ W_dec_r) + b_dec                 [B, D]
    loss     = replicated on every rank (same recon, same x)

With topk and relu the rank's code stays sparse on ``fastxc.kernels`` (the local top-k comes
from ``topk_encode``, the partial reconstruction from ``sparse_decode``, AuxK computes only
the dead features' encoder columns); batchtopk runs the dense [B, F_r] path above.

The all_reduce of the partial reconstructions is the identity in backward (every rank holds
the whole loss, so d loss / d partial_r = d loss / d recon, already local), which gives each
rank exactly the gradients of its rows that one process would compute. The decoder-norm
penalty (relu) and AuxK use the same reduce; dead-feature counters are local to the owner.

Checkpoints: data parallel writes the ordinary single-process checkpoint (rank 0).
Feature parallel writes ``checkpoint/rank{r}.safetensors`` (the rank's rows, its optimizer
state, the replicated tensors) plus ``manifest.json`` (world size, feature slices, model
config); ``load_checkpoint`` re-slices either format into any world size, and
``load_full_model(checkpoint)`` assembles the whole Crosscoder in one process. Rank 0 writes the
final ``out/crosscoder`` (``Crosscoder.load``) from the final sharded checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F_
from torch import Tensor, nn

from fastxc import kernels as K
from fastxc.core.crosscoder import Crosscoder, CrosscoderOutput
from fastxc.kernels import _dispatch

log = logging.getLogger("fastxc.train.distributed")

PARALLEL_MODES = ("none", "data", "features")
SHARDED_FORMAT = "fastxc-feature-sharded"
SHARDED_VERSION = 1
# Order of the parameters in the optimizer (Crosscoder's registration order); a checkpoint's
# optimizer state is keyed by these names.
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
# Tensors with one row per feature (split across ranks); everything else is replicated.
ROW_TENSORS = ("W_enc", "b_enc", "W_dec", "tokens_since_fired")


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
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda requested but no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices on this node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
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
    """Destroy the process group if ``setup`` created it. No barrier: rank 0 may still be
    evaluating, and a barrier waiting on it could outlast NCCL's collective timeout."""
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def feature_slices(n_features: int, world_size: int) -> list[tuple[int, int]]:
    """[(lo, hi)] per rank: rank r owns features [F*r//W, F*(r+1)//W)."""
    return [(n_features * r // world_size, n_features * (r + 1) // world_size) for r in range(world_size)]


def _all_gather(t: Tensor) -> Tensor:
    """t [n, ...] from every rank -> [W*n, ...] (rank order); t must have the same shape everywhere."""
    if dist.get_world_size() == 1:
        return t
    out = t.new_empty((dist.get_world_size() * t.shape[0], *t.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10
    gather(out, t.contiguous())
    return out


def _all_reduce(t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


class _ReduceReplicated(torch.autograd.Function):
    """Forward: sum of the ranks' partial tensors. Backward: identity.

    Used where everything after the sum is computed identically on every rank (the loss is
    replicated): the gradient of the one loss with respect to a rank's partial is then the
    gradient with respect to the sum, which each rank already holds. (An all_reduce in backward,
    as ``torch.distributed.nn.all_reduce`` does, would multiply it by the world size.)
    """

    @staticmethod
    def forward(ctx, partial: Tensor) -> Tensor:
        return _all_reduce(partial.clone())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def reduce_replicated(partial: Tensor) -> Tensor:
    """Sum of ``partial`` over ranks; gradient flows back unchanged (see ``_ReduceReplicated``)."""
    return _ReduceReplicated.apply(partial)


# ---------------------------------------------------------------------------- selections
def global_topk_mask(scores: Tensor, k: int, lo: int) -> Tensor:
    """scores [B, F_r] of this rank's features lo.. -> bool [B, F_r]: the entries among the k
    largest of their row over all ranks' features.

    Each rank sends its row-wise top-k (value, global id) as one int32 tensor [B, 2k] (the
    float bits and the id side by side: 8 bytes per candidate); every rank then runs the same
    top-k over the [B, W*k] gathered candidates, so all ranks agree on the winners.
    """
    B, F_r = scores.shape
    kk = min(k, F_r)
    vals, idx = scores.detach().float().topk(kk, dim=1, sorted=False)
    if kk < k:  # a slice narrower than k: pad with losers
        vals = torch.cat([vals, vals.new_full((B, k - kk), float("-inf"))], dim=1)
        idx = torch.cat([idx, idx.new_full((B, k - kk), -1 - lo)], dim=1)
    packed = torch.cat([vals.view(torch.int32), (idx + lo).to(torch.int32)], dim=1)  # [B, 2k]
    allp = _all_gather(packed.unsqueeze(0))  # [W, B, 2k]
    all_vals = allp[..., :k].contiguous().view(torch.float32).permute(1, 0, 2).reshape(B, -1)
    all_ids = allp[..., k:].permute(1, 0, 2).reshape(B, -1)
    win = all_vals.topk(k, dim=1, sorted=False).indices
    gid = all_ids.gather(1, win).long()
    owned = (gid >= lo) & (gid < lo + F_r)
    local = torch.where(owned, gid - lo, torch.full_like(gid, F_r))  # F_r: a dump column
    mask = torch.zeros(B, F_r + 1, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, local, True)
    return mask[:, :F_r]


def _aux_term(e_hat: Tensor, err: Tensor) -> Tensor:
    """AuxK loss of the dead features' reconstruction e_hat [B, D] of the residual -err, normalised
    by the residual's variance (as ``Crosscoder.aux_loss``)."""
    target = -err.detach()
    denom = (target - target.mean(dim=0)).pow(2).sum(dim=1).mean().clamp_min(1e-12)
    return (e_hat - target).pow(2).sum(dim=1).mean() / denom


def global_topk_keep(vals: Tensor, gid: Tensor, k: int) -> Tensor:
    """This rank's candidates (vals [B, m], their global feature ids gid [B, m]) -> bool [B, m]:
    those among the k largest of their row over all ranks' candidates.

    The sparse form of ``global_topk_mask``: each rank passes its own row-wise top-k (m <= k,
    m = 0 allowed), so no [B, F_r] tensor is needed. Same wire format ([B, 2k] int32).
    """
    B, m = vals.shape
    v = vals.detach().float()
    g = gid.to(torch.int32)
    if m < k:  # pad with losers (ids -1 never match a real candidate)
        v = torch.cat([v, v.new_full((B, k - m), float("-inf"))], dim=1)
        g = torch.cat([g, g.new_full((B, k - m), -1)], dim=1)
    allp = _all_gather(torch.cat([v.view(torch.int32), g], dim=1).unsqueeze(0))  # [W, B, 2k]
    all_vals = allp[..., :k].contiguous().view(torch.float32).permute(1, 0, 2).reshape(B, -1)
    all_ids = allp[..., k:].permute(1, 0, 2).reshape(B, -1)
    win = all_ids.gather(1, all_vals.topk(k, dim=1, sorted=False).indices)  # [B, k] global ids
    return (gid.to(torch.int32).unsqueeze(2) == win.unsqueeze(1)).any(dim=2)


def global_batch_threshold(relu_pre: Tensor, n_keep: int) -> tuple[Tensor, Tensor]:
    """relu(pre) [rows, F_r] (this rank's share of the global [B, F]) -> (t, top).

    t: the ``n_keep``-th largest value over all ranks (0-dim); keeping entries >= t is the
    global top-n_keep selection (entries equal to 0 add nothing to the code). top: the global
    top-n_keep values (every rank gets the same), for the running threshold. Each rank sends at
    most n_keep values (4 bytes each): no rank can own more of the winners than that.
    """
    flat = relu_pre.detach().float().flatten()
    m = min(n_keep, flat.numel())
    vals = flat.topk(m, sorted=False).values
    if m < n_keep:  # fewer local entries than n_keep: pad (relu values are >= 0)
        vals = torch.cat([vals, vals.new_full((n_keep - m,), -1.0)])
    allv = _all_gather(vals)
    top = allv.topk(n_keep, sorted=False).values
    return top.min(), top


def _update_threshold(buf: Tensor, top: Tensor, momentum: float) -> None:
    """The reference's running batchtopk threshold from the selected global values."""
    positive = top[top > 0]
    if positive.numel():
        batch_thr = positive.min().float()
        if buf.item() < 0:
            buf.copy_(batch_thr)
        else:
            buf.lerp_(batch_thr, momentum)


# ---------------------------------------------------------------------------- data parallel
class DataParallelCrosscoder(Crosscoder):
    """A Crosscoder replicated on every rank that trains on this rank's rows of the global batch.

    Gradients are averaged over ranks by an all_reduce as each one is accumulated (a hook per
    parameter). ``forward`` follows ``Crosscoder.forward`` with the global-batch statistics
    collected from all ranks; ``loss`` has the global batch's value and this rank's gradient.
    It saves and loads like a Crosscoder (same config and tensors).
    """

    def __init__(self, base: Crosscoder, ctx: DistContext):
        cfg = {k: v for k, v in base.config().items() if k != "version"}
        rng = torch.get_rng_state()  # __init__ draws a random init that is overwritten below
        super().__init__(**cfg, dtype=base.W_dec.dtype, device=ctx.device)
        torch.set_rng_state(rng)
        self.load_state_dict(base.state_dict())
        self.world_size = ctx.world_size
        for p in self.parameters():
            p.register_post_accumulate_grad_hook(self._average_grad)

    def _average_grad(self, p: Tensor) -> None:
        if self.world_size > 1:
            dist.all_reduce(p.grad)
            p.grad.div_(self.world_size)

    def activate(self, pre: Tensor) -> Tensor:
        if self.activation != "batchtopk" or not self.training:
            return super().activate(pre)
        relu_pre = F_.relu(pre)
        n_keep = min(self.k * pre.shape[0] * self.world_size, pre.numel() * self.world_size)
        t, top = global_batch_threshold(relu_pre, n_keep)
        with torch.no_grad():
            _update_threshold(self.threshold, top, self.threshold_momentum)
        return relu_pre * (relu_pre >= t)

    def forward(self, x: Tensor, l1_coef: float | None = None) -> CrosscoderOutput:
        """x: this rank's rows [b, D] or [b, n, d] (b = B / W) -> CrosscoderOutput over them, with
        loss / mse / fvu / l0 / aux reported for the global batch (detached except ``loss``)."""
        W = self.world_size
        x2 = self.flatten_input(x)
        b = x2.shape[0]
        self._calls += 1
        # the fused sparse ops of fastxc.kernels, as Crosscoder.forward, except for training
        # batchtopk, whose threshold is a statistic of the global batch (dense path below)
        fused = (self.activation != "batchtopk" or not self.training) and self.use_fused(x2)
        pre = f = vals = idx = None
        if fused:
            vals, idx = self.sparse_code(x2)
            loss, recon2, _, sparsity = self.sparse_loss(vals, idx, x2, l1_coef)
            active = vals > 0
            fired = torch.zeros(self.n_features, dtype=torch.bool, device=x2.device)
            fired[idx[active]] = True
            err = recon2 - x2
        else:
            # the sparsity penalty is a mean over rows: the rank average is the global one
            pre, f, recon2, err, _, loss, sparsity = self.dense_loss(x2, l1_coef)
            active = f > 0
            fired = active.any(dim=0)
        zero = loss.new_zeros(())

        use_aux = self.aux_k > 0 and self.activation in ("topk", "batchtopk") and self.training
        if self.training:
            # one all_reduce: which features fired anywhere, and the AuxK target's sums (float64
            # so that the one-pass variance matches the reference's two-pass one)
            target = -err.detach().double()
            stats = torch.cat([fired.double(), target.sum(dim=0), target.pow(2).sum().view(1)]) if use_aux \
                else fired.double()
            _all_reduce(stats)
            with torch.no_grad():
                self.tokens_since_fired.add_(b * W)
                self.tokens_since_fired.masked_fill_(stats[: self.n_features] > 0, 0)
        aux = zero
        if use_aux:
            s1, s2 = stats[self.n_features : -1], stats[-1]
            denom = ((s2 - s1.pow(2).sum() / (b * W)) / (b * W)).float().clamp_min(1e-12)
            aux = self._aux_loss_sparse(x2, err, denom) if fused else self._aux_loss_global(pre, err, denom)
            loss = loss + self.aux_coef * aux

        with torch.no_grad():  # global metrics in one all_reduce
            xs, es = self.split(x2.double()), self.split(err.detach().double())
            packed = torch.cat([
                torch.stack([e.pow(2).sum() for e in es]),
                torch.stack([xi.pow(2).sum() for xi in xs]),
                x2.double().sum(dim=0),
                torch.stack([loss.detach().double(), sparsity.detach().double(), aux.detach().double(),
                             active.sum().double()]),
            ])
            _all_reduce(packed)
            n, B = self.n_sources, b * W
            err_sq, x_sq, x_sum = packed[:n], packed[n : 2 * n], packed[2 * n : 2 * n + self.d_total]
            loss_g, sparsity_g, aux_g, active_g = (packed[-4:] / torch.tensor([W, W, W, B], dtype=packed.dtype, device=packed.device))
            var = torch.stack([x_sq[i] - x_sum[self.offsets[i] : self.offsets[i + 1]].pow(2).sum() / B for i in range(n)])
            fvu = (err_sq / var.clamp_min(1e-12)).float()
            mse_g = (err_sq / B).float()
        loss = loss + (loss_g.to(loss.dtype) - loss.detach())  # global value, this rank's gradient
        recon = recon2.view_as(x) if x.dim() == 3 else recon2
        return CrosscoderOutput(recon, f, loss, mse_g, fvu, sparsity_g.float(), aux_g.float(), active_g.float(),
                                vals=vals, idx=idx, n_features=self.n_features)

    def _aux_loss_global(self, pre: Tensor, err: Tensor, denom: Tensor) -> Tensor:
        """``Crosscoder.aux_loss`` with the residual variance of the global batch (``denom``)."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return pre.new_zeros(())
        k_aux = min(self.aux_k, n_dead)
        masked = pre.masked_fill(~dead, float("-inf"))
        vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
        code = torch.zeros_like(pre).scatter(-1, idx, F_.relu(vals))
        target = -err.detach()
        e_hat = code @ self.W_dec
        return (e_hat - target).pow(2).sum(dim=1).mean() / denom


# ---------------------------------------------------------------------------- feature parallel
class FeatureParallelCrosscoder(nn.Module):
    """This rank's slice [lo, hi) of a crosscoder's features; b_dec replicated.

    Parameters (same names and order as Crosscoder): W_enc [F_r, D], b_enc [F_r], W_dec [F_r, D],
    b_dec [D]. ``forward`` takes the whole batch on every rank and returns the whole
    reconstruction and the replicated loss; ``code`` is this rank's columns [B, F_r].
    """

    def __init__(self, base: Crosscoder, ctx: DistContext):
        super().__init__()
        cfg = base.config()
        self._config = cfg
        for key in ("widths", "n_features", "activation", "k", "aux_k", "aux_coef", "l1_coef", "dec_init_norm",
                    "dead_tokens", "threshold_momentum", "source_names"):
            setattr(self, key, cfg[key])
        self.offsets, self.n_sources, self.d_total = list(base.offsets), base.n_sources, base.d_total
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.lo, self.hi = feature_slices(self.n_features, ctx.world_size)[ctx.rank]
        if self.hi <= self.lo:
            raise DistributedError(f"{ctx.world_size} ranks for {self.n_features} features: rank {ctx.rank} would own none")
        rows = slice(self.lo, self.hi)
        dev = ctx.device
        self.W_enc = nn.Parameter(base.W_enc.detach()[rows].to(dev, copy=True))
        self.b_enc = nn.Parameter(base.b_enc.detach()[rows].to(dev, copy=True))
        self.W_dec = nn.Parameter(base.W_dec.detach()[rows].to(dev, copy=True))
        self.b_dec = nn.Parameter(base.b_dec.detach().to(dev, copy=True))
        self.register_buffer("threshold", base.threshold.detach().to(dev, copy=True))
        self.register_buffer("input_scale", base.input_scale.detach().to(dev, copy=True))
        self.register_buffer("tokens_since_fired", base.tokens_since_fired.detach()[rows].to(dev, copy=True))

    # the shape helpers only read widths / offsets, so Crosscoder's own code serves
    flatten_input = Crosscoder.flatten_input
    split = Crosscoder.split
    fvu = Crosscoder.fvu
    loss_terms = Crosscoder.loss_terms

    def config(self) -> dict:
        return dict(self._config)

    def decoder_norms(self) -> Tensor:
        """[F_r, n_sources] for this rank's features."""
        return torch.stack([p.norm(dim=1) for p in self.split(self.W_dec)], dim=1)

    def local_dead_mask(self) -> Tensor:
        """[F_r] bool: this rank's dead features."""
        return self.tokens_since_fired >= self.dead_tokens

    def dead_mask(self) -> Tensor:
        """[F] bool over all features (an all_gather; call it on every rank)."""
        local = self.local_dead_mask()
        width = self.n_features // self.world_size + 1
        padded = torch.zeros(width, dtype=torch.uint8, device=local.device)
        padded[: local.numel()] = local
        allm = _all_gather(padded).view(self.world_size, width)
        return torch.cat([allm[r, : hi - lo] for r, (lo, hi) in enumerate(feature_slices(self.n_features, self.world_size))]).bool()

    def _select(self, pre: Tensor) -> Tensor:
        """pre [B, F_r] -> dense code [B, F_r] of this rank's features (collectives inside)."""
        relu_pre = F_.relu(pre)
        if self.activation == "relu":
            return relu_pre
        if self.activation == "topk":
            return relu_pre * global_topk_mask(pre, self.k, self.lo)
        if not self.training:  # batchtopk at inference: the running threshold, no batch statistics
            thr = self.threshold.item()
            if thr < 0:
                raise RuntimeError("batchtopk crosscoder has no running threshold yet: train it (or call .train()) first")
            return pre * (pre > thr).to(pre.dtype)
        n_keep = min(self.k * pre.shape[0], pre.shape[0] * self.n_features)
        t, top = global_batch_threshold(relu_pre, n_keep)
        with torch.no_grad():
            _update_threshold(self.threshold, top, self.threshold_momentum)
        return relu_pre * (relu_pre >= t)

    def _fused(self, x2: Tensor) -> bool:
        """topk and relu run on fastxc.kernels (training batchtopk needs the dense pre)."""
        if self.activation == "batchtopk":
            return False
        return _dispatch.choose(x2) != "reference"

    def _forward_fused(self, x: Tensor, x2: Tensor, l1_coef: float | None) -> CrosscoderOutput:
        """``forward`` on the fused sparse ops: the local code stays (vals, idx) [B, m]."""
        B, F_r = x2.shape[0], self.W_enc.shape[0]
        if self.activation == "topk":
            # local top-k (relu applied: entries with pre <= 0 tie at 0 and add nothing, so
            # ranking the relu'd values picks the same code), then the global winners
            vals, idx = K.topk_encode(x2, self.W_enc, self.b_enc, min(self.k, F_r))
            vals = vals * global_topk_keep(vals, idx + self.lo, self.k)
        else:
            vals, idx = K.relu_encode(x2, self.W_enc, self.b_enc)
        recon2, err, mse, loss, sparsity = self._loss(
            x2, K.sparse_decode(vals, idx, self.W_dec), l1_coef, lambda norms: (vals * norms[idx]).sum(dim=1))
        zero = loss.new_zeros(())

        active = vals > 0
        if self.training:
            with torch.no_grad():
                fired = torch.zeros(F_r, dtype=torch.bool, device=x2.device)
                fired[idx[active]] = True
                self.tokens_since_fired.add_(B)
                self.tokens_since_fired.masked_fill_(fired, 0)
        dead = self.local_dead_mask()
        counts = torch.stack([dead.sum(), active.sum()]).to(torch.float64)  # one reduce for both
        _all_reduce(counts)
        n_dead, n_active = int(counts[0]), counts[1]
        aux = zero
        if self.aux_k > 0 and self.training and n_dead > 0:
            # only the dead features' encoder columns ([B, n_dead_r]), as Crosscoder's sparse AuxK
            k_aux = min(self.aux_k, n_dead)
            dead_idx = dead.nonzero().squeeze(1)
            pre_d = torch.addmm(self.b_enc[dead_idx], x2, self.W_enc[dead_idx].t())
            v, j = pre_d.topk(min(k_aux, dead_idx.numel()), dim=1, sorted=False)
            v = F_.relu(v) * global_topk_keep(v, dead_idx[j] + self.lo, k_aux)
            aux = _aux_term(reduce_replicated(K.sparse_decode(v, dead_idx[j], self.W_dec)), err)
            loss = loss + self.aux_coef * aux
        return self._output(x, x2, recon2, loss, mse, sparsity, aux, n_active, None, vals, idx)

    def _loss(self, x2: Tensor, partial: Tensor, l1_coef: float | None, row_penalty: Callable):
        """This rank's reconstruction share partial [B, D] -> (recon2, err, mse, loss, sparsity).
        row_penalty(norms [F_r]) -> [B]: this rank's decoder-norm-weighted L1 of each row (relu)."""
        recon2 = reduce_replicated(partial) + self.b_dec
        err = recon2 - x2
        mse, loss, sparsity = self.loss_terms(
            err, l1_coef, lambda: reduce_replicated(row_penalty(self.decoder_norms().sum(dim=1)).mean()))
        return recon2, err, mse, loss, sparsity

    def _output(self, x, x2, recon2, loss, mse, sparsity, aux, n_active, f, vals=None, idx=None) -> CrosscoderOutput:
        with torch.no_grad():
            fvu = self.fvu(x2, recon2)
            l0 = (n_active / x2.shape[0]).float()
        recon = recon2.view_as(x) if x.dim() == 3 else recon2
        return CrosscoderOutput(recon, f, loss, mse, fvu, sparsity, aux, l0, vals=vals, idx=idx,
                                n_features=self.W_enc.shape[0])

    def forward(self, x: Tensor, l1_coef: float | None = None) -> CrosscoderOutput:
        """x [B, D] or [B, n, d], the same on every rank -> CrosscoderOutput (code: local columns)."""
        x2 = self.flatten_input(x)
        if self._fused(x2):
            return self._forward_fused(x, x2, l1_coef)
        B = x2.shape[0]
        pre = torch.addmm(self.b_enc, x2, self.W_enc.t())
        f = self._select(pre)
        recon2, err, mse, loss, sparsity = self._loss(x2, f @ self.W_dec, l1_coef, lambda norms: f @ norms)
        zero = loss.new_zeros(())

        active = f > 0
        if self.training:
            with torch.no_grad():
                self.tokens_since_fired.add_(B)
                self.tokens_since_fired.masked_fill_(active.any(dim=0), 0)
        use_aux = self.aux_k > 0 and self.activation in ("topk", "batchtopk") and self.training
        dead = self.local_dead_mask()
        counts = torch.stack([dead.sum(), active.sum()]).to(torch.float64)  # one reduce for both
        _all_reduce(counts)
        n_dead, n_active = int(counts[0]), counts[1]
        aux = zero
        if use_aux and n_dead > 0:
            k_aux = min(self.aux_k, n_dead)
            masked = pre.masked_fill(~dead, float("-inf"))
            code = F_.relu(pre) * global_topk_mask(masked, k_aux, self.lo)
            aux = _aux_term(reduce_replicated(code @ self.W_dec), err)
            loss = loss + self.aux_coef * aux
        return self._output(x, x2, recon2, loss, mse, sparsity, aux, n_active, f)

    def extra_repr(self) -> str:
        return f"features [{self.lo}, {self.hi}) of {self.n_features}, widths={self.widths}, activation={self.activation!r}, k={self.k}"


def feature_parallel_comm_bytes(batch_size: int, d_total: int, k: int, activation: str = "topk",
                                aux_k: int = 0, world_size: int = 2) -> dict[str, int]:
    """Bytes of the tensors one rank hands to collectives in one feature-parallel training step
    (forward; the backward sends nothing). Independent of the dictionary size F.

    all_gather: what one rank contributes (each rank receives world_size times this). all_reduce:
    the tensor size (a ring all_reduce sends and receives 2*(W-1)/W of it per rank). ``aux_k``:
    the AuxK candidates per row, min(--aux-k, dead features); its terms count only on steps
    with dead features.
    """
    B, D = batch_size, d_total
    gather = {"topk": B * k * 8, "batchtopk": k * B * 4, "relu": 0}[activation]  # (fp32 bits, int32 id) | fp32
    reduce = B * D * 4 + 16  # partial reconstructions [B, D] fp32 + (dead, active) counts as 2 float64
    if activation == "relu":
        reduce += 4  # the decoder-norm penalty's partial sum
    if aux_k and activation != "relu":
        gather += B * aux_k * 8
        reduce += B * D * 4  # partial AuxK reconstructions
    return {"all_gather": gather, "all_gather_received": gather * world_size, "all_reduce": reduce}


def wrap(model: Crosscoder, ctx: DistContext | None) -> nn.Module:
    """The module this rank trains: ``model`` itself, its data-parallel replica or its slice."""
    if ctx is None:
        return model
    if ctx.mode == "data":
        return DataParallelCrosscoder(model, ctx)
    return FeatureParallelCrosscoder(model, ctx)


# ---------------------------------------------------------------------------- data
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
        _all_reduce(bad)
        yield x if bad.item() == 0 else torch.full_like(x, float("nan"))


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


# ---------------------------------------------------------------------------- checkpoints
def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@torch.no_grad()
def sync_replicated(model: nn.Module, ctx: DistContext | None) -> float:
    """Give every rank rank 0's replicated tensors (b_dec, threshold); returns the largest
    difference there was. Every rank computes them from the same numbers, so it is 0 (checked
    by the tests on gloo); if a platform's kernels ever differ between ranks the checkpoint
    still holds one consistent model, and the difference is logged."""
    if ctx is None or ctx.world_size == 1:
        return 0.0
    worst = 0.0
    for name in ("b_dec", "threshold"):
        t = getattr(model, name)
        ref = t.detach().clone()
        dist.broadcast(ref, 0)
        diff = (t.float() - ref.float()).abs().max().reshape(1)
        _all_reduce(diff, dist.ReduceOp.MAX)
        if diff.item() != 0:
            log.warning("replicated %s differed between ranks by %.3g; took rank 0's", name, diff.item())
            t.copy_(ref)
        worst = max(worst, diff.item())
    return worst


def save_checkpoint(out: Path, model: FeatureParallelCrosscoder, opt: torch.optim.Optimizer, state: dict,
                    ctx: DistContext, version: int) -> Path:
    """Write ``out/checkpoint`` from every rank (call on all ranks): rank{r}.safetensors each,
    then rank 0 writes manifest.json and state.json and swaps the directory in, so at every
    instant one complete checkpoint exists (checkpoint/ or checkpoint.old/)."""
    from safetensors.torch import save_file

    sync_replicated(model, ctx)
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    names = dict(enumerate(PARAM_NAMES))
    for pid, st in sd["state"].items():
        for key, v in st.items():
            tensors[f"opt.{names[pid]}.{key}"] = v.detach().contiguous().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    path = tmp / f"rank{ctx.rank}.safetensors"
    save_file(tensors, str(path))
    _fsync(path)
    barrier(ctx)
    if ctx.is_main:
        manifest = {"format": SHARDED_FORMAT, "version": SHARDED_VERSION, "world_size": ctx.world_size,
                    "slices": feature_slices(model.n_features, ctx.world_size), "config": model.config()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        meta = {"version": version, "param_groups": sd["param_groups"], **state}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        for p in (tmp / "manifest.json", tmp / "state.json"):
            _fsync(p)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


class _CheckpointReader:
    """Reads a checkpoint tensor by its name ("W_enc", "opt.W_enc.exp_avg", "rng.torch"),
    whole or by feature rows, from either checkpoint format."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        man = path / "manifest.json"
        if man.is_file():
            m = json.loads(man.read_text())
            if m.get("format") != SHARDED_FORMAT or m.get("version") != SHARDED_VERSION:
                raise DistributedError(f"{man}: not a {SHARDED_FORMAT} v{SHARDED_VERSION} manifest")
            self.config = m["config"]
            self.slices = [tuple(s) for s in m["slices"]]
            self.files = []
            for r in range(m["world_size"]):
                f = path / f"rank{r}.safetensors"
                if not f.is_file():
                    raise FileNotFoundError(f"{path}: missing {f.name} (manifest names {m['world_size']} ranks)")
                self.files.append(safe_open(str(f), framework="pt"))
            self.keys = {k: k for k in self.files[0].keys()}
        else:  # the single-process format of fastxc.train: model/ + optimizer.safetensors
            cfg_path = path / "model" / "config.json"
            if not cfg_path.is_file():
                raise FileNotFoundError(f"{path}: neither manifest.json nor model/config.json")
            self.config = json.loads(cfg_path.read_text())
            self.slices = [(0, self.config["n_features"])]
            model_f = safe_open(str(path / "model" / "model.safetensors"), framework="pt")
            opt_f = safe_open(str(path / "optimizer.safetensors"), framework="pt")
            self.files = [model_f]
            self.keys = {}
            self._opt = opt_f
            for k in model_f.keys():
                self.keys[f"model.{k}"] = k
            for k in opt_f.keys():
                if k.startswith("state."):
                    _, pid, name = k.split(".", 2)
                    self.keys[f"opt.{PARAM_NAMES[int(pid)]}.{name}"] = k
                else:
                    self.keys[k] = k

    def _file(self, key: str, r: int = 0):
        if not self.path.joinpath("manifest.json").is_file() and not key.startswith("model."):
            return self._opt
        return self.files[r]

    def has(self, key: str) -> bool:
        return key in self.keys

    def full(self, key: str) -> Tensor:
        """A replicated tensor (from rank 0's file)."""
        return self._file(key).get_tensor(self.keys[key])

    def rows(self, key: str, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) of a per-feature tensor, assembled from the shards that hold them."""
        parts = []
        for r, (a, b) in enumerate(self.slices):
            s, e = max(a, lo), min(b, hi)
            if s < e:
                parts.append(self._file(key, r).get_slice(self.keys[key])[s - a : e - a])
        return torch.cat(parts)


def _is_row_key(key: str) -> bool:
    name = key.split(".")[1]
    return name in ROW_TENSORS and not key.endswith(".step")


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, version: int) -> dict:
    """Restore model and optimizer from a checkpoint of either format into this rank's model
    (a FeatureParallelCrosscoder slice of any world size, or a whole Crosscoder); returns the
    trainer state (state.json)."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    if meta.get("version") != version:
        raise DistributedError(f"{path}: checkpoint version {meta.get('version')} is not {version}")
    rd = _CheckpointReader(path)
    cfg = {k: v for k, v in rd.config.items()}
    if cfg != model.config():
        diff = {k: (cfg.get(k), v) for k, v in model.config().items() if cfg.get(k) != v}
        raise DistributedError(f"{path}: checkpoint does not match this run's model config: {diff}")
    lo, hi = (model.lo, model.hi) if isinstance(model, FeatureParallelCrosscoder) else (0, model.n_features)
    device = model.W_dec.device

    def get(key: str) -> Tensor:
        return rd.rows(key, lo, hi) if _is_row_key(key) else rd.full(key)

    sd = {name: get(f"model.{name}").to(device) for name in model.state_dict()}
    model.load_state_dict(sd)
    state: dict = {}
    for pid, pname in enumerate(PARAM_NAMES):
        for key in rd.keys:
            if key.startswith(f"opt.{pname}."):
                v = get(key)
                state.setdefault(pid, {})[key.split(".", 2)[2]] = v if key.endswith(".step") else v.to(device)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if rd.has("rng.torch"):
        torch.set_rng_state(rd.full("rng.torch"))
    return meta


def load_full_model(path: str | os.PathLike, device: torch.device | str | None = None) -> Crosscoder:
    """The whole Crosscoder from a checkpoint directory of either format (any world size), in
    one process: e.g. ``load_full_model("runs/x/checkpoint")`` for analysis."""
    path = Path(path)
    rd = _CheckpointReader(path)
    cfg = {k: v for k, v in rd.config.items() if k != "version"}
    model = Crosscoder(**cfg, dtype=rd.rows("model.W_dec", 0, 1).dtype, device=device)
    F = model.n_features
    sd = {name: (rd.rows(f"model.{name}", 0, F) if name in ROW_TENSORS else rd.full(f"model.{name}"))
          for name in model.state_dict()}
    model.load_state_dict(sd)
    return model


def full_model(model: nn.Module, ctx: DistContext | None, checkpoint: Path) -> Crosscoder | None:
    """The whole trained Crosscoder on rank 0 (None on other ranks); call on every rank.

    Feature parallel assembles it on rank 0's device from the final sharded ``checkpoint``
    (written just before): weights only, a quarter of what training held across the ranks."""
    if ctx is None:
        return model
    barrier(ctx)
    if not ctx.is_main:
        return None
    if ctx.mode == "data":
        cfg = {k: v for k, v in model.config().items() if k != "version"}
        plain = Crosscoder(**cfg, dtype=model.W_dec.dtype, device=model.W_dec.device)
        plain.load_state_dict(model.state_dict())
        return plain
    return load_full_model(checkpoint, device=ctx.device)
