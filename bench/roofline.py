"""Roofline model of one fastxc training step (topk crosscoder) on a named GPU (issue 13).

The model
---------
Every op of the step is charged

    time = max(FLOPs / peak FLOP/s of the unit it runs on,  HBM bytes / HBM bandwidth)

and the predicted step is the plain sum over ops (ops run one after another on one stream; no
overlap between ops, no kernel launch latency, no tail effects). Peaks are the datasheet
numbers, so every prediction is a lower bound on time; the ratios between steps are what the
model is for.

Which unit ("pipe") an op runs on is read from the kernels, not assumed:

    bf16   dense bf16 tensor cores (tl.dot / torch GEMM on bf16 operands)
    tf32   TF32 tensor cores (torch GEMMs on fp32 data with TF32 allowed)
    fp32   fp32 CUDA cores. fastxc's encoder GEMM on fp32 operands follows
           ``torch.get_float32_matmul_precision()``: exact IEEE fp32 FMA under torch's default
           "highest" (modelled by default), TF32 tensor cores under "high" (``--encoder-tf32``);
           the scatter's one-hot dot (``_scatter_rows_kernel``) is always IEEE. Elementwise work
           and Adam also count here.
    int    32-bit integer / compare / select issue of the CUDA cores: Hopper has 64 INT32 lanes
           per SM against 128 FP32 lanes, i.e. FP32_FLOPS / 4 simple integer ops per second
           (FP32_FLOPS counts an FMA as 2). The in-GEMM top-k selection runs here.

Bytes are HBM traffic, counted as compulsory traffic (each operand read once, each output
written once: tiles re-read from L2 are free) with one exception, read from the kernels'
grids: a gather of random table rows costs one HBM read per gathered row when the table rows
the concurrently running programs touch do not fit in L2 (``L2_USABLE`` of it; the rest holds
the streamed operands). ``sparse_decode``'s gather-sum and the CSR scatters have grids whose
fastest axis walks rows/features at a fixed column block, so their live working set is one
[rows, BLOCK_D] slab (a few MiB): the table comes from HBM once. The decoder's gather-dot
(dvals = G . W_dec rows) loops over all of D inside one program, so its working set is all of
W_dec: every one of the B*k gathered rows is an HBM read when W_dec does not fit in L2.

Dtype modes
-----------
    bf16   x, working weights, recon and the weight gradients in bf16; the tensor-core GEMMs
           in bf16; fp32 master weights and Adam moments. Adam reads the bf16 gradient and the
           fp32 master/moments and writes the fp32 master/moments plus the bf16 working copy.
           (``fastxc.train --dtype bfloat16`` / ``Crosscoder(compute_dtype=torch.bfloat16)``.)
    tf32   everything fp32; torch GEMMs (the floor, the dense reference) on TF32 tensor cores;
           fastxc's own Triton GEMM runs IEEE fp32 FMA under torch's default precision
           (``--encoder-tf32`` models it under ``torch.set_float32_matmul_precision("high")``).

The ops of the fastxc step (Triton path: ``topk_encode`` + ``crosscoder_loss`` + backward,
Adam inside backward by ``fastxc.core.optim.AdamInBackward``) are in ``fastxc_step``; each
op's docstring line says which kernel / torch call it is. Two reference points:
``gemm_floor`` (the encoder GEMM alone, bf16/TF32 tensor cores, into a [B, F] output) and
``dense_step`` (bench/bench_step.py's ``step_dense``: dense GEMMs, dense [B, F] code).

Least certain line: the top-k epilogue. Its work is integer compare/select steps of Triton's
bitonic ``tl.topk`` over each [BLOCK_M, BLOCK_N] tile of int64 keys, counted exactly from
triton/language/standard.py's ``sort_impl``, times an *estimated* instruction cost per step
(``OPS_PER_COMPARE_SWAP``); the cross-thread shuffles / layout conversions the network needs
are not counted, and it is charged after the MMA work (no overlap with another CTA's MMAs).
The summary also prints the ratio with that epilogue fully hidden.

Not priced (each would only add time): kernel launch latency (~40 launches a step; matters at
the small ``bench`` shape); Triton / cuBLAS reaching less than the datasheet peak; the
encoder grid's rasterization (row blocks fastest, no grouping) re-reading x once per feature
block of 128, from L2 only while x fits there (seed shape: x is 24 MiB in bf16, 48 MiB in
fp32, against a 50 MiB L2); torch.topk's radix passes beyond the first (served from L2).

    python bench/roofline.py --shape seed --gpu h100 --dtype bf16 [--dense]
    python bench/roofline.py --batch 2048 --widths 1024 1024 --n-features 65536 --k 64 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

# ----------------------------------------------------------------------------- GPUs
# NVIDIA H100 Tensor Core GPU datasheet (SXM5 column) and the Hopper architecture whitepaper:
# dense (no 2:4 sparsity) peaks; the datasheet's headline tensor numbers are "with sparsity", i.e.
# twice these. L2: 50 MB on the SXM5 GH100.
H100_BF16_FLOPS = 989e12  # bf16 / fp16 tensor core, dense (1979 with sparsity)
H100_TF32_FLOPS = 494e12  # TF32 tensor core, dense (989 with sparsity)
H100_FP32_FLOPS = 67e12  # fp32 CUDA cores (non-tensor), FMA = 2 FLOPs
H100_HBM_BYTES_S = 3.35e12  # HBM3, 80 GB
# NVIDIA H200 Tensor Core GPU datasheet (SXM): the same GH100 compute, HBM3e 141 GB at 4.8 TB/s.
H200_BF16_FLOPS = H100_BF16_FLOPS
H200_TF32_FLOPS = H100_TF32_FLOPS
H200_FP32_FLOPS = H100_FP32_FLOPS
H200_HBM_BYTES_S = 4.8e12
GH100_L2_BYTES = 50 * 2**20
# Hopper whitepaper, SM sub-partition: 16 INT32 lanes next to 32 FP32 lanes -> integer issue
# (add/compare/select/logic/shift) is half the FP32 FMA rate = FP32_FLOPS / 4 ops per second.
INT_OPS_PER_FP32_FLOP = 0.25
# share of L2 a gathered table's live working set may use and still be served from L2
L2_USABLE = 0.5


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float
    tf32_flops: float
    fp32_flops: float
    hbm_bytes_s: float
    l2_bytes: int = GH100_L2_BYTES

    def peak(self, pipe: str) -> float:
        """Peak ops/s of one pipe (see the module docstring)."""
        return {"bf16": self.bf16_flops, "tf32": self.tf32_flops, "fp32": self.fp32_flops,
                "int": self.fp32_flops * INT_OPS_PER_FP32_FLOP}[pipe]


GPUS = {
    "h100": GPU("H100 SXM", H100_BF16_FLOPS, H100_TF32_FLOPS, H100_FP32_FLOPS, H100_HBM_BYTES_S),
    "h200": GPU("H200 SXM", H200_BF16_FLOPS, H200_TF32_FLOPS, H200_FP32_FLOPS, H200_HBM_BYTES_S),
}


# ----------------------------------------------------------------------------- shapes, dtypes
@dataclass(frozen=True)
class Shape:
    batch: int  # B rows
    widths: tuple[int, ...]  # source widths d_i
    n_features: int  # F
    k: int  # top-k

    @property
    def D(self) -> int:
        return sum(self.widths)


SHAPES = {
    "seed": Shape(4096, (1536, 1536), 32768, 32),  # issue 13's seed run
    "bench": Shape(1024, (512, 512), 16384, 32),  # bench/bench_step.py
}


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element and the GEMM pipes of one dtype mode."""
    mode: str
    data: int  # x, and the code values vals
    weight: int  # working W_enc / W_dec / biases, and their gradients (the scatters write W.dtype)
    act: int  # recon [B, D] and the dense step's [B, F] tensors
    fastxc_gemm: str  # pipe of fastxc's Triton encoder GEMM
    torch_gemm: str  # pipe of torch GEMMs (floor, dense step)


