// fastxc._C: CPU work where plain torch/numpy is measurably slower.
//
// gather_rows: out[i, :] = convert(src[rows[i], :]) * col_scale[:]
//   src   [N, D]  bf16 (as uint16), fp16 (as uint16) or fp32, C-contiguous (a memmap works)
//   rows  [B]     int64 row ids (any order; the shuffled batch)
//   out   [B, D]  fp32, C-contiguous, written in place
//   col_scale [D] fp32 (per-column normalisation; pass an empty array for none)
// Rows are split across OpenMP threads with the GIL released, so a background prefetch
// thread in Python overlaps it with training.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
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

template <typename T, float (*CONVERT)(T)>
void gather_impl(const T* src, int64_t n_rows, int64_t width, const int64_t* rows, int64_t n_out,
                 float* out, const float* scale) {
  // Validate first (no exceptions inside the parallel region).
  for (int64_t i = 0; i < n_out; ++i) {
    if (rows[i] < 0 || rows[i] >= n_rows) throw std::out_of_range("gather_rows: row id out of range");
  }
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n_out; ++i) {
    const T* s = src + rows[i] * width;
    float* o = out + i * width;
    if (scale) {
      for (int64_t j = 0; j < width; ++j) o[j] = CONVERT(s[j]) * scale[j];
    } else {
      for (int64_t j = 0; j < width; ++j) o[j] = CONVERT(s[j]);
    }
  }
}

inline float f32_identity(float x) { return x; }

void gather_rows(py::buffer src, py::array_t<int64_t, py::array::c_style> rows,
                 py::array_t<float, py::array::c_style> out, const std::string& dtype,
                 py::array_t<float, py::array::c_style | py::array::forcecast> col_scale) {
  py::buffer_info s = src.request();
  py::buffer_info r = rows.request();
  py::buffer_info o = out.request(true);
  py::buffer_info c = col_scale.request();
  if (s.ndim != 2) throw std::invalid_argument("gather_rows: src must be 2-D [N, D]");
  if (r.ndim != 1) throw std::invalid_argument("gather_rows: rows must be 1-D [B]");
  if (o.ndim != 2) throw std::invalid_argument("gather_rows: out must be 2-D [B, D]");
  const int64_t n_rows = s.shape[0], width = s.shape[1], n_out = r.shape[0];
  if (o.shape[0] != n_out || o.shape[1] != width)
    throw std::invalid_argument("gather_rows: out must have shape [len(rows), src.shape[1]]");
  if (s.strides[1] != s.itemsize || s.strides[0] != s.itemsize * width)
    throw std::invalid_argument("gather_rows: src must be C-contiguous");
  const float* scale = nullptr;
  if (c.size > 0) {
    if (c.ndim != 1 || c.shape[0] != width)
      throw std::invalid_argument("gather_rows: col_scale must be empty or [D]");
    scale = static_cast<const float*>(c.ptr);
  }
  const int64_t* rp = static_cast<const int64_t*>(r.ptr);
  float* op = static_cast<float*>(o.ptr);
  if (dtype == "bfloat16") {
    if (s.itemsize != 2) throw std::invalid_argument("gather_rows: bfloat16 src must have 2-byte items");
    gather_impl<uint16_t, bf16_to_f32>(static_cast<const uint16_t*>(s.ptr), n_rows, width, rp, n_out, op, scale);
  } else if (dtype == "float16") {
    if (s.itemsize != 2) throw std::invalid_argument("gather_rows: float16 src must have 2-byte items");
    gather_impl<uint16_t, f16_to_f32>(static_cast<const uint16_t*>(s.ptr), n_rows, width, rp, n_out, op, scale);
  } else if (dtype == "float32") {
    if (s.itemsize != 4) throw std::invalid_argument("gather_rows: float32 src must have 4-byte items");
    gather_impl<float, f32_identity>(static_cast<const float*>(s.ptr), n_rows, width, rp, n_out, op, scale);
  } else {
    throw std::invalid_argument("gather_rows: dtype must be bfloat16, float16 or float32, got " + dtype);
  }
}

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastxc C++ helpers (OpenMP): the activation store's row gather with dtype conversion.";
  m.def("gather_rows", &gather_rows, py::arg("src"), py::arg("rows"), py::arg("out"), py::arg("dtype"),
        py::arg("col_scale"),
        "out[i] = float32(src[rows[i]]) * col_scale; src [N, D] bf16/fp16 (uint16 view) or fp32.");
  m.def("num_threads", &num_threads, "OpenMP threads the gather uses.");
}
