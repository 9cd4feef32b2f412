// A prompt's rows through the routed experts of one MoE layer, bf16 weights on AMX tiles (included by
// decode_bf16.cpp after the tile products and exp_ps it uses).
//
// PyTorch's eager path ran 5-6 ops per expert that got tokens (gather, gate/up, silu, product, down, a copy
// into the grouped output): tiny's 438-token prompt has 704 of them, and half of its language prefill was
// that elementwise work and bookkeeping, not the products. Here each thread claims whole experts in turn
// and runs an expert's SwiGLU for all its rows in one pass: the rows are packed as input tiles once, the
// gate and up sums of 16 hidden units at a time become the hidden activations straight in the layout of
// the down product's input tiles (never stored as rows), and the down sums go to the expert's positions of
// the grouped output. Each result is rounded where PyTorch's bf16 ops round it (gate, up, silu, their
// product, down), so the values are those of the eager path up to the order of the fp32 sums.
#pragma once

namespace decode {

// 16 fp32 values rounded to bf16 (to nearest even, as PyTorch) and widened back.
inline __m512 round_bf16_ps(__m512 v) {
  const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Two hidden units' values for 16 inputs (fp32) as one row of an input tile: lane j holds input j's pair,
// bf16(lo[j]) | bf16(hi[j]) << 16.
inline __m512i pair_bf16(__m512 lo, __m512 hi) {
  const __m512i low = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i high = _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi)), 16);
  return _mm512_or_si512(low, high);
}

// tile_rows (decode_bf16.cpp) for many inputs (a prompt's rows; latent attention's values), which meet
// every weight row with several input tiles:
// sums[r * 16 * tiles + c] = w[r, :] . input c for weight rows r < rows (at most 16) and inputs c < columns.
// Each 16 x 32 piece of the weights is loaded once for up to four input tiles (sums tiles 0-3), the weight
// and input tiles taken by turns so that a load need not wait for the product before it; tile_rows loads
// the weights again for every input tile. While the first four input tiles go through these 16 rows, the
// next `rows_ahead` rows are asked for into L2, a cache line per row per piece: the hardware prefetchers
// barely ramp up on 16 short row streams (as int8_tile_rows found).
#define PREFILL_PRODUCT(t, weights, inputs)                                        \
  if (t < group) {                                                                \
    _tile_loadd(inputs, packed + (first + t) * stride + 512 * k, 64);             \
    _tile_dpbf16ps(t, weights, inputs);                                           \
  }
#define PREFILL_PIECE(weights)                                                    \
  _tile_loadd(weights, k < whole ? w + 32 * k : last, k < whole ? row_stride * 2 : 64); \
  PREFILL_PRODUCT(0, weights, 6) PREFILL_PRODUCT(1, weights, 7) PREFILL_PRODUCT(2, weights, 6) PREFILL_PRODUCT(3, weights, 7)

inline void tile_rows_wide(const uint16_t* w, int64_t row_stride, int64_t cols, const uint16_t* packed, int columns,
                           int rows, int rows_ahead, float* sums) {
  const int tiles = (columns + 15) / 16;
  const int64_t width = 16 * tiles;
  TileConfig config;
  for (int t = 0; t < 6; ++t) config.rows[t] = uint8_t(rows);  // (sums 0-3, weights 4-5)
  config.rows[6] = config.rows[7] = 16;                          // (inputs)
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
  const int64_t whole = cols / 32, chunks = (cols + 31) / 32;
  const int64_t stride = 512 * chunks;  // (one input tile's values)
  alignas(64) uint16_t last[16 * 32] = {};  // (the last cols % 32 weights of each row, zero-padded)
  if (whole < chunks)
    for (int r = 0; r < rows; ++r) std::memcpy(last + 32 * r, w + r * row_stride + 32 * whole, (cols - 32 * whole) * 2);
  const uint16_t* next = w + 16 * row_stride;
  for (int first = 0; first < tiles; first += 4) {
    const int group = std::min(4, tiles - first);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < chunks; ++k) {
      if (first == 0 && k < whole)
        for (int r = 0; r < rows_ahead; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * row_stride + 32 * k), _MM_HINT_T1);
      if (k % 2 == 0) {
        PREFILL_PIECE(4)
      } else {
        PREFILL_PIECE(5)
      }
    }
    float* out = sums + 16 * first;
    _tile_stored(0, out, width * 4);
    if (group > 1) _tile_stored(1, out + 16, width * 4);
    if (group > 2) _tile_stored(2, out + 32, width * 4);
    if (group > 3) _tile_stored(3, out + 48, width * 4);
  }
}
#undef PREFILL_PIECE
#undef PREFILL_PRODUCT

