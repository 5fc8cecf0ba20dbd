"""Weight layouts, N-D inputs, b_enc=None, -1 padding and the error messages of fastxc.kernels.

Every op takes its weight as [F, D] row-major or as the .T view of a row-major [D, F] tensor
(read in place; ``layout="df"`` for a [D, F] tensor passed as it is). The transposed view must
give the same forward and gradients as the row-major table on every backend (bit-identical
where the summation order is the same: the decode on cpu / triton; the decoder-norm reductions
of the penalty are torch reductions whose order follows the memory layout, so ops with the
penalty are compared with a tolerance), and its gradient must come back in the [D, F]
parameter's own layout without a copy.
"""
from __future__ import annotations

import pytest
import torch

import fastxc.kernels as K
from fastxc.kernels import _cext

BACKENDS = ["reference", "cpu", "triton"]
B, D, F, KK, WIDTHS = 6, 40, 70, 5, (15, 25)
# penalty ops, transposed vs row-major: the torch norm reduction runs in another order over a
# transposed slice; measured max |diff| / max |value| 1.2e-7 (fp32 eps 1.2e-7) on these shapes
PEN_RTOL = 1e-6


def _same(name, got, want, exact: bool):
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
    if exact:
        assert torch.equal(got, want), f"{name}: max diff {(got - want).abs().max().item():.3g}"
    else:
        err = (got - want).abs().max().item()
        assert err <= PEN_RTOL * want.abs().max().item(), f"{name}: max diff {err:.3g}"


def _weights():
    """(W_df [D, F] leaf, W_fd [F, D] leaf holding the same values)."""
    W_df = torch.randn(D, F).requires_grad_()
    W_fd = W_df.detach().t().contiguous().requires_grad_()
    return W_df, W_fd


def _code(b=B, k=KK):
    idx = torch.rand(b, F).argsort(1)[:, :k]
    return torch.rand(b, k).requires_grad_(), idx


# ----------------------------------------------------------------------------- both layouts
def _run_decode(W, vals, idx, b, bk, **kw):
    return K.sparse_decode(vals, idx, W, b, backend=bk, **kw)


def _run_loss(W, vals, idx, b, bk, pen=0.0, **kw):
    x = torch.randn(vals.shape[0], D, generator=torch.Generator().manual_seed(1))
    out = K.crosscoder_loss(vals, idx, W, b, x, WIDTHS, penalty_coef=pen, backend=bk, **kw)
    return out.loss + (out.recon * 0.01).sum()


