// Decode kernels for bf16 activations on x86 CPUs with AVX512-BF16: the products of bf16 weight rows
// (dense.h's dot, dots, AMX tiles; MLA's fp32 row helpers; one head's attention), and the layer bodies and
// whole step of step.h instantiated for bf16 (shared with the fp32 build; int8 and int4 weights run their
// own products, int8.h and int4.h, with AVX512-VNNI).
//
// vdpbf16ps multiplies 32 bf16 pairs and accumulates them into 16 fp32 lanes in one instruction, with no
// separate bf16 -> fp32 conversion; PyTorch's generic bf16 kernel converts first and tops out at ~47 GB/s
// on the 2-core EPYC this was measured on, where this one reaches ~62 GB/s (the memory's read rate).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include "step.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <thread>

namespace decode {

inline __m512bh load_bf16x32(const uint16_t* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

// out[j] = w . xs[j] for kRows rows at once: each 64-byte piece of w is loaded once for all of them
// (from memory by the first block of rows of a call, from L1 by the others) while each row keeps its own
// two accumulators (alternate 32-value blocks). Every row's sum takes exactly the instructions, in the
// same order, that it takes alone (kRows = 1 is dot()), so a row's result never depends on the others.
template <int kRows, bool kPrefetch>
inline void dots_block(const uint16_t* w, const uint16_t* const* xs, int64_t n, float* out) {
  __m512 acc0[kRows], acc1[kRows];
  for (int j = 0; j < kRows; ++j) acc0[j] = acc1[j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {  // two cache lines of w per iteration
    if (kPrefetch) {
      const char* ahead = reinterpret_cast<const char*>(w + k) + kPrefetchBytes;  // (never faults, even past the end)
      _mm_prefetch(ahead, _MM_HINT_T1);
      _mm_prefetch(ahead + 64, _MM_HINT_T1);
    }
    const __m512bh w0 = load_bf16x32(w + k), w1 = load_bf16x32(w + k + 32);
    for (int j = 0; j < kRows; ++j) {
      acc0[j] = _mm512_dpbf16_ps(acc0[j], w0, load_bf16x32(xs[j] + k));
      acc1[j] = _mm512_dpbf16_ps(acc1[j], w1, load_bf16x32(xs[j] + k + 32));
    }
  }
  for (; k + 32 <= n; k += 32) {
    const __m512bh w0 = load_bf16x32(w + k);
    for (int j = 0; j < kRows; ++j) acc0[j] = _mm512_dpbf16_ps(acc0[j], w0, load_bf16x32(xs[j] + k));
  }
  for (int j = 0; j < kRows; ++j) {
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j]));
    for (int64_t i = k; i < n; ++i) sum = multiply_add(bf16_to_float(w[i]), bf16_to_float(xs[j][i]), sum);
    out[j] = sum;
  }
}

float dot(const uint16_t* w, const uint16_t* x, int64_t n) {
  float sum;
  dots_block<1, true>(w, &x, n, &sum);
  return sum;
}

// Rows held in registers at once: 8 rows take 16 accumulators, two more registers hold the weights.
constexpr int kRowBlock = 8;

template <bool kPrefetch>
inline void dots_some(const uint16_t* w, const uint16_t* const* xs, int count, int64_t n, float* out) {
  switch (count) {
    case 1: return dots_block<1, kPrefetch>(w, xs, n, out);
    case 2: return dots_block<2, kPrefetch>(w, xs, n, out);
    case 3: return dots_block<3, kPrefetch>(w, xs, n, out);
    case 4: return dots_block<4, kPrefetch>(w, xs, n, out);
    case 5: return dots_block<5, kPrefetch>(w, xs, n, out);
    case 6: return dots_block<6, kPrefetch>(w, xs, n, out);
    case 7: return dots_block<7, kPrefetch>(w, xs, n, out);
    default: return dots_block<8, kPrefetch>(w, xs, n, out);
  }
}

void dots(const uint16_t* w, const uint16_t* const* xs, int count, int64_t n, float* out) {
  // (a weight row of a decode matrix is a few KiB: after the first block it is read from L1)
  for (int first = 0; first < count; first += kRowBlock) {
    const int rows = std::min(kRowBlock, count - first);
    if (first == 0)
      dots_some<true>(w, xs, rows, n, out);
    else
      dots_some<false>(w, xs + first, rows, n, out + first);
  }
}

// 16 bf16 values widened to fp32 (a bf16 is the top half of an fp32); with a mask, the lanes outside it 0.
inline __m512 load_bf16x16_as_f32(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load_bf16x16_as_f32(const uint16_t* p, __mmask16 valid) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, p)), 16));
}

