// fastxc._C: CPU work where plain torch/numpy is measurably slower.
//
// The activation store's row gather (bench/bench_store.py measures it against numpy memmap fancy
// indexing + torch conversion):
//
//   gather_rows(src, rows, out, dtype, col_scale, row_scale=None, seg_offsets=None)
//     out[i, j] = float32(src[rows[i], j]) * col_scale[j] * row_scale[rows[i], seg(j)]
//     src   [N, D]  bf16 / fp16 (uint16 view), fp32, or fp8 e4m3fn (uint8 view); C-contiguous
//                   (an np.memmap works)
//     rows  [B]     int64 row ids (any order)
//     out   [B, D]  fp32, C-contiguous, written in place
//     col_scale [D] fp32 (per-column normalisation; an empty array means none)
//     row_scale [N, S] fp32, only for fp8: the per-row, per-segment dequantisation scale
//     seg_offsets [S + 1] int64, the column ranges of the S segments (sources): 0 = o_0 < ... = D
//
//   gather_shards(srcs, shard_ids, local_rows, out, dtype, col_scale, row_scales, seg_offsets, threads=0)
//     the same over a list of shards: row i is srcs[shard_ids[i]][local_rows[i]]; one OpenMP
//     loop for the whole batch, so a batch shuffled across shards costs one call. threads > 0
//     caps its OpenMP team (the reader's prefetch thread uses 1: see fastxc.data.store).
//
//   willneed(srcs, shard_ids, local_rows)
//     madvise(MADV_WILLNEED) on the pages holding each row: the kernel starts reading them
//     asynchronously, so a store larger than RAM has many reads in flight instead of one per
//     gather thread. The reader calls it on the batch after the one it gathers, when the store
//     is too large to stay in the page cache (for a cached store it is one syscall per row for
//     nothing).
//
//   permute(idx, n, key, rounds=6)
//     the reader's keyed shuffle of row ids (identical to the numpy fastxc.data.store.permute).
//
// All loops run with the GIL released (a background prefetch thread in Python overlaps them
// with training). Row ids are validated before the parallel region (no exceptions inside it).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define FASTXC_HAVE_MADVISE 1
#endif

namespace py = pybind11;

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float f16_to_f32(uint16_t h) {
  // IEEE half -> float, including subnormals, inf and nan.
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3FFu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// fp8 e4m3fn (the OCP "fn" variant torch.float8_e4m3fn uses): 1 sign, 4 exponent bits (bias 7),
// 3 mantissa bits, no infinities, S.1111.111 is NaN, max finite 448. Decoded through a table.
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int sign = (b >> 7) & 1, exp = (b >> 3) & 0xF, mant = b & 0x7;
      float x;
      if (exp == 0xF && mant == 0x7) {
        x = NAN;
      } else if (exp == 0) {
        x = std::ldexp(static_cast<float>(mant) / 8.0f, -6);  // subnormal
      } else {
        x = std::ldexp(1.0f + static_cast<float>(mant) / 8.0f, exp - 7);
      }
      v[b] = sign ? -x : x;
    }
  }
};
const Fp8Table kFp8;

inline float f32_identity(float x) { return x; }
inline float fp8_to_f32(uint8_t b) { return kFp8.v[b]; }

// One output row: o[j] = conv(s[j]) * col[j] * rs[seg(j)]  (col / rs may be null).
template <typename T, float (*CONVERT)(T)>
inline void convert_row(const T* __restrict s, float* __restrict o, int64_t width,
                        const float* __restrict col, const float* __restrict rs,
                        const int64_t* seg, int64_t n_seg) {
  if (rs) {
    for (int64_t g = 0; g < n_seg; ++g) {
      const float f = rs[g];
      const int64_t lo = seg[g], hi = seg[g + 1];
      if (col) {
        for (int64_t j = lo; j < hi; ++j) o[j] = CONVERT(s[j]) * (col[j] * f);
      } else {
        for (int64_t j = lo; j < hi; ++j) o[j] = CONVERT(s[j]) * f;
      }
    }
  } else if (col) {
    for (int64_t j = 0; j < width; ++j) o[j] = CONVERT(s[j]) * col[j];
  } else {
    for (int64_t j = 0; j < width; ++j) o[j] = CONVERT(s[j]);
  }
}

