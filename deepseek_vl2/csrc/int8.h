// Products with int8 weights, one bf16 scale per output channel (deepseek_vl2/quantize.py): w = q * scale,
// q a signed byte.
//
// Turning 8-bit weights into floats takes more vector work per byte than memory needs to deliver the byte:
// on the 2-core Sapphire Rapids VM an int8 -> fp32 -> FMA loop ran at ~20 GB/s where reading ran at ~27. So
// the products run on the integer units (AVX512-VNNI: vpdpbusd, 64 byte multiply-adds per instruction), and
// it is the activation that becomes integers, once per phase for every matrix and row that multiplies it
// (prepare_int8): over blocks of 256 values, x ~ s * (128 * d1 + d2) with s = max|x| / (127 * 128),
// d1 in [-127, 127] and d2 in [-64, 64], two 8-bit limbs. That is within 2^-15 of the block's largest
// value: below bf16's own rounding of the activations (2^-9 of each value) for every value within 1/64 of
// the largest, so the result is that of the weight-only scheme, not of an 8-bit activation.
//
// A weight row's sum with one input, block by block: the integer sums of the block (vpdpbusd takes the
// limbs unsigned, d + 128, so sum(q) rides along to take 128 * sum(q) back out), exact whatever their order;
// then per lane fp32 total += float(block sum) * s; then the 16 lanes added as reduce16 adds them; then times
// the row's scale. The vector path and the plain one (CPUs without AVX512-VNNI, capped builds) make the same
// values in the same order: a row's result is the same bit for bit on either, alone or with other inputs.
#pragma once
#include "common.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define DECODE_INT8_VNNI 1
#endif

namespace decode {

// One input prepared for a quantized matrix (int8.h, int4.h say what each holds).
struct QuantInput {
  const uint8_t* a = nullptr;     // int8: d1 + 128 per value; int4: the limbs of each 128-value block
  const uint8_t* b = nullptr;     // int8: d2 + 128 per value
  const float* scale = nullptr;   // int8: s per 256-value block; int4: per lane of each block
  const int32_t* corr = nullptr;  // int4: -8 * sum(d) per lane of each block (the weights' offset of 8)
};

constexpr int64_t kInt8Block = 256;  // values per activation scale

inline int64_t int8_padded(int64_t cols) { return (cols + 63) / 64 * 64; }
inline int64_t int8_blocks(int64_t cols) { return (cols + kInt8Block - 1) / kInt8Block; }

// Bytes of one prepared input of `cols` values (a multiple of 64).
inline int64_t int8_input_bytes(int64_t cols) { return 2 * int8_padded(cols) + 4 * int8_blocks(cols); }

// Is any of the values not finite? (Their block's scale becomes NaN, and so does the product: a NaN or an
// infinity in an activation shows in the logits, as it does in PyTorch.)
template <typename T>
inline float block_max(const T* x, int64_t begin, int64_t end) {
  using S = Storage<T>;
  float best = 0.0f;
  bool finite = true;
  for (int64_t i = begin; i < end; ++i) {
    const float v = std::fabs(S::load(x[i]));
    finite &= std::isfinite(v);
    best = std::max(best, v);
  }
  return finite ? best : NAN;
}

// One value already multiplied by 127 / (its block's largest) as an 8-bit integer: round(v), clamped.
inline int value_of(float v) { return int(std::min(127.0f, std::max(-127.0f, std::nearbyint(v)))); }

// Its two limbs (int8): d1 = value_of(v) and d2 = round((v - d1) * 128), clamped to +-64 (both exact: v - d1
// is a float's own fraction).
inline void limbs_of(float v, int& d1, int& d2) {
  d1 = value_of(v);
  d2 = int(std::min(64.0f, std::max(-64.0f, std::nearbyint((v - float(d1)) * 128.0f))));
}

#ifdef DECODE_INT8_VNNI
// 16 activation values as fp32 (the first `count`, the rest 0).
inline __m512 load16_f32(const uint16_t* x, int count) {
  const __m256i bits = _mm256_maskz_loadu_epi16(__mmask16((1u << count) - 1), x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16_f32(const float* x, int count) { return _mm512_maskz_loadu_ps(__mmask16((1u << count) - 1), x); }

// The block's largest |x| (NaN where a value is not finite), as block_max, 16 values at a time.
template <typename T>
inline float block_max_vector(const T* x, int64_t begin, int64_t end) {
  __m512 best = _mm512_setzero_ps();
  __mmask16 odd = 0;
  for (int64_t i = begin; i < end; i += 16) {
    const __m512 v = _mm512_abs_ps(load16_f32(x + i, int(std::min<int64_t>(16, end - i))));
    odd |= ~_mm512_cmp_ps_mask(v, _mm512_set1_ps(INFINITY), _CMP_LT_OQ);  // (NaN or infinite)
    best = _mm512_max_ps(best, v);
  }
  return odd ? NAN : _mm512_reduce_max_ps(best);
}

// 16 values as value_of makes them (rounded, clamped floats), and their limbs as limbs_of, as int32 lanes.
inline __m512 value16_f32(__m512 v) {
  return _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-127.0f),
                       _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
}
inline __m512i value16(__m512 v) { return _mm512_cvtps_epi32(value16_f32(v)); }
inline void limbs16(__m512 v, __m512i& d1, __m512i& d2) {
  const __m512 first = value16_f32(v);
  const __m512 second = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, first), _mm512_set1_ps(128.0f)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  d1 = _mm512_cvtps_epi32(first);
  d2 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_set1_ps(64.0f), _mm512_max_ps(_mm512_set1_ps(-64.0f), second)));
}
#endif

