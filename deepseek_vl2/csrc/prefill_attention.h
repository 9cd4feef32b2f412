// Attention over a prompt's (or a vision tile's) tokens for bf16 activations on AMX tiles (included by
// decode_bf16.cpp after the tile products, whose TileConfig it uses): the vision tower's heads, and the
// decoder's prompt chunks (causal, against the keys cached before them).
//
// PyTorch's CPU flash attention ran SigLIP's heads (head size 72, 729 tokens a tile) at ~0.36 TFLOP/s, a
// tenth of the matmul probe, and a 438-token prompt's causal heads of tiny at ~2 ms a layer. All the keys of
// one head fit in one pass, so there is no online rescaling: per 32 queries, the scores against every key they
// may see on tiles, an exact softmax in fp32, the probabilities rounded to bf16 (as PyTorch's bf16 flash
// attention rounds them for its second product), their product with the values on tiles, divided by the fp32
// sum at the end.
#pragma once

namespace decode {

// 2^x for finite x <= 0 (softmax arguments): 2^n 2^f with n = round(x), |f| <= 1/2, 2^f by its Taylor
// polynomial of degree 6 (relative error below 1.2e-7, two fp32 roundings); 0 far below -126 (scalef
// underflows, subnormals are flushed). Nine instructions, where exp_ps's range reduction and clamping take
// fifteen: the softmax of the tower's attention evaluates 17 million of them a layer.
inline __m512 exp2_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108665e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650696e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718056e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// `count` rows of `cols` values (the values of one head, a row per key) as the tiles that multiply a matrix
// of key weights from the left: [cols / 16][count / 32][16 key pairs][16 columns], pair p of column c
// holding (row 2p, row 2p + 1); zeros past the last row and column. 16 columns of a row pair at a time, the
// rows read in order (MLA's decode packs its latent cache straight from memory: column by column, each
// pass touching a piece of every row, it waited on the cache misses).
inline void pack_columns_as_tiles(const uint16_t* first, int64_t stride, int64_t count, int64_t cols, uint32_t* out) {
  const int64_t chunks = (count + 31) / 32, groups = (cols + 15) / 16, pairs = (count + 1) / 2;
  for (int64_t g = 0; g < groups; ++g)  // (the pairs past the last row: zeros)
    std::memset(out + g * chunks * 256 + pairs * 16, 0, size_t(chunks * 16 - pairs) * 64);
  for (int64_t pair = 0; pair < pairs; ++pair) {
    for (int64_t g = 0; g < groups; ++g) {
      const __mmask16 valid = first_lanes(cols - 16 * g);
      const uint16_t* a = first + 2 * pair * stride + 16 * g;
      const __m512i low = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, a));
      const __m512i high = 2 * pair + 1 < count ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, a + stride)), 16)
                                                : _mm512_setzero_si512();
      _mm512_storeu_si512(out + g * chunks * 256 + pair * 16, _mm512_or_si512(low, high));
    }
  }
}

