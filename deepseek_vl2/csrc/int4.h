// Products with int4 weights in groups along the input (deepseek_vl2/quantize.py): byte i of a row holds
// inputs 2i (low nibble) and 2i + 1 (high nibble), each q + 8, and every `group` inputs share a bf16 scale
// (compressed-tensors' pack-quantized bytes, used as they are).
//
// As for int8 (int8.h), the weights stay integers and the activation is written once per phase as integers:
// here one 8-bit value per input over blocks of 64 values, x ~ s * d with s = max|x| / 127, d in
// [-127, 127]. Its error, at most 1/254 of the block's largest value, is a sixteenth of what the 4-bit weights
// carry (half a step of 1/7.5 of their group's largest): int4's arithmetic is that of its weights. A second
// limb as int8 has (2^-12 instead of 2^-8) made every piece two vpdpbusd longer: on the 2-core Sapphire
// Rapids VM tiny's int4 decode ran at 61-65 % of the bound with it, compute-bound.
//
// A 64-byte piece of a row holds 128 inputs. vpdpbusd adds the products of 4 bytes per 32-bit lane, so the
// low nibbles (even inputs) and high ones (odd inputs) of lane L cover inputs 8L .. 8L + 7 of the piece: the
// prepared input keeps each lane's values in that order (even ones, then odd ones), and with a group size
// that is a multiple of 8 each lane lies in one group. Per lane: the integer sum over its 8 inputs of u * d,
// less 8 * sum(d) (the offset of u, prepared negated with the input: the sum starts from it), exact; then fp32 total += float(sum) * (weight
// scale * input scale); then the lanes added as reduce16 adds them. The vector path and the plain one make
// the same values in the same order.
#pragma once
#include "int8.h"  // (QuantInput, block_max)

namespace decode {

constexpr int64_t kInt4Piece = 128;    // inputs per 64 bytes of a row
constexpr int64_t kInt4ScaleRun = 64;  // activation values per scale

inline int64_t int4_pieces(int64_t cols) { return (cols + kInt4Piece - 1) / kInt4Piece; }

// Bytes of one prepared input of `cols` values: per piece 128 bytes of values (those of the even inputs of
// each lane, then those of the odd ones: 64 bytes each), 16 scales, 16 offsets.
inline int64_t int4_input_bytes(int64_t cols) { return int4_pieces(cols) * (128 + 64 + 64); }

// Whether the kernels take int4 rows with this group size: each 8-input lane in one group.
inline bool int4_group_ok(int64_t group) { return group >= 8 && group % 8 == 0; }

template <typename T>
QuantInput prepare_int4(const T* x, int64_t cols, uint8_t* buffer) {
  using S = Storage<T>;
  const int64_t pieces = int4_pieces(cols);
  int8_t* values = reinterpret_cast<int8_t*>(buffer);
  float* scale = reinterpret_cast<float*>(buffer + pieces * 128);
  int32_t* corr = reinterpret_cast<int32_t*>(buffer + pieces * (128 + 64));
  std::memset(buffer, 0, size_t(pieces * (128 + 64 + 64)));
  for (int64_t piece = 0; piece < pieces; ++piece) {
    int8_t* p = values + piece * 128;
    for (int half = 0; half < 2; ++half) {
      const int64_t begin = piece * kInt4Piece + half * kInt4ScaleRun, end = std::min(cols, begin + kInt4ScaleRun);
      if (begin >= cols) break;
      const float largest = largest_in(x, begin, end);
      const bool usable = largest > 0.0f && std::isfinite(largest);
      const float s = usable ? largest / 127.0f : (largest == 0.0f ? 0.0f : NAN);
      for (int lane = 8 * half; lane < 8 * half + 8; ++lane) scale[piece * 16 + lane] = s;
      if (!usable) continue;
      const float inv = 127.0f / largest;
      int lane = 8 * half;
#ifdef DECODE_INT8_VNNI
      // 16 values (two lanes) at a time: as bytes in input order, then even inputs first.
      const __m128i evens_first = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
      for (; lane < 8 * half + 8; lane += 2) {
        const int64_t first = piece * kInt4Piece + 8 * lane;
        if (first >= cols) break;
        const __m512i d = value16(_mm512_mul_ps(load16_f32(x + first, int(std::min<int64_t>(16, cols - first))),
                                                _mm512_set1_ps(inv)));
        const __m128i bytes = _mm_shuffle_epi8(_mm512_cvtepi32_epi8(d), evens_first);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(p + 4 * lane), bytes);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(p + 64 + 4 * lane), _mm_srli_si128(bytes, 8));
        corr[piece * 16 + lane] = -8 * _mm512_mask_reduce_add_epi32(0x00FF, d);
        corr[piece * 16 + lane + 1] = -8 * _mm512_mask_reduce_add_epi32(0xFF00, d);
      }
#endif
      for (; lane < 8 * half + 8; ++lane) {
        int32_t offset = 0;
        for (int t = 0; t < 8; ++t) {
          const int64_t i = piece * kInt4Piece + 8 * lane + t;
          if (i >= cols) break;
          const int d = value_of(S::load(x[i]) * inv);
          p[4 * lane + t / 2 + (t % 2 ? 64 : 0)] = int8_t(d);  // even inputs first, then odd
          offset += 8 * d;
        }
        corr[piece * 16 + lane] = -offset;
      }
    }
  }
  return {buffer, nullptr, scale, corr};
}