// A shard as raw pointers (collected while holding the GIL).
struct ShardView {
  const void* data;
  int64_t n_rows;
  const float* row_scale;  // [n_rows, n_seg] or null
};

template <typename T, float (*CONVERT)(T)>
void gather_impl(const std::vector<ShardView>& shards, const int32_t* shard_ids, const int64_t* rows,
                 int64_t n_out, int64_t width, float* out, const float* col, const int64_t* seg,
                 int64_t n_seg, int threads) {
  py::gil_scoped_release release;
#ifdef _OPENMP
  const int nt = threads > 0 ? threads : omp_get_max_threads();
#else
  const int nt = 1;
#endif
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < n_out; ++i) {
    const ShardView& sh = shards[shard_ids ? shard_ids[i] : 0];
    const int64_t r = rows[i];
    const T* s = static_cast<const T*>(sh.data) + r * width;
    const float* rs = sh.row_scale ? sh.row_scale + r * n_seg : nullptr;
    convert_row<T, CONVERT>(s, out + i * width, width, col, rs, seg, n_seg);
  }
}

int64_t item_size(const std::string& dtype) {
  if (dtype == "bfloat16" || dtype == "float16") return 2;
  if (dtype == "float32") return 4;
  if (dtype == "float8_e4m3fn") return 1;
  throw std::invalid_argument(
      "gather_rows: dtype must be bfloat16, float16, float32 or float8_e4m3fn, got " + dtype);
}

// Checks one shard buffer and returns its view; `width` is set by the first shard.
ShardView shard_view(const py::buffer& src, const py::object& row_scale, int64_t item, int64_t& width,
                     int64_t n_seg, bool fp8) {
  py::buffer_info s = src.request();
  if (s.ndim != 2) throw std::invalid_argument("gather_rows: src must be 2-D [N, D]");
  if (s.itemsize != item)
    throw std::invalid_argument("gather_rows: src item size " + std::to_string(s.itemsize) +
                                " does not match dtype (" + std::to_string(item) + " bytes)");
  if (width < 0) width = s.shape[1];
  if (s.shape[1] != width) throw std::invalid_argument("gather_rows: shards differ in width");
  if (s.shape[0] > 0 && (s.strides[1] != s.itemsize || s.strides[0] != s.itemsize * width))
    throw std::invalid_argument("gather_rows: src must be C-contiguous");
  ShardView v{s.ptr, s.shape[0], nullptr};
  if (fp8) {
    if (row_scale.is_none())
      throw std::invalid_argument("gather_rows: float8_e4m3fn needs row_scale [N, n_segments]");
    auto rs = row_scale.cast<py::array_t<float, py::array::c_style>>();
    if (rs.ndim() != 2 || rs.shape(0) != s.shape[0] || rs.shape(1) != n_seg)
      throw std::invalid_argument("gather_rows: row_scale must be [N, n_segments] float32");
    v.row_scale = rs.data();
  }
  return v;
}

// Validates seg_offsets against width; returns the segment count (1 when none given).
std::vector<int64_t> segments(const py::object& seg_offsets, int64_t width) {
  std::vector<int64_t> seg;
  if (seg_offsets.is_none()) {
    seg = {0, width};
  } else {
    auto a = seg_offsets.cast<py::array_t<int64_t, py::array::c_style | py::array::forcecast>>();
    if (a.ndim() != 1 || a.shape(0) < 2) throw std::invalid_argument("gather_rows: seg_offsets must be [S+1]");
    seg.assign(a.data(), a.data() + a.shape(0));
    if (seg.front() != 0 || seg.back() != width)
      throw std::invalid_argument("gather_rows: seg_offsets must start at 0 and end at D");
    for (size_t g = 1; g < seg.size(); ++g)
      if (seg[g] < seg[g - 1]) throw std::invalid_argument("gather_rows: seg_offsets must be non-decreasing");
  }
  return seg;
}

