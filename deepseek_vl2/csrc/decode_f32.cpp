// Batch-1 (decode) kernels for fp32 weights on any x86-64 CPU: the linear y[n] = w[n, :] . x (+ bias[n])
// and the layer kernels of decode_layers.h (shared with the bf16 build) instantiated for fp32.
//
// CPUs without bf16 instructions decode in fp32, where every step streams ~2.4 GB of tiny's weights.
// PyTorch's fp32 paths reach 14 (MKL) to 22 (oneDNN) GB/s on an expert-sized 4.6 MB matrix on the
// 2-core EPYC this was written on, against ~36 GB/s of memory read rate. This loop is plain C++ that
// the compiler vectorises for the CPU it is built on (the extension is compiled on first use, on the
// machine that runs it, with -march=native): 32 partial sums keep several FMA chains in flight.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "decode_layers.h"

namespace decode {

constexpr int kLanes = 32;

float dot(const float* w, const float* x, int64_t n) {
  float partial[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {  // two cache lines of w per iteration
    const char* ahead = reinterpret_cast<const char*>(w + k) + kPrefetchBytes;  // (never faults, even past the end)
    __builtin_prefetch(ahead, 0, 2);  // (locality 2: into L2, as _MM_HINT_T1)
    __builtin_prefetch(ahead + 64, 0, 2);
    for (int j = 0; j < kLanes; ++j) partial[j] += w[k + j] * x[k + j];
  }
  float sum = 0.0f;
  for (int j = 0; j < kLanes; ++j) sum += partial[j];
  for (; k < n; ++k) sum += w[k] * x[k];
  return sum;
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
        }, "fp32 batch-1 linear, vectorised for the build machine", pybind11::arg("x"), pybind11::arg("w"),
        pybind11::arg("bias") = pybind11::none());
  bind_layer_kernels<float>(m, "f32");
}
