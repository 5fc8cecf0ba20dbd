"""fastxc.Crosscoder's fast path (fastxc.kernels ops) against its plain-torch reference path:
every output, every parameter gradient and the buffers it updates, per activation."""
from __future__ import annotations

import copy

import pytest
import torch

from fastxc.core.crosscoder import Crosscoder
from kernel_cases import KERNEL_TOL

WIDTHS = [40, 56]  # unequal sources


def run(cc, x, backend, l1=None):
    cc.backend = backend
    out = cc(x, l1_coef=l1)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in cc.named_parameters()}


def close(name, got, want, tol=KERNEL_TOL[torch.float32]):
    got, want = got.detach().float(), want.detach().float()
    assert got.shape == want.shape, name
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= tol["atol"] + tol["rtol"] * scale, f"{name}: max err {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("activation,aux_k", [("topk", 0), ("topk", 6), ("batchtopk", 6), ("relu", 0)])
def test_crosscoder_fast_matches_reference(activation, aux_k, backend):
    torch.manual_seed(1)
    cc = Crosscoder(WIDTHS, 257, activation=activation, k=7, aux_k=aux_k, l1_coef=0.3)
    with torch.no_grad():  # a trained-looking bias, so relu codes are sparse, and dead features
        cc.b_enc.add_(torch.randn(257) * 0.1 - (0.5 if activation == "relu" else 0.0))
    cc.tokens_since_fired[::3] = cc.dead_tokens  # a third of the features are dead (AuxK)
    x = torch.randn(37, sum(WIDTHS))
    fast, ref = copy.deepcopy(cc), copy.deepcopy(cc)
    out_f, g_f = run(fast, x, backend)
    out_r, g_r = run(ref, x, "reference")
    for name in ("loss", "recon", "code", "mse", "fvu", "sparsity", "aux", "l0"):
        close(name, getattr(out_f, name), getattr(out_r, name))
    if aux_k:
        assert out_r.aux.item() > 0, "the test should exercise AuxK"
    for n in g_r:
        close(f"grad {n}", g_f[n], g_r[n])
    assert torch.equal(fast.tokens_since_fired, ref.tokens_since_fired)
    close("threshold", fast.threshold, ref.threshold)


def test_crosscoder_fast_eval_and_3d_input():
    torch.manual_seed(2)
    cc = Crosscoder([48, 48], 131, activation="batchtopk", k=5)
    x = torch.randn(16, 2, 48)
    cc.train()
    cc(x)  # sets the running threshold
    cc.eval()
    fast, ref = copy.deepcopy(cc), copy.deepcopy(cc)
    fast.backend, ref.backend = "cpu", "reference"
    with torch.no_grad():
        of, orf = fast(x), ref(x)
    assert of.recon.shape == x.shape
    for name in ("loss", "recon", "code", "mse", "l0"):
        close(name, getattr(of, name), getattr(orf, name))


def test_crosscoder_env_reference(monkeypatch):
    """FASTXC_BACKEND=reference keeps the plain path (no fastxc.kernels autograd nodes)."""
    cc = Crosscoder([16, 16], 33, activation="topk", k=3)
    monkeypatch.setenv("FASTXC_BACKEND", "reference")
    assert "CrosscoderLossFn" not in repr(cc(torch.randn(4, 32)).recon.grad_fn)
    monkeypatch.setenv("FASTXC_BACKEND", "cpu")
    assert "CrosscoderLossFn" in repr(cc(torch.randn(4, 32)).recon.grad_fn)
