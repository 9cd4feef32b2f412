// Batch-1 (decode) kernels for fp32 weights on any x86-64 CPU: the linear y[n] = w[n, :] . x (+ bias[n])
// and the layer bodies and whole step of step.h (shared with the bf16 build) instantiated for fp32 (int8 and
// int4 weights run their own products, int8.h and int4.h: with AVX512-VNNI where the build machine has it).
//
// CPUs without bf16 instructions decode in fp32, where every step streams ~2.4 GB of tiny's weights.
// PyTorch's fp32 paths reach 14 (MKL) to 22 (oneDNN) GB/s on an expert-sized 4.6 MB matrix on the
// 2-core EPYC this was written on, against ~36 GB/s of memory read rate. This loop is plain C++ that
// the compiler vectorises for the CPU it is built on (the extension is compiled on first use, on the
// machine that runs it, with -march=native): 32 partial sums keep several FMA chains in flight.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "step.h"

namespace decode {

constexpr int kLanes = 32;

// out[j] = w . xs[j] for kRows rows at once, w read once for all of them (from memory by the first block
// of rows of a call, from L1 by the others). Each row keeps its own 32 partial sums and adds them up in
// the same order as it does alone (kRows = 1 is dot()), so a row's result never depends on the others:
// the per-lane arithmetic is one multiply_add per value whatever the compiler makes of the loops.
template <int kRows, bool kPrefetch>
inline void dots_block(const float* w, const float* const* xs, int64_t n, float* out) {
  float partial[kRows][kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {  // two cache lines of w per iteration
    if (kPrefetch) {
      const char* ahead = reinterpret_cast<const char*>(w + k) + kPrefetchBytes;  // (never faults, even past the end)
      __builtin_prefetch(ahead, 0, 2);  // (locality 2: into L2, as _MM_HINT_T1)
      __builtin_prefetch(ahead + 64, 0, 2);
    }
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < kLanes; ++j) partial[r][j] = multiply_add(w[k + j], xs[r][k + j], partial[r][j]);
  }
  for (int r = 0; r < kRows; ++r) {
    float sum = 0.0f;
    for (int j = 0; j < kLanes; ++j) sum += partial[r][j];
    for (int64_t i = k; i < n; ++i) sum = multiply_add(w[i], xs[r][i], sum);
    out[r] = sum;
  }
}

float dot(const float* w, const float* x, int64_t n) {
  float sum;
  dots_block<1, true>(w, &x, n, &sum);
  return sum;
}

// Rows whose partial sums fit in the vector registers at once: 4 x 32 floats are 8 AVX-512 registers;
// with 256-bit vectors (16 registers) 2 rows take 8.
#if defined(__AVX512F__)
constexpr int kRowBlock = 4;
#else
constexpr int kRowBlock = 2;
#endif

template <bool kPrefetch>
inline void dots_some(const float* w, const float* const* xs, int count, int64_t n, float* out) {
  switch (count) {
    case 1: return dots_block<1, kPrefetch>(w, xs, n, out);
#if defined(__AVX512F__)
    case 2: return dots_block<2, kPrefetch>(w, xs, n, out);
    case 3: return dots_block<3, kPrefetch>(w, xs, n, out);
    default: return dots_block<4, kPrefetch>(w, xs, n, out);
#else
    default: return dots_block<2, kPrefetch>(w, xs, n, out);
#endif
  }
}

void dots(const float* w, const float* const* xs, int count, int64_t n, float* out) {
  for (int first = 0; first < count; first += kRowBlock) {
    const int rows = std::min(kRowBlock, count - first);
    if (first == 0)
      dots_some<true>(w, xs, rows, n, out);
    else
      dots_some<false>(w, xs + first, rows, n, out + first);
  }
}

float router_dot(const float* w, const float* x, int64_t n) { return dot(w, x, n); }

void attend_head(const float* q, const float* k, int64_t k_row_stride, const float* v, int64_t v_row_stride,
                 int64_t length, int64_t d, float scale, float* scores, float* acc, float* out) {
  attend_head_generic(q, k, k_row_stride, v, v_row_stride, length, d, scale, scores, acc, out);
}

}  // namespace decode

using namespace decode;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_f32", [](const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
          return gemv<float>("gemv_f32", x, w, bias);
        }, ReleaseGil(), "fp32 batch-1 linear, vectorised for the build machine", pybind11::arg("x"), pybind11::arg("w"),
        pybind11::arg("bias") = pybind11::none());
  bind_layer_kernels<float>(m, "f32");
}