// The lanes of a 16-value block that hold values when `left` of them remain (all 16 when at least 16 do).
inline __mmask16 first_lanes(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

// p moved up to the next 64-byte boundary (a cache line, a tile row), in a buffer with 64 bytes to spare.
template <typename T>
inline T* aligned_64(T* p) {
  return p + (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64 / sizeof(T);
}

// 16 fp32 values stored as bf16 (rounded to nearest even, as PyTorch), the lanes of `valid` only.
inline void store_f32_as_bf16x16(uint16_t* p, __m512 v, __mmask16 valid = 0xffff) {
  _mm256_mask_storeu_epi16(p, valid, (__m256i)_mm512_cvtneps_pbh(v));
}

float dot_f32(const uint16_t* w, const float* x, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    acc0 = _mm512_fmadd_ps(load_bf16x16_as_f32(w + k), _mm512_loadu_ps(x + k), acc0);
    acc1 = _mm512_fmadd_ps(load_bf16x16_as_f32(w + k + 16), _mm512_loadu_ps(x + k + 16), acc1);
  }
  for (; k + 16 <= n; k += 16) acc0 = _mm512_fmadd_ps(load_bf16x16_as_f32(w + k), _mm512_loadu_ps(x + k), acc0);
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; k < n; ++k) sum += bf16_to_float(w[k]) * x[k];
  return sum;
}

void axpy_f32(float* acc, float a, const uint16_t* row, int64_t n) {
  const __m512 scale = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(scale, load_bf16x16_as_f32(row + i), _mm512_loadu_ps(acc + i)));
  for (; i < n; ++i) acc[i] += a * bf16_to_float(row[i]);
}

template <int kCount>
void dots_f32_n(const uint16_t* row, const float* xs, int64_t x_stride, int64_t n, float* out) {
  __m512 acc[kCount];
  for (int j = 0; j < kCount; ++j) acc[j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 r = load_bf16x16_as_f32(row + k);
    for (int j = 0; j < kCount; ++j) acc[j] = _mm512_fmadd_ps(r, _mm512_loadu_ps(xs + j * x_stride + k), acc[j]);
  }
  for (int j = 0; j < kCount; ++j) {
    float sum = _mm512_reduce_add_ps(acc[j]);
    for (int64_t i = k; i < n; ++i) sum += bf16_to_float(row[i]) * xs[j * x_stride + i];
    out[j] = sum;
  }
}

void dots_f32(const uint16_t* row, const float* xs, int64_t x_stride, int64_t count, int64_t n, float* out) {
  switch (count) {
    case 1: return dots_f32_n<1>(row, xs, x_stride, n, out);
    case 2: return dots_f32_n<2>(row, xs, x_stride, n, out);
    case 3: return dots_f32_n<3>(row, xs, x_stride, n, out);
    case 4: return dots_f32_n<4>(row, xs, x_stride, n, out);
    default: DECODE_CHECK(false, "dots_f32: 1 to 4 vectors");
  }
}

void axpys_f32(const uint16_t* row, const float* a, int64_t count, int64_t n, float* acc, int64_t acc_stride) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 r = load_bf16x16_as_f32(row + i);
    for (int64_t j = 0; j < count; ++j) {
      float* dst = acc + j * acc_stride + i;
      _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_set1_ps(a[j]), r, _mm512_loadu_ps(dst)));
    }
  }
  for (; i < n; ++i)
    for (int64_t j = 0; j < count; ++j) acc[j * acc_stride + i] += a[j] * bf16_to_float(row[i]);
}

// exp(x) of 16 fp32 values, for the softmax (x <= 0 there): Cephes' expf method, x = n ln2 + r with |r| <= ln2 / 2,
// e^r = 1 + r + r^2 P(r), then 2^n applied by vscalefps, which also takes very negative x to 0. Within 1 ulp
// of std::exp on every 7th float of [-110, 0]; std::exp itself, one value at a time, was a quarter of tiny's
// attention arithmetic.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: r exact for |n| < 2^10
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// silu(g) = g / (1 + exp(-g)). exp_ps clamps its argument at 88; below g = -88 the quotient is set to
// -0, what fp32's exp overflowing to inf gives.
inline __m512 silu_ps(__m512 g) {
  const __m512 e = exp_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(-88.0f)));  // (-inf: NaN)
  const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __mmask16 far = _mm512_cmp_ps_mask(g, _mm512_set1_ps(-88.0f), _CMP_LT_OQ);
  return _mm512_mask_mov_ps(s, far, _mm512_set1_ps(-0.0f));
}

