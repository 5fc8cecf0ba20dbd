"""Every public op of fastxc.kernels, forward + backward, in one run against (1) its plain-torch
reference (``<op>_ref``, the math written out) and (2) the dense plain-torch code an SAE library
writes for the same step (the decoder constraints, which have no backward, timed alone) (sae-lens / dictionary_learning / sparsify style: a dense [B, F] code,
``code @ W_dec``, ``(recon - x).pow(2).sum(-1).mean()``).

    python -m pytest bench/bench_ops.py --benchmark-only

One group per op (``op-fwd+bwd-B..-D..-F..-k..``), three rows each: ``fastxc``, ``reference``,
``plain_torch``. The shape is kernel_bench's (a single SAE of width D: widths [D]). Anything a
library would already hold (its dense code, for the plain decode) is built outside the timed
region.
"""
from __future__ import annotations

import platform

import pytest
import torch

import fastxc.kernels as K
from fastxc.kernels import auxk as AX, batchtopk as BT, constraints as CS, decode as DE, encode as E
from fastxc.kernels import jumprelu as JR, loss as L, penalty as P
from kernel_bench import B, D, F, KK, ROUNDS, setup

PROVIDERS = ["fastxc", "reference", "plain_torch"]
WIDTHS = [D]  # one SAE: crosscoder_loss with one source is the ordinary SAE loss


def _dense(vals, idx):
    """[B, F] dense code of a sparse one (what a dense-code library holds)."""
    return torch.zeros(vals.shape[0], F).scatter(1, idx, vals.detach()).requires_grad_()


# each entry: op -> provider -> step(x, W, b, vals, idx, dense) running forward + backward
def _topk(p, x, W, b, vals, idx, dense):
    if p == "plain_torch":  # top-k of the pre-activation, ReLU, scattered into a dense code
        pre = x @ W.t() + b
        v, i = pre.topk(KK, dim=-1)
        code = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
        code.sum().backward()
        return
    v, _ = (K.topk_encode if p == "fastxc" else E.topk_encode_ref)(x, W, b, KK)
    v.sum().backward()


def _relu(p, x, W, b, vals, idx, dense):
    # a bias of -2 leaves ~2% of pre-activations active (x ~ N(0, 1), W rows of norm 1)
    bb = b - 2.0
    if p == "plain_torch":
        torch.relu(x @ W.t() + bb).sum().backward()
        return
    v, _ = (K.relu_encode if p == "fastxc" else E.relu_encode_ref)(x, W, bb)
    v.sum().backward()


def _batchtopk(p, x, W, b, vals, idx, dense):
    if p == "plain_torch":  # the k*B largest of relu(pre) over the whole batch
        pre = torch.relu(x @ W.t() + b)
        v, i = pre.flatten().topk(KK * x.shape[0])
        code = torch.zeros_like(pre).flatten().scatter(0, i, v).view_as(pre)
        code.sum().backward()
        return
    fn = K.batchtopk_encode if p == "fastxc" else BT.batchtopk_encode_ref
    v, _ = fn(x, W, b, KK)[:2]
    v.sum().backward()


def _decode(p, x, W, b, vals, idx, dense):
    if p == "plain_torch":
        ((dense @ W) * x).sum().backward()
        return
    r = (K.sparse_decode if p == "fastxc" else DE.sparse_decode_ref)(vals, idx, W)
    (r * x).sum().backward()


def _loss(p, x, W, b, vals, idx, dense):
    bd = b[:D]
    if p == "plain_torch":  # the single-SAE L2 loss of dictionary_learning / sae-lens
        recon = dense @ W + bd
        (recon - x).pow(2).sum(-1).mean().backward()
        return
    fn = K.crosscoder_loss if p == "fastxc" else L.crosscoder_loss_ref
    fn(vals, idx, W, bd, x, WIDTHS).loss.backward()


def _penalty(p, x, W, b, vals, idx, dense):
    if p == "plain_torch":  # L1 of the code weighted by the decoder norms
        (dense * W.norm(dim=1)).sum().backward()
        return
    fn = K.decoder_norm_penalty if p == "fastxc" else P.decoder_norm_penalty_ref
    fn(vals, idx, W, WIDTHS).backward()


