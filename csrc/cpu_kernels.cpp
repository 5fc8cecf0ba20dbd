// fastxc._C CPU kernels for fastxc.kernels (fp32, raw buffers, OpenMP, GIL released).
// fastxc.kernels imports them optionally and falls back to torch ops without them;
// bench/bench_step.py measures both.
//
// Weight layout: every kernel that reads or writes a weight table takes it as an [F, D]
// row-major buffer (transposed = false) or as the [D, F] row-major buffer of which the
// table is the transpose (transposed = true: an nn.Linear(F, D).weight decoder, passed to
// the ops as W.T), and reads it in place. Both layouts give the same bits: every output element
// is summed in the same order (the [D, F] kernels only change which loop runs outside, and
// copy cache-sized blocks of the table into a local [features, columns] buffer first), and
// dot() has a fixed lane structure that no alignment or call site changes.
//
//   row_topk(pre [B, F], bias [F] or empty, k, vals [B, k], idx [B, k] int64)
//     the k largest entries of each row of pre + bias (unordered; the bias add is fused here
//     so the GEMM output is read once and never rewritten), a bounded min-heap per row: on random
//     data a row of 16384 costs one compare per entry and ~k log(F/k) heap updates, 3-4x less
//     than torch.topk's per-row partial sort.
//   csr_by_feature(flat_idx [nnz] int64, F, crow [F+1] int64, order [nnz] int64)
//     counting sort of the code entries by feature (stable): O(nnz + F) on one thread, where
//     torch's parallel argsort of 32768 ids took 20-60 ms on the shared 2-core machine.
//   gather_sum(idx [B, k] int64, vals [B, k], w, transposed, bias [D] or empty, out [B, D])
//     out[b] = bias + sum_j vals[b, j] * W[idx[b, j]] (the sparse decode; W = w or w^T).
//     [D, F]: one thread owns 16 columns at a time, copies those 16 rows of w into a
//     [F, 16] block (1 MiB at F = 16384: L2-sized) and runs every code entry over it.
//   decode_loss_fwd(idx [B, k] int64, vals [B, k], w, transposed, bias [D] or empty, x [B, D],
//                   col_src [D] int32, recon [B, D], resid [B, D], stats [S] f64, colsum [2, D] f64)
//     the fused sparse decode + squared error: recon[b] = bias + sum_j vals w[idx], resid =
//     recon - x, stats[s] = sum ||resid_s||^2, colsum = (sum_b x, sum_b x^2) per column (the
//     FVU denominator, exact 0 for one row). One pass over the rows instead of ~8 torch ops, each a parallel region
//     that costs milliseconds of thread hand-off on a loaded 2-core machine ([D, F]: the
//     decode of gather_sum first, then the same pass over the rows).
//   gather_dot(idx [B, k] int64, g [B, D], w [F, D], out [B, k])
//     out[b, j] = <g[b], w[idx[b, j]]>  (torch's bmm on [c, k, D] x [c, D, 1] is a batched
//     mat-vec that runs far below memory speed). [D, F] tables take scatter_rows with an empty
//     out (the dots of a feature's entries from one copied block).
//   scatter_rows(crow [F+1], order [nnz], k, wgt [nnz] (flat, read at order), x [B, D],
//                out (the table's layout) or empty, dot_w (same layout) or empty, dot_out [nnz]
//                or empty, pen_c [F] or empty, pen_inv [F, S], col_src [D] int32, transposed)
//     out[f] = sum_{e in CSR row f} wgt[e] * x[e / k] (+ pen_c[f] * dot_w[f] * pen_inv[f, src])
//     and, when dot_out is given, dot_out[e] = <x[e / k], dot_w[f]> for the same entries, so
//     the decoder's dW and dvals share one pass over each active decoder row. One thread owns
//     a feature row: every output row is written exactly once (zero for unused features),
//     deterministic, no atomics. [D, F]: a thread owns 16 features at a time, copies their
//     columns of dot_w into a local [16, D] block, computes the 16 rows there exactly as the
//     [F, D] kernel does, and writes them back as 64-byte pieces of the [D, F] rows.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace py = pybind11;