def dtypes(mode: str, encoder_tf32: bool = False) -> Dtypes:
    if mode == "bf16":
        return Dtypes("bf16", 2, 2, 2, "bf16", "bf16")
    if mode == "tf32":
        return Dtypes("tf32", 4, 4, 4, "tf32" if encoder_tf32 else "fp32", "tf32")
    raise ValueError(f"dtype mode must be bf16 or tf32, got {mode!r}")


FP32 = 4  # fp32 master weights, Adam moments, fp32 intermediates (resid, G, dvals)
I64 = 8  # idx, CSR order, top-k keys

# ----------------------------------------------------------------------------- kernel constants
# (copied from fastxc/kernels: a test checks they still match)
ENC_BLOCK_N = 128  # encode.py _triton_topk: BLOCK_N = max(128, BLOCK_TOPK) on a GPU
DEC_BLOCK_D = 128  # decode.py BLOCK_D: column block of gather-sum / gather-dot / scatter
SCATTER_BLOCK_F = 32  # decode.py BLOCK_F: features per scatter program (rows of the one-hot dot)
SCATTER_BLOCK_NNZ = 32  # decode.py BLOCK_NNZ (was BLOCK_E): entries per scatter loop step

# Estimated CUDA-core instructions (int pipe) per element step of tl.topk's bitonic network on
# int64 keys: 64-bit compare ~3 (two 32-bit compares + combine), flip/position test ~1,
# 64-bit select 2. Estimate, not measured; shuffles / layout conversions are not included.
OPS_PER_COMPARE_SWAP = 6
# ... and per pre-activation element to build the key: bias add, float->ordered-int (compare,
# xor, select), widen, shift, or with the feature id, padding select (64-bit ops count 2).
KEY_PACK_OPS = 10
# fp32 FLOPs per parameter of one Adam update (moments 7, denominator 3, update 3)
ADAM_FLOPS_PER_PARAM = 13


