// A prompt's elementwise steps in the decoder, for bf16 rows on AVX-512 (included by
// decode_bf16.cpp after exp_ps and silu_ps, which it uses).
//
// Between its matrix products, a 438-token prefill of tiny ran ~60 ms of small PyTorch ops: each MoE layer's
// weighted sum of the chosen experts (6 gathers, upcasts, products and sums), RoPE (products, a negation, a
// concatenation, a sum, each a pass over q or k), RMSNorm (upcast, square, mean, scale, downcast, weight) and
// the SwiGLU's silu and product. Here each is one pass over the rows. RoPE and the weighted sum round exactly
// where the eager ops round (bit-identical); RMSNorm sums its squares in another order and the SwiGLU uses
// exp_ps, so those may differ from the eager ops by one bf16 step.
#pragma once

namespace decode {

// (a * b and a + b each rounded on its own: the *_round_ forms are builtins that the compiler never
// contracts into a fused multiply-add, as it may the plain ones, so the sums round as PyTorch's ops do)
inline __m512 mul_exact(__m512 a, __m512 b) { return _mm512_mul_round_ps(a, b, _MM_FROUND_CUR_DIRECTION); }
inline __m512 add_exact(__m512 a, __m512 b) { return _mm512_add_round_ps(a, b, _MM_FROUND_CUR_DIRECTION); }

// body(i, valid) for the 16-value blocks of n values (the last one partial, `valid` its lanes), in parallel.
template <typename Body>
void in_blocks_of_16(int64_t n, Body body) {
  at::parallel_for(0, (n + 15) / 16, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i = 16 * block;
      body(i, first_lanes(n - i));
    }
  });
}

// One row's RMSNorm: out = weight * bf16(x * rsqrt(mean(x^2) + eps)), the squares summed 16 lanes at a time.
inline void rms_norm_row_simd(const uint16_t* x, const uint16_t* weight, int64_t d, float eps, uint16_t* out) {
  const int64_t whole = d / 16;
  const __mmask16 tail = __mmask16((1u << (d % 16)) - 1);
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < whole; ++i) {
    const __m512 v = load_bf16x16_as_f32(x + 16 * i);
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  if (tail) {
    const __m512 v = load_bf16x16_as_f32(x + 16 * whole, tail);
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const __m512 inv_rms = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / float(d) + eps));
  for (int64_t i = 0; 16 * i < d; ++i) {
    const __mmask16 valid = i < whole ? __mmask16(0xffff) : tail;
    const __m512 normed = round_bf16_ps(_mm512_mul_ps(load_bf16x16_as_f32(x + 16 * i, valid), inv_rms));
    store_f32_as_bf16x16(out + 16 * i, _mm512_mul_ps(load_bf16x16_as_f32(weight + 16 * i, valid), normed), valid);
  }
}

// weight * bf16(x * rsqrt(mean(x^2) + eps)) for every row of x [..., D] bf16 (the eager RMSNorm: statistics in
// fp32, normalised values rounded, then scaled by the bf16 weight).
torch::Tensor rms_norm_rows_bf16(const torch::Tensor& x_in, const torch::Tensor& weight_in, double eps) {
  const auto x = x_in.contiguous(), weight = weight_in.contiguous();
  DECODE_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
               "rms_norm_rows_bf16: bf16 CPU tensors");
  const int64_t d = weight.numel();
  DECODE_CHECK(x.dim() >= 1 && x.size(-1) == d, "rms_norm_rows_bf16: weight has ", d, " values, x rows have ", x.size(-1));
  torch::Tensor out = torch::empty_like(x);
  const uint16_t *xp = data_of<uint16_t>(x), *wp = data_of<uint16_t>(weight);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, x.numel() / d, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) rms_norm_row_simd(xp + row * d, wp, d, float(eps), op + row * d);
  });
  return out;
}

