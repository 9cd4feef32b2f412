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
#include "gemv_args.h"

namespace decode {

constexpr int kLanes = 32;

float dot(const float* w, const float* x, int64_t n) {
  float partial[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) partial[j] += w[k + j] * x[k + j];
  float sum = 0.0f;
  for (int j = 0; j < kLanes; ++j) sum += partial[j];
  for (; k < n; ++k) sum += w[k] * x[k];
  return sum;
}

float router_dot(const float* w, const float* x, int64_t n) { return dot(w, x, n); }

}  // namespace decode

using namespace decode;

// x: K fp32 values; w: [N, K] fp32 with contiguous rows; bias: [N] or none (see gemv_args.h).
torch::Tensor gemv_f32(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  const GemvArgs args = gemv_args("gemv_f32", at::kFloat, x, w, bias);
  const float* bp = args.bias_f32.defined() ? args.bias_f32.data_ptr<float>() : nullptr;
  auto out = torch::empty({args.rows}, x.options());
  const float *xp = args.x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, args.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float sum = dot(wp + n * args.row_stride, xp, args.cols);
      op[n] = bp ? sum + bp[n] : sum;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_f32", &gemv_f32, "fp32 batch-1 linear, vectorised for the build machine", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("bias") = pybind11::none());
  m.def("ffn_block_f32", &ffn_block<float>, "RMSNorm + router + chosen and shared experts (or a dense MLP) + residual, one token");
  m.def("mha_block_f32", &mha_block<float>, "RMSNorm + q/k/v + RoPE + cache write + attention + o_proj + residual, one token");
  pybind11::class_<DecodeStep<float>>(m, "DecodeStep", "a whole fp32 decode step of a plain-attention model in one parallel region")
      .def(pybind11::init<const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, double,
                          const torch::Tensor&>())
      .def("add_layer", &DecodeStep<float>::add_layer)
      .def("step", &DecodeStep<float>::step);
}
