"""Full crosscoder training step on the CPU (forward, backward, fused Adam), one group:

    fast          fastxc.kernels: topk_encode + crosscoder_loss (C++ kernels from fastxc._C),
                  Adam stepped inside backward (fastxc.core.optim.AdamInBackward)
    crosscoder    the same through fastxc.Crosscoder, as fastxc.train runs it
    fast-torch    the kernels' ops with the C++ kernels disabled (torch-only CPU path)
    embbag        sparse-decoder step built from torch's embedding_bag and index_add_
                  (the approach of the fastest current SAE trainers)
    dense         the plain-torch crosscoder step (dense [B, F] code, dense decode GEMM)
    gemm          a bare torch.mm of the encoder GEMM shape into a preallocated output: the
                  floor (a fresh 64 MiB output per call would add ~30 ms of page faults that
                  the fast path, which reuses its buffers, does not pay)

Shape (issue 3): topk, B = 1024, two sources of width 512, F = 16384, k = 32, fp32.
A second group compares relu with a sparse code (L0 <= 1% of F) against the dense relu step.
tokens/s and the ratio to the GEMM floor go in extra_info; ``test_step_peak_memory`` records
the step's peak memory (see its docstring for how it is measured).

    pytest bench/bench_step.py --benchmark-only
"""
from __future__ import annotations

import os
import platform
import threading
import time

import pytest
import torch
import torch.nn.functional as Fn

import fastxc.kernels as K
from fastxc import Crosscoder
from fastxc.core.optim import AdamInBackward

B, WIDTHS, F, KK = 1024, (512, 512), 16384, 32
D = sum(WIDTHS)
ROUNDS = 3
_floor: dict[str, float] = {}


class Model:
    """Crosscoder parameters (feature-major W_enc, W_dec [F, D]) and a fused Adam."""

    def __init__(self, relu_bias=0.0, seed=0, in_backward=False):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(F, D, generator=g)
        w /= w.norm(dim=1, keepdim=True) * 10
        self.W_enc = torch.nn.Parameter(w.clone())
        self.b_enc = torch.nn.Parameter(torch.full((F,), relu_bias))
        self.W_dec = torch.nn.Parameter(w.clone())
        self.b_dec = torch.nn.Parameter(torch.zeros(D))
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.opt = (AdamInBackward(self.params, lr=1e-4) if in_backward
                    else torch.optim.Adam(self.params, lr=1e-4, fused=True))
        self.x = torch.randn(B, D, generator=g)
        self.out = torch.empty(B, F) if not in_backward else None  # the floor's GEMM output