K_AUX = 256
THETA, BANDWIDTH = 0.5, 0.2  # jumprelu: ~2-3% of x ~ N(0, 1) projections above theta


def _dead():
    """[F] bool: every 4th feature dead (AuxK's input)."""
    return torch.arange(F) % 4 == 0


def _auxk(p, x, W, b, vals, idx, dense):
    resid = (x * 0.1).detach()
    dead = _dead()
    if p == "plain_torch":  # the dead features' top-k_aux of the dense pre-activation
        pre = (x @ W.t() + b).masked_fill(~dead, float("-inf"))
        v, i = pre.topk(K_AUX, dim=-1)
        e_hat = torch.zeros_like(pre).scatter(-1, i, torch.relu(v)) @ W
        var = (resid - resid.mean(0)).pow(2).sum(-1).mean()
        ((e_hat - resid).pow(2).sum(-1).mean() / var).backward()
        return
    fn = K.auxk_loss if p == "fastxc" else AX.auxk_loss_ref
    fn(x, W, b, W, dead, K_AUX, resid).backward()


class _JumpReLUSTE(torch.autograd.Function):
    """pre * (pre > theta) with the rectangle-kernel straight-through threshold gradient, as SAE
    libraries write it (dense [B, F])."""

    @staticmethod
    def forward(ctx, pre, theta):
        ctx.save_for_backward(pre, theta)
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        band = ((pre - theta).abs() < BANDWIDTH / 2).to(g.dtype)
        return g * (pre > theta), (-(theta / BANDWIDTH) * band * g).sum(0)


def _jumprelu(p, x, W, b, vals, idx, dense):
    theta = torch.full((F,), THETA, requires_grad=True)
    if p == "plain_torch":
        _JumpReLUSTE.apply(x @ W.t() + b, theta).sum().backward()
        return
    fn = K.jumprelu_encode if p == "fastxc" else JR.jumprelu_encode_ref
    fn(x, W, b, theta, BANDWIDTH).vals.sum().backward()


def _unit_norm(p, x, W, b, vals, idx, dense):
    with torch.no_grad():  # in place, around the optimizer step: no backward
        if p == "plain_torch":
            W.div_(W.norm(dim=1, keepdim=True))
        else:
            (K.unit_norm_decoder_ if p == "fastxc" else CS.unit_norm_decoder_ref)(W)


def _parallel_grad(p, x, W, b, vals, idx, dense):
    g = W.grad  # set once by the test: the op works in place on it
    if p == "plain_torch":  # rows of unit norm, as the libraries assume
        g -= (g * W.detach()).sum(dim=1, keepdim=True) * W.detach()
    elif p == "fastxc":
        K.remove_parallel_grad_(W, g)
    else:
        W.grad = CS.remove_parallel_grad_ref(W.detach(), g)


IN_PLACE = {"unit_norm_decoder_", "remove_parallel_grad_"}  # no backward; timed as they are


OPS = {
    "topk_encode": _topk,
    "relu_encode": _relu,
    "batchtopk_encode": _batchtopk,
    "sparse_decode": _decode,
    "crosscoder_loss": _loss,
    "decoder_norm_penalty": _penalty,
    "auxk_loss": _auxk,
    "jumprelu_encode": _jumprelu,
    "unit_norm_decoder_": _unit_norm,
    "remove_parallel_grad_": _parallel_grad,
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", list(OPS))
def test_op_fwd_bwd(benchmark, op, provider):
    x, W, b, vals, idx = setup()
    W = (W.detach() / W.detach().norm(dim=1, keepdim=True)).requires_grad_()
    dense = _dense(vals, idx)
    benchmark.group = f"{op}-fwd+bwd-B{B}-D{D}-F{F}-k{KK}-fp32"

    if op == "remove_parallel_grad_":
        W.grad = torch.randn(W.shape, generator=torch.Generator().manual_seed(1))

    def run():
        for t in (b, vals, dense) if op in IN_PLACE else (W, b, vals, dense):
            t.grad = None
        OPS[op](provider, x, W, b, vals, idx, dense)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info.update(machine=platform.processor() or platform.machine(),
                                threads=torch.get_num_threads())
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = B / benchmark.stats.stats.min
