"""Every public op of fastxc.kernels, forward + backward, in one run against (1) its plain-torch
reference (``<op>_ref``, the math written out) and (2) the dense plain-torch code an SAE library
writes for the same step (sae-lens / dictionary_learning / sparsify style: a dense [B, F] code,
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
from fastxc.kernels import batchtopk as BT, decode as DE, encode as E, loss as L, penalty as P
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


OPS = {
    "topk_encode": _topk,
    "relu_encode": _relu,
    "batchtopk_encode": _batchtopk,
    "sparse_decode": _decode,
    "crosscoder_loss": _loss,
    "decoder_norm_penalty": _penalty,
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", list(OPS))
def test_op_fwd_bwd(benchmark, op, provider):
    x, W, b, vals, idx = setup()
    W = (W.detach() / W.detach().norm(dim=1, keepdim=True)).requires_grad_()
    dense = _dense(vals, idx)
    benchmark.group = f"{op}-fwd+bwd-B{B}-D{D}-F{F}-k{KK}-fp32"

    def run():
        for t in (W, b, vals, dense):
            t.grad = None
        OPS[op](provider, x, W, b, vals, idx, dense)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info.update(machine=platform.processor() or platform.machine(),
                                threads=torch.get_num_threads())
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = B / benchmark.stats.stats.min