// x = bf16(silu(x)) in place (dense.h), 16 values at a time: scalar std::exp per hidden unit was ~2 % of
// base's int4 decode step.
void silu_in_place(uint16_t* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 valid = first_lanes(n - i);
    store_f32_as_bf16x16(x + i, silu_ps(load_bf16x16_as_f32(x + i, valid)), valid);
  }
}

// probs[t] = exp(scores[t] - best) / sum over t, in place, 16 at a time (the softmax of the official code, in fp32).
inline void softmax_in_place(float* probs, int64_t length, float best) {
  const __m512 shift = _mm512_set1_ps(best);
  __m512 sums = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= length; t += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(probs + t), shift));
    _mm512_storeu_ps(probs + t, e);
    sums = _mm512_add_ps(sums, e);
  }
  const __mmask16 tail = __mmask16((1u << (length - t)) - 1);
  const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, probs + t), shift));
  _mm512_mask_storeu_ps(probs + t, tail, e);
  sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(tail, e));
  const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sums));
  for (t = 0; t + 16 <= length; t += 16) _mm512_storeu_ps(probs + t, _mm512_div_ps(_mm512_loadu_ps(probs + t), total));
  _mm512_mask_storeu_ps(probs + t, tail, _mm512_div_ps(_mm512_maskz_loadu_ps(tail, probs + t), total));
}

// One head's attention with d = 32 * kBlocks, its fp32 sums held in registers across all cached positions
// (the plain loop loaded and stored them for every value row). Keys are summed as dot() sums them (two
// accumulators over alternate 32-value blocks). A value row is widened by interleaving its bf16 bits
// with zeros (unpacklo/hi: each 128-bit lane's first four values, then its last four), half the
// instructions of an in-order widening; the sums are put back in order when stored.
// Attention reads each head's cached keys, then its values, as runs of ~100 KiB (tiny at ~440 tokens) that
// start anew for every (row, head): asking for each cached row kPrefetchBytes ahead keeps misses in flight
// across those starts. Tiny's bf16 step of 16 rows at position 438 (tiles on, the Sapphire Rapids VM, A/B in
// turns): 199.7-202.5 ms against 205.2-209.4 without.
inline void prefetch_ahead(const uint16_t* row, int64_t d) {
  const char* ahead = reinterpret_cast<const char*>(row) + kPrefetchBytes;
  for (int64_t b = 0; b < d * 2; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T1);
}

template <int kBlocks>
void attend_head_vec(const uint16_t* q, const uint16_t* k, int64_t k_row_stride, const uint16_t* v, int64_t v_row_stride,
                     int64_t length, float scale, float* probs, uint16_t* out) {
  constexpr int64_t d = 32 * kBlocks;
  __m512bh query[kBlocks];
  for (int j = 0; j < kBlocks; ++j) query[j] = load_bf16x32(q + 32 * j);
  float best = -INFINITY;
  for (int64_t t = 0; t < length; ++t) {
    const uint16_t* row = k + t * k_row_stride;
    prefetch_ahead(row, d);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int j = 0; j + 1 < kBlocks; j += 2) {
      acc0 = _mm512_dpbf16_ps(acc0, load_bf16x32(row + 32 * j), query[j]);
      acc1 = _mm512_dpbf16_ps(acc1, load_bf16x32(row + 32 * j + 32), query[j + 1]);
    }
    if (kBlocks % 2) acc0 = _mm512_dpbf16_ps(acc0, load_bf16x32(row + d - 32), query[kBlocks - 1]);
    probs[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) * scale;
    best = std::max(best, probs[t]);
  }
  softmax_in_place(probs, length, best);
  __m512 low[kBlocks], high[kBlocks];
  for (int j = 0; j < kBlocks; ++j) low[j] = high[j] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t t = 0; t < length; ++t) {
    const __m512 p = _mm512_set1_ps(probs[t]);
    const uint16_t* row = v + t * v_row_stride;
    prefetch_ahead(row, d);
    for (int j = 0; j < kBlocks; ++j) {
      const __m512i bits = _mm512_loadu_si512(reinterpret_cast<const void*>(row + 32 * j));
      low[j] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, bits)), low[j]);
      high[j] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, bits)), high[j]);
    }
  }
  alignas(64) float sums[2][16];
  for (int j = 0; j < kBlocks; ++j) {
    _mm512_store_ps(sums[0], low[j]);
    _mm512_store_ps(sums[1], high[j]);
    for (int lane = 0; lane < 4; ++lane)  // value 8 * lane + i of the block: low (i < 4) or high, lane's slot i % 4
      for (int i = 0; i < 8; ++i) out[32 * j + 8 * lane + i] = float_to_bf16(sums[i / 4][4 * lane + i % 4]);
  }
}

