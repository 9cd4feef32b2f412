// MLA's absorbed decode attention on AMX tiles (included by decode_bf16.cpp after prefill_attention.h, whose
// exp2_ps and value packing it uses; mla.h's attend_latent_heads calls it wherever tiles are on).
//
// In the absorbed form every query head attends over the same cached rows (latent [rank] + rotated key
// [rope]): a multi-query attention whose heads are the rows of one matrix product. On vectors each cached
// row was widened to fp32 and met every head's fp32 query with FMAs (~54 GFLOP/s on the 2-core VM): 15 % of
// base's int4 decode step at 438 positions. Here the heads' queries are rounded to bf16 once and the cache
// is read as tiles in place: the scores of 16 positions by up to 16 heads per accumulation tile, a softmax
// with the heads as vector lanes, the probabilities rounded to bf16 (as PyTorch's bf16 attention rounds
// them for its second product), and their product with the latents (packed as value tiles) on tiles. A
// head's result is the same whatever heads share its call: every tile product keeps a row of A and a column
// of B to itself, and the softmax works lane by lane.
#pragma once

namespace decode {

bool latent_attention_tiles(const uint16_t* latent, int64_t latent_stride, const uint16_t* k_pe, int64_t k_pe_stride,
                            int64_t length, int64_t rank, int64_t rope, const float* q_latent, const uint16_t* q_pe,
                            int64_t count, float scale, float* context) {
  if (tiles_min_rows().load(std::memory_order_relaxed) == 0 || count < 1 || count > 16 || length < 1) return false;
  const int64_t rank_chunks = (rank + 31) / 32, chunks = rank_chunks + (rope + 31) / 32;
  const int64_t width = 32 * chunks;  // (a query, or a gathered key: the latent part zero-padded to 32 values, then rope)
  const bool in_place = rank % 32 == 0 && rope % 32 == 0;  // (whole blocks of 16 keys load from the caches directly)
  const int64_t blocks = (length + 15) / 16, padded = 32 * ((length + 31) / 32), groups = (rank + 15) / 16;
  thread_local std::vector<uint16_t> queries, gathered, probs;
  thread_local std::vector<float> scores, sums;
  thread_local std::vector<uint32_t> values;
  queries.assign(size_t(count * width), 0);
  const uint16_t* query_rows[16];
  for (int64_t j = 0; j < count; ++j) {
    uint16_t* row = queries.data() + j * width;
    for (int64_t i = 0; i < rank; ++i) row[i] = float_to_bf16(q_latent[j * rank + i]);
    std::memcpy(row + 32 * rank_chunks, q_pe + j * rope, size_t(rope) * 2);
    query_rows[j] = row;
  }
  const uint16_t* packed = pack_tiles(query_rows, int(count), width);  // ([chunks][16 value pairs][16 heads])

  // The latents packed as the value tiles of the second product first: that reads the cache row after row
  // from memory (the prefetchers stream it), and leaves it in L2 for the scores' tile loads, 16 rows at a
  // time, which wait on every miss. The rotated keys (a line or two a row) are asked for meanwhile.
  for (int64_t t = 0; t < length; ++t)
    for (int64_t byte = 0; byte < rope * 2; byte += 64)
      _mm_prefetch(reinterpret_cast<const char*>(k_pe + t * k_pe_stride) + byte, _MM_HINT_T0);
  values.resize(size_t(groups * (padded / 32) * 256 + 16));
  uint32_t* value_tiles = aligned_64(values.data());
  pack_columns_as_tiles(latent, latent_stride, length, rank, value_tiles);

  // scores^T [16 blocks][16 keys][16 heads]: the keys are the tiles' rows (A), the heads their columns (B)
  scores.resize(size_t(blocks * 256));
  gathered.resize(size_t(16 * width));
  TileConfig config;
  for (int t = 0; t < 5; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;  // (sums 0, keys 1-2, queries 3-4)
  _tile_loadconfig(&config);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t first = 16 * b, keys = std::min<int64_t>(16, length - first);
    const bool direct = in_place && keys == 16;
    if (!direct) {  // (the last keys, or widths that are not whole pieces: copied, zero-padded)
      std::fill(gathered.begin(), gathered.end(), uint16_t(0));
      for (int64_t r = 0; r < keys; ++r) {
        std::memcpy(gathered.data() + r * width, latent + (first + r) * latent_stride, size_t(rank) * 2);
        std::memcpy(gathered.data() + r * width + 32 * rank_chunks, k_pe + (first + r) * k_pe_stride, size_t(rope) * 2);
      }
    }
    _tile_zero(0);
    for (int64_t k = 0; k < chunks; ++k) {
      const uint16_t* piece = !direct ? gathered.data() + 32 * k
                              : k < rank_chunks ? latent + first * latent_stride + 32 * k
                                                : k_pe + first * k_pe_stride + 32 * (k - rank_chunks);
      const int64_t stride = 2 * (!direct ? width : k < rank_chunks ? latent_stride : k_pe_stride);
      if (k % 2 == 0) {  // (two sets of operand tiles by turns: a load need not wait for the product before it)
        _tile_loadd(1, piece, stride);
        _tile_loadd(3, packed + 512 * k, 64);
        _tile_dpbf16ps(0, 1, 3);
      } else {
        _tile_loadd(2, piece, stride);
        _tile_loadd(4, packed + 512 * k, 64);
        _tile_dpbf16ps(0, 2, 4);
      }
    }
    _tile_stored(0, scores.data() + 256 * b, 64);
  }

  // softmax over the keys, a head per lane: exp(scale (s - best)) = 2^(s log2e scale - best log2e scale)
  const __m512 factor = _mm512_set1_ps(float(1.44269504088896341 * scale));
  __m512 best = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < length; ++t) best = _mm512_max_ps(best, _mm512_loadu_ps(scores.data() + 16 * t));
  const __m512 shift = _mm512_mul_ps(best, factor);
  __m512 total = _mm512_setzero_ps(), total_odd = _mm512_setzero_ps();  // (two chains of additions)
  int64_t t = 0;
  for (; t + 1 < length; t += 2) {
    float* s = scores.data() + 16 * t;
    const __m512 e0 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s), factor, shift));
    const __m512 e1 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + 16), factor, shift));
    total = _mm512_add_ps(total, e0);
    total_odd = _mm512_add_ps(total_odd, e1);
    _mm512_storeu_ps(s, e0);
    _mm512_storeu_ps(s + 16, e1);
  }
  if (t < length) {
    const __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(scores.data() + 16 * t), factor, shift));
    total = _mm512_add_ps(total, e);
    _mm512_storeu_ps(scores.data() + 16 * t, e);
  }
  for (t = length; t < 16 * blocks; ++t) _mm512_storeu_ps(scores.data() + 16 * t, _mm512_setzero_ps());
  alignas(64) float totals[16];
  _mm512_store_ps(totals, _mm512_add_ps(total, total_odd));

  // the probabilities as rows (a head per row, bf16, zeros up to a whole piece of 32 keys): 16 x 16 transposes
  probs.resize(size_t(16 * padded));
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(scores.data() + 256 * b + 16 * i);
    transpose16(r);
    for (int64_t h = 0; h < count; ++h) store_f32_as_bf16x16(probs.data() + h * padded + 16 * b, r[h]);
  }
  if (16 * blocks < padded)
    for (int64_t h = 0; h < count; ++h) std::memset(probs.data() + h * padded + 16 * blocks, 0, 32);

  // context = (p @ latent) / total: the heads' probabilities as the rows, the latents as value tiles (above)
  sums.resize(size_t(16 * 16 * groups));
  tile_rows_wide(probs.data(), padded, padded, reinterpret_cast<const uint16_t*>(value_tiles), int(rank), int(count), 0,
                 sums.data());
  for (int64_t j = 0; j < count; ++j) {
    const float inverse = 1.0f / totals[j];
    for (int64_t c = 0; c < rank; ++c) context[j * rank + c] = sums[j * 16 * groups + c] * inverse;
  }
  return true;
}

}  // namespace decode
