"""Data parallel (``--parallel data``): every rank holds the whole crosscoder and trains on its
rows of each global batch.

Rank r trains on rows [r*B/W, (r+1)*B/W) of global batch i (``parallel.batches``), and the
gradients are averaged with all_reduce, so W ranks take the same steps as one process on the
same global batch. What is a statistic of the batch is computed over the global batch:
batchtopk's k*B selection (each rank's top k*B candidates are all-gathered and the (k*B)-th
largest value is the global threshold), the AuxK residual variance, the dead-feature counters
and the reported loss / FVU / L0. ``Crosscoder.forward`` runs unchanged, fused sparse ops
included (batchtopk's training step stays dense, since its threshold needs the whole global
batch's pre-activations); the collectives sit in the hooks overridden here.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fastxc.core.crosscoder import Crosscoder, CrosscoderOutput, ForwardStep
from fastxc.train import parallel
from fastxc.train.parallel import DistContext


class DataParallelCrosscoder(Crosscoder):
    """A Crosscoder replicated on every rank that trains on this rank's rows of the global batch.

    Gradients are averaged over ranks by an all_reduce as each one is accumulated (a hook per
    parameter). ``forward`` (Crosscoder's) takes this rank's rows x [b, D] or [b, n, d]
    (b = B / W) and reports loss / mse / fvu / l0 / aux for the global batch (detached except
    ``loss``, which has the global value and this rank's gradient). It saves and loads like a
    Crosscoder (same config and tensors).
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
        """Training batchtopk keeps the k*B largest entries of the global batch."""
        if self.activation != "batchtopk" or not self.training:
            return super().activate(pre)
        relu_pre = torch.relu(pre)
        n_keep = min(self.k * pre.shape[0] * self.world_size, pre.numel() * self.world_size)
        return parallel.global_batchtopk(relu_pre, n_keep, self.threshold, self.threshold_momentum)

    def use_fused(self, x2: Tensor) -> bool:
        """As Crosscoder, except for training batchtopk, whose threshold is a statistic of the
        global batch (the dense ``activate`` above)."""
        return (self.activation != "batchtopk" or not self.training) and super().use_fused(x2)

    def batch_statistics(self, step: ForwardStep) -> Tensor | None:
        """Training: one all_reduce of which features fired anywhere and of the AuxK target's
        sums; returns the global batch's residual variance for AuxK (None when AuxK is off)."""
        if not self.training:
            return None
        fired = step.fired(self.n_features)
        use_aux = self.uses_auxk()
        # float64, so that the one-pass variance matches the reference's two-pass one
        target = -step.err.detach().double()
        stats = torch.cat([fired.double(), target.sum(dim=0), target.pow(2).sum().view(1)]) if use_aux \
            else fired.double()
        parallel.all_reduce(stats)
        n_rows = step.err.shape[0] * self.world_size
        with torch.no_grad():
            self.tokens_since_fired.add_(n_rows)
            self.tokens_since_fired.masked_fill_(stats[: self.n_features] > 0, 0)
        if not use_aux:
            return None
        s1, s2 = stats[self.n_features : -1], stats[-1]
        return ((s2 - s1.pow(2).sum() / n_rows) / n_rows).float().clamp_min(1e-12)

    def output(self, x: Tensor, x2: Tensor, step: ForwardStep, aux: Tensor, stats) -> CrosscoderOutput:
        """The global batch's metrics, in one all_reduce; ``loss`` gets the global value."""
        W, n = self.world_size, self.n_sources
        with torch.no_grad():
            xs, es = self.split(x2.double()), self.split(step.err.detach().double())
            packed = torch.cat([
                torch.stack([e.pow(2).sum() for e in es]),
                torch.stack([xi.pow(2).sum() for xi in xs]),
                x2.double().sum(dim=0),
                torch.stack([step.loss.detach().double(), step.sparsity.detach().double(), aux.detach().double(),
                             step.active.sum().double()]),
            ])
            parallel.all_reduce(packed)
            B = x2.shape[0] * W
            err_sq, x_sq, x_sum = packed[:n], packed[n : 2 * n], packed[2 * n : 2 * n + self.d_total]
            loss_g, sparsity_g, aux_g, active_g = (packed[-4:] / torch.tensor([W, W, W, B], dtype=packed.dtype, device=packed.device))
            var = torch.stack([x_sq[i] - x_sum[self.offsets[i] : self.offsets[i + 1]].pow(2).sum() / B for i in range(n)])
            fvu = (err_sq / var.clamp_min(1e-12)).float()
            mse_g = (err_sq / B).float()
        loss = step.loss + (loss_g.to(step.loss.dtype) - step.loss.detach())  # global value, this rank's gradient
        return CrosscoderOutput(step.recon_as(x), step.f, loss, mse_g, fvu, sparsity_g.float(), aux_g.float(),
                                active_g.float(), vals=step.vals, idx=step.idx, n_features=self.n_features)
