// Products with int4 weights in groups along the input (deepseek_vl2/quantize.py): byte i of a row holds
// inputs 2i (low nibble) and 2i + 1 (high nibble), each q + 8, and every `group` inputs share a bf16 scale
// (compressed-tensors' pack-quantized bytes, used as they are).
//
// As for int8 (int8.h), the weights stay integers and the activation is written once per phase as two 8-bit
// limbs: over blocks of 64 values x ~ s * (16 * d1 + d2), s = max|x| / (127 * 16), d1 in [-127, 127],
// d2 in [-8, 8] (within 2^-12 of the block's largest value; the 4-bit weights' own rounding is 2^-4 of
// theirs). The base is 16 so that both limbs go into one integer sum: 16 * u < 256 is still a byte.
//
// A 64-byte piece of a row holds 128 inputs. vpdpbusd adds the products of 4 bytes per 32-bit lane, so the
// low nibbles (even inputs) and high ones (odd inputs) of lane L cover inputs 8L .. 8L + 7 of the piece: the
// prepared input keeps each lane's values in that order (even ones, then odd ones, limb by limb), and with a
// group size that is a multiple of 8 each lane lies in one group. Per lane: the integer sum over its 8 inputs
// of u * (16 d1 + d2), less 8 * sum(16 d1 + d2) (the offset of u, prepared with the input), exact; then fp32
// total += float(sum) * (weight scale * input scale); then the lanes added as reduce16 adds them. The vector
// path and the plain one make the same values in the same order.
#pragma once
#include "int8.h"  // (QuantInput, block_max)