namespace {

using f32arr = py::array_t<float, py::array::c_style>;
using i64arr = py::array_t<int64_t, py::array::c_style>;
using i32arr = py::array_t<int32_t, py::array::c_style>;

void need(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("fastxc._C: " + msg);
}

// <a, b> over n floats with 8 explicit lanes (lane l sums the elements i = l mod 8) and a
// fixed final order: the same bits for the same values whatever the pointers' alignment or the
// caller (noinline: one machine code), so the [F, D] and [D, F] kernels agree exactly. The
// compiler vectorises the lane loop without reassociating anything.
__attribute__((noinline)) float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + tail;
}

inline void axpy(float s, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += s * x[i];
}

// min-heap of (value, index) on parallel arrays; h[0] is the smallest kept value
inline void sift_down(float* hv, int64_t* hi, int64_t k, int64_t pos) {
  while (true) {
    int64_t l = 2 * pos + 1, r = l + 1, m = pos;
    if (l < k && hv[l] < hv[m]) m = l;
    if (r < k && hv[r] < hv[m]) m = r;
    if (m == pos) return;
    std::swap(hv[m], hv[pos]);
    std::swap(hi[m], hi[pos]);
    pos = m;
  }
}

void row_topk(f32arr pre, f32arr bias, int64_t k, f32arr vals, i64arr idx) {
  need(pre.ndim() == 2, "row_topk: pre must be [B, F]");
  const int64_t B = pre.shape(0), F = pre.shape(1);
  need(bias.size() == 0 || bias.size() == F, "row_topk: bias must be [F] or empty");
  need(k >= 1 && k <= F, "row_topk: k must be in [1, F]");
  need(vals.ndim() == 2 && vals.shape(0) == B && vals.shape(1) == k, "row_topk: vals must be [B, k]");
  need(idx.ndim() == 2 && idx.shape(0) == B && idx.shape(1) == k, "row_topk: idx must be [B, k]");
  const float* p = pre.data();
  const float* bp = bias.size() ? bias.data() : nullptr;
  float* ov = vals.mutable_data();
  int64_t* oi = idx.mutable_data();
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const float* row = p + b * F;
    float* hv = ov + b * k;
    int64_t* hi = oi + b * k;
    for (int64_t j = 0; j < k; ++j) {
      hv[j] = row[j] + (bp ? bp[j] : 0.f);
      hi[j] = j;
    }
    for (int64_t j = k / 2 - 1; j >= 0; --j) sift_down(hv, hi, k, j);
    float lo = hv[0];
    for (int64_t f = k; f < F; ++f) {
      const float v = row[f] + (bp ? bp[f] : 0.f);
      if (v > lo) {
        hv[0] = v;
        hi[0] = f;
        sift_down(hv, hi, k, 0);
        lo = hv[0];
      }
    }
  }
}

void csr_by_feature(i64arr flat, int64_t F, i64arr crow, i64arr order) {
  const int64_t nnz = flat.size();
  need(crow.size() == F + 1 && order.size() == nnz, "csr_by_feature: crow must be [F+1], order [nnz]");
  const int64_t* fi = flat.data();
  for (int64_t e = 0; e < nnz; ++e) need(fi[e] >= 0 && fi[e] < F, "csr_by_feature: feature id out of range");
  int64_t* cr = crow.mutable_data();
  int64_t* od = order.mutable_data();
  py::gil_scoped_release nogil;
  std::memset(cr, 0, sizeof(int64_t) * (F + 1));
  for (int64_t e = 0; e < nnz; ++e) ++cr[fi[e] + 1];
  for (int64_t f = 0; f < F; ++f) cr[f + 1] += cr[f];
  std::vector<int64_t> fill(cr, cr + F);
  for (int64_t e = 0; e < nnz; ++e) od[fill[fi[e]]++] = e;
}