const float* col_scale_ptr(const py::array_t<float, py::array::c_style | py::array::forcecast>& c,
                           int64_t width) {
  if (c.size() == 0) return nullptr;
  if (c.ndim() != 1 || c.shape(0) != width)
    throw std::invalid_argument("gather_rows: col_scale must be empty or [D]");
  return c.data();
}

void dispatch(const std::string& dtype, const std::vector<ShardView>& shards, const int32_t* ids,
              const int64_t* rows, int64_t n_out, int64_t width, float* out, const float* col,
              const std::vector<int64_t>& seg, int threads = 0) {
  const int64_t n_seg = static_cast<int64_t>(seg.size()) - 1;
  if (dtype == "bfloat16") {
    gather_impl<uint16_t, bf16_to_f32>(shards, ids, rows, n_out, width, out, col, seg.data(), n_seg, threads);
  } else if (dtype == "float16") {
    gather_impl<uint16_t, f16_to_f32>(shards, ids, rows, n_out, width, out, col, seg.data(), n_seg, threads);
  } else if (dtype == "float32") {
    gather_impl<float, f32_identity>(shards, ids, rows, n_out, width, out, col, seg.data(), n_seg, threads);
  } else {
    gather_impl<uint8_t, fp8_to_f32>(shards, ids, rows, n_out, width, out, col, seg.data(), n_seg, threads);
  }
}

py::buffer_info out_info(py::array_t<float, py::array::c_style>& out, int64_t n_out, int64_t width) {
  py::buffer_info o = out.request(true);
  if (o.ndim != 2 || o.shape[0] != n_out || o.shape[1] != width)
    throw std::invalid_argument("gather_rows: out must be float32 [len(rows), D]");
  return o;
}

void gather_rows(py::buffer src, py::array_t<int64_t, py::array::c_style | py::array::forcecast> rows,
                 py::array_t<float, py::array::c_style> out, const std::string& dtype,
                 py::array_t<float, py::array::c_style | py::array::forcecast> col_scale,
                 py::object row_scale, py::object seg_offsets) {
  const int64_t item = item_size(dtype);
  const bool fp8 = dtype == "float8_e4m3fn";
  if (rows.ndim() != 1) throw std::invalid_argument("gather_rows: rows must be 1-D [B]");
  int64_t width = -1;
  py::buffer_info s = src.request();
  if (s.ndim == 2) width = s.shape[1];
  const std::vector<int64_t> seg = segments(seg_offsets, width < 0 ? 0 : width);
  std::vector<ShardView> shards{shard_view(src, row_scale, item, width, static_cast<int64_t>(seg.size()) - 1, fp8)};
  const int64_t n_out = rows.shape(0);
  const int64_t* rp = rows.data();
  for (int64_t i = 0; i < n_out; ++i)
    if (rp[i] < 0 || rp[i] >= shards[0].n_rows) throw std::out_of_range("gather_rows: row id out of range");
  py::buffer_info o = out_info(out, n_out, width);
  dispatch(dtype, shards, nullptr, rp, n_out, width, static_cast<float*>(o.ptr), col_scale_ptr(col_scale, width), seg);
}

