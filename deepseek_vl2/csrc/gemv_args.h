// Argument checks of the batch-1 linear kernel (step.h: gemv, bound as gemv_bf16 and gemv_f32).
#pragma once
#include <torch/extension.h>

#include "check.h"

// A linear's optional bias as an fp32 copy of its `rows` values (undefined when there is none).
inline torch::Tensor fp32_bias(const char* name, const c10::optional<torch::Tensor>& bias, int64_t rows) {
  if (!bias.has_value() || !bias->defined()) return torch::Tensor();
  DECODE_CHECK(bias->numel() == rows, name, ": bias has ", bias->numel(), " values, weight has ", rows, " rows");
  return bias->to(at::kFloat).contiguous();
}

// x: K values of `dtype` (any shape with K elements), flattened and contiguous; w: [N, K] of `dtype` with
// contiguous rows (any row stride); bias: [N] values, as fp32 (undefined when there is none).
struct GemvArgs {
  torch::Tensor x, bias_f32;
  int64_t rows, cols, row_stride;
};

inline GemvArgs gemv_args(const char* name, at::ScalarType dtype, const torch::Tensor& x, const torch::Tensor& w,
                          const c10::optional<torch::Tensor>& bias) {
  DECODE_CHECK(x.scalar_type() == dtype && w.scalar_type() == dtype, name, ": ", dtype, " tensors only");
  DECODE_CHECK(x.device().is_cpu() && w.device().is_cpu(), name, ": CPU tensors only");
  DECODE_CHECK(w.dim() == 2 && w.stride(1) == 1, name, ": weight must be 2-D with contiguous rows");
  GemvArgs args{x.reshape({-1}).contiguous(), fp32_bias(name, bias, w.size(0)), w.size(0), w.size(1), w.stride(0)};
  DECODE_CHECK(args.x.numel() == args.cols, name, ": x has ", args.x.numel(), " values, weight rows have ", args.cols);
  return args;
}