void attend_head(const uint16_t* q, const uint16_t* k, int64_t k_row_stride, const uint16_t* v, int64_t v_row_stride,
                 int64_t length, int64_t d, float scale, float* scores, float* acc, uint16_t* out) {
  switch (d) {
    case 64: return attend_head_vec<2>(q, k, k_row_stride, v, v_row_stride, length, scale, scores, out);
    case 128: return attend_head_vec<4>(q, k, k_row_stride, v, v_row_stride, length, scale, scores, out);
    case 192: return attend_head_vec<6>(q, k, k_row_stride, v, v_row_stride, length, scale, scores, out);
    case 256: return attend_head_vec<8>(q, k, k_row_stride, v, v_row_stride, length, scale, scores, out);
    default: return attend_head_generic(q, k, k_row_stride, v, v_row_stride, length, d, scale, scores, acc, out);
  }
}

// ---- AMX tiles (see tiles_min_rows in dense.h) ----

// The tile registers' shapes, as LDTILECFG reads them (palette 1: 8 tiles of up to 16 rows x 64 bytes).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: sums (C: weight rows x 16 inputs, fp32), weights (A: weight rows x 32 bf16), inputs (B: 16 value pairs
// x 16 inputs). (Macros: the tile intrinsics paste their numbers into the instruction's text.)
#define SUMS_TILE 0
#define WEIGHTS_TILE 1
#define INPUTS_TILE 2

// AMX-BF16 and AMX-TILE in CPUID leaf 7 (EDX bits 22 and 24), and Linux's permission to use the tile
// registers (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; without it the first tile
// instruction is SIGILL).
bool tiles_available() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return false;
  constexpr long kRequestPermission = 0x1023, kTileData = 18;
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

// Whether int8 matrices go on tiles too (int8.h): wherever bf16 ones do and the CPU has AMX-INT8.
std::atomic<bool>& int8_tiles_on() {
  static std::atomic<bool> on{false};
  return on;
}

// AMX-INT8 in CPUID leaf 7 (EDX bit 25).
bool has_amx_int8() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx & (1u << 25));
}

// Tiles for steps of at least `min_rows` rows (where the CPU and the OS allow them), or never (0); returns
// the minimum now in force (0 where tiles are unavailable). Not while a step runs.
int set_tiles(int min_rows) {
  const bool on = min_rows > 0 && tiles_available();
  tiles_min_rows().store(on ? min_rows : 0);
  int8_tiles_on().store(on && has_amx_int8());
  return tiles_min_rows().load();
}

// 16 vectors of 16 32-bit values transposed in registers: lane j of r[i] becomes lane i of r[j].
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // (pairs of rows interleaved: per 128-bit lane, elements 0-1 and 2-3)
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // (r[4q + s], lane L: element 4L + s of rows 4q .. 4q + 3)
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int q = 0; q < 2; ++q)  // (128-bit lanes gathered across the four row quads, two steps)
    for (int s = 0; s < 4; ++s) {
      t[8 * q + s] = _mm512_shuffle_f32x4(r[8 * q + s], r[8 * q + 4 + s], 0x88);
      t[8 * q + 4 + s] = _mm512_shuffle_f32x4(r[8 * q + s], r[8 * q + 4 + s], 0xdd);
    }
  for (int s = 0; s < 8; ++s) {
    r[s] = _mm512_shuffle_f32x4(t[s], t[8 + s], 0x88);
    r[8 + s] = _mm512_shuffle_f32x4(t[s], t[8 + s], 0xdd);
  }
}

// A 16 x 16 block of value pairs at a time: 16 inputs' 32 values loaded as rows, transposed so that each
// vector holds one pair of all 16 inputs (zeros past the last input and value).
const uint16_t* pack_tiles(const uint16_t* const* xs, int count, int64_t cols) {
  thread_local std::vector<uint32_t> buffer;
  const int64_t chunks = (cols + 31) / 32, tiles = (count + 15) / 16;
  const size_t need = size_t(tiles * chunks * 256 + 16);  // (+16: room to align to 64 bytes)
  if (buffer.size() < need) buffer.assign(need, 0);
  uint32_t* base = aligned_64(buffer.data());
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t values = std::min<int64_t>(32, cols - 32 * c);
      const __mmask32 valid = values == 32 ? __mmask32(0xffffffffu) : __mmask32((1u << values) - 1);
      __m512 r[16];
      for (int j = 0; j < 16; ++j)
        r[j] = 16 * t + j < count ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(valid, xs[16 * t + j] + 32 * c))
                                  : _mm512_setzero_ps();
      transpose16(r);
      uint32_t* out = base + (t * chunks + c) * 256;
      for (int p = 0; p < 16; ++p) _mm512_store_ps(reinterpret_cast<float*>(out + 16 * p), r[p]);
    }
  return reinterpret_cast<const uint16_t*>(base);
}

