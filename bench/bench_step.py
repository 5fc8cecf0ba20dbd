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

As a script it times every step of one shape in one run, on any device, and writes JSON:

    python bench/bench_step.py --device cuda --shape seed --json step.json
    python bench/bench_step.py --device cpu --shape bench --rounds 1

    gemm-bf16     bare bf16 torch.mm of the encoder GEMM into a preallocated output (the floor)
    fastxc-bf16   fastxc.Crosscoder, --dtype bfloat16 (fp32 masters, bf16 GEMMs), Adam in backward
    fastxc-fp32   the same in fp32 (TF32 matmuls on CUDA)
    torch-only    the fastxc.kernels step without the fast kernels (CPU: C++ off; CUDA: the
                  plain-torch references)
    dense         the plain-torch dense crosscoder step
    embbag        the embedding_bag + index_add_ sparse-decode step
Shapes: seed = B 4096, widths 2 x 1536, F 32768, k 32 (the seed study); bench = the pytest shape
above. Peak memory: torch.cuda.max_memory_allocated on CUDA, process RSS above the state on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
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


SHAPES = {"bench": (B, WIDTHS, F, KK), "seed": (4096, (1536, 1536), 32768, 32)}


class Model:
    """Crosscoder parameters (feature-major W_enc, W_dec [F, D]) and a fused Adam."""

    def __init__(self, relu_bias=0.0, seed=0, in_backward=False, shape=SHAPES["bench"], device="cpu",
                 gemm_dtype=torch.float32, backend=None):
        b, widths, f, k = shape
        d = sum(widths)
        self.B, self.widths, self.F, self.k, self.backend = b, tuple(widths), f, k, backend
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(f, d, generator=g)
        w /= w.norm(dim=1, keepdim=True) * 10
        self.W_enc = torch.nn.Parameter(w.clone().to(device))
        self.b_enc = torch.nn.Parameter(torch.full((f,), relu_bias, device=device))
        self.W_dec = torch.nn.Parameter(w.to(device))
        self.b_dec = torch.nn.Parameter(torch.zeros(d, device=device))
        del w
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.opt = (AdamInBackward(self.params, lr=1e-4) if in_backward
                    else torch.optim.Adam(self.params, lr=1e-4, fused=True))
        self.x = torch.randn(b, d, generator=g).to(device)
        self.gemm_w = None
        if not in_backward:  # the floor's operands and preallocated GEMM output
            self.gemm_w = self.W_enc.detach() if gemm_dtype == torch.float32 else self.W_enc.detach().to(gemm_dtype)
            self.gemm_x = self.x.to(gemm_dtype)
            self.out = torch.empty(b, f, dtype=gemm_dtype, device=device)


class CrosscoderModel:
    """fastxc.Crosscoder with the optimizer fastxc.train uses."""

    def __init__(self, seed=0, shape=SHAPES["bench"], device="cpu", compute_dtype=None):
        b, widths, f, k = shape
        torch.manual_seed(seed)
        self.cc = Crosscoder(list(widths), f, "topk", k=k, device=device, compute_dtype=compute_dtype)
        self.params = list(self.cc.parameters())
        self.opt = AdamInBackward(self.params, lr=1e-4)
        self.x = torch.randn(b, sum(widths), device=device)


def step_fast(m: Model):
    vals, idx = K.topk_encode(m.x, m.W_enc, m.b_enc, m.k, backend=m.backend)
    out = K.crosscoder_loss(vals, idx, m.W_dec, m.b_dec, m.x, m.widths, backend=m.backend)
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
        dW = torch.zeros(ctx.F, x.shape[1], device=x.device).index_add_(
            0, idx.reshape(-1), (g.unsqueeze(-1) * x.unsqueeze(1)).reshape(-1, x.shape[1]))
        db = torch.zeros(ctx.F, device=x.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return None, dW, db, None


def _mse(recon, x, widths=WIDTHS):
    err = recon - x
    return sum(e.pow(2).sum(1).mean() for e in err.split(list(widths), dim=1))


def step_embbag(m: Model):
    vals, idx = _TopKEncodeIndexAdd.apply(m.x, m.W_enc, m.b_enc, m.k)
    recon = _EmbBagDecode.apply(vals, idx, m.W_dec, m.b_dec)
    _mse(recon, m.x, m.widths).backward()
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)


def step_dense(m: Model):
    pre = torch.addmm(m.b_enc, m.x, m.W_enc.t())
    vals, idx = pre.topk(m.k, dim=1, sorted=False)
    code = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
    recon = torch.addmm(m.b_dec, code, m.W_dec)
    _mse(recon, m.x, m.widths).backward()
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)


