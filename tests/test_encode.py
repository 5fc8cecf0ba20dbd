"""topk_encode and relu_encode (fastxc/kernels/encode.py) against their references."""
from __future__ import annotations

import pytest
import torch

import fastxc.kernels as K
from fastxc.kernels import encode as E
from kernel_cases import CASES, PARAMS, cases, check_encode, close, dense, f64, params


@pytest.mark.parametrize(PARAMS, CASES)
def test_topk_encode(backend, B, D, F, k, widths, dtype, kernel_tol, poison):
    x, W, b = params(B, D, F, dtype)
    check_encode(lambda *a: K.topk_encode(*a, k, backend=backend),
                 lambda *a: E.topk_encode_ref(*a, k), x, W, b, F, dtype, kernel_tol)


@pytest.mark.parametrize("theta", ["relu", "scalar", "per-feature"])
@pytest.mark.parametrize(PARAMS, cases(heavy_interp=True))
def test_relu_encode(backend, B, D, F, k, widths, dtype, theta, kernel_tol, poison):
    x, W, b = params(B, D, F, dtype)
    # pre ~ N(0, 1): thresholds near 2 keep ~2% of F active (the interpreter loops over m)
    th = {"relu": None, "scalar": 2.0, "per-feature": 1.8 + 0.4 * torch.rand(F)}[theta]
    if theta == "relu":
        b = (b.detach() - 2.0).requires_grad_()
    check_encode(lambda *a: K.relu_encode(*a, th, backend=backend),
                 lambda *a: E.relu_encode_ref(*a, th), x, W, b, F, dtype, kernel_tol)


def test_encode_references_gradcheck():
    """The references' own gradients, in float64, against finite differences."""
    B, D, F, k = 3, 7, 11, 3
    x, W, b = f64((B, D), (F, D), (F,))
    assert torch.autograd.gradcheck(lambda *a: E.topk_encode_ref(*a, k)[0], (x, W, b))
    assert torch.autograd.gradcheck(lambda *a: E.relu_encode_ref(*a, 0.1)[0], (x, W, b))


def test_encode_bad_inputs():
    x, W, b = params(4, 16, 33, torch.float32)
    with pytest.raises(ValueError, match="W_enc"):
        K.topk_encode(x[:, :5], W, b, 3)
    with pytest.raises(ValueError, match="k must be"):
        K.topk_encode(x, W, b, 0)
    with pytest.raises(ValueError, match="b_enc"):
        K.topk_encode(x, W, b[:5], 3)


def test_fast_grads_are_written_once():
    """dW from the sparse backward becomes .grad itself (no zero-fill + add, no copy)."""
    x, W, b = params(8, 16, 33, torch.float32)
    W2 = torch.randn(33, 16, requires_grad=True)
    v, i = K.topk_encode(x, W, b, 4, backend="cpu")
    out = K.crosscoder_loss(v, i, W2, None, x.detach(), [16], backend="cpu")
    out.loss.backward()
    assert W.grad is not None and W2.grad is not None and b.grad is not None
    assert W.grad.is_contiguous() and W2.grad.shape == W2.shape