# ----------------------------------------------------------------------------- ops
ADAM_GROUP = "Adam (all parameters, dense)"


@dataclass
class Op:
    name: str
    flops: float  # operations executed on `pipe` (FLOPs, or integer ops on the int pipe)
    bytes: float  # HBM bytes moved
    pipe: str  # bf16 | tf32 | fp32 | int
    phase: str  # fwd | bwd
    note: str = ""
    times: float = 1.0  # how many times the step runs it (already folded into flops/bytes)
    group: str = ""  # ops that are one piece of work (the Adam hooks) share a group for the verdict

    def __post_init__(self):
        self.group = self.group or self.name

    def compute_s(self, gpu: GPU) -> float:
        return self.flops / gpu.peak(self.pipe)

    def memory_s(self, gpu: GPU) -> float:
        return self.bytes / gpu.hbm_bytes_s

    def time_s(self, gpu: GPU) -> float:
        return max(self.compute_s(gpu), self.memory_s(gpu))

    def bound(self, gpu: GPU) -> str:
        return "compute" if self.compute_s(gpu) >= self.memory_s(gpu) else "memory"

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf


def gathered_bytes(n_gathers: int, row_bytes: float, table_rows: int, live_bytes: float,
                   gpu: GPU) -> float:
    """HBM bytes of gathering n_gathers random rows of a [table_rows, row] table.

    live_bytes: the table bytes the concurrently running programs touch (see the module
    docstring). When that fits in the usable L2 every table row comes from HBM at most once,
    otherwise every gathered row is an HBM read.
    """
    if live_bytes <= L2_USABLE * gpu.l2_bytes:
        return min(n_gathers, table_rows) * row_bytes
    return n_gathers * row_bytes


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def topk_network_steps(n: int, k: int) -> int:
    """Element compare/select steps of Triton's ``tl.topk`` (k of n, powers of two) on one row.

    From triton/language/standard.py ``sort_impl``: bitonic merges of stages 1..log k over all n
    elements (stage i is i rounds), then for each further stage a pairwise max halves the row and
    a log k-round merge runs on what is left.
    """
    log_n, log_k = n.bit_length() - 1, k.bit_length() - 1
    if log_k == 0:
        return n - 1
    steps, size = sum(i for i in range(1, log_k + 1)) * n, n
    for _ in range(log_k + 1, log_n + 1):
        size //= 2
        steps += size + log_k * size
    return steps


def encoder_gemm(s: Shape, dt: Dtypes) -> Op:
    """``_encode_topk_kernel`` main loop: pre = x @ W_enc.T (the [B, F] result never leaves
    registers; its candidates are written by the epilogue, see ``topk_epilogue``)."""
    B, D, F = s.batch, s.D, s.n_features
    return Op("encoder GEMM x @ W_enc^T", 2 * B * F * D, B * D * dt.data + (F * D + F) * dt.weight,
              dt.fastxc_gemm, "fwd", f"2BFD; x, W_enc, b_enc read once ({dt.fastxc_gemm} pipe)")