void gather_shards(py::list srcs, py::array_t<int32_t, py::array::c_style | py::array::forcecast> shard_ids,
                   py::array_t<int64_t, py::array::c_style | py::array::forcecast> local_rows,
                   py::array_t<float, py::array::c_style> out, const std::string& dtype,
                   py::array_t<float, py::array::c_style | py::array::forcecast> col_scale,
                   py::object row_scales, py::object seg_offsets, int threads) {
  const int64_t item = item_size(dtype);
  const bool fp8 = dtype == "float8_e4m3fn";
  if (srcs.size() == 0) throw std::invalid_argument("gather_shards: srcs is empty");
  if (shard_ids.ndim() != 1 || local_rows.ndim() != 1 || shard_ids.shape(0) != local_rows.shape(0))
    throw std::invalid_argument("gather_shards: shard_ids and local_rows must be 1-D of the same length");
  int64_t width = srcs[0].cast<py::buffer>().request().shape[1];
  const std::vector<int64_t> seg = segments(seg_offsets, width);
  const int64_t n_seg = static_cast<int64_t>(seg.size()) - 1;
  py::list rsl;
  if (fp8) {
    if (row_scales.is_none()) throw std::invalid_argument("gather_shards: float8_e4m3fn needs row_scales");
    rsl = row_scales.cast<py::list>();
    if (rsl.size() != srcs.size()) throw std::invalid_argument("gather_shards: one row_scale per shard");
  }
  std::vector<ShardView> shards;
  shards.reserve(srcs.size());
  for (size_t k = 0; k < srcs.size(); ++k)
    shards.push_back(shard_view(srcs[k].cast<py::buffer>(), fp8 ? py::object(rsl[k]) : py::object(py::none()),
                                item, width, n_seg, fp8));
  const int64_t n_out = shard_ids.shape(0);
  const int32_t* ip = shard_ids.data();
  const int64_t* rp = local_rows.data();
  const int64_t n_shards = static_cast<int64_t>(shards.size());
  for (int64_t i = 0; i < n_out; ++i) {
    if (ip[i] < 0 || ip[i] >= n_shards) throw std::out_of_range("gather_shards: shard id out of range");
    if (rp[i] < 0 || rp[i] >= shards[ip[i]].n_rows) throw std::out_of_range("gather_shards: row id out of range");
  }
  py::buffer_info o = out_info(out, n_out, width);
  dispatch(dtype, shards, ip, rp, n_out, width, static_cast<float*>(o.ptr), col_scale_ptr(col_scale, width), seg,
           threads);
}

// Returns how many madvise calls succeeded (0 where the platform has no madvise).
int64_t willneed(py::list srcs, py::array_t<int32_t, py::array::c_style | py::array::forcecast> shard_ids,
                 py::array_t<int64_t, py::array::c_style | py::array::forcecast> local_rows) {
#ifdef FASTXC_HAVE_MADVISE
  struct Span {
    const char* p;
    int64_t n_rows, row_bytes;
  };
  std::vector<Span> spans;
  for (auto h : srcs) {
    py::buffer_info s = h.cast<py::buffer>().request();
    if (s.ndim != 2) throw std::invalid_argument("willneed: src must be 2-D");
    spans.push_back({static_cast<const char*>(s.ptr), s.shape[0], s.shape[1] * s.itemsize});
  }
  if (shard_ids.shape(0) != local_rows.shape(0)) throw std::invalid_argument("willneed: length mismatch");
  const int64_t n = shard_ids.shape(0);
  const int32_t* ip = shard_ids.data();
  const int64_t* rp = local_rows.data();
  for (int64_t i = 0; i < n; ++i)
    if (ip[i] < 0 || ip[i] >= static_cast<int64_t>(spans.size()) || rp[i] < 0 || rp[i] >= spans[ip[i]].n_rows)
      throw std::out_of_range("willneed: row out of range");
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  int64_t ok = 0;
  py::gil_scoped_release release;
  for (int64_t i = 0; i < n; ++i) {
    const Span& sp = spans[ip[i]];
    uintptr_t a = reinterpret_cast<uintptr_t>(sp.p + rp[i] * sp.row_bytes);
    uintptr_t b = a + static_cast<uintptr_t>(sp.row_bytes);
    a &= ~(page - 1);
    if (madvise(reinterpret_cast<void*>(a), b - a, MADV_WILLNEED) == 0) ++ok;
  }
  return ok;
#else
  (void)srcs;
  (void)shard_ids;
  (void)local_rows;
  return 0;
#endif
}