// The largest |x[begin, end)| (NaN where a value is not finite), on vectors where the CPU has them.
template <typename T>
inline float largest_in(const T* x, int64_t begin, int64_t end) {
#ifdef DECODE_INT8_VNNI
  return block_max_vector(x, begin, end);
#else
  return block_max(x, begin, end);
#endif
}

// x (cols values of the storage type) as int8's limbs in `buffer` (int8_input_bytes(cols), 4-byte aligned).
// A block whose largest value is 0 or not finite gets zero limbs (and a scale of 0 or NaN).
template <typename T>
QuantInput prepare_int8(const T* x, int64_t cols, uint8_t* buffer) {
  using S = Storage<T>;
  const int64_t padded = int8_padded(cols), blocks = int8_blocks(cols);
  uint8_t *hi = buffer, *lo = buffer + padded;
  float* scale = reinterpret_cast<float*>(buffer + 2 * padded);
  std::memset(buffer, 128, size_t(2 * padded));  // (zero limbs: padding, unusable blocks)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t begin = block * kInt8Block, end = std::min(cols, begin + kInt8Block);
    const float largest = largest_in(x, begin, end);
    const bool usable = largest > 0.0f && std::isfinite(largest);
    scale[block] = usable ? largest / (127.0f * 128.0f) : (largest == 0.0f ? 0.0f : NAN);
    if (!usable) continue;
    const float inv = 127.0f / largest;
    int64_t i = begin;
#ifdef DECODE_INT8_VNNI
    for (; i < end; i += 16) {
      const int count = int(std::min<int64_t>(16, end - i));
      __m512i d1, d2;
      limbs16(_mm512_mul_ps(load16_f32(x + i, count), _mm512_set1_ps(inv)), d1, d2);
      const __m512i bias = _mm512_set1_epi32(128);
      _mm_mask_storeu_epi8(hi + i, __mmask16((1u << count) - 1), _mm512_cvtepi32_epi8(_mm512_add_epi32(d1, bias)));
      _mm_mask_storeu_epi8(lo + i, __mmask16((1u << count) - 1), _mm512_cvtepi32_epi8(_mm512_add_epi32(d2, bias)));
    }
#endif
    for (; i < end; ++i) {
      int d1, d2;
      limbs_of(S::load(x[i]) * inv, d1, d2);
      hi[i] = uint8_t(d1 + 128);
      lo[i] = uint8_t(d2 + 128);
    }
  }
  return {hi, lo, scale, nullptr};
}

// out[j] = w . x_j for `count` prepared inputs (without the row's scale), plain C++: the reference for the
// vector path, and the path of CPUs without AVX512-VNNI.
inline void int8_dots_plain(const int8_t* w, const QuantInput* xs, int count, int64_t cols, float* out) {
  const int64_t lines = (cols + 63) / 64;
  for (int j = 0; j < count; ++j) {
    float total[16] = {};
    for (int64_t first = 0; first < lines; first += kInt8Block / 64) {
      int32_t hi[16] = {}, lo[16] = {}, sum_q[16] = {};
      const int64_t last = std::min(lines, first + kInt8Block / 64);
      for (int64_t i = first * 64; i < std::min(cols, last * 64); ++i) {
        const int lane = int((i % 64) / 4), q = w[i];
        sum_q[lane] += q;
        hi[lane] += int32_t(xs[j].a[i]) * q;
        lo[lane] += int32_t(xs[j].b[i]) * q;
      }
      const float s = xs[j].scale[first / (kInt8Block / 64)];
      for (int lane = 0; lane < 16; ++lane) {
        const int32_t exact = hi[lane] * 128 + lo[lane] - 16512 * sum_q[lane];  // (128 + 1) * 128 * sum(q) out
        total[lane] = std::fmaf(float(exact), s, total[lane]);
      }
    }
    out[j] = reduce16(total);
  }
}

#ifdef DECODE_INT8_VNNI
inline __m512i load_line(const int8_t* p, int64_t left) {
  return left >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(__mmask64((~0ULL) >> (64 - left)), p);
}