def topk_epilogue(s: Shape, dt: Dtypes) -> Op:
    """``_encode_topk_kernel`` epilogue: int64 keys, ``tl.topk`` per [BLOCK_M, BLOCK_N] tile,
    candidates [B, F/BLOCK_N * kp] int64 written."""
    B, F = s.batch, s.n_features
    kp = _pow2(s.k)
    bn = max(ENC_BLOCK_N, kp)
    n_tiles = math.ceil(F / bn)
    per_elem = topk_network_steps(bn, kp) / bn * OPS_PER_COMPARE_SWAP + KEY_PACK_OPS
    return Op("top-k epilogue (in GEMM, est.)", per_elem * B * n_tiles * bn, B * n_tiles * kp * I64, "int", "fwd",
              f"~{per_elem:.0f} int ops per pre-activation (estimate); candidates B x {n_tiles * kp} int64")


def final_topk(s: Shape) -> Op:
    """``cand.topk(k)`` over [B, n_cand] int64 keys, then ``_unpack_keys`` + relu_ + cast on [B, k]."""
    B, k = s.batch, s.k
    kp = _pow2(k)
    n_cand = math.ceil(s.n_features / max(ENC_BLOCK_N, kp)) * kp
    unpack = B * k * 60  # ~6 small elementwise kernels over [B, k] (shift, where, and, relu_, cast)
    return Op("final top-k over candidates", 0, B * n_cand * I64 + B * k * 2 * I64 + unpack, "int", "fwd",
              "torch.topk on int64 keys (radix passes served from L2) + unpack")


def sparse_decode(s: Shape, dt: Dtypes, gpu: GPU) -> Op:
    """``_gather_sum_kernel``: recon[b] = sum_j vals[b,j] W_dec[idx[b,j]] + b_dec, grid (B, D/BLOCK_D)."""
    B, D, F, k = s.batch, s.D, s.n_features, s.k
    live = F * DEC_BLOCK_D * dt.weight  # programs at one column block touch a [F, BLOCK_D] slab
    w = gathered_bytes(B * k, D * dt.weight, F, live, gpu)
    code = B * k * (dt.data + I64)
    return Op("sparse decode (gather-sum)", 2 * B * k * D, w + code + D * dt.weight + B * D * dt.act, "fp32", "fwd",
              f"B*k={B * k} rows of W_dec gathered; slab {live / 2**20:.0f} MiB "
              + ("in L2: W_dec read once" if w < B * k * D * dt.weight else "> L2: every row from HBM"))


def loss_stats(s: Shape, dt: Dtypes) -> Op:
    """``_col_stats_kernel``: per-column sum (r-x)^2, sum x, sum x^2 -> per-source MSE / FVU."""
    B, D = s.batch, s.D
    return Op("loss: per-source MSE/FVU stats", 6 * B * D, B * D * (dt.act + dt.data) + 3 * D * FP32, "fp32", "fwd",
              "reads recon and x once")


def residual(s: Shape, dt: Dtypes) -> Op:
    """``resid = recon.float() - x.float()`` (saved for backward): in bf16 two casts + a subtract."""
    B, D = s.batch, s.D
    per = (dt.act + FP32 + dt.data + FP32 if dt.act != FP32 else 0) + 3 * FP32
    return Op("loss: residual recon - x (fp32)", B * D, B * D * per, "fp32", "fwd",
              "unfused torch ops" + (" (2 casts + sub)" if dt.act != FP32 else ""))


def loss_backward(s: Shape) -> Op:
    """``G = resid * fac[col_src]`` and ``db_dec = G.sum(0)`` (decoder-norm penalty off for topk)."""
    B, D = s.batch, s.D
    return Op("loss bwd: G = resid*fac, db_dec", 2 * B * D, 3 * B * D * FP32, "fp32", "bwd",
              "two torch ops over [B, D] fp32; topk: no decoder-norm penalty")


def csr_index(s: Shape, times: int) -> Op:
    """``csr_by_feature``: stable argsort of the B*k feature ids (cub radix sort, 8 passes of 8
    bits over int64 key + value), bincount, cumsum; then tok / wgt / feat gathers by ``order``."""
    nnz = s.batch * s.k
    per = 8 * 2 * 2 * I64 + 4 * I64 + 6 * I64  # sort passes r+w keys+vals, bincount/cumsum, gathers
    return Op(f"CSR index by feature (x{times})", 0, times * (nnz * per + (s.n_features + 1) * I64 * 2), "int",
              "bwd", "argsort of B*k ids; built once in the decoder and once in the encoder backward", times)