// --------------------------------------------------------------------- sparse decode
// Columns of one [D, F] tile of the transposed-table kernels: 16 floats = one 64-byte line
// of each copied row; F x 16 floats (1 MiB at F = 16384) stay in L2 while every code entry
// reads them.
constexpr int64_t TILE = 16;
// Features per block of the transposed scatter: the block's rows of dot_w / out (64 x D
// floats each, 266 KiB at D = 1024) stay in L2 while its entries run, and each of the D rows
// is visited for 256 contiguous bytes per block (16 measured 1.2-1.5x slower at B = 4096,
// D = 1024, F = 16384: a 64-byte piece per 64 KiB-strided row costs a TLB miss per line).
constexpr int64_t FBLK = 64;

// Software prefetch distance of the transposed kernels' copies, in rows of the [D, F] buffer:
// each row visit is a few lines on a page of its own, which the hardware prefetcher does not
// predict, so without it every visit waits for memory in turn.
constexpr int64_t PFD = 8;
inline void prefetch_read(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 0);
}
inline void prefetch_write(float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 1, 0);
}

void check_ids(const int64_t* ip, int64_t n, int64_t F, const char* what) {
  for (int64_t e = 0; e < n; ++e) need(ip[e] >= 0 && ip[e] < F, std::string(what) + ": feature id out of range");
}

// dst[t * ld + d] = src[d * F + t] for d < D, t < fb: fb columns of the D rows of a [D, F]
// buffer (src points at the first column) into fb rows of a local block. 4 x 4 register
// transposes where SSE is there (plain moves: the same bits either way), with the strided
// rows prefetched PFD ahead.
void copy_columns_in(const float* src, int64_t F, int64_t D, int64_t fb, float* dst, int64_t ld) {
  int64_t d = 0;
#if defined(__SSE__)
  for (; d + 4 <= D; d += 4) {
    for (int64_t r = 0; r < 4 && d + PFD + r < D; ++r) prefetch_read(src + (d + PFD + r) * F, fb);
    const float* s = src + d * F;
    int64_t t = 0;
    for (; t + 4 <= fb; t += 4) {
      __m128 a = _mm_loadu_ps(s + t), b = _mm_loadu_ps(s + F + t);
      __m128 c = _mm_loadu_ps(s + 2 * F + t), e = _mm_loadu_ps(s + 3 * F + t);
      _MM_TRANSPOSE4_PS(a, b, c, e);
      _mm_storeu_ps(dst + t * ld + d, a);
      _mm_storeu_ps(dst + (t + 1) * ld + d, b);
      _mm_storeu_ps(dst + (t + 2) * ld + d, c);
      _mm_storeu_ps(dst + (t + 3) * ld + d, e);
    }
    for (; t < fb; ++t)
      for (int64_t r = 0; r < 4; ++r) dst[t * ld + d + r] = s[r * F + t];
  }
#endif
  for (; d < D; ++d) {
    if (d + PFD < D) prefetch_read(src + (d + PFD) * F, fb);
    for (int64_t t = 0; t < fb; ++t) dst[t * ld + d] = src[d * F + t];
  }
}

// dst[d * F + t] = src[t * ld + d]: the inverse of copy_columns_in (a local block's fb rows
// written back as fb columns of the D rows of a [D, F] buffer).
void copy_columns_out(const float* src, int64_t ld, int64_t D, int64_t fb, float* dst, int64_t F) {
  int64_t d = 0;
#if defined(__SSE__)
  for (; d + 4 <= D; d += 4) {
    for (int64_t r = 0; r < 4 && d + PFD + r < D; ++r) prefetch_write(dst + (d + PFD + r) * F, fb);
    float* o = dst + d * F;
    int64_t t = 0;
    for (; t + 4 <= fb; t += 4) {
      __m128 a = _mm_loadu_ps(src + t * ld + d), b = _mm_loadu_ps(src + (t + 1) * ld + d);
      __m128 c = _mm_loadu_ps(src + (t + 2) * ld + d), e = _mm_loadu_ps(src + (t + 3) * ld + d);
      _MM_TRANSPOSE4_PS(a, b, c, e);
      _mm_storeu_ps(o + t, a);
      _mm_storeu_ps(o + F + t, b);
      _mm_storeu_ps(o + 2 * F + t, c);
      _mm_storeu_ps(o + 3 * F + t, e);
    }
    for (; t < fb; ++t)
      for (int64_t r = 0; r < 4; ++r) o[r * F + t] = src[t * ld + d + r];
  }
#endif
  for (; d < D; ++d) {
    if (d + PFD < D) prefetch_write(dst + (d + PFD) * F, fb);
    for (int64_t t = 0; t < fb; ++t) dst[d * F + t] = src[t * ld + d];
  }
}