# ----------------------------------------------------------------------------- precision and casting
@pytest.mark.parametrize("setting,want", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_gemm_precision_follows_torch(setting, want):
    """The encoder GEMM's fp32 dot precision is a per-call constexpr from torch's setting."""
    T = pytest.importorskip("fastxc.kernels.triton_encode")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        assert T.dot_precision() == want
        assert T.gemm_flags(torch.float32, torch.float32)["PRECISION"] == want
    finally:
        torch.set_float32_matmul_precision(old)


def test_gemm_casting_rule(monkeypatch):
    """Same-dtype bf16 / fp16 / fp32 operands go to tl.dot as loaded; any mix is cast to fp32
    (on the GPU; the interpreter always casts)."""
    T = pytest.importorskip("fastxc.kernels.triton_encode")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    f32, bf, fp = torch.float32, torch.bfloat16, torch.float16
    assert [T.gemm_flags(a, b)["UPCAST"] for a, b in ((bf, bf), (fp, fp), (f32, f32))] == [False] * 3
    assert [T.gemm_flags(a, b)["UPCAST"] for a, b in ((f32, bf), (bf, f32), (bf, fp))] == [True] * 3
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert T.gemm_flags(bf, bf)["UPCAST"]


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_topk_encode_mixed_x_fp32_w_bf16(backend, kernel_tol):
    """x fp32 with W bf16: every backend computes the products of the fp32 operands (the
    casting rule), so the code matches the fp32 reference on the bf16-valued weights."""
    B, D, F, k = 9, 64, 200, 5
    x = torch.randn(B, D)
    W = (torch.randn(F, D) / D ** 0.5).to(torch.bfloat16).requires_grad_()
    b = torch.zeros(F, dtype=torch.bfloat16, requires_grad=True)
    v, i = K.topk_encode(x, W, b, k, backend=backend)
    vr, ir = E.topk_encode_ref(x, W.detach().float(), b.detach().float(), k)
    assert torch.equal(i.sort(1).values, ir.sort(1).values)
    close("vals", dense(v, i, F), dense(vr, ir, F), torch.float32, kernel_tol)
    v.sum().backward()
    assert W.grad.dtype == torch.bfloat16 and torch.isfinite(W.grad.float()).all()


def tf32(t: torch.Tensor) -> torch.Tensor:
    """t as the tensor cores read it in a TF32 dot (10 mantissa bits): Triton 3.9 feeds the
    fp32 bits to mma.sync / wgmma ``.tf32`` with no ``cvt.rna.tf32.f32`` (checked in the PTX of
    ``python -m fastxc.kernels.aot``), and the hardware ignores the low 13 bits: truncation."""
    bits = t.float().contiguous().view(torch.int32)
    return (bits & ~0x1FFF).view(torch.float32)


def tf32_topk_agreement(B=256, D=1024, F=16384, k=32, seed=0):
    """Top-k of pre under TF32 (operands rounded to TF32; products exact in fp32, fp32 sums)
    against the exact fp32 top-k, at a training-sized shape with pre ~ N(0, 1) ->
    (overlap: fraction of the B*k selected features both pick, max |vals error| / max |vals|
    over the features both pick)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    W = torch.randn(F, D, generator=g) / D ** 0.5
    b = torch.randn(F, generator=g) * 0.1
    v_ref, i_ref = (x @ W.t() + b).topk(k, dim=1)
    v_tf, i_tf = (tf32(x) @ tf32(W).t() + b).topk(k, dim=1)
    both = (i_tf[:, :, None] == i_ref[:, None, :])  # [B, k, k]
    overlap = both.any(2).float().mean().item()
    err = (v_tf[:, :, None] - v_ref[:, None, :]).abs()[both].max().item()
    return overlap, err / v_ref.abs().max().item()


def test_tf32_topk_agreement():
    """What TF32 (torch.set_float32_matmul_precision("high")) does to the fused top-k: measured
    by emulating TF32's operand rounding on the CPU at B=256, D=1024, F=16384, k=32.
    Measured: the TF32 top-k picks 99.94% of the exact top-k's features (8187 of 8192: 5
    swapped at the k-th / (k+1)-th boundary; seeds 1 and 2: 99.96%, 99.94%) with values within
    8.06e-4 of the largest value (max |vals| 5.03: 4.1e-3 absolute)."""
    overlap, rel_err = tf32_topk_agreement()
    assert overlap == pytest.approx(TF32_OVERLAP, abs=1e-5)
    assert rel_err == pytest.approx(TF32_REL_ERR, rel=0.05)
    assert overlap < 1.0  # TF32 does change the selection: the difference is real, not zero


TF32_OVERLAP = 8187 / 8192
TF32_REL_ERR = 8.06e-4


@pytest.mark.gpu  # TF32 tensor cores
def test_tf32_topk_agreement_on_gpu():
    """On a GPU: the fused top-k with TF32 ("high") against the same op in IEEE ("highest"),
    at the shape of the emulation: agreement at least the emulated figure's, less a margin
    for sums accumulated in another order."""
    g = torch.Generator().manual_seed(0)
    B, D, F, k = 256, 1024, 16384, 32
    x = torch.randn(B, D, generator=g).cuda()
    W = (torch.randn(F, D, generator=g) / D ** 0.5).cuda()
    b = (torch.randn(F, generator=g) * 0.1).cuda()
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        v_ref, i_ref = K.topk_encode(x, W, b, k)
        torch.set_float32_matmul_precision("high")
        v_tf, i_tf = K.topk_encode(x, W, b, k)
    finally:
        torch.set_float32_matmul_precision(old)
    both = i_tf[:, :, None] == i_ref[:, None, :]
    overlap = both.any(2).float().mean().item()
    assert overlap >= TF32_OVERLAP - 1e-3
    err = (v_tf[:, :, None] - v_ref[:, None, :]).abs()[both].max().item() / v_ref.abs().max().item()
    assert err <= 3 * TF32_REL_ERR