// x * cos + rotate_half(x) * sin for x [B, H, S, d] bf16 (any strides with the last dimension dense) and cos,
// sin [S, d] bf16, each product and the sum rounded to bf16 as the eager ops round them; rotate_half(x) is
// (-x[d/2:], x[:d/2]). Returns a tensor laid out like x (contiguous if x is not dense).
torch::Tensor rope_bf16(const torch::Tensor& x, const torch::Tensor& cos_in, const torch::Tensor& sin_in) {
  const auto cos = cos_in.contiguous(), sin = sin_in.contiguous();
  DECODE_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 &&
                   x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1,
               "rope_bf16: x [B, H, S, d] bf16 with its last dimension dense, cos and sin bf16");
  const int64_t batch = x.size(0), heads = x.size(1), seq = x.size(2), d = x.size(3), half = d / 2;
  DECODE_CHECK(d % 2 == 0 && cos.dim() == 2 && cos.size(0) == seq && cos.size(1) == d && sin.sizes() == cos.sizes(),
               "rope_bf16: cos and sin must be [S, d] with d even");
  torch::Tensor out = torch::empty_like(x);  // (x's layout where x is dense; else contiguous)
  const uint16_t *xp = data_of<uint16_t>(x), *cp = data_of<uint16_t>(cos), *sp = data_of<uint16_t>(sin);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, batch * heads * seq, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * seq), h = item / seq % heads, s = item % seq;
      const uint16_t* in = xp + b * x.stride(0) + h * x.stride(1) + s * x.stride(2);
      uint16_t* o = op + b * out.stride(0) + h * out.stride(1) + s * out.stride(2);
      const uint16_t *c = cp + s * d, *n = sp + s * d;
      for (int64_t i = 0; i < half; i += 16) {
        const __mmask16 valid = first_lanes(half - i);
        const __m512 low = load_bf16x16_as_f32(in + i, valid), high = load_bf16x16_as_f32(in + half + i, valid);
        // (first half: x * cos + (-high) * sin; second half: x * cos + low * sin)
        const __m512 first = add_exact(round_bf16_ps(mul_exact(low, load_bf16x16_as_f32(c + i, valid))),
                                       round_bf16_ps(mul_exact(_mm512_sub_ps(_mm512_setzero_ps(), high), load_bf16x16_as_f32(n + i, valid))));
        const __m512 second = add_exact(round_bf16_ps(mul_exact(high, load_bf16x16_as_f32(c + half + i, valid))),
                                        round_bf16_ps(mul_exact(low, load_bf16x16_as_f32(n + half + i, valid))));
        store_f32_as_bf16x16(o + i, first, valid);
        store_f32_as_bf16x16(o + half + i, second, valid);
      }
    }
  });
  return out;
}

// sum_j weights[n, j] * grouped[position[n, j]] for every token n, in fp32, choice by choice in order (each
// product and each partial sum rounded on its own, as Experts._weighted_sum's eager ops), then rounded to bf16.
// grouped: [P, D] bf16 (the experts' outputs in expert-grouped order); position: [N, k] int64; weights: [N, k]
// fp32. Returns [N, D] bf16.
torch::Tensor weighted_sum_bf16(const torch::Tensor& grouped_in, const torch::Tensor& position_in, const torch::Tensor& weights_in) {
  const auto grouped = grouped_in.contiguous(), position = position_in.contiguous(), weights = weights_in.contiguous();
  DECODE_CHECK(grouped.scalar_type() == at::kBFloat16 && grouped.dim() == 2 && grouped.device().is_cpu(),
               "weighted_sum_bf16: grouped must be [P, D] bf16");
  DECODE_CHECK(position.scalar_type() == at::kLong && position.dim() == 2 && weights.scalar_type() == at::kFloat &&
                   weights.sizes() == position.sizes(),
               "weighted_sum_bf16: position [N, k] int64 and weights [N, k] fp32");
  const int64_t tokens = position.size(0), top_k = position.size(1), d = grouped.size(1), positions = grouped.size(0);
  const int64_t* where = position.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens * top_k; ++i)
    DECODE_CHECK(where[i] >= 0 && where[i] < positions, "weighted_sum_bf16: position out of range");
  torch::Tensor out = torch::empty({tokens, d}, grouped.options());
  const uint16_t* gp = data_of<uint16_t>(grouped);
  const float* wp = weights.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 valid = first_lanes(d - i);
        __m512 total = mul_exact(load_bf16x16_as_f32(gp + where[n * top_k] * d + i, valid), _mm512_set1_ps(wp[n * top_k]));
        for (int64_t j = 1; j < top_k; ++j)
          total = add_exact(total, mul_exact(load_bf16x16_as_f32(gp + where[n * top_k + j] * d + i, valid), _mm512_set1_ps(wp[n * top_k + j])));
        store_f32_as_bf16x16(op + n * d + i, total, valid);
      }
    }
  });
  return out;
}

// bf16(bf16(silu(gate)) * up) elementwise (the SwiGLU's activation, as the eager silu and product round it;
// silu through exp_ps). gate and up: bf16 of the same shape. Returns a fresh tensor.
torch::Tensor silu_mul_bf16(const torch::Tensor& gate_in, const torch::Tensor& up_in) {
  const auto gate = gate_in.contiguous(), up = up_in.contiguous();
  DECODE_CHECK(gate.scalar_type() == at::kBFloat16 && up.scalar_type() == at::kBFloat16 && gate.sizes() == up.sizes() &&
                   gate.device().is_cpu(),
               "silu_mul_bf16: gate and up must be bf16 CPU tensors of one shape");
  torch::Tensor out = torch::empty_like(gate);
  const uint16_t *gp = data_of<uint16_t>(gate), *up_p = data_of<uint16_t>(up);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  in_blocks_of_16(gate.numel(), [&](int64_t i, __mmask16 valid) {
    const __m512 act = round_bf16_ps(silu_ps(load_bf16x16_as_f32(gp + i, valid)));
    store_f32_as_bf16x16(op + i, _mm512_mul_ps(act, load_bf16x16_as_f32(up_p + i, valid)), valid);
  });
  return out;
}

}  // namespace decode
