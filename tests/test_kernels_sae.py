"""A plain single-model SAE written only with fastxc.kernels ops (no other fastxc module): other
SAE code can use the kernels. TopK, TopK with AuxK, and JumpReLU with a learned threshold; the
decoder kept unit-norm with the parallel gradient removed. Each must learn planted directions."""
from __future__ import annotations

import math

import pytest
import torch

from fastxc.kernels import source_mse, sparse_decode, topk_encode
from fastxc.kernels.auxk import auxk_loss
from fastxc.kernels.constraints import remove_parallel_grad_, unit_norm_decoder_
from fastxc.kernels.jumprelu import jumprelu_encode, jumprelu_l0


class TopKSAE(torch.nn.Module):
    """x [B, D] -> recon [B, D] through a k-sparse code; W_enc, W_dec [F, D] (feature-major)."""

    def __init__(self, d: int, n_features: int, k: int):
        super().__init__()
        w = torch.randn(n_features, d)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w.clone())
        self.W_enc = torch.nn.Parameter(w.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n_features))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.k = k

    def forward(self, x):
        vals, idx = topk_encode(x - self.b_dec, self.W_enc, self.b_enc, self.k)
        recon = sparse_decode(vals, idx, self.W_dec, self.b_dec)
        mse, fvu = source_mse(recon, x, [x.shape[1]])
        return mse.sum(), fvu[0]


def planted(n, d, n_true, k_true, gen):
    """Rows are sums of k_true of n_true unit directions with positive weights."""
    dirs = torch.randn(n_true, d, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_true, generator=gen).argsort(1)[:, :k_true]
    w = torch.zeros(n, n_true).scatter(1, idx, 0.5 + torch.rand(n, k_true, generator=gen))
    return w @ dirs, dirs