def gather_dot(s: Shape, dt: Dtypes, gpu: GPU) -> Op:
    """``_gather_dot_kernel``: dvals[b,j] = <G[b], W_dec[idx[b,j]]>, grid (B, k/16), all of D
    inside one program."""
    B, D, F, k = s.batch, s.D, s.n_features, s.k
    w = gathered_bytes(B * k, D * dt.weight, F, F * D * dt.weight, gpu)
    return Op("decoder bwd: dvals = G . W_dec rows", 2 * B * k * D, w + B * D * FP32 + B * k * (I64 + FP32), "fp32",
              "bwd", "live set = all of W_dec: " + ("served from L2" if w < B * k * D * dt.weight
                                                    else "every gathered row from HBM"))


def scatter(s: Shape, dt: Dtypes, gpu: GPU, what: str, src_bytes: int) -> Op:
    """``_scatter_rows_kernel``: dW[f] = sum over feature f's entries of w * src[token], every
    row of dW written once. Grid (F/BLOCK_F, D/BLOCK_D); each loop step is a one-hot
    [BLOCK_F, BLOCK_NNZ] x [BLOCK_NNZ, BLOCK_D] tl.dot in fp32 ieee (BLOCK_F times the useful FLOPs)."""
    B, D, F, k = s.batch, s.D, s.n_features, s.k
    n_fb = math.ceil(F / SCATTER_BLOCK_F)
    n_db = math.ceil(D / DEC_BLOCK_D)
    steps = math.ceil(B * k / n_fb / SCATTER_BLOCK_NNZ)  # loop steps per program, features used evenly
    flops = n_fb * n_db * steps * 2 * SCATTER_BLOCK_F * SCATTER_BLOCK_NNZ * DEC_BLOCK_D
    src = gathered_bytes(B * k, D * src_bytes, B, B * DEC_BLOCK_D * src_bytes, gpu)
    entries = B * k * (2 * I64 + FP32)  # tok, feat, weight per entry
    return Op(f"{what} scatter (one-hot dot)", flops, src + entries + F * D * dt.weight, "fp32", "bwd",
              f"executed = {SCATTER_BLOCK_F} x useful 2BkD ({2 * B * k * D / 1e9:.2f} GFLOP); writes all F rows")


def adam(what: str, n: int, dt: Dtypes) -> Op:
    """torch fused Adam on every element (AdamInBackward steps the whole parameter: the gradient
    is dense [F, D], zero rows included). fp32 master p and moments m, v: read + write each;
    the gradient read in the weight dtype; bf16: the bf16 working copy written too."""
    per = 3 * 2 * FP32 + dt.weight + (dt.weight if dt.weight != FP32 else 0)
    return Op(f"Adam {what}", ADAM_FLOPS_PER_PARAM * n, n * per, "fp32", "bwd",
              f"{n / 1e6:.1f}M params x {per} B (p, m, v r+w; grad r" + (", bf16 copy w)" if dt.weight != FP32 else ")"),
              group=ADAM_GROUP)


def fastxc_step(s: Shape, mode: str, gpu: GPU, encoder_tf32: bool = False) -> list[Op]:
    """The ops of one fastxc topk step, in execution order (x is data: no dx is computed)."""
    dt = dtypes(mode, encoder_tf32)
    B, D, F, k = s.batch, s.D, s.n_features, s.k
    return [
        encoder_gemm(s, dt),
        topk_epilogue(s, dt),
        final_topk(s),
        sparse_decode(s, dt, gpu),
        loss_stats(s, dt),
        residual(s, dt),
        loss_backward(s),
        csr_index(s, 2),
        gather_dot(s, dt, gpu),
        scatter(s, dt, gpu, "dW_dec", FP32),  # gathers rows of G (fp32)
        adam("W_dec + b_dec", F * D + D, dt),
        Op("encoder bwd: mask, db_enc", B * k, B * k * (dt.data + FP32 * 2 + I64) + 3 * F * FP32, "fp32", "bwd",
           "where(vals != 0), index_add_ into [F]"),
        scatter(s, dt, gpu, "dW_enc", dt.data),  # gathers rows of x
        adam("W_enc + b_enc", F * D + F, dt),
    ]