// Up to 16 weight rows: one sums tile per 16 inputs, its fp32 sums over the 32-value pieces in order.
// (No software prefetch: asking for each row 2 KiB ahead, as dot() does, cost a third of the rate here;
// the hardware prefetchers alone follow the 16 rows' streams at ~27 GB/s where dot() reads ~31 on the
// 2-core Sapphire Rapids VM this was measured on. Copying the rows to a staging buffer first, to read
// each in one pass, was slower still: the copy and the multiplies no longer overlap.)
void tile_rows(const uint16_t* w, int64_t row_stride, int64_t cols, const uint16_t* packed, int columns, int rows,
               float* sums) {
  const int tiles = (columns + 15) / 16;
  const int64_t width = 16 * tiles;  // (sums row stride)
  TileConfig config;
  config.rows[SUMS_TILE] = config.rows[WEIGHTS_TILE] = uint8_t(rows);
  config.rows[INPUTS_TILE] = 16;
  config.bytes_per_row[SUMS_TILE] = config.bytes_per_row[WEIGHTS_TILE] = config.bytes_per_row[INPUTS_TILE] = 64;
  _tile_loadconfig(&config);
  const int64_t whole = cols / 32, chunks = (cols + 31) / 32;
  for (int64_t t = 0; t < tiles; ++t) {
    const uint16_t* inputs = packed + t * chunks * 512;
    _tile_zero(SUMS_TILE);
    for (int64_t k = 0; k < whole; ++k) {
      _tile_loadd(WEIGHTS_TILE, w + 32 * k, row_stride * 2);
      _tile_loadd(INPUTS_TILE, inputs + 512 * k, 64);
      _tile_dpbf16ps(SUMS_TILE, WEIGHTS_TILE, INPUTS_TILE);
    }
    if (whole < chunks) {  // the last cols % 32 values, zero-padded (the inputs were padded when packed)
      alignas(64) uint16_t last[16 * 32] = {};
      for (int r = 0; r < rows; ++r) std::memcpy(last + 32 * r, w + r * row_stride + 32 * whole, (cols - 32 * whole) * 2);
      _tile_loadd(WEIGHTS_TILE, last, 64);
      _tile_loadd(INPUTS_TILE, inputs + 512 * whole, 64);
      _tile_dpbf16ps(SUMS_TILE, WEIGHTS_TILE, INPUTS_TILE);
    }
    _tile_stored(SUMS_TILE, sums + 16 * t, width * 4);
  }
}

// Tiles of the int8 products (int8.h): sums of the two limbs (C, 16 x 16 int32), and two sets of operands
// taken by turns, chunk by chunk (so that one chunk's loads need not wait for the last chunk's products):
// weights (A: 16 rows x 64 signed bytes) and the inputs' two limbs (B: 16 quads x 16 columns, unsigned).
#define HI_SUMS_TILE 0
#define LO_SUMS_TILE 1

Int8Tiles pack_int8_tiles(const uint16_t*, const QuantInput* xs, int count, int64_t cols, int slot) {
  if (!int8_tiles_on().load(std::memory_order_relaxed)) return {};
  thread_local std::vector<uint8_t> buffers[3];
  Int8Tiles packed;
  packed.count = count, packed.cols = cols;
  const int64_t chunks = packed.chunks(), blocks = int8_blocks(cols), group_bytes = packed.group_bytes();
  std::vector<uint8_t>& buffer = buffers[slot];
  const size_t need = size_t(packed.groups() * group_bytes + 64);
  if (buffer.size() < need) buffer.resize(need);
  uint8_t* base = buffer.data() + (64 - reinterpret_cast<uintptr_t>(buffer.data()) % 64) % 64;
  std::memset(base, 0, size_t(packed.groups() * group_bytes));
  for (int g = 0; g < packed.groups(); ++g) {
    uint8_t* hi = base + g * group_bytes;
    uint8_t* lo = hi + chunks * 1024;
    float* scales = reinterpret_cast<float*>(lo + chunks * 1024);
    for (int64_t quad = 0; quad < chunks * 16; ++quad) std::memset(hi + 64 * quad + 4 * kInt8TileInputs, 1, 4);  // (sum q)
    for (int c = 0; c < kInt8TileInputs && g * kInt8TileInputs + c < count; ++c) {
      const QuantInput& x = xs[g * kInt8TileInputs + c];
      for (int64_t quad = 0; quad < chunks * 16; ++quad) {  // (values 4 quad .. 4 quad + 3: row quad % 16 of chunk quad / 16)
        std::memcpy(hi + 64 * quad + 4 * c, x.a + 4 * quad, 4);
        std::memcpy(lo + 64 * quad + 4 * c, x.b + 4 * quad, 4);
      }
      for (int64_t b = 0; b < blocks; ++b) scales[16 * b + c] = x.scale[b];
    }
  }
  packed.data = base;
  return packed;
}