// The table's [F, D] shape from its buffer: w is [F, D] or, transposed, [D, F].
void table_shape(const f32arr& w, bool transposed, int64_t& F, int64_t& D, const char* what) {
  need(w.ndim() == 2, std::string(what) + ": w must be 2-D");
  F = transposed ? w.shape(1) : w.shape(0);
  D = transposed ? w.shape(0) : w.shape(1);
}

// out[b] = bias + sum_j vals[b, j] * W[idx[b, j]] for a [D, F] buffer wt (W = wt^T). Per
// element the same sum in the same order as the [F, D] loop (bias, then entry j = 0, 1, ...).
void decode_transposed(const int64_t* ip, const float* vp, int64_t B, int64_t k, const float* wt,
                       int64_t F, int64_t D, const float* bp, float* out) {
  const int64_t ntiles = (D + TILE - 1) / TILE;
#pragma omp parallel
  {
    std::vector<float> pack(F * TILE, 0.f);  // pack[f * TILE + i] = W[f, d0 + i]
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t d0 = t * TILE, tw = std::min(TILE, D - d0);
      // FBLK columns of the tw rows at a time, 4 rows by 4 columns per register transpose (the
      // rows are 4 KiB multiples apart for F % 1024 == 0, so reading all of them element-
      // interleaved would thrash one L1 set); the next pieces are prefetched
      for (int64_t f0 = 0; f0 < F; f0 += FBLK) {
        if (f0 + 2 * FBLK < F)
          for (int64_t i = 0; i < tw; ++i) prefetch_read(wt + (d0 + i) * F + f0 + 2 * FBLK, FBLK);
        copy_columns_in(wt + d0 * F + f0, F, tw, std::min(FBLK, F - f0), pack.data() + f0 * TILE, TILE);
      }
      for (int64_t b = 0; b < B; ++b) {
        float acc[TILE];
        for (int64_t i = 0; i < TILE; ++i) acc[i] = (bp && i < tw) ? bp[d0 + i] : 0.f;
        for (int64_t j = 0; j < k; ++j) {
          const float v = vp[b * k + j];
          const float* p = pack.data() + ip[b * k + j] * TILE;
          for (int64_t i = 0; i < TILE; ++i) acc[i] += v * p[i];
        }
        float* o = out + b * D + d0;
        for (int64_t i = 0; i < tw; ++i) o[i] = acc[i];
      }
    }
  }
}

// recon row b = bias + sum_j vals[b, j] * w[idx[b, j]] for an [F, D] buffer w.
inline void decode_row(const int64_t* ip, const float* vp, int64_t k, const float* w, int64_t D,
                       const float* bp, float* r) {
  if (bp) std::memcpy(r, bp, sizeof(float) * D); else std::memset(r, 0, sizeof(float) * D);
  for (int64_t j = 0; j < k; ++j) axpy(vp[j], w + ip[j] * D, r, D);
}

// The checked shapes of a decode's arguments: idx, vals [B, k]; w [F, D] (or, transposed,
// [D, F]); bias [D] or empty; rows [B, D] (the output, or the target); every id in [0, F).
struct DecodeShape {
  int64_t B, k, F, D;
};

DecodeShape check_decode(const i64arr& idx, const f32arr& vals, const f32arr& w, bool transposed,
                         const f32arr& bias, const f32arr& rows, const std::string& op) {
  need(idx.ndim() == 2 && vals.ndim() == 2 && rows.ndim() == 2, op + ": bad ranks");
  DecodeShape s{idx.shape(0), idx.shape(1), 0, 0};
  table_shape(w, transposed, s.F, s.D, op.c_str());
  need(vals.shape(0) == s.B && vals.shape(1) == s.k && rows.shape(0) == s.B && rows.shape(1) == s.D,
       op + ": shapes must be idx, vals [B, k], w [F, D], and [B, D] rows");
  need(bias.size() == 0 || bias.size() == s.D, op + ": bias must be [D] or empty");
  check_ids(idx.data(), s.B * s.k, s.F, op.c_str());
  return s;
}