def gemm_floor(s: Shape, mode: str) -> Op:
    """The floor: the encoder GEMM alone, dense, on tensor cores (bf16, or TF32 in tf32 mode),
    into a [B, F] output (bench_step's ``step_gemm``)."""
    dt = dtypes(mode)
    B, D, F = s.batch, s.D, s.n_features
    return Op("GEMM floor: torch.mm(x, W_enc.T)", 2 * B * F * D, (B * D + F * D + B * F) * dt.act, dt.torch_gemm, "fwd",
              "dense encoder GEMM alone")


def dense_step(s: Shape, mode: str) -> list[Op]:
    """bench_step's ``step_dense`` in torch on the GPU: addmm, topk over [B, F], scatter into a
    dense code, addmm decode, MSE; backward: 3 GEMMs (dW_dec, dcode, dW_enc; no dx), the dense
    [B, F] gradients; fused torch Adam with the same master/moment layout as the fastxc step."""
    dt = dtypes(mode)
    B, D, F, k = s.batch, s.D, s.n_features, s.k
    a, w, g = dt.act, dt.weight, dt.torch_gemm
    BF, BD, FD = B * F, B * D, F * D
    gemm = 2 * B * F * D
    return [
        Op("encode GEMM -> pre [B, F]", gemm, (BD + FD) * a + F * w + BF * a, g, "fwd"),
        Op("topk over [B, F]", 0, BF * a + B * k * (a + I64), "int", "fwd"),
        Op("dense code: zeros + scatter", 0, BF * a + B * k * (a + I64) * 2, "int", "fwd"),
        Op("decode GEMM code @ W_dec", gemm, (BF + FD) * a + D * w + BD * a, g, "fwd"),
        Op("MSE over sources (torch ops)", 4 * BD, 6 * BD * a, "fp32", "fwd"),
        Op("MSE backward (torch ops)", 3 * BD, 4 * BD * a, "fp32", "bwd"),
        Op("dW_dec = code^T @ drecon", gemm, (BF + BD) * a + FD * w, g, "bwd"),
        Op("dcode = drecon @ W_dec^T", gemm, (BD + FD) * a + BF * a, g, "bwd"),
        Op("code/topk backward -> dpre [B, F]", 0, 3 * BF * a, "int", "bwd", "gather, zeros, scatter"),
        Op("dW_enc = dpre^T @ x, db_enc", gemm, (BF + BD) * a + FD * w + BF * a, g, "bwd"),
        adam("all parameters", 2 * FD + F + D, dt),
    ]


