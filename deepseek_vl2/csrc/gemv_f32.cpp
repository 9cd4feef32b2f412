// Batch-1 linear for fp32 weights on any x86-64 CPU: y[n] = w[n, :] . x (+ bias[n]).
//
// CPUs without bf16 instructions decode in fp32, where every step streams ~2.4 GB of tiny's weights.
// PyTorch's fp32 paths reach 14 (MKL) to 22 (oneDNN) GB/s on an expert-sized 4.6 MB matrix on the
// 2-core EPYC this was written on, against ~36 GB/s of memory read rate. This loop is plain C++ that
// the compiler vectorises for the CPU it is built on (the extension is compiled on first use, on the
// machine that runs it, with -march=native): 32 partial sums keep several FMA chains in flight.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "gemv_args.h"

namespace {

constexpr int kLanes = 32;

inline float dot_f32(const float* w, const float* x, int64_t n) {
  float partial[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) partial[j] += w[k + j] * x[k + j];
  float sum = 0.0f;
  for (int j = 0; j < kLanes; ++j) sum += partial[j];
  for (; k < n; ++k) sum += w[k] * x[k];
  return sum;
}

}  // namespace

// x: K fp32 values; w: [N, K] fp32 with contiguous rows; bias: [N] or none (see gemv_args.h).
torch::Tensor gemv_f32(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  const GemvArgs args = gemv_args("gemv_f32", at::kFloat, x, w, bias);
  const float* bp = args.bias_f32.defined() ? args.bias_f32.data_ptr<float>() : nullptr;
  auto out = torch::empty({args.rows}, x.options());
  const float *xp = args.x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, args.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float sum = dot_f32(wp + n * args.row_stride, xp, args.cols);
      op[n] = bp ? sum + bp[n] : sum;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_f32", &gemv_f32, "fp32 batch-1 linear, vectorised for the build machine", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("bias") = pybind11::none());
}