void gather_sum(i64arr idx, f32arr vals, f32arr w, bool transposed, f32arr bias, f32arr out) {
  const DecodeShape s = check_decode(idx, vals, w, transposed, bias, out, "gather_sum");
  const int64_t B = s.B, k = s.k, F = s.F, D = s.D;  // plain locals: OpenMP regions use them
  const int64_t* ip = idx.data();
  const float* vp = vals.data();
  const float* wp = w.data();
  const float* bp = bias.size() ? bias.data() : nullptr;
  float* op = out.mutable_data();
  py::gil_scoped_release nogil;
  if (transposed) {
    decode_transposed(ip, vp, B, k, wp, F, D, bp, op);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) decode_row(ip + b * k, vp + b * k, k, wp, D, bp, op + b * D);
}

void decode_loss_fwd(i64arr idx, f32arr vals, f32arr w, bool transposed, f32arr bias, f32arr x,
                     i32arr col_src, f32arr recon, f32arr resid,
                     py::array_t<double, py::array::c_style> stats,
                     py::array_t<double, py::array::c_style> colsum) {
  const DecodeShape s = check_decode(idx, vals, w, transposed, bias, x, "decode_loss_fwd");
  const int64_t B = s.B, k = s.k, F = s.F, D = s.D;  // plain locals: OpenMP regions use them
  need(col_src.size() == D && recon.size() == B * D && resid.size() == B * D && colsum.size() == 2 * D,
       "decode_loss_fwd: col_src [D], recon/resid [B, D], colsum [2, D]");
  const int64_t S = stats.size();
  const int64_t* ip = idx.data();
  const int32_t* cs = col_src.data();
  for (int64_t d = 0; d < D; ++d) need(cs[d] >= 0 && cs[d] < S, "decode_loss_fwd: col_src out of range");
  const float* vp = vals.data();
  const float* wp = w.data();
  const float* bp = bias.size() ? bias.data() : nullptr;
  const float* xp = x.data();
  float* rp = recon.mutable_data();
  float* ep = resid.mutable_data();
  double* st = stats.mutable_data();
  double* csum = colsum.mutable_data();
  py::gil_scoped_release nogil;
  std::memset(st, 0, sizeof(double) * S);
  std::memset(csum, 0, sizeof(double) * 2 * D);
  // [D, F]: the decode first (column tiles), then the same pass over the finished rows
  if (transposed) decode_transposed(ip, vp, B, k, wp, F, D, bp, rp);
#pragma omp parallel
  {
    std::vector<double> lst(S, 0.0), lcol(2 * D, 0.0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      float* r = rp + b * D;
      if (!transposed) decode_row(ip + b * k, vp + b * k, k, wp, D, bp, r);
      const float* xr = xp + b * D;
      float* er = ep + b * D;
      for (int64_t d = 0; d < D; ++d) {
        const float e = r[d] - xr[d];
        er[d] = e;
        lst[cs[d]] += static_cast<double>(e) * e;
        lcol[d] += xr[d];
        lcol[D + d] += static_cast<double>(xr[d]) * xr[d];
      }
    }
#pragma omp critical
    {
      for (int64_t i = 0; i < S; ++i) st[i] += lst[i];
      for (int64_t d = 0; d < 2 * D; ++d) csum[d] += lcol[d];
    }
  }
}

void gather_dot(i64arr idx, f32arr g, f32arr w, f32arr out) {
  need(idx.ndim() == 2 && g.ndim() == 2 && w.ndim() == 2 && out.ndim() == 2, "gather_dot: bad ranks");
  const int64_t B = idx.shape(0), k = idx.shape(1), D = g.shape(1), F = w.shape(0);
  need(g.shape(0) == B && w.shape(1) == D && out.shape(0) == B && out.shape(1) == k,
       "gather_dot: shapes must be idx [B,k], g [B,D], w [F,D], out [B,k]");
  const int64_t* ip = idx.data();
  check_ids(ip, B * k, F, "gather_dot");
  const float* gp = g.data();
  const float* wp = w.data();
  float* op = out.mutable_data();
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < k; ++j) op[b * k + j] = dot(gp + b * D, wp + ip[b * k + j] * D, D);
}