// The weights of 16 rows come as 16 short streams (a row is 1-2 KiB), which the hardware prefetchers barely
// ramp up on: the next 16 rows are asked for into L2 while these are multiplied.
void int8_tile_rows(const uint16_t*, const int8_t* w, int64_t row_stride, const uint16_t* row_scales,
                    const Int8Tiles& packed, int rows, float* sums) {
  TileConfig config;
  config.rows[HI_SUMS_TILE] = config.rows[LO_SUMS_TILE] = config.rows[2] = config.rows[5] = uint8_t(rows);  // (C, A)
  config.rows[3] = config.rows[4] = config.rows[6] = config.rows[7] = 16;  // (B)
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
  const int64_t cols = packed.cols, chunks = packed.chunks(), whole = cols / 64;
  const int64_t blocks = int8_blocks(cols), width = 16 * packed.groups();
  alignas(64) int32_t hi_sums[16 * 16], lo_sums[16 * 16];
  alignas(64) int8_t last[16 * 64];  // (the last cols % 64 weights of each row, zero-padded)
  if (whole < chunks) {
    std::memset(last, 0, sizeof(last));
    for (int r = 0; r < rows; ++r) std::memcpy(last + 64 * r, w + r * row_stride + 64 * whole, size_t(cols - 64 * whole));
  }
  for (int g = 0; g < packed.groups(); ++g) {
    const uint8_t* hi = packed.data + g * packed.group_bytes();
    const uint8_t* lo = hi + chunks * 1024;
    const float* scales = reinterpret_cast<const float*>(lo + chunks * 1024);
    __m512 total[16];
    for (int r = 0; r < 16; ++r) total[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      _tile_zero(HI_SUMS_TILE);
      _tile_zero(LO_SUMS_TILE);
      for (int64_t k = b * (kInt8Block / 64); k < std::min(chunks, (b + 1) * (kInt8Block / 64)); ++k) {
        if (g == 0)  // (the next 16 rows, 1 KiB per chunk: they follow these in memory when the rows are compact)
          for (int line = 0; line < 16; ++line)
            _mm_prefetch(reinterpret_cast<const char*>(w + 16 * row_stride + 1024 * k + 64 * line), _MM_HINT_T1);
        const int8_t* weights = k < whole ? w + 64 * k : last;
        const int64_t stride = k < whole ? row_stride : 64;
        if (k % 2 == 0) {
          _tile_loadd(2, weights, stride);
          _tile_loadd(3, hi + 1024 * k, 64);
          _tile_loadd(4, lo + 1024 * k, 64);
          _tile_dpbsud(HI_SUMS_TILE, 2, 3);
          _tile_dpbsud(LO_SUMS_TILE, 2, 4);
        } else {
          _tile_loadd(5, weights, stride);
          _tile_loadd(6, hi + 1024 * k, 64);
          _tile_loadd(7, lo + 1024 * k, 64);
          _tile_dpbsud(HI_SUMS_TILE, 5, 6);
          _tile_dpbsud(LO_SUMS_TILE, 5, 7);
        }
      }
      _tile_stored(HI_SUMS_TILE, hi_sums, 64);
      _tile_stored(LO_SUMS_TILE, lo_sums, 64);
      const __m512 block_scales = _mm512_load_ps(scales + 16 * b);
      for (int r = 0; r < rows; ++r) {
        const __m512i sum_q = _mm512_set1_epi32(hi_sums[16 * r + kInt8TileInputs]);
        const __m512i offset = _mm512_add_epi32(_mm512_slli_epi32(sum_q, 14), _mm512_slli_epi32(sum_q, 7));
        const __m512i exact = _mm512_sub_epi32(
            _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(hi_sums + 16 * r), 7), _mm512_load_si512(lo_sums + 16 * r)),
            offset);
        total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), block_scales, total[r]);
      }
    }
    for (int r = 0; r < rows; ++r)
      _mm512_storeu_ps(sums + r * width + 16 * g, _mm512_mul_ps(total[r], _mm512_set1_ps(bf16_to_float(row_scales[r]))));
  }
}

float router_dot(const float* w, const float* x, int64_t n) {
  const int64_t n16 = n / 16 * 16;
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i < n16; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), acc);
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) sum += w[i] * x[i];
  return sum;
}