// splitmix64 finaliser (wrapping uint64 arithmetic), as fastxc.data.store._mix64.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The store's keyed bijection of [0, n) (fastxc.data.store.permute is the numpy reference; the two
// give identical ids): a balanced Feistel network on 2**(2h) >= n with cycle walking. Per row
// it is a few dozen integer ops, so the numpy version's ~50 array passes per batch dominated.
py::array_t<int64_t> permute(py::array_t<int64_t, py::array::c_style | py::array::forcecast> idx, int64_t n,
                             uint64_t key, int rounds) {
  const int64_t m = idx.size();
  py::array_t<int64_t> out(m);
  int64_t* o = out.mutable_data();
  const int64_t* x = idx.data();
  for (int64_t i = 0; i < m; ++i)
    if (x[i] < 0 || x[i] >= n) throw std::out_of_range("permute: index out of [0, n)");
  if (n <= 1) {
    std::fill(o, o + m, int64_t{0});
    return out;
  }
  int bits = 64 - __builtin_clzll(static_cast<uint64_t>(n - 1));
  bits = std::max(bits, 2);
  bits += bits & 1;
  const int h = bits / 2;
  const uint64_t mask = (uint64_t{1} << h) - 1;
  const uint64_t kbase = mix64(key);
  std::vector<uint64_t> keys(rounds);
  for (int r = 0; r < rounds; ++r) keys[r] = mix64(kbase + static_cast<uint64_t>(r) + 1);
  py::gil_scoped_release release;
  for (int64_t i = 0; i < m; ++i) {
    uint64_t v = static_cast<uint64_t>(x[i]);
    do {
      uint64_t left = v >> h, right = v & mask;
      for (int r = 0; r < rounds; ++r) {
        const uint64_t t = left ^ (mix64(right ^ keys[r]) & mask);
        left = right;
        right = t;
      }
      v = (left << h) | right;
    } while (v >= static_cast<uint64_t>(n));
    o[i] = static_cast<int64_t>(v);
  }
  return out;
}

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

void register_cpu_kernels(py::module_& m);  // csrc/cpu_kernels.cpp (fastxc.kernels)

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastxc C++ helpers (OpenMP): the activation store's row gather with dtype conversion.";
  m.def("gather_rows", &gather_rows, py::arg("src"), py::arg("rows"), py::arg("out"), py::arg("dtype"),
        py::arg("col_scale"), py::arg("row_scale") = py::none(), py::arg("seg_offsets") = py::none(),
        "out[i] = float32(src[rows[i]]) * col_scale (* row_scale[rows[i], seg] for fp8); src [N, D] "
        "bf16/fp16 (uint16 view), fp32 or fp8 e4m3fn (uint8 view).");
  m.def("gather_shards", &gather_shards, py::arg("srcs"), py::arg("shard_ids"), py::arg("local_rows"),
        py::arg("out"), py::arg("dtype"), py::arg("col_scale"), py::arg("row_scales") = py::none(),
        py::arg("seg_offsets") = py::none(), py::arg("threads") = 0,
        "out[i] = float32(srcs[shard_ids[i]][local_rows[i]]) * col_scale (* row scale for fp8); "
        "threads: OpenMP threads (0: the default).");
  m.def("willneed", &willneed, py::arg("srcs"), py::arg("shard_ids"), py::arg("local_rows"),
        "madvise(MADV_WILLNEED) the pages of the given rows (asynchronous read-ahead).");
  m.def("permute", &permute, py::arg("idx"), py::arg("n"), py::arg("key"), py::arg("rounds") = 6,
        "Keyed bijection of [0, n) applied to idx (int64 [m]); equals fastxc.data.store.permute.");
  m.def("num_threads", &num_threads, "OpenMP threads the gather uses.");
  register_cpu_kernels(m);
}