// --------------------------------------------------------------------- scatter by feature
struct ScatterArgs {
  const int64_t* cr;  // [F + 1] CSR row pointers
  const int64_t* od;  // [nnz] entries sorted by feature
  int64_t k, D;
  const float* wg;  // [nnz] entry weights (flat, read at od)
  const float* xp;  // [B, D] rows gathered by entry
  float* dop;       // [nnz] dots or nullptr
  const float* pc;  // [F] penalty weights or nullptr
  const float* pi;  // [F, S] inverse norms
  int64_t S;
  const int32_t* cs;  // [D] source of each column
};

// Row f of the scatter into orow (when want_out) and its entries' dots, from wrow = W[f] (a
// row of the [F, D] table or of a thread's copied block: the same arithmetic either way).
inline void scatter_row(const ScatterArgs& a, int64_t f, bool want_out, float* orow, const float* wrow) {
  const int64_t D = a.D;
  if (want_out) std::memset(orow, 0, sizeof(float) * D);
  for (int64_t p = a.cr[f]; p < a.cr[f + 1]; ++p) {
    const int64_t e = a.od[p];
    const float* xr = a.xp + (e / a.k) * D;
    if (want_out) axpy(a.wg[e], xr, orow, D);
    if (a.dop) a.dop[e] = dot(xr, wrow, D);
  }
  if (want_out && a.pc && a.pc[f] != 0.f) {
    const float c = a.pc[f];
    const float* inv = a.pi + f * a.S;
    for (int64_t d = 0; d < D; ++d) orow[d] += c * inv[a.cs[d]] * wrow[d];
  }
}

void scatter_rows(i64arr crow, i64arr order, int64_t k, f32arr wgt, f32arr x, f32arr out,
                  f32arr dot_w, f32arr dot_out, f32arr pen_c, f32arr pen_inv, i32arr col_src,
                  bool transposed) {
  const int64_t F = crow.shape(0) - 1, nnz = order.shape(0), D = x.shape(1), B = x.shape(0);
  const bool want_out = out.size() > 0 || F * D == 0;
  const int64_t oF = transposed ? 1 : 0, oD = transposed ? 0 : 1;  // out / dot_w dims of F, D
  need(!want_out || (out.ndim() == 2 && out.shape(oF) == F && out.shape(oD) == D),
       transposed ? "scatter_rows: out must be [D, F] (transposed)" : "scatter_rows: out must be [F, D]");
  need(!want_out || wgt.size() >= nnz, "scatter_rows: wgt shorter than order");
  const bool want_dot = dot_out.size() > 0, want_pen = pen_c.size() > 0;
  need(!(want_dot || want_pen) || (dot_w.ndim() == 2 && dot_w.shape(oF) == F && dot_w.shape(oD) == D),
       "scatter_rows: dot_w must have out's layout, [F, D] or transposed [D, F]");
  need(!want_dot || dot_out.size() == nnz, "scatter_rows: dot_out must have nnz entries");
  need(!want_pen || want_out, "scatter_rows: the penalty needs out");
  ScatterArgs a{crow.data(), order.data(), k, D, wgt.data(), x.data(),
                want_dot ? dot_out.mutable_data() : nullptr, nullptr, nullptr, 0, nullptr};
  if (want_pen) {
    need(pen_c.size() == F && pen_inv.ndim() == 2 && pen_inv.shape(0) == F && col_src.size() == D,
         "scatter_rows: penalty arrays must be c [F], inv [F, S], col_src [D]");
    a.pc = pen_c.data();
    a.pi = pen_inv.data();
    a.S = pen_inv.shape(1);
    a.cs = col_src.data();
  }
  need(a.cr[0] == 0 && a.cr[F] == nnz, "scatter_rows: crow must run from 0 to nnz");
  for (int64_t e = 0; e < nnz; ++e) need(a.od[e] >= 0 && a.od[e] / k < B, "scatter_rows: entry out of range");
  float* op = want_out ? out.mutable_data() : nullptr;
  const float* dw = (want_dot || want_pen) ? dot_w.data() : nullptr;
  py::gil_scoped_release nogil;
  if (!transposed) {
    // dynamic schedule in chunks: rows differ in entry counts (load balance)
#pragma omp parallel for schedule(dynamic, 64)
    for (int64_t f = 0; f < F; ++f)
      scatter_row(a, f, want_out, want_out ? op + f * D : nullptr, dw ? dw + f * D : nullptr);
    return;
  }
  // [D, F]: blocks of FBLK features; their columns of dot_w are copied into rows of wblk, their
  // out rows computed in oblk and written back as FBLK-wide pieces of each of the D rows
  const int64_t nblk = (F + FBLK - 1) / FBLK;
  // row stride of the local blocks: D rounded up to a cache line, plus one line, so that the
  // FBLK rows are never a multiple of 4 KiB apart (they would share one L1 set and evict each
  // other on every column of the copy; measured 2-3x slower at D = 1024)
  const int64_t LD = (D + 15) / 16 * 16 + 16;
#pragma omp parallel
  {
    std::vector<float> wblk(dw ? FBLK * LD : 0), oblk(FBLK * LD);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t f0 = blk * FBLK, fb = std::min(FBLK, F - f0);
      if (dw) copy_columns_in(dw + f0, F, D, fb, wblk.data(), LD);
      for (int64_t t = 0; t < fb; ++t)
        scatter_row(a, f0 + t, want_out, oblk.data() + t * LD, dw ? wblk.data() + t * LD : nullptr);
      if (op) copy_columns_out(oblk.data(), LD, D, fb, op + f0, F);
    }
  }
}

}  // namespace