// fp32 rows with fp32 inputs (dense.h's contract for fp32): in this build only for MLA's fp32 context, whose
// quantized kv_b rows go through matrix.h with fp32 operands (the dense branch is there but never taken).
float dot(const float* w, const float* x, int64_t n) { return router_dot(w, x, n); }
void dots(const float* w, const float* const* xs, int count, int64_t n, float* out) {
  for (int j = 0; j < count; ++j) out[j] = router_dot(w, xs[j], n);
}

}  // namespace decode

using namespace decode;

// RMSNorm of bf16 vectors (rows of the last dimension), rounded like the eager module:
// weight * bf16(x * rsqrt(mean(x^2) + eps)), the statistics in fp32.
torch::Tensor rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  DECODE_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "rms_norm_bf16: bf16 only");
  const auto xc = x.contiguous(), wc = weight.contiguous();
  const int64_t d = wc.numel();
  DECODE_CHECK(xc.size(-1) == d, "rms_norm_bf16: weight has ", d, " values, x rows have ", xc.size(-1));
  auto out = torch::empty_like(xc);
  const uint16_t *xp = data_of<uint16_t>(xc), *wp = data_of<uint16_t>(wc);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  for (int64_t row = 0; row < xc.numel() / d; ++row) rms_norm_row(xp + row * d, wp, d, float(eps), op + row * d);
  return out;
}

// Several batch-1 linears in one parallel region: outs[i] = ws[i] @ xs[i] (+ biases[i]), each rounded once
// to bf16 like F.linear. Every thread takes its share of the rows of every matrix, with no barrier between
// matrices. xs[i]: K_i bf16 values; ws[i]: [N_i, K_i]; biases: empty or one (possibly undefined) per weight.
std::vector<torch::Tensor> gemv_bf16_many(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& ws,
                                          const std::vector<c10::optional<torch::Tensor>>& biases) {
  DECODE_CHECK(xs.size() == ws.size() && (biases.empty() || biases.size() == ws.size()), "gemv_bf16_many: list lengths");
  const size_t count = ws.size();
  std::vector<torch::Tensor> inputs, bias_f, outs;
  for (size_t i = 0; i < count; ++i) {
    check_matrix<uint16_t>(ws[i], "gemv_bf16_many");
    inputs.push_back(xs[i].reshape({-1}).contiguous());
    DECODE_CHECK(inputs[i].scalar_type() == at::kBFloat16 && inputs[i].numel() == ws[i].size(1),
                 "gemv_bf16_many: input ", i, " must hold ", ws[i].size(1), " bf16 values");
    bias_f.push_back(biases.empty() ? torch::Tensor() : fp32_bias("gemv_bf16_many", biases[i], ws[i].size(0)));
    outs.push_back(torch::empty({ws[i].size(0)}, ws[i].options()));
  }
  const int threads = pool_threads();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
    for (size_t i = 0; i < count; ++i) {
      auto* out = reinterpret_cast<uint16_t*>(outs[i].data_ptr());
      const float* bias = bias_f[i].defined() ? bias_f[i].data_ptr<float>() : nullptr;
      const auto [begin, end] = share(ws[i].size(0), thread, team);
      gemv_rows(data_of<uint16_t>(ws[i]), ws[i].stride(0), ws[i].size(1), data_of<uint16_t>(inputs[i]), begin, end,
                [&](int64_t n, float sum) { out[n] = float_to_bf16(bias ? sum + bias[n] : sum); });
    }
  }
  return outs;
}

// y[j] = w @ xs[j] for the rows xs [count, K] (bf16, fp32 sums rounded once), through the step kernels'
// row products (tiles where they are on), every thread of the pool claiming 64 KiB chunks: for the tests
// and the benchmarks of those products alone.
torch::Tensor rows_linear_bf16(const torch::Tensor& xs, const torch::Tensor& w) {
  check_matrix<uint16_t>(w, "rows_linear_bf16");
  const auto x = xs.contiguous();
  DECODE_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == w.size(1) && x.size(0) >= 1 &&
                   x.size(0) <= kMaxRows, "rows_linear_bf16: xs must be [1..", kMaxRows, ", ", w.size(1), "] bf16");
  const int count = int(x.size(0));
  const int64_t cols = w.size(1);
  auto out = torch::empty({count, w.size(0)}, w.options());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const Matrix<uint16_t> matrix = matrix_of<uint16_t>({w}, "rows_linear_bf16");
  RowClaims claims;
  claims.reset(w.size(0), pool_threads());
  in_parallel([&](int thread, int team) {
    const uint16_t* inputs[kMaxRows];
    row_pointers<uint16_t>(data_of<uint16_t>(x), cols, count, inputs);
    const Operands<uint16_t> in = operands<uint16_t>(Format::kDense, inputs, count, cols);
    claims.run(thread, chunk_rows(cols * 2), [&](int64_t begin, int64_t end) {
      gemv_rows_multi(matrix, in, begin, end, [&](int64_t n, int j, float sum) { op[j * w.size(0) + n] = float_to_bf16(sum); });
    });
  });
  return out;
}