// out[j] = w . x_j (the group scales included) for `count` prepared inputs, plain C++.
inline void int4_dots_plain(const uint8_t* w, const uint16_t* scales, int64_t group, const QuantInput* xs, int count,
                            int64_t cols, float* out) {
  const int64_t pieces = int4_pieces(cols);
  for (int j = 0; j < count; ++j) {
    const int8_t* values = reinterpret_cast<const int8_t*>(xs[j].a);
    float total[16] = {};
    for (int64_t piece = 0; piece < pieces; ++piece) {
      const int8_t* p = values + piece * 128;
      for (int lane = 0; lane < 16; ++lane) {
        const int64_t first = piece * kInt4Piece + 8 * lane;
        if (first >= cols) break;
        int32_t sum = 0;
        for (int t = 0; t < 8 && first + t < cols; ++t) {
          const uint8_t byte = w[(first + t) / 2];
          const int32_t u = t % 2 ? byte >> 4 : byte & 0x0F;
          sum += u * int32_t(p[4 * lane + t / 2 + (t % 2 ? 64 : 0)]);
        }
        const float both = bf16_to_float(scales[first / group]) * xs[j].scale[piece * 16 + lane];
        total[lane] = std::fmaf(float(sum + xs[j].corr[piece * 16 + lane]), both, total[lane]);
      }
    }
    out[j] = reduce16(total);
  }
}

// What every row of one int4 matrix shares, worked out once per matrix (a division by the group size per row
// cost ~25 cycles, a tenth of an expert row).
struct Int4Layout {
  int64_t cols = 0, group = 0, pieces = 0, row_bytes = 0;
  int64_t per_piece = 0;         // scales per piece (groups below 128), else 0
  int64_t pieces_per_group = 1;  // pieces per scale (groups of 128 or more)
  bool vector = false;           // the vector path takes this group size
  uint32_t whole_mask = 0, last_mask = 0;
  Int4Layout(int64_t cols_, int64_t group_) : cols(cols_), group(group_), pieces(int4_pieces(cols_)), row_bytes(cols_ / 2) {
    vector = group % kInt4Piece == 0 || kInt4Piece % group == 0;
    if (group < kInt4Piece) {
      per_piece = kInt4Piece / group;
      const int64_t last_count = (cols - (pieces - 1) * kInt4Piece + group - 1) / group;
      whole_mask = uint32_t((uint64_t(1) << per_piece) - 1), last_mask = uint32_t((uint64_t(1) << last_count) - 1);
    } else {
      pieces_per_group = group / kInt4Piece;
    }
  }
};

