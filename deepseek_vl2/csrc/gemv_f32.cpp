// Batch-1 linear for fp32 weights on any x86-64 CPU: y[n] = w[n, :] . x (+ bias[n]).
//
// CPUs without bf16 instructions decode in fp32, where every step streams ~2.4 GB of tiny's weights.
// PyTorch's fp32 paths reach 14 (MKL) to 22 (oneDNN) GB/s on an expert-sized 4.6 MB matrix on the
// 2-core EPYC this was written on, against ~36 GB/s of memory read rate. This loop is plain C++ that
// the compiler vectorises for the CPU it is built on (the extension is compiled on first use, on the
// machine that runs it, with -march=native): 32 partial sums keep several FMA chains in flight.
#include <torch/extension.h>
#include <ATen/Parallel.h>

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

// x: K fp32 values (any shape with K elements); w: [N, K] fp32 with contiguous rows; bias: [N] or none.
torch::Tensor gemv_f32(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "gemv_f32: fp32 tensors only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv_f32: CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "gemv_f32: weight must be 2-D with contiguous rows");
  const auto xc = x.reshape({-1}).contiguous();
  const int64_t rows = w.size(0), cols = w.size(1), row_stride = w.stride(0);
  TORCH_CHECK(xc.numel() == cols, "gemv_f32: x has ", xc.numel(), " values, weight rows have ", cols);
  torch::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == rows, "gemv_f32: bias has ", bias_c.numel(), " values, weight has ", rows, " rows");
  }
  const float* bp = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  auto out = torch::empty({rows}, xc.options());
  const float *xp = xc.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float sum = dot_f32(wp + n * row_stride, xp, cols);
      op[n] = bp ? sum + bp[n] : sum;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_f32", &gemv_f32, "fp32 batch-1 linear, vectorised for the build machine", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("bias") = pybind11::none());
}
