"""The ops SAE trainers use around the step (fastxc.kernels.auxk, .constraints, .jumprelu):
each against its plain-torch reference (values and gradients, fp32 and bf16, the cpu path and
the Triton kernels under the interpreter), the reference against float64 gradcheck or a hand
computation, and the straight-through estimates against the derivative they estimate."""
from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import KERNEL_TOL, close, dense

from fastxc.kernels.auxk import auxk_loss, auxk_loss_ref
from fastxc.kernels.constraints import (
    remove_parallel_grad_,
    remove_parallel_grad_ref,
    unit_norm_decoder_,
    unit_norm_decoder_ref,
)
from fastxc.kernels.jumprelu import (
    jumprelu_encode,
    jumprelu_encode_ref,
    jumprelu_l0,
    jumprelu_l0_ref,
    jumprelu_ref,
)

BACKENDS = ["cpu", "triton"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# the Triton interpreter runs every program in Python: tiny shapes there (still several
# programs per dimension), the default (non-power-of-two) ones on the cpu path
TINY = {"cpu": {}, "triton": {"B": 13, "D": 40, "F": 97}}


def leaf(t, dtype=torch.float32):
    return t.to(dtype).detach().requires_grad_()


def grads(ts):
    out = [t.grad.clone() for t in ts]
    for t in ts:
        t.grad = None
    return out


# ----------------------------------------------------------------------------- AuxK
def auxk_case(B=37, D=40, F=97, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = leaf(torch.randn(B, D, generator=g), dtype)
    W_enc = leaf(torch.randn(F, D, generator=g) / math.sqrt(D), dtype)
    b_enc = leaf(torch.randn(F, generator=g) * 0.1, dtype)
    W_dec = leaf(torch.randn(F, D, generator=g) / math.sqrt(D), dtype)
    dead = torch.rand(F, generator=g) < 0.4
    residual = torch.randn(B, D, generator=g) * 0.5
    return x, W_enc, b_enc, W_dec, dead, residual


def test_auxk_reference_gradcheck_float64():
    x, W_enc, b_enc, W_dec, dead, residual = auxk_case(B=6, D=5, F=9, dtype=torch.float64)
    assert 3 <= int(dead.sum()) < 9

    def f(x, W_enc, b_enc, W_dec):
        return auxk_loss_ref(x, W_enc, b_enc, W_dec, dead, 2, residual.double())

    assert torch.autograd.gradcheck(f, (x, W_enc, b_enc, W_dec))
    # float64 inputs take the reference whatever the backend (the kernels compute in fp32)
    assert auxk_loss(x, W_enc, b_enc, W_dec, dead, 2, residual.double()).dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_auxk_fast_matches_reference(backend, dtype):
    x, W_enc, b_enc, W_dec, dead, residual = auxk_case(dtype=dtype, **TINY[backend])
    ps = [x, W_enc, b_enc, W_dec]
    fast = auxk_loss(x, W_enc, b_enc, W_dec, dead, 6, residual, backend=backend)
    fast.backward()
    gf = grads(ps)
    # the reference in float32 on the same (possibly bf16-rounded) inputs
    ref32 = [leaf(p.detach().float()) for p in ps]
    want = auxk_loss_ref(*ref32, dead, 6, residual)
    want.backward()
    gr = grads(ref32)
    assert fast.dtype == torch.float32
    assert want.item() > 0.1
    close("loss", fast, want, dtype, KERNEL_TOL)
    for name, a, b in zip(("dx", "dW_enc", "db_enc", "dW_dec"), gf, gr):
        close(name, a, b, dtype, KERNEL_TOL)
    # only dead features get gradient
    assert gf[1][~dead].abs().max() == 0 and gf[3][~dead].abs().max() == 0
    assert gf[3][dead].abs().sum() > 0


def test_auxk_transposed_weights_and_denom():
    """W_enc / W_dec given as the .T views of [D, F] tensors; an explicit denom scales the loss."""
    x, W_enc, b_enc, W_dec, dead, residual = auxk_case()
    We_t, Wd_t = leaf(W_enc.detach().t().contiguous()), leaf(W_dec.detach().t().contiguous())
    got = auxk_loss(x, We_t.t(), b_enc, Wd_t.t(), dead, 6, residual)
    got.backward()
    want = auxk_loss_ref(x, W_enc, b_enc, W_dec, dead, 6, residual)
    want.backward()
    close("loss", got, want, torch.float32, KERNEL_TOL)
    close("dW_enc", We_t.grad.t(), W_enc.grad, torch.float32, KERNEL_TOL)
    close("dW_dec", Wd_t.grad.t(), W_dec.grad, torch.float32, KERNEL_TOL)
    half = auxk_loss(x, W_enc, b_enc, W_dec, dead, 6, residual, denom=torch.tensor(2.0))
    num = auxk_loss(x, W_enc, b_enc, W_dec, dead, 6, residual, denom=torch.tensor(1.0))
    torch.testing.assert_close(half, num / 2)


def test_auxk_residual_is_a_target_and_k_aux_clamps():
    x, W_enc, b_enc, W_dec, dead, residual = auxk_case(F=20)
    residual.requires_grad_()
    n_dead = int(dead.sum())
    big = auxk_loss(x, W_enc, b_enc, W_dec, dead, 50, residual)  # k_aux > n_dead: every dead feature
    all_dead = auxk_loss_ref(x, W_enc, b_enc, W_dec, dead, n_dead, residual)
    close("loss", big, all_dead, torch.float32, KERNEL_TOL)
    big.backward()
    assert residual.grad is None
    nothing = auxk_loss(x, W_enc, b_enc, W_dec, torch.zeros(20, dtype=torch.bool), 8, residual)
    assert nothing.item() == 0.0
    assert auxk_loss(x, W_enc, b_enc, W_dec, dead, 0, residual).item() == 0.0


def test_auxk_rejects_bad_shapes():
    x, W_enc, b_enc, W_dec, dead, residual = auxk_case()
    with pytest.raises(ValueError, match=r"dead must be a bool mask \[F\]"):
        auxk_loss(x, W_enc, b_enc, W_dec, dead.float(), 4, residual)
    with pytest.raises(ValueError, match=r"residual must be \[B, D\]"):
        auxk_loss(x, W_enc, b_enc, W_dec, dead, 4, residual[:3])
    with pytest.raises(ValueError, match=r"W_dec must be \[F, D\]"):
        auxk_loss(x, W_enc, b_enc, W_dec[:5], dead, 4, residual)


# ----------------------------------------------------------------------------- constraints
@pytest.mark.parametrize("widths", [None, (13, 27)], ids=["whole-row", "per-source"])
@pytest.mark.parametrize("layout", ["FD", "DF.T"])
def test_unit_norm_decoder(widths, layout):
    torch.manual_seed(3)
    W0 = torch.randn(31, 40) * 3
    W0[4] = 0  # a zero row has no direction: it stays 0
    W = torch.nn.Parameter(W0.clone() if layout == "FD" else W0.t().contiguous())
    view = W if layout == "FD" else W.t()
    out = unit_norm_decoder_(view, widths)
    assert out.data_ptr() == W.data_ptr()  # in place, on the parameter's own storage
    want = unit_norm_decoder_ref(W0, widths)
    # measured max err 1.2e-7 (fp32 division vs multiplication by the reciprocal)
    torch.testing.assert_close(view.detach(), want, rtol=0, atol=5e-7)
    blocks = [view] if widths is None else [view[:, :13], view[:, 13:]]
    for b in blocks:
        n = b.detach().norm(dim=1)
        assert torch.allclose(n[torch.arange(31) != 4], torch.ones(30), atol=1e-6)
    assert view[4].abs().max() == 0


def test_unit_norm_decoder_bf16():
    W0 = torch.randn(64, 96) * 5
    W = W0.bfloat16()
    unit_norm_decoder_(W)
    # one bf16 rounding per element: relative 2^-9 per entry; the norm within ~2^-8
    assert (W.float().norm(dim=1) - 1).abs().max() < 4e-3
    assert (W.float() - unit_norm_decoder_ref(W0.bfloat16().float())).abs().max() < 4e-3


@pytest.mark.parametrize("widths", [None, (13, 27)], ids=["whole-row", "per-source"])
@pytest.mark.parametrize("layout", ["FD", "DF.T"])
def test_remove_parallel_grad(widths, layout):
    torch.manual_seed(4)
    W0, G0 = torch.randn(31, 40), torch.randn(31, 40)
    W0[7] = 0
    W = torch.nn.Parameter(W0.clone() if layout == "FD" else W0.t().contiguous())
    view = W if layout == "FD" else W.t()
    (view * G0).sum().backward()  # W.grad = G0 in view's layout
    # [F, D]: W_dec.grad by default; the .T view: its gradient is the .T of the parameter's
    g = remove_parallel_grad_(view, None if layout == "FD" else W.grad.t(), widths)
    assert g.data_ptr() == W.grad.data_ptr()
    got = W.grad if layout == "FD" else W.grad.t()
    want = remove_parallel_grad_ref(W0.double(), G0.double(), widths).float()
    # measured max err 4.8e-7 against the float64 reference
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    blocks = [slice(None)] if widths is None else [slice(0, 13), slice(13, 40)]
    for s in blocks:  # what is left is orthogonal to each row (or source slice)
        assert (got[:, s] * W0[:, s]).sum(1).abs().max() < 1e-5
    torch.testing.assert_close(got[7], G0[7])  # a zero row: nothing to remove


def test_parallel_grad_removal_keeps_unit_rows_to_second_order():
    """Why the trainers remove it: a step along the cleaned gradient changes unit row norms by
    O(lr^2), the raw gradient by O(lr)."""
    torch.manual_seed(5)
    W = unit_norm_decoder_(torch.randn(50, 30))
    G = torch.randn(50, 30) + 3 * W  # a gradient with a large parallel part
    lr = 1e-2
    raw = (W - lr * G).norm(dim=1) - 1
    clean = (W - lr * remove_parallel_grad_(W, G.clone())).norm(dim=1) - 1
    assert raw.abs().max() > 0.02
    assert clean.abs().max() < 0.5 * lr**2 * G.norm(dim=1).max() ** 2


def test_remove_parallel_grad_needs_a_gradient():
    with pytest.raises(ValueError, match="W_dec.grad is None"):
        remove_parallel_grad_(torch.nn.Parameter(torch.randn(4, 3)))
    with pytest.raises(ValueError, match=r"grad must be \[F, D\]"):
        remove_parallel_grad_(torch.randn(4, 3), torch.randn(3, 4))


# ----------------------------------------------------------------------------- JumpReLU
def jump_case(B=37, D=96, F=257, dtype=torch.float32, seed=0):
    """pre ~ N(0, 1); thresholds in [0.2, 1.2] through a log parameter; eps 0.2."""
    g = torch.Generator().manual_seed(seed)
    x = leaf(torch.randn(B, D, generator=g), dtype)
    W = leaf(torch.randn(F, D, generator=g) / math.sqrt(D), dtype)
    b = leaf(torch.randn(F, generator=g) * 0.1, dtype)
    log_t = leaf((torch.rand(F, generator=g) + 0.2).log())
    return x, W, b, log_t, 0.2


def jump_loss(code, G, log_t, eps, F, l0_coef=0.7, backend=None):
    """sum vals * G[idx] + l0_coef * L0: an upstream gradient that does not depend on entry order."""
    theta = log_t.exp()
    L0 = (jumprelu_l0(code.pre, code.idx, theta, eps, backend=backend) if backend
          else jumprelu_l0_ref(code.pre, code.idx, theta, eps))
    return (code.vals.float() * G.gather(1, code.idx)).sum() + l0_coef * L0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_jumprelu_fast_matches_reference(backend, dtype):
    x, W, b, log_t, eps = jump_case(dtype=dtype, **TINY[backend])
    F = W.shape[0]
    G = torch.randn(x.shape[0], F, generator=torch.Generator().manual_seed(9))
    fast = jumprelu_encode(x, W, b, log_t.exp(), eps, backend=backend)
    jump_loss(fast, G, log_t, eps, F, backend=backend).backward()
    gf = grads([x, W, b, log_t])
    ref_in = [leaf(t.detach().float()) for t in (x, W, b)]
    ref = jumprelu_encode_ref(*ref_in, log_t.exp(), eps)
    jump_loss(ref, G, log_t, eps, F).backward()
    gr = grads([*ref_in, log_t])
    assert fast.vals.dtype == dtype and fast.pre.dtype == torch.float32
    close("code", dense(fast.vals, fast.idx, F), dense(ref.vals, ref.idx, F), dtype, KERNEL_TOL)
    # the same entries (band included), the same pre-activations
    # (scatter-add: padding entries, pre -inf, may share feature 0 with a real entry)
    def kept(c):
        valid = c.pre > -math.inf
        return dense(valid.float(), c.idx, F) > 0, dense(torch.where(valid, c.pre, 0.0), c.idx, F)

    (keep_f, pre_f), (keep_r, pre_r) = kept(fast), kept(ref)
    assert torch.equal(keep_f, keep_r)
    close("pre", pre_f, pre_r, dtype, KERNEL_TOL)
    in_band = ((fast.vals == 0) & (fast.pre > -math.inf)).sum()
    assert in_band > 10, "the case should put entries in the band below the threshold"
    for name, a, r in zip(("dx", "dW_enc", "db_enc", "dlog_threshold"), gf, gr):
        close(name, a, r, dtype, KERNEL_TOL)
    assert gf[3].abs().sum() > 0


def test_jumprelu_straight_through_by_hand():
    """One row, three features with pre 0.95 (in the band below theta = 1), 1.05 (band above) and
    2.0 (above the band); eps = 0.2, g = dL/dvals = (3, 5, 7), L0 coefficient 0.5:
        dtheta = -(theta/eps) * g  for band entries  +  0.5 * (-(1/eps))  per band entry
               = (-15 - 2.5, -25 - 2.5, 0);  dlog_theta = theta * dtheta = dtheta (theta = 1)."""
    x = torch.eye(3, requires_grad=True)[:1]  # pre = W_enc[:, 0] + b
    W = torch.tensor([[0.95, 0.0, 0.0], [1.05, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    log_t = torch.zeros(3, requires_grad=True)
    for bk in ("cpu", "reference"):
        code = jumprelu_encode(x, W, b, log_t.exp(), 0.2, backend=bk)
        d = dense(code.vals, code.idx, 3)[0]
        torch.testing.assert_close(d, torch.tensor([0.0, 1.05, 2.0]))
        assert sorted(code.idx[0].tolist()) == [0, 1, 2]  # the band entry is kept, with value 0
        g = torch.tensor([3.0, 5.0, 7.0])
        loss = (code.vals * g[code.idx]).sum() + 0.5 * jumprelu_l0(code.pre, code.idx, log_t.exp(), 0.2, backend=bk)
        loss.backward()
        torch.testing.assert_close(log_t.grad, torch.tensor([-17.5, -27.5, 0.0]))
        torch.testing.assert_close(W.grad[:, 0], torch.tensor([0.0, 5.0, 7.0]))  # none through the band entry
        torch.testing.assert_close(b.grad, torch.tensor([0.0, 5.0, 7.0]))
        for t in (x, W, b, log_t):
            t.grad = None


def test_jumprelu_l0_gradient_estimates_the_density():
    """d/dtheta E[H(pre - theta)] = -p(theta): with pre ~ N(0, 1) the L0 estimate per feature is
    -(1/eps) * (fraction of rows in the band), which must approach -phi(theta)."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(40000, 4, generator=g)
    theta = torch.tensor([0.0, 0.5, 1.0, 2.0], requires_grad=True)
    eps = 0.1
    L0 = jumprelu_l0(pre, None, theta, eps)
    torch.testing.assert_close(L0, (pre > theta.detach()).float().sum(1).mean())
    L0.backward()
    phi = torch.exp(-theta.detach() ** 2 / 2) / math.sqrt(2 * math.pi)
    # sampling error: ~40000 * eps * phi rows in each band (54 at theta = 2: 14%); 3 sigma
    rel = ((-theta.grad - phi) / phi).abs()
    assert (rel < torch.tensor([0.06, 0.06, 0.08, 0.4])).all(), rel
    # the dense reference gives the same estimate
    t2 = theta.detach().clone().requires_grad_()
    jumprelu_l0_ref(pre, None, t2, eps).backward()
    torch.testing.assert_close(t2.grad, theta.grad)


def test_jumprelu_dense_reference_gradcheck_away_from_the_threshold():
    """In pre the JumpReLU is pre * H(pre - theta): gradcheck (float64) where no pre is within
    the finite-difference step of a threshold."""
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(8, 6, generator=g, dtype=torch.float64)
    theta = torch.full((6,), 0.3, dtype=torch.float64)
    assert ((pre - 0.3).abs() > 1e-3).all()
    assert torch.autograd.gradcheck(lambda p: jumprelu_ref(p, theta, 0.1), (pre.requires_grad_(),))


def test_jumprelu_triton_and_cpu_take_transposed_weights():
    x, W, b, log_t, eps = jump_case(B=9, F=50)
    Wt = leaf(W.detach().t().contiguous())
    code = jumprelu_encode(x, Wt.t(), b, log_t.exp(), eps, backend="cpu")
    want = jumprelu_encode_ref(x, W, b, log_t.exp(), eps)
    close("code", dense(code.vals, code.idx, 50), dense(want.vals, want.idx, 50), torch.float32, KERNEL_TOL)
    code.vals.sum().backward()
    want.vals.sum().backward()
    close("dW_enc", Wt.grad.t(), W.grad, torch.float32, KERNEL_TOL)


def test_jumprelu_rejects_bad_arguments():
    x, W, b, log_t, eps = jump_case(B=3, F=20)
    with pytest.raises(ValueError, match=r"threshold must be a \[F\]=20 tensor"):
        jumprelu_encode(x, W, b, 0.5, eps)
    with pytest.raises(ValueError, match=r"threshold must be a \[F\]=20 tensor"):
        jumprelu_encode(x, W, b, log_t[:5].exp(), eps)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        jumprelu_encode(x, W, b, log_t.exp(), 0.0)
    with pytest.raises(ValueError, match=r"pre and idx must both be \[B, m\]"):
        jumprelu_l0(torch.randn(3, 4), torch.zeros(3, 5, dtype=torch.long), log_t.exp(), eps)