OPS = {  # name -> (run(W, vals, idx, b, backend, **layout) -> tensor, results identical?)
    "sparse_decode": (_run_decode, True),
    "crosscoder_loss": (_run_loss, True),
    "crosscoder_loss+penalty": (lambda *a, **kw: _run_loss(*a, pen=0.5, **kw), False),
    "decoder_norm_penalty": (lambda W, v, i, b, bk, **kw: K.decoder_norm_penalty(v, i, W, WIDTHS, backend=bk, **kw), False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("how", ["T-view", "layout-df"])
def test_decoder_ops_transposed_equal_row_major(op, backend, how):
    """Forward, dvals and dW_dec with the [D, F] decoder (as W.T or layout='df') equal the
    row-major [F, D] ones; the [D, F] parameter's grad is contiguous [D, F]."""
    run, exact = OPS[op]
    exact = exact and backend != "reference"  # the reference is plain torch on a strided view
    W_df, W_fd = _weights()
    vals, idx = _code()
    b = torch.randn(D)
    g = torch.randn(B, D)
    want = run(W_fd, vals, idx, b, backend)
    want_g = torch.autograd.grad((want * (g if want.dim() == 2 else 1)).sum(), (vals, W_fd))
    got = run(W_df.T, vals, idx, b, backend) if how == "T-view" else run(W_df, vals, idx, b, backend, layout="df")
    got_g = torch.autograd.grad((got * (g if got.dim() == 2 else 1)).sum(), (vals, W_df))
    _same("forward", got, want, exact)
    _same("dvals", got_g[0], want_g[0], exact)
    _same("dW", got_g[1].T, want_g[1], exact)
    if backend != "reference":
        assert got_g[1].is_contiguous(), "dW of a [D, F] decoder must come back [D, F] row-major"


@pytest.mark.parametrize("d, f", [(43, 70), (7, 131), (1, 3)])
def test_cpu_decode_transposed_odd_shapes_bit_identical(d, f):
    """The C++ [D, F] kernels copy 4 x 4 tiles of the buffer and finish the rest one element
    at a time: with D not a multiple of 4 and F not a multiple of 4 or of the 64-feature block,
    forward, dvals and dW still equal the [F, D] kernels' bit for bit."""
    gen = torch.Generator().manual_seed(d * 1000 + f)
    W_df = torch.randn(d, f, generator=gen).requires_grad_()
    W_fd = W_df.detach().t().contiguous().requires_grad_()
    k, b = min(KK, f), 32
    # every feature is used (b * k >= f), so every copied column reaches a result
    idx = (torch.arange(b)[:, None] * k + torch.arange(k)) % f
    vals = torch.rand(b, k, generator=gen).requires_grad_()
    g = torch.randn(b, d, generator=gen)
    outs = []
    for W in (W_fd, W_df.T):
        r = K.sparse_decode(vals, idx, W, backend="cpu")
        outs.append((r, *torch.autograd.grad((r * g).sum(), (vals, W))))
    for name, want, got in zip(("forward", "dvals", "dW"), outs[0], outs[1]):
        _same(name, got, want, exact=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["topk_encode", "relu_encode", "batchtopk_encode"])
def test_encoders_transposed_equal_row_major(op, backend):
    """Encoders with W_enc the .T view of a [D, F] tensor (SAELens' W_enc): the same code and
    gradients as with the row-major [F, D] W_enc (the GEMM reads W.T in place; the backward's
    gather and scatter are the decoder's, identical in both layouts)."""
    W_df, W_fd = _weights()
    W_df.data /= D ** 0.5
    W_fd.data /= D ** 0.5
    x = torch.randn(B, D, requires_grad=True)
    b = torch.randn(F) * 0.1
    fn = {"topk_encode": lambda W: K.topk_encode(x, W, b, 4, backend=backend),
          "relu_encode": lambda W: K.relu_encode(x, W, b, backend=backend),
          "batchtopk_encode": lambda W: K.batchtopk_encode(x, W, b, 4, backend=backend)}[op]
    v1, i1 = fn(W_fd)
    g1 = torch.autograd.grad((v1 * torch.arange(v1.numel()).view_as(v1)).sum(), (x, W_fd))
    v2, i2 = fn(W_df.T)
    g2 = torch.autograd.grad((v2 * torch.arange(v2.numel()).view_as(v2)).sum(), (x, W_df))
    exact = backend != "reference"
    assert torch.equal(i1, i2)
    _same("vals", v2, v1, exact)
    _same("dx", g2[0], g1[0], exact)
    _same("dW_enc", g2[1].T, g1[1], exact)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dense_penalty_transposed(backend):
    W_df, W_fd = _weights()
    code = torch.relu(torch.randn(B, F)).requires_grad_()
    p1 = K.dense_decoder_norm_penalty(code, W_fd, WIDTHS, backend=backend)
    g1 = torch.autograd.grad(p1, (code, W_fd))
    p2 = K.dense_decoder_norm_penalty(code, W_df.T, WIDTHS, backend=backend)
    g2 = torch.autograd.grad(p2, (code, W_df))
    _same("penalty", p2, p1, False)
    _same("dcode", g2[0], g1[0], False)
    _same("dW", g2[1].T, g1[1], False)
    assert g2[1].is_contiguous()


def test_decode_reads_transposed_in_place(monkeypatch):
    """No copy of the table: torch.Tensor.contiguous is never called on it, and the gradient
    autograd stores in the [D, F] parameter is the very buffer the kernel wrote (AccumulateGrad
    steals it; a copy would give another data_ptr)."""
    W = torch.nn.Parameter(torch.randn(D, F))
    vals, idx = _code()
    seen = []
    view = W.T
    view.register_hook(lambda g: seen.append((g.data_ptr(), g.stride())))
    calls = []
    orig = torch.Tensor.contiguous

    def spy(self, *a, **kw):
        if self.data_ptr() == W.data_ptr():
            calls.append(tuple(self.shape))
        return orig(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    K.sparse_decode(vals, idx, view, backend="cpu").sum().backward()
    assert calls == [], f"the decoder was copied: {calls}"
    assert seen[0][1] == view.stride(), "dW must have the strides of W.T"
    assert W.grad.data_ptr() == seen[0][0] and W.grad.is_contiguous()


def test_transposed_cpu_kernel_is_used(monkeypatch):
    """The fp32 CPU decode of a transposed decoder runs the C++ kernel on the [D, F] buffer
    (not the torch fallback, which copies)."""
    C = _cext.get()
    if C is None:
        pytest.skip("fastxc._C not built")
    called = []

    class Spy:
        def __getattr__(self, name):
            called.append(name)
            return getattr(C, name)

    orig = _cext.usable
    monkeypatch.setattr(_cext, "usable", lambda *t: Spy() if orig(*t) is not None else None)
    vals, idx = _code()
    K.sparse_decode(vals, idx, torch.randn(D, F).T, backend="cpu")
    assert called == ["gather_sum"]


# ----------------------------------------------------------------------------- N-D, bias, padding
@pytest.mark.parametrize("backend", BACKENDS)
def test_nd_inputs(backend):
    """[2, 3, ...] leading shapes give the rows of the flat [6, ...] call, restored."""
    _, W = _weights()
    vals, idx = _code()
    b = torch.randn(D)
    x = torch.randn(B, D)
    flat = K.sparse_decode(vals, idx, W, b, backend=backend)
    nd = K.sparse_decode(vals.view(2, 3, KK), idx.view(2, 3, KK), W, b, backend=backend)
    assert nd.shape == (2, 3, D) and torch.equal(nd.reshape(B, D), flat)
    l1 = K.crosscoder_loss(vals, idx, W, b, x, WIDTHS, penalty_coef=0.5, backend=backend)
    l2 = K.crosscoder_loss(vals.view(2, 3, KK), idx.view(2, 3, KK), W, b, x.view(2, 3, D), WIDTHS,
                           penalty_coef=0.5, backend=backend)
    assert l2.recon.shape == (2, 3, D)
    for a, c in zip(l1, l2):
        assert torch.equal(a.reshape(c.shape), c)
    m1 = K.source_mse(flat, x, WIDTHS, backend=backend)
    m2 = K.source_mse(nd, x.view(2, 3, D), WIDTHS, backend=backend)
    assert all(torch.equal(a, c) for a, c in zip(m1, m2))
    p1 = K.decoder_norm_penalty(vals, idx, W, WIDTHS, backend=backend)
    assert torch.equal(K.decoder_norm_penalty(vals.view(2, 3, KK), idx.view(2, 3, KK), W, WIDTHS, backend=backend), p1)
    code = torch.relu(torch.randn(B, F))
    assert torch.equal(K.dense_decoder_norm_penalty(code.view(2, 3, F), W, WIDTHS, backend=backend),
                       K.dense_decoder_norm_penalty(code, W, WIDTHS, backend=backend))
    We = (W.detach() / D ** 0.5).requires_grad_()
    be = torch.randn(F) * 0.1
    for enc in (lambda x_: K.topk_encode(x_, We, be, 4, backend=backend),
                lambda x_: K.relu_encode(x_, We, be, backend=backend),
                lambda x_: K.batchtopk_encode(x_, We, be, 4, backend=backend)):
        v1, i1 = enc(x)
        v2, i2 = enc(x.view(2, 3, D))
        assert v2.shape[:2] == (2, 3) and i2.shape == v2.shape
        assert torch.equal(v2.reshape(v1.shape), v1) and torch.equal(i2.reshape(i1.shape), i1)
    xg = x.view(2, 3, D).clone().requires_grad_()
    v, _ = K.topk_encode(xg, We, be, 4, backend=backend)
    v.sum().backward()
    assert xg.grad.shape == (2, 3, D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["topk_encode", "relu_encode", "batchtopk_encode"])
def test_encode_without_bias(op, backend):
    """b_enc=None is an encoder without bias: the same as a zero bias, and no bias gradient."""
    _, W = _weights()
    W.data /= D ** 0.5
    x = torch.randn(B, D)
    zero = torch.zeros(F, requires_grad=True)
    fn = {"topk_encode": lambda b: K.topk_encode(x, W, b, 4, backend=backend),
          "relu_encode": lambda b: K.relu_encode(x, W, b, backend=backend),
          "batchtopk_encode": lambda b: K.batchtopk_encode(x, W, b, 4, backend=backend)}[op]
    v1, i1 = fn(zero)
    (g1,) = torch.autograd.grad(v1.sum(), (W,))
    v2, i2 = fn(None)
    (g2,) = torch.autograd.grad(v2.sum(), (W,))
    assert torch.equal(v1, v2) and torch.equal(i1, i2) and torch.equal(g1, g2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_ids_are_ignored(backend):
    """-1 entries contribute nothing and get zero dvals and no dW row: the code with padding
    gives exactly what the code without those entries gives."""
    _, W = _weights()
    vals, idx = _code(k=KK)
    b = torch.randn(D)
    pad_idx = torch.cat([idx, torch.full((B, 2), -1)], 1)
    pad_vals = torch.cat([vals.detach(), torch.rand(B, 2) + 1], 1).requires_grad_()
    x = torch.randn(B, D)
    for name, run in {
        "sparse_decode": lambda v, i: K.sparse_decode(v, i, W, b, backend=backend).sum(),
        "crosscoder_loss": lambda v, i: K.crosscoder_loss(v, i, W, b, x, WIDTHS, penalty_coef=0.5,
                                                          backend=backend).loss,
        "decoder_norm_penalty": lambda v, i: K.decoder_norm_penalty(v, i, W, WIDTHS, backend=backend),
    }.items():
        want = run(vals, idx)
        gv, gW = torch.autograd.grad(want, (vals, W))
        got = run(pad_vals, pad_idx)
        pv, pW = torch.autograd.grad(got, (pad_vals, W))
        # the penalty sums [B, k + 2] products instead of [B, k]: the reduction tree differs
        # (measured |diff| 1.5e-5 on 153.5, 1e-7 relative); everything else is exact
        if name == "decoder_norm_penalty":
            assert torch.allclose(got, want, rtol=1e-6, atol=0), name
        else:
            assert torch.equal(got, want), name
        assert torch.equal(pv[:, :KK], gv) and torch.equal(pv[:, KK:], torch.zeros(B, 2)), name
        assert torch.equal(pW, gW), name


# ----------------------------------------------------------------------------- errors
def test_wrong_layout_errors():
    """A [D, F] decoder passed without .T: a message naming [F, D] and the layout option, where
    before it was torch's 'index out of range' / a misleading widths message."""
    W_df = torch.randn(D, F)
    vals, idx = _code()
    idx[0, 0] = D + 3  # a feature id >= D: too large for W_df read as [F, D]
    with pytest.raises(ValueError, match=r"sparse_decode: idx holds feature id \d+, but W_dec \[F, D\] = "
                                         r"\[40, 70\] has F=40.*pass W_dec.T or layout='df'"):
        K.sparse_decode(vals, idx, W_df)
    x = torch.randn(B, D)
    with pytest.raises(ValueError, match=r"crosscoder_loss: W_dec \[40, 70\] looks like \[D, F\].*"
                                         r"pass W_dec.T or layout='df'"):
        K.crosscoder_loss(vals, idx % D, W_df, None, x, WIDTHS)
    with pytest.raises(ValueError, match=r"decoder_norm_penalty: W_dec \[40, 70\] looks like \[D, F\]"):
        K.decoder_norm_penalty(vals, idx % D, W_df, WIDTHS)
    with pytest.raises(ValueError, match=r"topk_encode: x must be \[..., D\] and W_enc \[F, D\].*"
                                         r"W_enc looks like \[D, F\]: pass W_enc.T or layout='df'"):
        K.topk_encode(torch.randn(B, D), W_df, None, 3)
    with pytest.raises(ValueError, match="layout must be 'fd'"):
        K.sparse_decode(vals, idx % D, W_df, layout="DF")


@pytest.mark.parametrize("bad", [-2, F, F + 100])
def test_out_of_range_ids(bad):
    _, W = _weights()
    vals, idx = _code()
    idx[1, 2] = bad
    want = (f"idx holds {bad}; ids must be in \\[0, F={F}\\), or -1" if bad < 0
            else f"idx holds feature id {bad}, but W_dec \\[F, D\\] = \\[{F}, {D}\\] has F={F}")
    for op, call in {"sparse_decode": lambda: K.sparse_decode(vals, idx, W),
                     "crosscoder_loss": lambda: K.crosscoder_loss(vals, idx, W, None, torch.randn(B, D), WIDTHS),
                     "decoder_norm_penalty": lambda: K.decoder_norm_penalty(vals, idx, W, WIDTHS)}.items():
        with pytest.raises(ValueError, match=f"{op}: {want}"):
            call()


def test_shape_errors():
    _, W = _weights()
    vals, idx = _code()
    with pytest.raises(ValueError, match=r"sparse_decode: b_dec must be \[D\]=\[40\] or None, got \(41,\)"):
        K.sparse_decode(vals, idx, W, torch.zeros(D + 1))
    with pytest.raises(ValueError, match=r"crosscoder_loss: x must be \[..., D\]=\[6, 40\]"):
        K.crosscoder_loss(vals, idx, W, None, torch.randn(B, D + 1), WIDTHS)
    with pytest.raises(ValueError, match=r"sparse_decode: W_dec must be \[F, D\] .* got \(40,\)"):
        K.sparse_decode(vals, idx, W[0])
    with pytest.raises(ValueError, match=r"topk_encode: b_enc must be \[F\]=\[70\] or None"):
        K.topk_encode(torch.randn(B, D), W, torch.zeros(3), 3)