// grouped_out[p] = expert_e(x[order[p] / top_k]) for the positions p of expert e in the expert-grouped order
// (expert e owns positions starts[e] .. starts[e] + counts[e], as `order = argsort(ids.flatten(), stable)`
// lays them out). x: [N, D] bf16; order: [N * top_k] int64; counts: [E] int64; table: kernels.expert_table
// of compact bf16 experts ([E, 6] pointers: gate [I, D], up [I, D], down [D, I]). Returns [N * top_k, D] bf16.
torch::Tensor experts_prefill_bf16(const torch::Tensor& x_in, const torch::Tensor& order_in, const torch::Tensor& counts_in,
                                   int64_t top_k, const torch::Tensor& table_in, int64_t inter) {
  DECODE_CHECK(tiles_min_rows().load() > 0, "experts_prefill_bf16: AMX tiles are off (set_tiles)");
  const auto x = x_in.contiguous();
  const auto order = order_in.contiguous(), counts = counts_in.contiguous(), table = table_in.contiguous();
  DECODE_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.device().is_cpu(), "experts_prefill_bf16: x must be [N, D] bf16");
  DECODE_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 && order.size(0) == x.size(0) * top_k,
               "experts_prefill_bf16: order must hold N * top_k int64 positions");
  DECODE_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && table.scalar_type() == at::kLong &&
                   table.dim() == 2 && table.size(0) == counts.size(0) && table.size(1) == 6,
               "experts_prefill_bf16: counts [E] and table [E, 6] int64");
  const int64_t hidden = x.size(1), experts = counts.size(0), positions = order.size(0);
  const int64_t* count_of = counts.data_ptr<int64_t>();
  const int64_t* token_of = order.data_ptr<int64_t>();
  const int64_t* pointers = table.data_ptr<int64_t>();
  std::vector<int64_t> starts(experts + 1, 0);
  for (int64_t e = 0; e < experts; ++e) {
    DECODE_CHECK(count_of[e] >= 0, "experts_prefill_bf16: negative count");
    DECODE_CHECK(pointers[6 * e + 3] == 0 && pointers[6 * e + 4] == 0 && pointers[6 * e + 5] == 0,
                 "experts_prefill_bf16: dense bf16 experts only");
    starts[e + 1] = starts[e] + count_of[e];
  }
  DECODE_CHECK(starts[experts] == positions, "experts_prefill_bf16: the counts must add up to N * top_k");
  for (int64_t p = 0; p < positions; ++p)
    DECODE_CHECK(token_of[p] >= 0 && token_of[p] < positions, "experts_prefill_bf16: order out of range");
  torch::Tensor out = torch::empty({positions, hidden}, x.options());
  const uint16_t* xp = data_of<uint16_t>(x);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t down_chunks = (inter + 31) / 32;  // the hidden activations' 32-value pieces
  std::atomic<int64_t> next{0};
  in_parallel([&](int, int) {
    std::vector<const uint16_t*> inputs;
    std::vector<float> gate_sums, up_sums, down_sums;
    std::vector<uint32_t> hidden_tiles;  // the expert's activations as input tiles: [tiles][chunks][16 pairs][16 inputs]
    for (int64_t e; (e = next.fetch_add(1)) < experts;) {
      const int64_t count = count_of[e];
      if (count == 0) continue;
      const auto* gate = reinterpret_cast<const uint16_t*>(pointers[6 * e]);
      const auto* up = reinterpret_cast<const uint16_t*>(pointers[6 * e + 1]);
      const auto* down = reinterpret_cast<const uint16_t*>(pointers[6 * e + 2]);
      const int tiles = int((count + 15) / 16), width = 16 * tiles;
      inputs.resize(size_t(count));
      for (int64_t j = 0; j < count; ++j) inputs[j] = xp + (token_of[starts[e] + j] / top_k) * hidden;
      const uint16_t* packed = pack_tiles(inputs.data(), int(count), hidden);
      gate_sums.resize(size_t(16 * width)), up_sums.resize(size_t(16 * width)), down_sums.resize(size_t(16 * width));
      hidden_tiles.resize(size_t(tiles * down_chunks * 256 + 16));
      uint32_t* h = aligned_64(hidden_tiles.data());
      if (inter % 32)  // (the last piece's pairs past the activations must be zeros: 0 * garbage can be NaN)
        for (int t = 0; t < tiles; ++t) std::memset(h + (t * down_chunks + down_chunks - 1) * 256, 0, 256 * 4);
      for (int64_t r0 = 0; r0 < inter; r0 += 16) {
        const int rows = int(std::min<int64_t>(16, inter - r0));
        const int ahead = int(std::min<int64_t>(16, inter - r0 - 16));
        tile_rows_wide(gate + r0 * hidden, hidden, hidden, packed, int(count), rows, ahead, gate_sums.data());
        tile_rows_wide(up + r0 * hidden, hidden, hidden, packed, int(count), rows, ahead, up_sums.data());
        for (int r = 0; r < rows; r += 2) {
          const int64_t pair = (r0 + r) / 2;  // its place among the activations' value pairs
          for (int t = 0; t < tiles; ++t) {
            __m512 act[2];
            for (int half = 0; half < 2; ++half) {
              if (r + half >= rows) {
                act[half] = _mm512_setzero_ps();
                continue;
              }
              const __m512 g = round_bf16_ps(_mm512_loadu_ps(gate_sums.data() + (r + half) * width + 16 * t));
              const __m512 u = round_bf16_ps(_mm512_loadu_ps(up_sums.data() + (r + half) * width + 16 * t));
              act[half] = _mm512_mul_ps(round_bf16_ps(silu_ps(g)), u);
            }
            _mm512_storeu_si512(h + t * down_chunks * 256 + pair * 16, pair_bf16(act[0], act[1]));
          }
        }
      }
      const __m512i down_rows = _mm512_mullo_epi32(_mm512_set1_epi32(width),
                                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      for (int64_t r0 = 0; r0 < hidden; r0 += 16) {
        const int rows = int(std::min<int64_t>(16, hidden - r0));
        const __mmask16 valid = __mmask16((1u << rows) - 1);
        tile_rows_wide(down + r0 * inter, inter, inter, reinterpret_cast<const uint16_t*>(h), int(count), rows,
                        int(std::min<int64_t>(16, hidden - r0 - 16)), down_sums.data());
        for (int64_t j = 0; j < count; ++j) {  // input j's 16 sums: a column of the sums
          const __m512 column = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, down_rows, down_sums.data() + j, 4);
          store_f32_as_bf16x16(op + (starts[e] + j) * hidden + r0, column, valid);
        }
      }
    }
  });
  return out;
}

}  // namespace decode
