"""Feature parallel (``--parallel features``): each rank owns a slice of the dictionary.

Rank r owns features [F*r/W, F*(r+1)/W): its rows of W_enc, b_enc, W_dec, their Adam state and
dead-feature counters; b_dec is replicated. Every rank sees the whole batch. Forward, for
x [B, D] and F_r = local features:

    pre_r    = x @ W_enc_r.T + b_enc_r                                 [B, F_r]   local GEMM
    topk:      each row's local top-k (value, global id) -> all_gather [W, B, k] -> the global
               top-k of each row; a rank keeps the winners it owns
    batchtopk: local top k*B values -> all_gather [W, k*B] -> global (k*B)-th value = threshold
    recon    = all_reduce_sum(code_r @ W_dec_r) + b_dec                 [B, D]
    loss     = replicated on every rank (same recon, same x)

It runs ``Crosscoder.forward``: the selections and reductions above are its hooks
(``activate``/``sparse_code``, ``decode``/``sparse_loss``, ``batch_statistics``, ``auxk``,
``output``). With topk and relu the rank's code stays sparse on ``fastxc.kernels`` (the local
top-k from ``topk_encode``, the partial reconstruction from ``sparse_decode``, AuxK computes
only the dead features' encoder columns); batchtopk runs the dense [B, F_r] path.

The all_reduce of the partial reconstructions is the identity in backward (every rank holds
the whole loss, so d loss / d partial_r = d loss / d recon, already local), which gives each
rank exactly the gradients of its rows that one process would compute. The decoder-norm
penalty (relu) and AuxK use the same reduce; dead-feature counters are local to the owner.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastxc import kernels as K
from fastxc.core.crosscoder import (
    Crosscoder,
    CrosscoderOutput,
    ForwardStep,
    auxk_residual_loss,
    compute_dtype_of,
)
from fastxc.kernels import _dispatch
from fastxc.train import parallel
from fastxc.train.parallel import DistContext, DistributedError


def feature_slices(n_features: int, world_size: int) -> list[tuple[int, int]]:
    """[(lo, hi)] per rank: rank r owns features [F*r//W, F*(r+1)//W)."""
    return [(n_features * r // world_size, n_features * (r + 1) // world_size) for r in range(world_size)]


class _ReduceReplicated(torch.autograd.Function):
    """Forward: sum of the ranks' partial tensors. Backward: identity.

    Used where everything after the sum is computed identically on every rank (the loss is
    replicated): the gradient of the one loss with respect to a rank's partial is then the
    gradient with respect to the sum, which each rank already holds. (An all_reduce in backward,
    as ``torch.distributed.nn.all_reduce`` does, would multiply it by the world size.)
    """

    @staticmethod
    def forward(ctx, partial: Tensor) -> Tensor:
        return parallel.all_reduce(partial.clone())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def reduce_replicated(partial: Tensor) -> Tensor:
    """Sum of ``partial`` over ranks; gradient flows back unchanged (see ``_ReduceReplicated``)."""
    return _ReduceReplicated.apply(partial)


# ---------------------------------------------------------------------------- selections
def _gather_candidates(vals: Tensor, ids: Tensor, k: int) -> Tensor:
    """This rank's k candidates per row (vals float [B, k], global ids int32 [B, k]) -> the global
    ids of each row's k winners over all ranks [B, k], the same on every rank.

    Sent as one int32 tensor [B, 2k] (the float bits and the id side by side: 8 bytes each).
    """
    B = vals.shape[0]
    allp = parallel.all_gather(torch.cat([vals.view(torch.int32), ids], dim=1).unsqueeze(0))  # [W, B, 2k]
    all_vals = allp[..., :k].contiguous().view(torch.float32).permute(1, 0, 2).reshape(B, -1)
    all_ids = allp[..., k:].permute(1, 0, 2).reshape(B, -1)
    return all_ids.gather(1, all_vals.topk(k, dim=1, sorted=False).indices)


def global_topk_mask(scores: Tensor, k: int, lo: int) -> Tensor:
    """scores [B, F_r] of this rank's features lo.. -> bool [B, F_r]: the entries among the k
    largest of their row over all ranks' features."""
    B, F_r = scores.shape
    kk = min(k, F_r)
    vals, idx = scores.detach().float().topk(kk, dim=1, sorted=False)
    if kk < k:  # a slice narrower than k: pad with losers
        vals = torch.cat([vals, vals.new_full((B, k - kk), float("-inf"))], dim=1)
        idx = torch.cat([idx, idx.new_full((B, k - kk), -1 - lo)], dim=1)
    gid = _gather_candidates(vals, (idx + lo).to(torch.int32), k).long()
    owned = (gid >= lo) & (gid < lo + F_r)
    local = torch.where(owned, gid - lo, torch.full_like(gid, F_r))  # F_r: a dump column
    mask = torch.zeros(B, F_r + 1, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, local, True)
    return mask[:, :F_r]


def global_topk_keep(vals: Tensor, gid: Tensor, k: int) -> Tensor:
    """This rank's candidates (vals [B, m], their global feature ids gid [B, m]) -> bool [B, m]:
    those among the k largest of their row over all ranks' candidates.

    The sparse form of ``global_topk_mask``: each rank passes its own row-wise top-k (m <= k,
    m = 0 allowed), so no [B, F_r] tensor is needed.
    """
    B, m = vals.shape
    v = vals.detach().float()
    g = gid.to(torch.int32)
    if m < k:  # pad with losers (ids -1 never match a real candidate)
        v = torch.cat([v, v.new_full((B, k - m), float("-inf"))], dim=1)
        g = torch.cat([g, g.new_full((B, k - m), -1)], dim=1)
    win = _gather_candidates(v, g, k)
    return (gid.to(torch.int32).unsqueeze(2) == win.unsqueeze(1)).any(dim=2)


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


# ---------------------------------------------------------------------------- the module
class FeatureParallelCrosscoder(nn.Module):
    """This rank's slice [lo, hi) of a crosscoder's features; b_dec replicated.

    Parameters (same names and order as Crosscoder): W_enc [F_r, D], b_enc [F_r], W_dec [F_r, D],
    b_dec [D]. ``forward`` (Crosscoder's) takes the whole batch on every rank and returns the
    whole reconstruction and the replicated loss; ``code`` is this rank's columns [B, F_r].
    """

    def __init__(self, base: Crosscoder, ctx: DistContext):
        super().__init__()
        cfg = base.config()
        if cfg["activation"] == "jumprelu":
            raise DistributedError("jumprelu does not run feature parallel yet (its thresholds are not sliced); "
                                   "use --parallel data or none")
        self._config = cfg
        for key in ("widths", "n_features", "activation", "k", "aux_k", "aux_coef", "l1_coef", "dec_init_norm",
                    "dead_tokens", "threshold_momentum", "source_names"):
            setattr(self, key, cfg[key])
        self.offsets, self.n_sources, self.d_total = list(base.offsets), base.n_sources, base.d_total
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.lo, self.hi = feature_slices(self.n_features, ctx.world_size)[ctx.rank]
        if self.hi <= self.lo:
            raise DistributedError(f"{ctx.world_size} ranks for {self.n_features} features: rank {ctx.rank} would own none")
        self._calls = 0  # Crosscoder.forward counts its calls
        # mixed precision as the Crosscoder's (weight / to_compute / accum); the partial
        # reconstructions are summed over ranks in fp32
        self.compute_dtype = compute_dtype_of(cfg.get("compute_dtype"))
        self._cast_cache = None
        rows = slice(self.lo, self.hi)
        dev = ctx.device
        self.W_enc = nn.Parameter(base.W_enc.detach()[rows].to(dev, copy=True))
        self.b_enc = nn.Parameter(base.b_enc.detach()[rows].to(dev, copy=True))
        self.W_dec = nn.Parameter(base.W_dec.detach()[rows].to(dev, copy=True))
        self.b_dec = nn.Parameter(base.b_dec.detach().to(dev, copy=True))
        self.register_buffer("threshold", base.threshold.detach().to(dev, copy=True))
        self.register_buffer("input_scale", base.input_scale.detach().to(dev, copy=True))
        self.register_buffer("tokens_since_fired", base.tokens_since_fired.detach()[rows].to(dev, copy=True))

    # Crosscoder's forward and the hooks that hold no collective: they read only widths,
    # offsets and the (sliced) tensors, so Crosscoder's own code serves
    forward = Crosscoder.forward
    dense_step = Crosscoder.dense_step
    fused_step = Crosscoder.fused_step
    dense_loss = Crosscoder.dense_loss
    loss_terms = Crosscoder.loss_terms
    count_fired = Crosscoder.count_fired
    uses_auxk = Crosscoder.uses_auxk
    inference_threshold = Crosscoder.inference_threshold
    flatten_input = Crosscoder.flatten_input
    split = Crosscoder.split
    fvu = Crosscoder.fvu
    weight = Crosscoder.weight
    to_compute = Crosscoder.to_compute
    accum = Crosscoder.accum

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
        allm = parallel.all_gather(padded).view(self.world_size, width)
        return torch.cat([allm[r, : hi - lo] for r, (lo, hi) in enumerate(feature_slices(self.n_features, self.world_size))]).bool()

    # ------------------------------------------------------------------ hooks with collectives
    def use_fused(self, x2: Tensor) -> bool:
        """topk and relu run on fastxc.kernels (training batchtopk needs the dense pre)."""
        return self.activation != "batchtopk" and _dispatch.choose(x2) != "reference"

    def activate(self, pre: Tensor) -> Tensor:
        """pre [B, F_r] -> dense code [B, F_r] of this rank's features, selected over all ranks."""
        relu_pre = torch.relu(pre)
        if self.activation == "relu":
            return relu_pre
        if self.activation == "topk":
            return relu_pre * global_topk_mask(pre, self.k, self.lo)
        if not self.training:  # batchtopk at inference: the running threshold, no batch statistics
            return pre * (pre > self.inference_threshold()).to(pre.dtype)
        n_keep = min(self.k * pre.shape[0], pre.shape[0] * self.n_features)
        return parallel.global_batchtopk(relu_pre, n_keep, self.threshold, self.threshold_momentum)

    def decode(self, f: Tensor) -> Tensor:
        """f [B, F_r] -> the whole reconstruction [B, D] (the ranks' partials summed) + b_dec."""
        return reduce_replicated(self.accum(self.to_compute(f) @ self.weight("W_dec"))) + self.b_dec

    def sparsity_penalty(self, f: Tensor) -> Tensor:
        """The decoder-norm-weighted L1 of the whole code (mean over rows), summed over ranks."""
        return reduce_replicated((self.accum(f) @ self.decoder_norms().sum(dim=1)).mean())

    def sparse_code(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        """x2 [B, D] -> this rank's code (vals, idx) [B, m], local feature ids."""
        xc, W_enc, b_enc = self.to_compute(x2), self.weight("W_enc"), self.weight("b_enc")
        if self.activation == "relu":
            return K.relu_encode(xc, W_enc, b_enc)
        # local top-k (relu applied: entries with pre <= 0 tie at 0 and add nothing, so ranking
        # the relu'd values picks the same code), then the global winners
        vals, idx = K.topk_encode(xc, W_enc, b_enc, min(self.k, self.W_enc.shape[0]))
        return vals * global_topk_keep(vals, idx + self.lo, self.k), idx

    def sparse_loss(self, vals: Tensor, idx: Tensor, x2: Tensor, l1_coef: float | None):
        """As ``Crosscoder.sparse_loss`` -> (loss, recon2 [B, D], mse [n], sparsity), with the
        partial reconstruction and penalty summed over ranks."""
        recon2 = reduce_replicated(self.accum(K.sparse_decode(vals, idx, self.weight("W_dec")))) + self.b_dec
        mse, loss, sparsity = self.loss_terms(
            recon2 - self.accum(x2), l1_coef,
            lambda: reduce_replicated((self.accum(vals) * self.decoder_norms().sum(dim=1)[idx]).sum(dim=1).mean()))
        return loss, recon2, mse, sparsity

    def batch_statistics(self, step: ForwardStep) -> tuple[int, Tensor]:
        """The local dead-feature counters, then one all_reduce of the dead and active counts
        -> (dead features over all ranks, active entries over all ranks)."""
        if self.training:
            self.count_fired(step)
        counts = torch.stack([self.local_dead_mask().sum(), step.active.sum()]).to(torch.float64)
        parallel.all_reduce(counts)
        return int(counts[0]), counts[1]

    def auxk(self, x2: Tensor, step: ForwardStep, stats: tuple[int, Tensor]) -> Tensor:
        """AuxK over the dead features of all ranks: a global top-aux_k of each row, the
        partial reconstructions summed (see ``Crosscoder.aux_loss``)."""
        n_dead = stats[0]
        if n_dead == 0:
            return step.loss.new_zeros(())
        k_aux = min(self.aux_k, n_dead)
        dead = self.local_dead_mask()
        if step.pre is not None:
            masked = step.pre.masked_fill(~dead, float("-inf"))
            code = torch.relu(step.pre) * global_topk_mask(masked, k_aux, self.lo)
            return auxk_residual_loss(reduce_replicated(self.accum(code @ self.weight("W_dec"))), step.err)
        # only the dead features' encoder columns ([B, n_dead_r]), as Crosscoder's sparse AuxK
        dead_idx = dead.nonzero().squeeze(1)
        pre_d = torch.addmm(self.weight("b_enc")[dead_idx], self.to_compute(x2), self.weight("W_enc")[dead_idx].t())
        v, j = pre_d.topk(min(k_aux, dead_idx.numel()), dim=1, sorted=False)
        v = torch.relu(v) * global_topk_keep(v, dead_idx[j] + self.lo, k_aux)  # a collective: even with no local candidate
        if dead_idx.numel():
            partial = self.accum(K.sparse_decode(v, dead_idx[j], self.weight("W_dec")))
        else:  # no dead feature here (others have some): nothing to add, and no empty code to decode
            partial = self.W_dec.new_zeros((x2.shape[0], self.d_total))
        return auxk_residual_loss(reduce_replicated(partial), step.err)

    def output(self, x: Tensor, x2: Tensor, step: ForwardStep, aux: Tensor, stats: tuple[int, Tensor]) -> CrosscoderOutput:
        """fvu from the whole reconstruction, l0 from the active entries of all ranks."""
        with torch.no_grad():
            fvu = self.fvu(x2, step.recon2)
            l0 = (stats[1] / x2.shape[0]).float()
        return CrosscoderOutput(step.recon_as(x), step.f, step.loss, step.mse, fvu, step.sparsity, aux, l0,
                                vals=step.vals, idx=step.idx, n_features=self.W_enc.shape[0])

    def extra_repr(self) -> str:
        return f"features [{self.lo}, {self.hi}) of {self.n_features}, widths={self.widths}, activation={self.activation!r}, k={self.k}"