namespace decode {

constexpr int64_t kInt4Piece = 128;    // inputs per 64 bytes of a row
constexpr int64_t kInt4ScaleRun = 64;  // activation values per scale

inline int64_t int4_pieces(int64_t cols) { return (cols + kInt4Piece - 1) / kInt4Piece; }

// Bytes of one prepared input of `cols` values: per piece 256 bytes of limbs (d1 of the even inputs of each
// lane, d2 of the even ones, d1 of the odd ones, d2 of the odd ones: 64 bytes each), 16 scales, 16 offsets.
inline int64_t int4_input_bytes(int64_t cols) { return int4_pieces(cols) * (256 + 64 + 64); }

// Whether the kernels take int4 rows with this group size: each 8-input lane in one group.
inline bool int4_group_ok(int64_t group) { return group >= 8 && group % 8 == 0; }

template <typename T>
QuantInput prepare_int4(const T* x, int64_t cols, uint8_t* buffer) {
  using S = Storage<T>;
  const int64_t pieces = int4_pieces(cols);
  int8_t* limbs = reinterpret_cast<int8_t*>(buffer);
  float* scale = reinterpret_cast<float*>(buffer + pieces * 256);
  int32_t* corr = reinterpret_cast<int32_t*>(buffer + pieces * (256 + 64));
  std::memset(buffer, 0, size_t(pieces * 256));
  for (int64_t piece = 0; piece < pieces; ++piece) {
    int8_t* p = limbs + piece * 256;
    for (int half = 0; half < 2; ++half) {
      const int64_t begin = piece * kInt4Piece + half * kInt4ScaleRun, end = std::min(cols, begin + kInt4ScaleRun);
      const float largest = begin < cols ? block_max(x, begin, end) : 0.0f;
      const bool usable = largest > 0.0f && std::isfinite(largest);
      const float inv = usable ? 127.0f / largest : 0.0f;
      const float s = usable ? largest / (127.0f * 16.0f) : (largest == 0.0f ? 0.0f : NAN);
      for (int lane = 8 * half; lane < 8 * half + 8; ++lane) {
        scale[piece * 16 + lane] = s;
        int32_t offset = 0;
        for (int t = 0; t < 8; ++t) {
          const int64_t i = piece * kInt4Piece + 8 * lane + t;
          if (i >= cols) break;
          const float v = S::load(x[i]) * inv;
          const float d1 = std::min(127.0f, std::max(-127.0f, std::nearbyint(v)));
          const float d2 = std::min(8.0f, std::max(-8.0f, std::nearbyint((v - d1) * 16.0f)));
          const int slot = 4 * lane + t / 2 + (t % 2 ? 128 : 0);  // even inputs first, then odd
          p[slot] = int8_t(d1);
          p[slot + 64] = int8_t(d2);
          offset += 8 * (16 * int32_t(d1) + int32_t(d2));
        }
        corr[piece * 16 + lane] = offset;
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
    const int8_t* limbs = reinterpret_cast<const int8_t*>(xs[j].a);
    float total[16] = {};
    for (int64_t piece = 0; piece < pieces; ++piece) {
      const int8_t* p = limbs + piece * 256;
      for (int lane = 0; lane < 16; ++lane) {
        const int64_t first = piece * kInt4Piece + 8 * lane;
        if (first >= cols) break;
        int32_t sum = 0;
        for (int t = 0; t < 8 && first + t < cols; ++t) {
          const uint8_t byte = w[(first + t) / 2];
          const int32_t u = t % 2 ? byte >> 4 : byte & 0x0F;
          const int slot = 4 * lane + t / 2 + (t % 2 ? 128 : 0);
          sum += u * (16 * int32_t(p[slot]) + int32_t(p[slot + 64]));
        }
        const float both = bf16_to_float(scales[first / group]) * xs[j].scale[piece * 16 + lane];
        total[lane] = std::fmaf(float(sum - xs[j].corr[piece * 16 + lane]), both, total[lane]);
      }
    }
    out[j] = reduce16(total);
  }
}

#ifdef DECODE_INT8_VNNI
// Where lane L of a piece finds its weight scale among the piece's 128 / group scales (group dividing 128):
// number 8L / group, put into the high half of the lane's 32 bits (a bf16 is the top of an fp32).
inline __m512i int4_lane_index(int64_t group) {
  alignas(64) int16_t index[32] = {};
  for (int lane = 0; lane < 16; ++lane) index[2 * lane + 1] = int16_t(group < kInt4Piece ? 8 * lane / group : 0);
  return _mm512_load_si512(index);
}

// The weight scales of the 16 lanes of the piece starting at input k, as fp32.
inline __m512 int4_lane_scales(const uint16_t* scales, int64_t group, int64_t k, int64_t cols, __m512i lane_index) {
  if (group % kInt4Piece == 0) return _mm512_set1_ps(bf16_to_float(scales[k / group]));
  const int64_t whole = kInt4Piece / group, left = (cols - k + group - 1) / group;
  const __m512i loaded = _mm512_maskz_loadu_epi16(__mmask32((1u << std::min(whole, left)) - 1), scales + k / group);
  return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, lane_index, loaded));
}

template <int kCount>
inline void int4_dots_block(const uint8_t* w, const uint16_t* scales, int64_t group, const QuantInput* xs, int64_t cols,
                            float* out) {
  const int64_t pieces = int4_pieces(cols), row_bytes = cols / 2;
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8(char(0xF0));
  const __m512i times16 = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 16, 32, 48, 64, 80, 96, 112, char(128), char(144), char(160), char(176), char(192), char(208),
                    char(224), char(240)));
  const __m512i lane_index = int4_lane_index(group);
  __m512 total[kCount];
  for (int j = 0; j < kCount; ++j) total[j] = _mm512_setzero_ps();
  for (int64_t piece = 0; piece < pieces; ++piece) {
    const int64_t k = piece * kInt4Piece, left = row_bytes - piece * 64;
    _mm_prefetch(reinterpret_cast<const char*>(w + piece * 64) + kPrefetchBytes, _MM_HINT_T1);
    const __m512i raw = load_line(reinterpret_cast<const int8_t*>(w + piece * 64), left);
    const __m512i low = _mm512_and_si512(raw, low4), high16 = _mm512_and_si512(raw, high4);
    const __m512i high = _mm512_srli_epi16(high16, 4), low16 = _mm512_shuffle_epi8(times16, low);
    const __m512 weight_scale = int4_lane_scales(scales, group, k, cols, lane_index);
    for (int j = 0; j < kCount; ++j) {
      const uint8_t* p = xs[j].a + piece * 256;
      __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low16, _mm512_loadu_si512(p));
      sum = _mm512_dpbusd_epi32(sum, low, _mm512_loadu_si512(p + 64));
      sum = _mm512_dpbusd_epi32(sum, high16, _mm512_loadu_si512(p + 128));
      sum = _mm512_dpbusd_epi32(sum, high, _mm512_loadu_si512(p + 192));
      sum = _mm512_sub_epi32(sum, _mm512_loadu_si512(xs[j].corr + piece * 16));
      const __m512 both = _mm512_mul_ps(weight_scale, _mm512_loadu_ps(xs[j].scale + piece * 16));
      total[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), both, total[j]);
    }
  }
  alignas(64) float lanes[16];
  for (int j = 0; j < kCount; ++j) {
    _mm512_store_ps(lanes, total[j]);
    out[j] = reduce16(lanes);
  }
}
#endif

// out[j] = w . x_j for one int4 weight row (its group scales at `scales`) and `count` prepared inputs, the
// row read from memory once for all of them (blocks of 8 inputs).
inline void int4_dots(const uint8_t* w, const uint16_t* scales, int64_t group, const QuantInput* xs, int count,
                      int64_t cols, float* out) {
#ifdef DECODE_INT8_VNNI
  if (group % kInt4Piece == 0 || kInt4Piece % group == 0) {
    for (int first = 0; first < count; first += 8) {
      const QuantInput* x = xs + first;
      float* o = out + first;
      switch (std::min(8, count - first)) {
        case 1: int4_dots_block<1>(w, scales, group, x, cols, o); break;
        case 2: int4_dots_block<2>(w, scales, group, x, cols, o); break;
        case 3: int4_dots_block<3>(w, scales, group, x, cols, o); break;
        case 4: int4_dots_block<4>(w, scales, group, x, cols, o); break;
        case 5: int4_dots_block<5>(w, scales, group, x, cols, o); break;
        case 6: int4_dots_block<6>(w, scales, group, x, cols, o); break;
        case 7: int4_dots_block<7>(w, scales, group, x, cols, o); break;
        default: int4_dots_block<8>(w, scales, group, x, cols, o); break;
      }
    }
    return;
  }
#endif
  int4_dots_plain(w, scales, group, xs, count, cols, out);
}

}  // namespace decode