# ----------------------------------------------------------------------------- report
@dataclass
class Report:
    shape: Shape
    gpu: GPU
    mode: str
    ops: list[Op]
    floor: Op
    dense: list[Op]
    encoder_tf32: bool = False
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self):
        total = self.step_s
        self.rows = [{"op": o.name, "phase": o.phase, "pipe": o.pipe, "flops": o.flops, "bytes": o.bytes,
                          "intensity": None if math.isinf(o.intensity) else o.intensity,
                          "bound": o.bound(self.gpu), "us": o.time_s(self.gpu) * 1e6,
                          "share": o.time_s(self.gpu) / total, "note": o.note} for o in self.ops]

    @property
    def step_s(self) -> float:
        return sum(o.time_s(self.gpu) for o in self.ops)

    @property
    def floor_s(self) -> float:
        return self.floor.time_s(self.gpu)

    @property
    def dense_s(self) -> float:
        return sum(o.time_s(self.gpu) for o in self.dense)

    def beyond_gemm(self) -> list[tuple[str, float]]:
        """(group, seconds) of every op but the encoder GEMM, costliest first (the Adam hooks of
        both weights count as one: one optimizer step)."""
        acc: dict[str, float] = {}
        for o in self.ops[1:]:
            acc[o.group] = acc.get(o.group, 0.0) + o.time_s(self.gpu)
        return sorted(acc.items(), key=lambda kv: -kv[1])

    def totals(self) -> dict:
        other, other_s = self.beyond_gemm()[0]
        epi = next(o for o in self.ops if o.name.startswith("top-k epilogue"))  # compute part hidden
        hidden = self.step_s - epi.compute_s(self.gpu) + epi.memory_s(self.gpu) if epi.bound(self.gpu) == "compute" \
            else self.step_s
        adam_s = sum(o.time_s(self.gpu) for o in self.ops if o.name.startswith("Adam"))
        enc = self.ops[0].time_s(self.gpu)
        return {"encoder_gemm_us": enc * 1e6, "encoder_gemm_over_floor": enc / self.floor_s, "step_us": self.step_s * 1e6, "floor_us": self.floor_s * 1e6, "step_over_floor": self.step_s / self.floor_s,
                    "within_1p3x_floor": self.step_s <= 1.3 * self.floor_s,
                    "costliest_other_op": other, "costliest_other_us": other_s * 1e6,
                    "beyond_gemm_us": {g: t * 1e6 for g, t in self.beyond_gemm()},
                    "adam_us": adam_s * 1e6, "adam_over_floor": adam_s / self.floor_s,
                    "step_over_floor_epilogue_hidden": hidden / self.floor_s,
                    "dense_step_us": self.dense_s * 1e6, "dense_over_floor": self.dense_s / self.floor_s,
                    "fastxc_speedup_over_dense": self.dense_s / self.step_s}

    def to_json(self) -> dict:
        def op_dict(o: Op) -> dict:
            return {"op": o.name, "phase": o.phase, "pipe": o.pipe, "flops": o.flops, "bytes": o.bytes,
                        "bound": o.bound(self.gpu), "us": o.time_s(self.gpu) * 1e6, "note": o.note}
        return {"shape": dict(asdict(self.shape), D=self.shape.D), "gpu": asdict(self.gpu), "dtype": self.mode,
                    "encoder_tf32": self.encoder_tf32, "ops": self.rows, "gemm_floor": op_dict(self.floor),
                    "dense_step": [op_dict(o) for o in self.dense], "totals": self.totals()}


def build(shape: Shape, gpu: str = "h100", mode: str = "bf16", encoder_tf32: bool = False) -> Report:
    g = GPUS[gpu]
    return Report(shape, g, mode, fastxc_step(shape, mode, g, encoder_tf32), gemm_floor(shape, mode),
                  dense_step(shape, mode), encoder_tf32)


def _fmt(x: float, unit: float) -> str:
    return f"{x / unit:,.2f}" if x else "-"


