// The vision tower's attention and GELU for bf16 activations on AMX tiles and AVX-512 (included by
// decode_bf16.cpp after the tile products and exp_ps it uses).
//
// PyTorch's CPU flash attention ran SigLIP's heads (head size 72, 729 tokens a tile) at ~0.36 TFLOP/s, a
// tenth of the matmul probe: 29 % of the tower's time for ~10 % of its FLOPs; the matrix products and the
// softmax as separate PyTorch ops were slower still. A tile's 729 keys fit in one pass, so there is no
// online rescaling: per 16 queries, the scores against every key on tiles, an exact softmax in fp32, the
// probabilities rounded to bf16 (as PyTorch's bf16 flash attention rounds them for its second product),
// their product with the values on tiles, divided by the fp32 sum at the end.
#pragma once

namespace decode {

// `count` rows of `cols` values (the values of one head, a row per key) as the tiles that multiply a matrix
// of key weights from the left: [cols / 16][count / 32][16 key pairs][16 columns], pair p of column c
// holding (row 2p, row 2p + 1); zeros past the last row and column.
inline void pack_columns_as_tiles(const uint16_t* first, int64_t stride, int64_t count, int64_t cols, uint32_t* out) {
  const int64_t chunks = (count + 31) / 32, groups = (cols + 15) / 16;
  std::memset(out, 0, size_t(groups * chunks * 256) * 4);
  for (int64_t row = 0; row < count; row += 2) {
    const uint16_t* a = first + row * stride;
    const uint16_t* b = row + 1 < count ? a + stride : nullptr;
    const int64_t pair = row / 2;  // (chunk pair / 16, place pair % 16)
    for (int64_t c = 0; c < cols; ++c)
      out[(c / 16) * chunks * 256 + pair * 16 + c % 16] = uint32_t(a[c]) | (b ? uint32_t(b[c]) << 16 : 0u);
  }
}

// softmax(q k^T / sqrt(d)) v for every head of every image: qkv [B, N, 3 * W] bf16 (q | k | v, each W =
// heads * d values, head-major), returns [B, N, W] bf16 (the heads side by side, as the output projection
// takes them). Every thread takes whole (image, head) pairs: packs that head's keys and values once, then
// its queries 16 at a time.
torch::Tensor vision_attention_bf16(const torch::Tensor& qkv_in, int64_t heads) {
  DECODE_CHECK(tiles_min_rows().load() > 0, "vision_attention_bf16: AMX tiles are off (set_tiles)");
  const auto qkv = qkv_in.contiguous();
  DECODE_CHECK(qkv.scalar_type() == at::kBFloat16 && qkv.dim() == 3 && qkv.device().is_cpu() && heads > 0 &&
                   qkv.size(2) % (3 * heads) == 0,
               "vision_attention_bf16: qkv must be [B, N, 3 * heads * d] bf16");
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), width = qkv.size(2) / 3, d = width / heads;
  torch::Tensor out = torch::empty({batch, tokens, width}, qkv.options());
  const uint16_t* base = data_of<uint16_t>(qkv);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t d_chunks = (d + 31) / 32, key_tiles = (tokens + 15) / 16, key_chunks = (tokens + 31) / 32;
  const int64_t d_groups = (d + 15) / 16, padded_keys = 32 * key_chunks;
  const float scale = 1.0f / std::sqrt(float(d));
  std::atomic<int64_t> next{0};
  in_parallel([&](int, int) {
    std::vector<const uint16_t*> key_rows(static_cast<size_t>(tokens));
    std::vector<uint32_t> values(size_t(d_groups * key_chunks * 256 + 16));
    std::vector<uint16_t> queries(size_t(16 * 32 * d_chunks + 32)), probs(size_t(16 * padded_keys + 32));
    std::vector<float> scores(size_t(16 * 16 * key_tiles)), sums(size_t(16 * 16 * d_groups));
    auto aligned = [](auto* p) { return p + (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64 / sizeof(*p); };
    uint32_t* value_tiles_p = aligned(values.data());
    uint16_t* q_rows = aligned(queries.data());
    uint16_t* p_rows = aligned(probs.data());
    for (int64_t item; (item = next.fetch_add(1)) < batch * heads;) {
      const int64_t b = item / heads, h = item % heads;
      const uint16_t* rows = base + b * tokens * 3 * width;  // token t of this image: rows + t * 3 * width
      for (int64_t t = 0; t < tokens; ++t) key_rows[t] = rows + t * 3 * width + width + h * d;
      // (pack_tiles: this thread's buffer; the columns past the last key are never read, masked below)
      const uint16_t* packed_keys = pack_tiles(key_rows.data(), int(tokens), d);
      pack_columns_as_tiles(rows + 2 * width + h * d, 3 * width, tokens, d, value_tiles_p);
      for (int64_t q0 = 0; q0 < tokens; q0 += 16) {
        const int64_t count = std::min<int64_t>(16, tokens - q0);
        std::memset(q_rows, 0, size_t(16 * 32 * d_chunks) * 2);
        for (int64_t r = 0; r < count; ++r)
          std::memcpy(q_rows + r * 32 * d_chunks, rows + (q0 + r) * 3 * width + h * d, size_t(d) * 2);
        // (tile_rows_wide: 16 query rows against up to four key tiles per load of the queries)
        tile_rows_wide(q_rows, 32 * d_chunks, 32 * d_chunks, packed_keys, int(16 * key_tiles), 16, 0, scores.data());
        float total[16];
        const int64_t stride = 16 * key_tiles;
        const __mmask16 tail = __mmask16((1u << (tokens % 16 ? tokens % 16 : 16)) - 1);
        const int64_t whole = tokens / 16;
        for (int64_t r = 0; r < 16; ++r) {
          float* s = scores.data() + r * stride;
          uint16_t* p = p_rows + r * padded_keys;
          if (r >= count) {  // (rows past the queries: zeros, never stored)
            std::memset(p, 0, size_t(padded_keys) * 2);
            continue;
          }
          __m512 best = _mm512_set1_ps(-INFINITY);
          for (int64_t t = 0; t < whole; ++t) best = _mm512_max_ps(best, _mm512_mul_ps(_mm512_loadu_ps(s + 16 * t), _mm512_set1_ps(scale)));
          if (whole < key_tiles)
            best = _mm512_mask_max_ps(best, tail, best, _mm512_mul_ps(_mm512_loadu_ps(s + 16 * whole), _mm512_set1_ps(scale)));
          const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(best));
          __m512 sum = _mm512_setzero_ps();
          for (int64_t t = 0; t < key_tiles; ++t) {
            const __mmask16 valid = t < whole ? __mmask16(0xffff) : tail;
            const __m512 e = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(s + 16 * t), _mm512_set1_ps(scale)), shift)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16 * t), (__m256i)_mm512_cvtneps_pbh(e));
          }
          for (int64_t k = 16 * key_tiles; k < padded_keys; ++k) p[k] = 0;
          total[r] = _mm512_reduce_add_ps(sum);
        }
        // out[q] = (p[q] @ v) / total[q]: p's rows on the left (16 queries x 32 keys a piece), the values'
        // columns on the right.
        tile_rows_wide(p_rows, padded_keys, padded_keys, reinterpret_cast<const uint16_t*>(value_tiles_p),
                       int(16 * d_groups), 16, 0, sums.data());
        for (int64_t r = 0; r < count; ++r) {
          const float inverse = 1.0f / total[r];
          uint16_t* o = op + (b * tokens + q0 + r) * width + h * d;
          const float* row = sums.data() + r * 16 * d_groups;
          for (int64_t c = 0; c < d; ++c) o[c] = float_to_bf16(row[c] * inverse);
        }
      }
    }
  });
  return out;
}

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
