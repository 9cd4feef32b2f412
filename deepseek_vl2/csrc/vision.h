// The vision tower's GELU for bf16 activations on AVX-512 (included by decode_bf16.cpp after exp_ps and
// prefill_rows.h's in_blocks_of_16, which it uses). Its attention is prefill_attention.h's.
#pragma once

namespace decode {

// GELU with the tanh approximation, in place on bf16 values: x * sigmoid(2 y), y = sqrt(2 / pi) (x + 0.044715
// x^3), which equals 0.5 x (1 + tanh(y)) without its cancellation for negative x; -0 where 2y < -88 (fp32's
// tanh is -1 there, exp_ps clamps at 88). PyTorch's bf16 gelu took ~1 ns a value, 13 % of the tower.
void gelu_tanh_bf16_(torch::Tensor& x) {
  DECODE_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.device().is_cpu(),
               "gelu_tanh_bf16_: a contiguous bf16 CPU tensor");
  auto* p = reinterpret_cast<uint16_t*>(x.data_ptr());
  in_blocks_of_16(x.numel(), [&](int64_t i, __mmask16 valid) {
    const __m512 v = load_bf16x16_as_f32(p + i, valid);
    const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                       _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(v, v), v), _mm512_set1_ps(0.044715f), v));
    const __m512 minus_two_y = _mm512_mul_ps(inner, _mm512_set1_ps(-2.0f));
    // (exp_ps of -inf would be NaN: below -88 the sigmoid is 1 in fp32 anyway)
    __m512 g = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_max_ps(minus_two_y, _mm512_set1_ps(-88.0f)))));
    g = _mm512_mask_mul_ps(g, _mm512_cmp_ps_mask(minus_two_y, _mm512_set1_ps(88.0f), _CMP_GT_OQ), v, _mm512_setzero_ps());
    store_f32_as_bf16x16(p + i, g, valid);
  });
}

}  // namespace decode