template <int kCount>
inline void int8_dots_block(const int8_t* w, const QuantInput* xs, int64_t cols, float* out) {
  const int64_t lines = (cols + 63) / 64;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512 total[kCount];
  for (int j = 0; j < kCount; ++j) total[j] = _mm512_setzero_ps();
  for (int64_t first = 0; first < lines; first += kInt8Block / 64) {
    const int64_t last = std::min(lines, first + kInt8Block / 64);
    __m512i hi[kCount], lo[kCount], sum_q = _mm512_setzero_si512();
    for (int j = 0; j < kCount; ++j) hi[j] = lo[j] = _mm512_setzero_si512();
    for (int64_t line = first; line < last; ++line) {
      const int64_t k = line * 64;
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetchBytes, _MM_HINT_T1);
      const __m512i q = load_line(w + k, cols - k);
      sum_q = _mm512_dpbusd_epi32(sum_q, ones, q);
      for (int j = 0; j < kCount; ++j) {
        hi[j] = _mm512_dpbusd_epi32(hi[j], _mm512_loadu_si512(xs[j].a + k), q);
        lo[j] = _mm512_dpbusd_epi32(lo[j], _mm512_loadu_si512(xs[j].b + k), q);
      }
    }
    const __m512i offset = _mm512_add_epi32(_mm512_slli_epi32(sum_q, 14), _mm512_slli_epi32(sum_q, 7));
    for (int j = 0; j < kCount; ++j) {
      const __m512i exact = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(hi[j], 7), lo[j]), offset);
      total[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(xs[j].scale[first / (kInt8Block / 64)]), total[j]);
    }
  }
  for (int j = 0; j < kCount; ++j) out[j] = _mm512_reduce_add_ps(total[j]);  // (in reduce16's order)
}
#endif

// out[j] = scale * (w . x_j) for one int8 weight row and `count` prepared inputs, the row read from memory
// once for all of them (blocks of 4 inputs: 12 accumulators each).
inline void int8_dots(const int8_t* w, float scale, const QuantInput* xs, int count, int64_t cols, float* out) {
#ifdef DECODE_INT8_VNNI
  for (int first = 0; first < count; first += 4) {
    switch (std::min(4, count - first)) {
      case 1: int8_dots_block<1>(w, xs + first, cols, out + first); break;
      case 2: int8_dots_block<2>(w, xs + first, cols, out + first); break;
      case 3: int8_dots_block<3>(w, xs + first, cols, out + first); break;
      default: int8_dots_block<4>(w, xs + first, cols, out + first); break;
    }
  }
#else
  int8_dots_plain(w, xs, count, cols, out);
#endif
  for (int j = 0; j < count; ++j) out[j] *= scale;
}


// ---- AMX-INT8 (decode_bf16.cpp only: the fp32 extension never uses tiles) ----
// In a step of at least tiles_min_rows() rows (dense.h) on a CPU with AMX-INT8, the int8 matrices every row
// multiplies (attention, shared experts or dense MLP, LM head) take 16 weight rows by up to 15 inputs at
// once: TDPBSUD makes 16 x 16 x 64 byte products in one instruction where vpdpbusd makes 64 for one input,
// and with 8 rows those matrices were bound by vpdpbusd, not by memory (two limbs: 16 of them per 64 weight
// bytes). The 16th column of the first limb's inputs holds ones, which gives each weight row's sum(q) per
// block. The integer sums are exact, as on the vector path; the block's fp32 sum is then made over the whole
// block at once instead of per lane, so a row's result differs from the vector path's in the order of its
// fp32 sums (as bf16's tiles do: see tiles_min_rows) and never depends on the other inputs of its tile.
constexpr int kInt8TileInputs = 15;

// A phase's prepared int8 inputs laid out as tiles, per group of kInt8TileInputs inputs: the first limbs
// [chunks of 64 values][16 value quads][16 columns x 4 bytes], the second limbs alike, then the block
// scales [blocks][16 columns] (fp32).
struct Int8Tiles {
  const uint8_t* data = nullptr;
  int count = 0;
  int64_t cols = 0;
  int64_t chunks() const { return int8_padded(cols) / 64; }
  int64_t group_bytes() const { return 2 * chunks() * 1024 + int8_blocks(cols) * 64; }
  int groups() const { return (count + kInt8TileInputs - 1) / kInt8TileInputs; }
};

// `count` prepared inputs (prepare_int8) as tiles in this thread's buffer `slot`; empty where the CPU has no
// AMX-INT8 or tiles are off (the storage type tells the extensions apart).
Int8Tiles pack_int8_tiles(const uint16_t*, const QuantInput* xs, int count, int64_t cols, int slot);
inline Int8Tiles pack_int8_tiles(const float*, const QuantInput*, int, int64_t, int) { return {}; }
// sums[r * 16 * groups + 16 * g + c] = scale_r * (w[r, :] . input 15 g + c) for weight rows r < rows (at most 16)
// and every packed input.
void int8_tile_rows(const uint16_t*, const int8_t* w, int64_t row_stride, const uint16_t* row_scales,
                    const Int8Tiles& packed, int rows, float* sums);
inline void int8_tile_rows(const float*, const int8_t*, int64_t, const uint16_t*, const Int8Tiles&, int, float*) {}

}  // namespace decode
