"""fastxc.kernels.codes: the dense <-> sparse code helpers (to_dense, to_sparse, code_l0), against
plain loops and against the ops that produce and consume sparse codes."""
from __future__ import annotations

import pytest
import torch

from fastxc.kernels import relu_encode, sparse_decode, topk_encode
from fastxc.kernels.codes import code_l0, to_dense, to_sparse


def dense_by_loop(vals, idx, F):
    """code[b, f] = sum of vals[b, j] with idx[b, j] == f, slot by slot (idx -1 skipped)."""
    code = torch.zeros(vals.shape[0], F, dtype=vals.dtype)
    for b in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            if idx[b, j] >= 0:
                code[b, idx[b, j]] += vals[b, j]
    return code


def random_code(rows, F, max_active, gen):
    """[rows, F] dense code with 0..max_active non-zeros per row (one row all zero), values of
    both signs."""
    code = torch.zeros(rows, F)
    for r in range(1, rows):
        n = int(torch.randint(1, max_active + 1, (), generator=gen))
        cols = torch.randperm(F, generator=gen)[:n]
        code[r, cols] = torch.randn(n, generator=gen)
    return code


# ----------------------------------------------------------------------------- to_dense
def test_to_dense_scatters_adds_repeats_and_skips_padding():
    gen = torch.Generator().manual_seed(0)
    vals = torch.randn(6, 5, generator=gen)
    idx = torch.randint(0, 7, (6, 5), generator=gen)
    idx[0] = torch.tensor([3, 3, 3, 1, 1])        # repeated features add up, as in sparse_decode
    idx[1, 2:] = -1                                # padding slots: their values are ignored
    got = to_dense(vals, idx, 7)
    assert got.shape == (6, 7)
    torch.testing.assert_close(got, dense_by_loop(vals, idx, 7), rtol=0, atol=1e-6)
    assert got[1].count_nonzero() <= 2
    # int32 indices work the same
    torch.testing.assert_close(to_dense(vals, idx.int(), 7), got, rtol=0, atol=0)