class CrosscoderModel:
    """fastxc.Crosscoder with the optimizer fastxc.train uses."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.cc = Crosscoder(list(WIDTHS), F, "topk", k=KK)
        self.params = list(self.cc.parameters())
        self.opt = AdamInBackward(self.params, lr=1e-4)
        self.x = torch.randn(B, D)


def step_fast(m: Model):
    vals, idx = K.topk_encode(m.x, m.W_enc, m.b_enc, KK)
    out = K.crosscoder_loss(vals, idx, m.W_dec, m.b_dec, m.x, WIDTHS)
    out.loss.backward()
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)


class _EmbBagDecode(torch.autograd.Function):
    """Sparse decode with torch ops: embedding_bag forward; index_add_ / gather backward."""

    @staticmethod
    def forward(ctx, vals, idx, W, b):
        ctx.save_for_backward(vals, idx, W)
        return Fn.embedding_bag(idx, W, per_sample_weights=vals, mode="sum") + b

    @staticmethod
    def backward(ctx, g):
        vals, idx, W = ctx.saved_tensors
        dvals = torch.bmm(W[idx], g.unsqueeze(-1)).squeeze(-1)
        dW = torch.zeros_like(W).index_add_(0, idx.reshape(-1),
                                            (vals.unsqueeze(-1) * g.unsqueeze(1)).reshape(-1, W.shape[1]))
        return dvals, None, dW, g.sum(0)


class _TopKEncodeIndexAdd(torch.autograd.Function):
    """GEMM + topk; backward dW_enc by index_add_ of k rows per token (sparse, torch ops)."""

    @staticmethod
    def forward(ctx, x, W, b, k):
        vals, idx = torch.addmm(b, x, W.t()).topk(k, dim=1, sorted=False)
        ctx.save_for_backward(x, vals, idx)
        ctx.F = W.shape[0]
        ctx.mark_non_differentiable(idx)
        return torch.relu(vals), idx

    @staticmethod
    def backward(ctx, gv, _):
        x, vals, idx = ctx.saved_tensors
        g = gv * (vals > 0)
        k = idx.shape[1]
        dW = torch.zeros(ctx.F, x.shape[1]).index_add_(
            0, idx.reshape(-1), (g.unsqueeze(-1) * x.unsqueeze(1)).reshape(-1, x.shape[1]))
        db = torch.zeros(ctx.F).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return None, dW, db, None


def _mse(recon, x):
    err = recon - x
    return sum(e.pow(2).sum(1).mean() for e in err.split(list(WIDTHS), dim=1))


def step_embbag(m: Model):
    vals, idx = _TopKEncodeIndexAdd.apply(m.x, m.W_enc, m.b_enc, KK)
    recon = _EmbBagDecode.apply(vals, idx, m.W_dec, m.b_dec)
    _mse(recon, m.x).backward()
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)


def step_dense(m: Model):
    pre = torch.addmm(m.b_enc, m.x, m.W_enc.t())
    vals, idx = pre.topk(KK, dim=1, sorted=False)
    code = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
    recon = torch.addmm(m.b_dec, code, m.W_dec)
    _mse(recon, m.x).backward()
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)


def step_gemm(m: Model):
    torch.mm(m.x, m.W_enc.detach().t(), out=m.out)


def step_crosscoder(m: CrosscoderModel):
    m.cc(m.x).loss.backward()
    m.opt.step()


def _norms(W):
    return torch.stack([p.norm(dim=1) for p in W.split(list(WIDTHS), dim=1)], 1).sum(1)


def step_relu_sparse(m: Model):
    vals, idx = K.relu_encode(m.x, m.W_enc, m.b_enc)
    out = K.crosscoder_loss(vals, idx, m.W_dec, m.b_dec, m.x, WIDTHS, penalty_coef=1.0)
    out.loss.backward()
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)
    return idx.shape[1], (vals > 0).sum(1).float().mean().item()


def step_relu_dense(m: Model):
    f = torch.relu(torch.addmm(m.b_enc, m.x, m.W_enc.t()))
    recon = torch.addmm(m.b_dec, f, m.W_dec)
    loss = _mse(recon, m.x) + (f @ _norms(m.W_dec)).mean()
    loss.backward()
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)


def _machine():
    return {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


STEPS = {"gemm": step_gemm, "fast": step_fast, "crosscoder": step_crosscoder, "fast-torch": step_fast,
         "embbag": step_embbag, "dense": step_dense}
IN_BACKWARD = {"fast", "fast-torch"}


def make(provider: str):
    if provider == "crosscoder":
        return CrosscoderModel()
    return Model(in_backward=provider in IN_BACKWARD)


@pytest.fixture
def no_c(monkeypatch):
    return lambda on: monkeypatch.setenv("FASTXC_KERNELS_NO_C", "1" if on else "0")


@pytest.mark.benchmark(group="step-topk-B1024-D2x512-F16384-k32-fp32")
@pytest.mark.parametrize("provider", list(STEPS))
def test_step_topk(benchmark, provider, no_c):
    no_c(provider == "fast-torch")
    m = make(provider)
    fn = STEPS[provider]
    with torch.no_grad() if provider == "gemm" else torch.enable_grad():
        benchmark.pedantic(fn, args=(m,), rounds=ROUNDS, warmup_rounds=1)
    t = benchmark.stats.stats.min
    if provider == "gemm":
        _floor["topk"] = t
    benchmark.extra_info.update(_machine(), tokens_per_s=B / t,
                                gflops_encoder=2 * B * D * F / t / 1e9)
    if "topk" in _floor:
        benchmark.extra_info["x_gemm"] = t / _floor["topk"]


@pytest.mark.benchmark(group="step-relu-B1024-D2x512-F16384-L0<=1%")
@pytest.mark.parametrize("provider", ["relu-sparse", "relu-dense"])
def test_step_relu(benchmark, provider):
    # pre ~ N(0, 0.1^2) with these weights: bias -0.26 (2.6 sigma) keeps ~0.5% of F active
    # per token (L0 ~ 80 of 16384; extra_info records the measured L0)
    m = Model(relu_bias=-0.26)
    fn = step_relu_sparse if provider == "relu-sparse" else step_relu_dense
    benchmark.pedantic(fn, args=(m,), rounds=ROUNDS, warmup_rounds=1)
    t = benchmark.stats.stats.min
    benchmark.extra_info.update(_machine(), tokens_per_s=B / t)
    if provider == "relu-sparse":
        m_pad, l0 = step_relu_sparse(m)
        benchmark.extra_info.update(l0=l0, l0_frac=l0 / F, code_width=m_pad)


# ----------------------------------------------------------------------------- memory
def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(fn):
    """(peak RSS - RSS before) while fn runs, sampled every ~50 us by a thread.

    Why RSS: torch's CPU allocator has no peak counter (tracemalloc does not see it), and
    every large CPU tensor is its own mmap that glibc returns on free, so resident memory
    tracks live tensors closely. The kernels' buffer pool is emptied first, so reused buffers
    count as fresh allocations.
    """
    K.empty_cache()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(5e-5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return peak[0] - base


@pytest.mark.benchmark(group="step-peak-memory")
@pytest.mark.parametrize("provider", ["fast", "crosscoder", "embbag", "dense"])
def test_step_peak_memory(benchmark, provider):
    """Peak memory of one training step above the persistent state.

    Before the step the process holds the parameters and the Adam moments. Target (issue 3):
    the step adds <= 1.2 x one [B, F] fp32 buffer. fast / crosscoder step Adam inside backward,
    so no [F, D] gradient outlives its parameter's update, and the one pooled large buffer
    serves the encoder's [B, F] output and then each weight gradient in turn. embbag and dense
    keep both gradients until optimizer.step(), as the usual loop does.
    """
    m = make(provider)
    fn = STEPS[provider]
    fn(m)  # Adam state exists from here on
    params = sum(p.numel() * 4 for p in m.params)
    bf = B * F * 4
    peaks = []
    benchmark.pedantic(lambda: peaks.append(peak_during(lambda: fn(m))), rounds=2, warmup_rounds=0)
    peak = min(peaks)
    benchmark.extra_info.update(
        peak_above_state_MiB=peak / 2**20, one_BF_buffer_MiB=bf / 2**20, peak_over_BF=peak / bf,
        params_MiB=params / 2**20, adam_state_MiB=2 * params / 2**20)