// For the tests: which thread of the pool processed each of n rows claimed in chunks, thread 0 sleeping
// `slow_us` microseconds per chunk (so the others must take over its share); -1 where no thread did,
// -2 where two did.
torch::Tensor row_claims_trace(int64_t n, int64_t chunk, int64_t slow_us) {
  std::vector<std::atomic<int64_t>> cells(n);
  for (auto& cell : cells) cell.store(-1);
  RowClaims claims;
  claims.reset(n, pool_threads());
  in_parallel([&](int thread, int team) {
    claims.run(thread, chunk, [&](int64_t begin, int64_t end) {
      if (thread == 0 && slow_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(slow_us));
      for (int64_t r = begin; r < end; ++r) {
        int64_t expected = -1;
        if (!cells[r].compare_exchange_strong(expected, thread)) cells[r].store(-2);
      }
    });
  });
  auto owner = torch::empty({n}, torch::kInt64);
  for (int64_t r = 0; r < n; ++r) owner[r] = cells[r].load();
  return owner;
}

#include "experts_prefill.h"  // (these after the tile products and exp_ps above, which they use)
#include "prefill_rows.h"
#include "prefill_attention.h"
#include "latent_attention.h"
#include "vision.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_claims_trace", &row_claims_trace, "test hook: the thread that processed each row claimed in chunks");
  m.def("gemv_bf16", [](const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
          return gemv<uint16_t>("gemv_bf16", x, w, bias);
        }, ReleaseGil(), "bf16 batch-1 linear with AVX512-BF16", pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("bias") = pybind11::none());
  m.def("rms_norm_bf16", &rms_norm_bf16, ReleaseGil(), "RMSNorm of bf16 rows");
  m.def("gemv_bf16_many", &gemv_bf16_many, ReleaseGil(), "several bf16 batch-1 linears in one parallel region");
  m.def("rows_linear_bf16", &rows_linear_bf16, ReleaseGil(), "w @ xs[j] for each row of xs, through the step kernels' row products");
  m.def("experts_prefill_bf16", &experts_prefill_bf16, ReleaseGil(),
        "a prompt's rows through the routed experts of one MoE layer on AMX tiles, in the expert-grouped order",
        pybind11::arg("x"), pybind11::arg("order"), pybind11::arg("counts"), pybind11::arg("top_k"), pybind11::arg("table"),
        pybind11::arg("intermediate"));
  m.def("attention_bf16", &attention_bf16, ReleaseGil(),
        "softmax(scale q k^T) v of every head on AMX tiles (causal from causal_offset >= 0): q [B, H, S, dk], k [B, Hk, T, dk], "
        "v [B, Hk, T, dv] -> [B, S, H, dv]",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("causal_offset"), pybind11::arg("scale"));
  m.def("gelu_tanh_bf16_", &gelu_tanh_bf16_, ReleaseGil(), "GELU (tanh approximation) in place on bf16 values",
        pybind11::arg("x"));
  m.def("rms_norm_rows_bf16", &rms_norm_rows_bf16, ReleaseGil(), "RMSNorm of many bf16 rows, in parallel");
  m.def("rope_bf16", &rope_bf16, ReleaseGil(), "RoPE (half-split) of bf16 x [B, H, S, d] with cos, sin [S, d]");
  m.def("weighted_sum_bf16", &weighted_sum_bf16, ReleaseGil(), "the routed experts' weighted sum per token");
  m.def("silu_mul_bf16", &silu_mul_bf16, ReleaseGil(), "bf16(bf16(silu(gate)) * up)");
  m.def("set_tiles", &set_tiles, "AMX tiles for steps of at least min_rows rows (where the CPU and OS allow), 0: never; "
        "returns the minimum in force", pybind11::arg("min_rows"));
  m.def("int8_tiles", []() { return int8_tiles_on().load(); }, "whether int8 matrices run on AMX-INT8 tiles in steps "
        "of tiles_min_rows rows or more");
  m.def("tiles_min_rows", []() { return tiles_min_rows().load(); }, "the fewest rows of a step that AMX tiles carry (0: never)");
  bind_layer_kernels<uint16_t>(m, "bf16");
}