#ifdef DECODE_INT8_VNNI
// Where lane L of a piece finds its weight scale among the piece's 128 / group scales (a power-of-two group
// dividing 128): number 8L / group, put into the high half of the lane's 32 bits (a bf16 is the top of an
// fp32).
inline __m512i int4_lane_index(int64_t group) {
  const __m512i eight_lane = _mm512_slli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 3 + 16);
  return _mm512_srl_epi32(eight_lane, _mm_cvtsi64_si128(group < kInt4Piece ? __builtin_ctzll(group) : 16));
}

// The integer sums of one piece's 16 lanes with one prepared input, less the offset of the weights' bias,
// as fp32 times the lanes' weight and input scales, added to `total`.
inline __m512 int4_piece(__m512i low, __m512i high, __m512 weight_scale, const QuantInput& x, int64_t piece, __m512 total) {
  const uint8_t* p = x.a + piece * 128;
  const __m512i even = _mm512_dpbusd_epi32(_mm512_loadu_si512(x.corr + piece * 16), low, _mm512_loadu_si512(p));
  const __m512i sum = _mm512_dpbusd_epi32(even, high, _mm512_loadu_si512(p + 64));  // (the offset first: exact either way)
  const __m512 both = _mm512_mul_ps(weight_scale, _mm512_loadu_ps(x.scale + piece * 16));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), both, total);
}

template <int kCount, bool kSmallGroups>
inline void int4_dots_block(const uint8_t* w, const uint16_t* scales, const Int4Layout& layout, const QuantInput* xs,
                            float* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i lane_index = int4_lane_index(layout.group);
  const uint16_t* piece_scales = scales;
  int64_t in_group = 0;
  __m512 total[kCount];
  for (int j = 0; j < kCount; ++j) total[j] = _mm512_setzero_ps();
  for (int64_t piece = 0; piece < layout.pieces; ++piece) {
    const bool last = piece + 1 == layout.pieces;
    _mm_prefetch(reinterpret_cast<const char*>(w + piece * 64) + kPrefetchBytes, _MM_HINT_T1);
    const __m512i raw = last ? load_line(reinterpret_cast<const int8_t*>(w + piece * 64), layout.row_bytes - piece * 64)
                             : _mm512_loadu_si512(w + piece * 64);
    const __m512i low = _mm512_and_si512(raw, low4), high = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
    __m512 weight_scale;
    if (kSmallGroups) {  // the piece's scales spread over the lanes
      const __mmask32 mask = __mmask32(last ? layout.last_mask : layout.whole_mask);
      weight_scale = _mm512_castsi512_ps(
          _mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, lane_index, _mm512_maskz_loadu_epi16(mask, piece_scales)));
      piece_scales += layout.per_piece;
    } else {  // one scale for every lane
      weight_scale = _mm512_set1_ps(bf16_to_float(*piece_scales));
      if (++in_group == layout.pieces_per_group) in_group = 0, ++piece_scales;
    }
    for (int j = 0; j < kCount; ++j) total[j] = int4_piece(low, high, weight_scale, xs[j], piece, total[j]);
  }
  for (int j = 0; j < kCount; ++j) out[j] = _mm512_reduce_add_ps(total[j]);  // (in reduce16's order)
}

template <bool kSmallGroups>
inline void int4_dots_vector(const uint8_t* w, const uint16_t* scales, const Int4Layout& layout, const QuantInput* xs,
                             int count, float* out) {
  for (int first = 0; first < count; first += 8) {
    const QuantInput* x = xs + first;
    float* o = out + first;
    switch (std::min(8, count - first)) {
      case 1: int4_dots_block<1, kSmallGroups>(w, scales, layout, x, o); break;
      case 2: int4_dots_block<2, kSmallGroups>(w, scales, layout, x, o); break;
      case 3: int4_dots_block<3, kSmallGroups>(w, scales, layout, x, o); break;
      case 4: int4_dots_block<4, kSmallGroups>(w, scales, layout, x, o); break;
      case 5: int4_dots_block<5, kSmallGroups>(w, scales, layout, x, o); break;
      case 6: int4_dots_block<6, kSmallGroups>(w, scales, layout, x, o); break;
      case 7: int4_dots_block<7, kSmallGroups>(w, scales, layout, x, o); break;
      default: int4_dots_block<8, kSmallGroups>(w, scales, layout, x, o); break;
    }
  }
}
#endif