def step_gemm(m: Model):
    torch.mm(m.gemm_x, m.gemm_w.t(), out=m.out)


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


# ----------------------------------------------------------------------------- script
def _make_script(name: str, shape, device: torch.device, no_c):
    """The model of one script provider (see the module docstring)."""
    if name == "gemm-bf16":
        return Model(shape=shape, device=device, gemm_dtype=torch.bfloat16)
    if name == "fastxc-bf16":
        return CrosscoderModel(shape=shape, device=device, compute_dtype=torch.bfloat16)
    if name == "fastxc-fp32":
        return CrosscoderModel(shape=shape, device=device)
    if name == "torch-only":
        no_c(True)
        return Model(shape=shape, device=device, in_backward=True, backend="reference" if device.type == "cuda" else None)
    return Model(shape=shape, device=device)  # dense, embbag


SCRIPT_STEPS = {"gemm-bf16": step_gemm, "fastxc-bf16": step_crosscoder, "fastxc-fp32": step_crosscoder,
                "torch-only": step_fast, "dense": step_dense, "embbag": step_embbag}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_provider(name: str, shape, device: torch.device, rounds: int, warmup: int) -> dict:
    """Median step time, tokens/s and peak memory of one provider; its model is freed after."""
    import gc

    prev = os.environ.get("FASTXC_KERNELS_NO_C")

    def no_c(on):
        os.environ["FASTXC_KERNELS_NO_C"] = "1" if on else "0"

    try:
        m = _make_script(name, shape, device, no_c)
        fn = SCRIPT_STEPS[name]
        ctx = torch.no_grad if name == "gemm-bf16" else torch.enable_grad
        with ctx():
            for _ in range(max(1, warmup)):  # Adam state and every buffer exist from here on
                fn(m)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            times, peak = [], 0
            for _ in range(rounds):
                if device.type == "cuda":
                    t0 = time.perf_counter()
                    fn(m)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                else:
                    box = []

                    def timed():
                        t0 = time.perf_counter()
                        fn(m)
                        box.append(time.perf_counter() - t0)

                    peak = max(peak, peak_during(timed))
                    times.append(box[0])
            if device.type == "cuda":
                peak_total = torch.cuda.max_memory_allocated(device)
                mem = {"peak_allocated_MiB": peak_total / 2**20, "peak_above_state_MiB": (peak_total - base) / 2**20}
            else:
                mem = {"peak_rss_above_state_MiB": peak / 2**20}
        med = statistics.median(times)
        return {"median_s": med, "times_s": times, "tokens_per_s": shape[0] / med, **mem}
    finally:
        if prev is None:
            os.environ.pop("FASTXC_KERNELS_NO_C", None)
        else:
            os.environ["FASTXC_KERNELS_NO_C"] = prev
        m = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        K.empty_cache()


def main(argv=None) -> int:
    from fastxc.core.device import resolve_device

    ap = argparse.ArgumentParser(description="Time one crosscoder training step per provider, one shape, one run.")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench",
                    help="seed: B 4096, 2 x 1536, F 32768, k 32; bench: B 1024, 2 x 512, F 16384, k 32")
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per provider (the median is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--providers", default=",".join(SCRIPT_STEPS), help="comma-separated subset")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [n for n in args.providers.split(",") if n]
    unknown = [n for n in names if n not in SCRIPT_STEPS]
    if unknown or args.rounds < 1:
        print(f"error: unknown providers {unknown} (choose from {', '.join(SCRIPT_STEPS)})" if unknown
              else "error: --rounds must be >= 1", file=sys.stderr)
        return 2
    shape = SHAPES[args.shape]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 GEMMs as TF32 (fastxc-fp32, dense, embbag)
        torch.backends.cudnn.allow_tf32 = True
    b, widths, f, k = shape
    info = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            (platform.processor() or platform.machine()), "shape": args.shape, "B": b, "widths": list(widths),
            "F": f, "k": k, "rounds": args.rounds, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "tf32": device.type == "cuda"}
    results = {}
    for name in names:
        r = _time_provider(name, shape, device, args.rounds, args.warmup)
        results[name] = r
        print(f"{name:12s} {r['median_s'] * 1e3:9.1f} ms  {r['tokens_per_s']:12.0f} tok/s  " +
              "  ".join(f"{k} {v:.0f}" for k, v in r.items() if k.endswith("MiB")), flush=True)
    floor = results.get("gemm-bf16", {}).get("median_s")
    if floor:
        for r in results.values():
            r["x_gemm_bf16"] = r["median_s"] / floor
    out = {"info": info, "results": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