def test_to_dense_n_d_dtype_and_gradient():
    gen = torch.Generator().manual_seed(1)
    vals = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(-1, 9, (2, 3, 4), generator=gen)
    code = to_dense(vals, idx, 9)
    assert code.shape == (2, 3, 9) and code.dtype == torch.float64
    torch.testing.assert_close(code.reshape(6, 9), dense_by_loop(vals.detach().reshape(6, 4), idx.reshape(6, 4), 9))
    g = torch.randn(2, 3, 9, generator=gen, dtype=torch.float64)
    code.backward(g)
    # d code[f] / d vals[j] = [idx[j] == f]: the upstream gradient read at idx, 0 at padding
    want = torch.where(idx >= 0, g.gather(-1, idx.clamp_min(0)), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(vals.grad, want, rtol=0, atol=0)
    assert to_dense(vals.detach().bfloat16(), idx, 9).dtype == torch.bfloat16


@pytest.mark.parametrize("vals_shape,idx,F,match", [
    ((4, 3), torch.zeros(4, 2, dtype=torch.long), 8, r"vals and idx must both be \[\.\.\., k\]"),
    ((4, 3), torch.zeros(4, 3), 8, "idx must be an integer tensor"),
    ((4, 3), torch.full((4, 3), 8), 8, r"idx must lie in \[-1, n_features=8\)"),
    ((4, 3), torch.full((4, 3), -2), 8, r"idx must lie in \[-1, n_features=8\)"),
    ((4, 3), torch.zeros(4, 3, dtype=torch.long), 0, "n_features must be >= 1"),
])
def test_to_dense_rejects_bad_input(vals_shape, idx, F, match):
    with pytest.raises(ValueError, match=match):
        to_dense(torch.ones(vals_shape), idx, F)


# ----------------------------------------------------------------------------- to_sparse
def test_to_sparse_all_non_zeros_round_trips():
    gen = torch.Generator().manual_seed(2)
    code = random_code(9, 13, 5, gen)
    vals, idx = to_sparse(code)
    nnz = (code != 0).sum(1)
    assert vals.shape == idx.shape == (9, int(nnz.max())) and idx.dtype == torch.int64
    torch.testing.assert_close(to_dense(vals, idx, 13), code, rtol=0, atol=0)
    assert torch.equal(code_l0(vals), nnz)
    for r in range(9):
        n = int(nnz[r])
        # the non-zeros first, in feature order; the padding has value 0 and points at a
        # feature of the row whose entry is 0, so no feature repeats in a row
        assert torch.equal(idx[r, :n], code[r].nonzero()[:, 0])
        assert torch.equal(vals[r, :n], code[r, idx[r, :n]])
        assert (vals[r, n:] == 0).all() and (code[r, idx[r, n:]] == 0).all()
        assert idx[r].unique().numel() == idx.shape[1]


def test_to_sparse_shapes_edge_rows_and_gradient():
    code = torch.zeros(2, 3, 6, requires_grad=True)
    vals, idx = to_sparse(code)                      # no non-zero anywhere: one padding slot
    assert vals.shape == idx.shape == (2, 3, 1) and (vals == 0).all()
    assert to_sparse(torch.zeros(0, 6))[0].shape == (0, 1)
    c = torch.tensor([[0.0, 2.0, -0.0, -3.0], [5.0, 0.0, 0.0, 0.0]], requires_grad=True)
    vals, idx = to_sparse(c)
    assert vals.tolist() == [[2.0, -3.0], [5.0, 0.0]] and idx[:, 0].tolist() == [1, 0]
    (vals * torch.tensor([[1.0, 10.0], [100.0, 1000.0]])).sum().backward()
    # gradient through the non-zero entries only (the padding slot's 1000 goes nowhere)
    assert c.grad.tolist() == [[0.0, 1.0, 0.0, 10.0], [100.0, 0.0, 0.0, 0.0]]


def test_to_sparse_k_largest():
    gen = torch.Generator().manual_seed(3)
    code = torch.randn(7, 20, generator=gen)
    vals, idx = to_sparse(code, k=4)
    assert vals.shape == idx.shape == (7, 4)
    torch.testing.assert_close(vals.sort(1).values, code.topk(4, dim=1).values.sort(1).values, rtol=0, atol=0)
    torch.testing.assert_close(code.gather(1, idx), vals, rtol=0, atol=0)
    # a TopK code (at most k non-zeros, all positive) comes back whole
    topk_code = torch.zeros(7, 20).scatter(1, idx, vals.abs() + 0.1)
    topk_code[0] = 0
    topk_code[1, idx[1, :2]] = 0                   # rows with fewer than k non-zeros
    torch.testing.assert_close(to_dense(*to_sparse(topk_code, k=4), 20), topk_code, rtol=0, atol=0)


@pytest.mark.parametrize("code,k,match", [
    (torch.tensor(1.0), None, r"code must be \[\.\.\., F\] with F >= 1"),
    (torch.zeros(3, 0), None, r"code must be \[\.\.\., F\] with F >= 1"),
    (torch.zeros(3, 5), 0, r"k must be in \[1, F=5\]"),
    (torch.zeros(3, 5), 6, r"k must be in \[1, F=5\]"),
])
def test_to_sparse_rejects_bad_input(code, k, match):
    with pytest.raises(ValueError, match=match):
        to_sparse(code, k)


def test_code_l0_counts_non_zero_slots():
    vals = torch.tensor([[[1.0, 0.0, -2.0], [0.0, 0.0, 0.0]]])
    assert code_l0(vals).tolist() == [[2, 0]]
    with pytest.raises(ValueError, match=r"vals must be \[\.\.\., k\]"):
        code_l0(torch.tensor(1.0))


# ----------------------------------------------------------------------------- with the ops
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_codes_meet_the_ops(backend):
    """to_dense of an encode op's code is the dense activation; sparse_decode of to_sparse of a
    dense code is the dense decode. Measured max|err| / max|want| here: 1.4e-7 (GEMM and
    decode sums in another order); asserted <= 1e-6."""
    gen = torch.Generator().manual_seed(4)
    B, D, F, k = 11, 24, 40, 5
    x, W_enc, W_dec = (torch.randn(*s, generator=gen) for s in ((B, D), (F, D), (F, D)))
    b_enc = torch.randn(F, generator=gen) - 1.5    # most pre-activations negative: sparse ReLU
    pre = x @ W_enc.T + b_enc

    def close(got, want):
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), (got - want).abs().max()

    vals, idx = relu_encode(x, W_enc, b_enc, backend=backend)
    close(to_dense(vals, idx, F), pre.relu())
    vals, idx = topk_encode(x, W_enc, b_enc, k, backend=backend)
    code = to_dense(vals, idx, F)
    assert code_l0(vals).max() <= k
    close(sparse_decode(*to_sparse(code), W_dec, backend=backend), code @ W_dec)
    close(sparse_decode(*to_sparse(code, k), W_dec, backend=backend), code @ W_dec)
