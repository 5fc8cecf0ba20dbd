"""A plain single-model TopK SAE written only with fastxc.kernels ops (no other fastxc module):
other SAE code can use the kernels. It must recover planted dictionary directions."""
from __future__ import annotations

import pytest
import torch

from fastxc.kernels import source_mse, sparse_decode, topk_encode


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