// acc[c] += sum_i a[i] * w[i, c] over `count` consecutive int4 rows (row_stride bytes apart, their scales
// scale_stride apart): MLA's query absorption (mla.h), rows of kv_b against a head's fp32 query values.
// Per column, in this order on either path: total = fma chain over the rows of (a[i] * scale) * nibble
// (the stored q + 8), offset = sum of a[i] * scale in row order, acc += fma(-8, offset, total). The rows
// are read in order, each whole (they come from memory: a head's are one block, which the hardware
// prefetchers stream), the totals kept in L1; the nibbles of 8 bytes go through as one vector of 16 columns
// (groups of a multiple of 16 values: one scale each). The compiler's loop, the nibbles interleaved in
// place, took ~5 % of base's int4 decode step.
inline bool int4_rows_axpy_fits(int64_t cols, int64_t group) { return group % 16 == 0 && cols % group == 0; }
constexpr int64_t kAxpyRowsAhead = 16;

inline void int4_rows_axpy(const uint8_t* w, int64_t row_stride, const uint16_t* scales, int64_t scale_stride, int64_t cols,
                           int64_t group, int64_t count, const float* a, float* acc) {
  thread_local std::vector<float> totals, offsets;
  totals.assign(size_t(cols), 0.0f);
  offsets.assign(size_t(cols / group), 0.0f);
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* row = w + i * row_stride;
    const uint16_t* row_scales = scales + i * scale_stride;
#ifdef DECODE_INT8_VNNI
    if (i + kAxpyRowsAhead < count) {  // (the block is short: the prefetchers alone barely ramp up on it)
      for (int64_t line = 0; line < (cols / 2 + 63) / 64; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(row + kAxpyRowsAhead * row_stride + 64 * line), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row_scales + kAxpyRowsAhead * scale_stride), _MM_HINT_T0);
    }
#endif
    for (int64_t g = 0; g < cols / group; ++g) {
      const float as = a[i] * bf16_to_float(row_scales[g]);
      offsets[size_t(g)] += as;
      int64_t c = g * group;
#ifdef DECODE_INT8_VNNI
      const __m512i byte_of_lane = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
      const __m512i nibble_shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
      const __m512 scale = _mm512_set1_ps(as);
      for (; c < (g + 1) * group; c += 16) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c / 2)));
        const __m512i nibbles = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(byte_of_lane, bytes), nibble_shift),
                                                 _mm512_set1_epi32(0x0F));
        _mm512_storeu_ps(totals.data() + c, _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(nibbles), _mm512_loadu_ps(totals.data() + c)));
      }
#endif
      for (; c < (g + 1) * group; ++c)
        totals[size_t(c)] = std::fma(as, float(c % 2 ? row[c / 2] >> 4 : row[c / 2] & 0x0F), totals[size_t(c)]);
    }
  }
  for (int64_t c = 0; c < cols; ++c) acc[c] += std::fma(-8.0f, offsets[size_t(c / group)], totals[size_t(c)]);
}

// out[j] = w . x_j for one int4 weight row (its group scales at `scales`) and `count` prepared inputs, the
// row read from memory once for all of them (blocks of 8 inputs).
inline void int4_dots(const uint8_t* w, const uint16_t* scales, const Int4Layout& layout, const QuantInput* xs, int count,
                      float* out) {
#ifdef DECODE_INT8_VNNI
  if (layout.vector) {
    if (layout.group < kInt4Piece)
      int4_dots_vector<true>(w, scales, layout, xs, count, out);
    else
      int4_dots_vector<false>(w, scales, layout, xs, count, out);
    return;
  }
#endif
  int4_dots_plain(w, scales, layout.group, xs, count, layout.cols, out);
}

}  // namespace decode