// sums[r * width + c] = a[r, :] . input c for the 32 rows r of `a` (two 16-row tiles, rows row_stride values
// apart, `chunks` pieces of 32 values each) and every packed input c < columns (input tile t's piece k at
// packed + t * tile_stride + 512 * k; width = 16 * tiles). Two row tiles by two input tiles at a time: each
// input tile is loaded once for both row tiles, where tile_rows_wide loads it once per 16 rows (the packed keys
// and values come from L2). Each sum is the same chain of products, in the same order, as tile_rows_wide's.
inline void tile_row_pairs(const uint16_t* a, int64_t row_stride, int64_t chunks, const uint16_t* packed, int64_t tile_stride,
                           int columns, float* sums) {
  const int tiles = (columns + 15) / 16;
  const int64_t width = 16 * tiles;
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;  // (sums 0-3, rows 4-5, inputs 6-7)
  _tile_loadconfig(&config);
  for (int first = 0; first < tiles; first += 2) {
    const bool two = first + 1 < tiles;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < chunks; ++k) {
      _tile_loadd(4, a + 32 * k, row_stride * 2);
      _tile_loadd(5, a + 16 * row_stride + 32 * k, row_stride * 2);
      _tile_loadd(6, packed + first * tile_stride + 512 * k, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (two) {
        _tile_loadd(7, packed + (first + 1) * tile_stride + 512 * k, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    float* out = sums + 16 * first;
    _tile_stored(0, out, width * 4);
    _tile_stored(2, out + 16 * width, width * 4);
    if (two) {
      _tile_stored(1, out + 16, width * 4);
      _tile_stored(3, out + 16 * width + 16, width * 4);
    }
  }
}

// softmax(scale q k^T) v for every head: q [B, H, S, dk], k [B, Hk, T, dk], v [B, Hk, T, dv] bf16 (any strides
// with the last dimension dense; query head h reads key/value head h / (H / Hk)). With causal_offset >= 0, query
// s sees keys 0 .. causal_offset + s only (a prompt chunk whose first token sits at position causal_offset of
// the T cached keys); below 0, every key. Returns [B, S, H, dv] bf16 (the heads side by side, as the output
// projection takes them). Every thread takes whole (batch, head) pairs: packs that head's keys and values once,
// then its queries 32 at a time (two row tiles: each packed key or value tile loaded once for both; SigLIP's heads of
// a tile took 3.9-4.0 ms a layer 16 at a time, 3.25-3.6 ms so, with the same bits).
torch::Tensor attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t causal_offset,
                             double scale) {
  DECODE_CHECK(tiles_min_rows().load() > 0, "attention_bf16: AMX tiles are off (set_tiles)");
  for (const auto* t : {&q, &k, &v})
    DECODE_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 4 && t->device().is_cpu() && t->stride(3) == 1,
                 "attention_bf16: q, k and v must be [B, heads, tokens, d] bf16 with the last dimension dense");
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), dk = q.size(3);
  const int64_t kv_heads = k.size(1), keys = k.size(2), dv = v.size(3);
  DECODE_CHECK(k.size(0) == batch && v.size(0) == batch && v.size(1) == kv_heads && v.size(2) == keys && k.size(3) == dk &&
                   kv_heads > 0 && heads % kv_heads == 0 && keys > 0,
               "attention_bf16: k [B, Hk, T, dk] and v [B, Hk, T, dv] must match q [B, H, S, dk] (H a multiple of Hk)");
  DECODE_CHECK(causal_offset < 0 || causal_offset + queries <= keys, "attention_bf16: the causal queries reach past the keys");
  torch::Tensor out = torch::empty({batch, queries, heads, dv}, q.options());
  if (queries == 0) return out;
  const uint16_t *qp = data_of<uint16_t>(q), *kp = data_of<uint16_t>(k), *vp = data_of<uint16_t>(v);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t dk_chunks = (dk + 31) / 32, key_tiles = (keys + 15) / 16, key_chunks = (keys + 31) / 32;
  const int64_t dv_groups = (dv + 15) / 16, group = heads / kv_heads;
  const float log2e_scale = float(1.44269504088896341 * scale);  // (softmax(scale s) = 2^(log2e scale s) / sum)
  constexpr int64_t kBlock = 32;  // queries a block: two row tiles (tile_row_pairs)
  std::atomic<int64_t> next{0};
  in_parallel([&](int, int) {
    std::vector<const uint16_t*> key_rows(static_cast<size_t>(keys));
    std::vector<uint32_t> values(size_t(dv_groups * key_chunks * 256 + 16));
    std::vector<uint16_t> query_buffer(size_t(kBlock * 32 * dk_chunks + 32)), probs(size_t(kBlock * 32 * key_chunks + 32));
    std::vector<float> scores(size_t(kBlock * 16 * key_tiles)), sums(size_t(kBlock * 16 * dv_groups));
    uint32_t* value_tiles = aligned_64(values.data());
    uint16_t* q_rows = aligned_64(query_buffer.data());
    uint16_t* p_rows = aligned_64(probs.data());
    int64_t packed_item = -1;  // (the (batch, key head) whose keys and values are packed)
    const uint16_t* packed_keys = nullptr;
    for (int64_t item; (item = next.fetch_add(1)) < batch * heads;) {
      const int64_t b = item / heads, h = item % heads, kh = h / group;
      if (packed_item != b * kv_heads + kh) {  // (pack_tiles: this thread's buffer; columns past the last key never read)
        for (int64_t t = 0; t < keys; ++t) key_rows[t] = kp + b * k.stride(0) + kh * k.stride(1) + t * k.stride(2);
        packed_keys = pack_tiles(key_rows.data(), int(keys), dk);
        pack_columns_as_tiles(vp + b * v.stride(0) + kh * v.stride(1), v.stride(2), keys, dv, value_tiles);
        packed_item = b * kv_heads + kh;
      }
      for (int64_t q0 = 0; q0 < queries; q0 += kBlock) {
        const int64_t count = std::min<int64_t>(kBlock, queries - q0);
        // the keys these queries see: all, or up to the last query's position
        const int64_t seen = causal_offset < 0 ? keys : causal_offset + q0 + count;
        const int64_t seen_tiles = (seen + 15) / 16, padded = 32 * ((seen + 31) / 32), stride = 16 * seen_tiles;
        std::memset(q_rows, 0, size_t(kBlock * 32 * dk_chunks) * 2);
        for (int64_t r = 0; r < count; ++r)
          std::memcpy(q_rows + r * 32 * dk_chunks, qp + b * q.stride(0) + h * q.stride(1) + (q0 + r) * q.stride(2), size_t(dk) * 2);
        tile_row_pairs(q_rows, 32 * dk_chunks, dk_chunks, packed_keys, 512 * dk_chunks, int(stride), scores.data());
        float total[kBlock];
        for (int64_t r = 0; r < kBlock; ++r) {
          float* s = scores.data() + r * stride;
          uint16_t* p = p_rows + r * padded;
          if (r >= count) {  // (rows past the queries: zeros, never stored)
            std::memset(p, 0, size_t(padded) * 2);
            continue;
          }
          const int64_t visible = causal_offset < 0 ? keys : causal_offset + q0 + r + 1;
          const int64_t whole = visible / 16, tiles = (visible + 15) / 16;
          const __mmask16 tail = __mmask16((1u << (visible % 16 ? visible % 16 : 16)) - 1);
          // (the largest raw score: the scale is positive, so its scaled value is the largest scaled one)
          __m512 best = _mm512_set1_ps(-INFINITY);
          for (int64_t t = 0; t < whole; ++t) best = _mm512_max_ps(best, _mm512_loadu_ps(s + 16 * t));
          if (whole < tiles) best = _mm512_mask_max_ps(best, tail, best, _mm512_loadu_ps(s + 16 * whole));
          // exp(scale (s - best)) = 2^(s log2e scale - best log2e scale): one fused multiply-subtract a value
          const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(best) * log2e_scale);
          const __m512 factor = _mm512_set1_ps(log2e_scale);
          __m512 sum = _mm512_setzero_ps(), sum_odd = _mm512_setzero_ps();  // (two chains of additions)
          int64_t t = 0;
          for (; t + 1 < whole; t += 2) {
            const __m512 e0 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + 16 * t), factor, shift));
            const __m512 e1 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + 16 * t + 16), factor, shift));
            sum = _mm512_add_ps(sum, e0);
            sum_odd = _mm512_add_ps(sum_odd, e1);
            store_f32_as_bf16x16(p + 16 * t, e0);
            store_f32_as_bf16x16(p + 16 * t + 16, e1);
          }
          for (; t < tiles; ++t) {  // (the last whole tile if their count is odd, then the partial one, masked)
            const __mmask16 valid = t < whole ? __mmask16(0xffff) : tail;
            const __m512 e = _mm512_maskz_mov_ps(valid, exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + 16 * t), factor, shift)));
            sum = _mm512_add_ps(sum, e);
            store_f32_as_bf16x16(p + 16 * t, e);
          }
          sum = _mm512_add_ps(sum, sum_odd);
          for (int64_t key = 16 * tiles; key < padded; ++key) p[key] = 0;
          total[r] = _mm512_reduce_add_ps(sum);
        }
        // out[q] = (p[q] @ v) / total[q]: p's rows on the left (two tiles of 16 queries x 32 keys a piece), the values'
        // columns on the right (packed for all the keys: the first padded / 32 pieces of each).
        tile_row_pairs(p_rows, padded, padded / 32, reinterpret_cast<const uint16_t*>(value_tiles), 512 * key_chunks,
                       int(16 * dv_groups), sums.data());
        for (int64_t r = 0; r < count; ++r) {
          const float inverse = 1.0f / total[r];
          uint16_t* o = op + ((b * queries + q0 + r) * heads + h) * dv;
          const float* row = sums.data() + r * 16 * dv_groups;
          for (int64_t c = 0; c < dv; c += 16) {
            const __mmask16 valid = first_lanes(dv - c);
            store_f32_as_bf16x16(o + c, _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, row + c), _mm512_set1_ps(inverse)), valid);
          }
        }
      }
    }
  });
  return out;
}

}  // namespace decode
