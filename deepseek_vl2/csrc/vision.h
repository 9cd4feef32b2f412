// The vision tower's GELU for bf16 activations on AVX-512 (included by decode_bf16.cpp after exp_ps, which it
// uses). Its attention is prefill_attention.h's.
#pragma once

namespace decode {

// GELU with the tanh approximation, in place on bf16 values: x * sigmoid(2 y), y = sqrt(2 / pi) (x + 0.044715
// x^3), which equals 0.5 x (1 + tanh(y)) without its cancellation for negative x; -0 where 2y < -88 (fp32's
// tanh is -1 there, exp_ps clamps at 88). PyTorch's bf16 gelu took ~1 ns a value, 13 % of the tower.
void gelu_tanh_bf16_(torch::Tensor& x) {
  DECODE_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.device().is_cpu(),
               "gelu_tanh_bf16_: a contiguous bf16 CPU tensor");
  auto* p = reinterpret_cast<uint16_t*>(x.data_ptr());
  const int64_t n = x.numel();
  at::parallel_for(0, (n + 15) / 16, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i = 16 * block;
      const __mmask16 valid = i + 16 <= n ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
      const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, p + i)), 16));
      const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                         _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(v, v), v), _mm512_set1_ps(0.044715f), v));
      const __m512 minus_two_y = _mm512_mul_ps(inner, _mm512_set1_ps(-2.0f));
      // (exp_ps of -inf would be NaN: below -88 the sigmoid is 1 in fp32 anyway)
      __m512 g = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_max_ps(minus_two_y, _mm512_set1_ps(-88.0f)))));
      g = _mm512_mask_mul_ps(g, _mm512_cmp_ps_mask(minus_two_y, _mm512_set1_ps(88.0f), _CMP_GT_OQ), v, _mm512_setzero_ps());
      _mm256_mask_storeu_epi16(p + i, valid, (__m256i)_mm512_cvtneps_pbh(g));
    }
  });
}

}  // namespace decode