@pytest.fixture
def one_thread():
    """Tiny ops: on the shared 2-core machine intra-op threads cost more than they give
    (measured 144 ms/step with 2 threads, 21 ms with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_topk_sae_from_kernels_recovers_planted_directions(one_thread):
    gen = torch.Generator().manual_seed(0)
    d, n_true, F, k = 48, 24, 48, 4
    data, dirs = planted(8192, d, n_true, 3, gen)
    # not seed 0: planted() drew its directions from a generator seeded 0, the same stream, so
    # an init from seed 0 would start on the planted directions
    torch.manual_seed(1)
    sae = TopKSAE(d, F, k)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    losses = []
    for step in range(400):
        x = data[torch.randint(0, len(data), (256,), generator=gen)]
        loss, fvu = sae(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # unit-norm decoder rows, the usual SAE constraint
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.1 * first, f"loss {first:.3f} -> {last:.3f}"
    assert fvu.item() < 0.1
    cos = (dirs @ sae.W_dec.detach().T).max(dim=1).values  # best decoder match per direction
    assert (cos > 0.9).float().mean() >= 0.9, f"recovered {(cos > 0.9).sum()}/{n_true}: {cos}"


# ----------------------------------------------------------------------------- AuxK, JumpReLU
# The same SAE with the other ops SAE trainers use, again only from fastxc.kernels submodules.


def test_auxk_trains_dead_features_from_kernels(one_thread):
    """Features 24..47 of a TopK SAE are dead by construction (the main code selects among
    0..23 only), so AuxK is the only gradient they get: it must make them model the residual
    the main code leaves (36 planted directions for 24 live features) and move towards the
    directions it misses. Without AuxK they do not move."""
    gen = torch.Generator().manual_seed(0)
    d, n_true, F, live, k = 48, 36, 48, 24, 3
    data, dirs = planted(8192, d, n_true, 3, gen)
    dead = torch.arange(F) >= live

    def train(aux_coef):
        torch.manual_seed(1)  # not 0: planted() drew its directions from a generator seeded 0
        sae = TopKSAE(d, F, k)
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        aux_hist = []
        for step in range(400):
            x = data[torch.randint(0, len(data), (256,), generator=gen)]
            xc = x - sae.b_dec
            vals, idx = topk_encode(xc, sae.W_enc[:live], sae.b_enc[:live], k)
            recon = sparse_decode(vals, idx, sae.W_dec, sae.b_dec)
            mse, _ = source_mse(recon, x, [d])
            aux = auxk_loss(xc, sae.W_enc, sae.b_enc, sae.W_dec, dead, k, x - recon)
            opt.zero_grad(set_to_none=True)
            (mse.sum() + aux_coef * aux).backward()
            remove_parallel_grad_(sae.W_dec)
            opt.step()
            unit_norm_decoder_(sae.W_dec)
            aux_hist.append(aux.item())
        cos_live = (dirs @ sae.W_dec.detach()[:live].T).max(dim=1).values
        cos_dead = (dirs @ sae.W_dec.detach()[live:].T).max(dim=1).values
        return aux_hist, cos_live, cos_dead, sae

    aux_hist, cos_live, cos_dead, _ = train(1.0)
    first, last = sum(aux_hist[:20]) / 20, sum(aux_hist[-20:]) / 20
    assert last < 0.5 * first, f"AuxK loss {first:.3f} -> {last:.3f}: the dead features did not learn"
    missed = cos_live < 0.9  # the directions the live features did not get
    _, _, cos_dead0, _ = train(0.0)
    # measured: 20 directions missed; their best dead-decoder cosine 0.64 on average with AuxK,
    # 0.23 without (random unit rows in 48 dimensions)
    assert missed.sum() >= 8
    assert cos_dead[missed].mean() > 0.5, f"dead features' cosine with the missed directions {cos_dead[missed]}"
    assert cos_dead0[missed].mean() < 0.35


class JumpReLUSAE(TopKSAE):
    """x -> recon through a JumpReLU code with a learned per-feature threshold exp(log_threshold)."""

    def __init__(self, d: int, n_features: int, bandwidth: float, init_threshold: float):
        super().__init__(d, n_features, k=0)
        self.log_threshold = torch.nn.Parameter(torch.full((n_features,), math.log(init_threshold)))
        self.bandwidth = bandwidth

    def forward(self, x, l0_coef):
        theta = self.log_threshold.exp()
        code = jumprelu_encode(x - self.b_dec, self.W_enc, self.b_enc, theta, self.bandwidth)
        recon = sparse_decode(code.vals, code.idx, self.W_dec, self.b_dec)
        mse, fvu = source_mse(recon, x, [x.shape[1]])
        l0 = jumprelu_l0(code.pre, code.idx, theta, self.bandwidth)
        return mse.sum() + l0_coef * l0, fvu[0], l0


def test_jumprelu_sae_from_kernels_recovers_planted_directions(one_thread):
    """The JumpReLU paper's recipe with the kernel ops: MSE + lambda * L0 (straight-through
    threshold gradients), unit-norm decoder rows with the parallel gradient removed."""
    gen = torch.Generator().manual_seed(0)
    d, n_true, F = 48, 24, 48
    data, dirs = planted(8192, d, n_true, 3, gen)
    torch.manual_seed(1)  # not 0: planted() drew its directions from a generator seeded 0
    sae = JumpReLUSAE(d, F, bandwidth=0.05, init_threshold=0.5)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(400):
        x = data[torch.randint(0, len(data), (256,), generator=gen)]
        loss, fvu, l0 = sae(x, l0_coef=0.01 * min(1.0, step / 50))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        remove_parallel_grad_(sae.W_dec)
        opt.step()
        unit_norm_decoder_(sae.W_dec)
    assert fvu.item() < 0.1
    assert l0.item() < 6, f"L0 {l0.item():.1f} (3 planted directions per row)"
    assert (sae.log_threshold.detach() - math.log(0.5)).abs().max() > 0.05  # the thresholds learned
    cos = (dirs @ sae.W_dec.detach().T).max(dim=1).values
    assert (cos > 0.9).float().mean() >= 0.9, f"recovered {(cos > 0.9).sum()}/{n_true}: {cos}"