void register_cpu_kernels(py::module_& m) {
  m.def("row_topk", &row_topk, py::arg("pre"), py::arg("bias"), py::arg("k"), py::arg("vals"), py::arg("idx"),
        "k largest entries of each row of pre [B, F] + bias [F] (fp32) into vals [B, k], idx [B, k] (unordered).");
  m.def("csr_by_feature", &csr_by_feature, py::arg("flat_idx"), py::arg("n_features"), py::arg("crow"),
        py::arg("order"), "Stable counting sort of feature ids: CSR row pointers and entry order.");
  m.def("gather_sum", &gather_sum, py::arg("idx"), py::arg("vals"), py::arg("w"), py::arg("transposed"),
        py::arg("bias"), py::arg("out"),
        "out[b] = bias + sum_j vals[b, j] * W[idx[b, j]]; W = w [F, D] or, transposed, w^T of a [D, F] w (fp32).");
  m.def("decode_loss_fwd", &decode_loss_fwd, py::arg("idx"), py::arg("vals"), py::arg("w"), py::arg("transposed"),
        py::arg("bias"), py::arg("x"), py::arg("col_src"), py::arg("recon"), py::arg("resid"), py::arg("stats"),
        py::arg("colsum"), "Fused sparse decode + residual + per-source squared-error sums (fp32, f64 sums).");
  m.def("gather_dot", &gather_dot, py::arg("idx"), py::arg("g"), py::arg("w"), py::arg("out"),
        "out[b, j] = <g[b], w[idx[b, j]]> (fp32, w [F, D]).");
  m.def("scatter_rows", &scatter_rows, py::arg("crow"), py::arg("order"), py::arg("k"), py::arg("wgt"),
        py::arg("x"), py::arg("out"), py::arg("dot_w"), py::arg("dot_out"), py::arg("pen_c"),
        py::arg("pen_inv"), py::arg("col_src"), py::arg("transposed"),
        "out[f] = sum over CSR row f of wgt[e] * x[e // k] (+ penalty); optional dot_out[e] = "
        "<x[e // k], dot_w[f]>. Every row of out written once; out / dot_w [F, D] or, transposed, "
        "[D, F] buffers; out may be empty (dots only).");
}