def render(r: Report, show_dense: bool = False) -> str:
    s, g = r.shape, r.gpu
    out = [f"fastxc topk step roofline: B={s.batch} widths={list(s.widths)} (D={s.D}) F={s.n_features} k={s.k}, "
           f"{g.name} ({g.bf16_flops / 1e12:.0f} bf16 / {g.tf32_flops / 1e12:.0f} tf32 / {g.fp32_flops / 1e12:.0f} fp32 "
           f"TFLOP/s, {g.hbm_bytes_s / 1e12:.2f} TB/s), dtype {r.mode}"
           + (" (encoder GEMM on TF32)" if r.encoder_tf32 else ""),
           "time = max(FLOPs / peak of the op's pipe, HBM bytes / bandwidth); step = sum over ops",
           "(* on the int pipe: G integer ops; est. = estimated instruction counts, see the module docstring)", ""]
    hdr = f"{'op':<36} {'ph':<3} {'pipe':<4} {'GFLOP*':>9} {'MB':>9} {'FLOP/B':>8} {'bound':<7} {'us':>9} {'share':>6}"

    def line(name, phase, pipe, flops, nbytes, bound, us, share):
        ai = f"{flops / nbytes:,.1f}" if nbytes and flops else "-"
        return (f"{name:<36} {phase:<3} {pipe:<4} {_fmt(flops, 1e9):>9} {_fmt(nbytes, 1e6):>9} {ai:>8} {bound:<7} "
                f"{us:>9,.1f} {share:>6}")

    out += [hdr, "-" * len(hdr)]
    for row in r.rows:
        out.append(line(row["op"], row["phase"], row["pipe"], row["flops"], row["bytes"], row["bound"], row["us"],
                        f"{100 * row['share']:.1f}%"))
    out.append("-" * len(hdr))
    t = r.totals()
    out.append(line("predicted fastxc step", "", "", sum(o.flops for o in r.ops), sum(o.bytes for o in r.ops), "",
                    t["step_us"], "100%"))
    f = r.floor
    out.append(line(f.name, "", f.pipe, f.flops, f.bytes, f.bound(g), t["floor_us"], ""))
    out.append("")
    out.append(f"predicted step {t['step_us']:,.0f} us; GEMM floor ({f.pipe} tensor cores) {t['floor_us']:,.0f} us; "
               f"step / floor = {t['step_over_floor']:.2f} x")
    out.append(f"costliest op besides the encoder GEMM: {t['costliest_other_op']} "
               f"({t['costliest_other_us']:,.0f} us, {t['costliest_other_us'] / t['floor_us']:.2f} x the floor)")
    enc = r.ops[0].time_s(g) / r.floor_s
    if enc > 1.3:
        out.append(f"the encoder GEMM itself is {enc:.2f} x the floor: it runs on the {r.ops[0].pipe} pipe, "
                   f"the floor on {f.pipe} tensor cores")
    if t["within_1p3x_floor"]:
        out.append("verdict: within 1.3 x the GEMM floor")
    else:
        culprit = "the encoder GEMM's precision (fp32 FMA)" if enc > 1.3 else t["costliest_other_op"]
        out.append(f"verdict: ABOVE 1.3 x the GEMM floor ({t['step_over_floor']:.2f} x); "
                   f"{culprit} keeps it from the floor")
    out.append("  time beyond the encoder GEMM, costliest first (x the floor): " + "; ".join(
        f"{g} {us:,.0f} us ({us / t['floor_us']:.2f} x)" for g, us in list(t["beyond_gemm_us"].items())[:4]))
    out.append(f"  Adam alone (memory-bound, every parameter every step): {t['adam_us']:,.0f} us = "
               f"{t['adam_over_floor']:.2f} x the floor")
    out.append(f"  with the top-k epilogue fully hidden under the MMA: {t['step_over_floor_epilogue_hidden']:.2f} x")
    if r.mode == "tf32" and not r.encoder_tf32:
        out.append("  tf32: fastxc's Triton GEMM runs IEEE fp32 FMA under torch's default matmul precision; "
                   "--encoder-tf32 models it under torch.set_float32_matmul_precision('high')")
    sp = t["fastxc_speedup_over_dense"]
    out.append(f"dense plain-torch step: {t['dense_step_us']:,.0f} us = {t['dense_over_floor']:.2f} x the floor "
               f"(fastxc predicted {sp:.2f} x faster)" if sp >= 1 else
               f"dense plain-torch step: {t['dense_step_us']:,.0f} us = {t['dense_over_floor']:.2f} x the floor "
               f"(fastxc predicted {1 / sp:.2f} x SLOWER)")
    if show_dense:
        out += ["", "dense plain-torch step:", hdr, "-" * len(hdr)]
        total = r.dense_s
        for o in r.dense:
            out.append(line(o.name, o.phase, o.pipe, o.flops, o.bytes, o.bound(g), o.time_s(g) * 1e6,
                            f"{100 * o.time_s(g) / total:.1f}%"))
    return "\n".join(out)


def parse_shape(a: argparse.Namespace) -> Shape:
    base = SHAPES[a.shape] if a.shape else SHAPES["seed"]
    widths = tuple(a.widths) if a.widths else base.widths
    shape = Shape(a.batch or base.batch, widths, a.n_features or base.n_features, a.k or base.k)
    if shape.batch < 1 or shape.n_features < 1 or not 1 <= shape.k <= shape.n_features or min(widths) < 1:
        raise SystemExit(f"bad shape {shape}")
    return shape


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), help="named shape (default seed); explicit flags override")
    p.add_argument("--batch", type=int)
    p.add_argument("--widths", type=int, nargs="+", help="source widths d_i (D = their sum)")
    p.add_argument("--n-features", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--dtype", choices=["bf16", "tf32"], default="bf16")
    p.add_argument("--encoder-tf32", action="store_true",
                   help="tf32 mode: model fastxc's encoder GEMM on TF32 tensor cores instead of fp32 FMA")
    p.add_argument("--dense", action="store_true", help="also print the dense plain-torch step's ops")
    p.add_argument("--json", metavar="FILE", help="write the ops and totals as JSON")
    a = p.parse_args(argv)
    r = build(parse_shape(a), a.gpu, a.dtype, a.encoder_tf32)
    print(render(r, a.dense))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r.to_json(), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
