// The decode kernels on the CPU, generic over the weights' storage type: bf16 (uint16_t bits,
// decode_bf16.cpp) or fp32 (float, decode_f32.cpp). Each of those translation units defines how it
// multiplies rows (declared below, defined in the translation unit):
//   float dot(const T* w, const T* x, int64_t n)          a weight row with the input
//   void dots(const T* w, const T* const* xs, int count, int64_t n, float* out)   ... with several inputs
//   float router_dot(const float* w, const float* x, int64_t n)   a router row (fp32 weights) with fp32 input
// Decoding streams every active weight once per step, so these loops only have to keep up with memory.
//
// A step decodes one token of each of several sequences (rows; the serving engine's batch): every
// weight matrix is streamed once for all the rows, and in a MoE layer each expert chosen by any row is
// streamed once for the rows routed to it. Each row's arithmetic is exactly what it is alone (the same
// sums in the same order: see dots), so a row's logits never depend on the other rows of its step.
//
// Every call has a fixed cost (Python, pybind, waking the thread pool, the hardware prefetchers ramping up
// on a new matrix), which is large next to one expert's 2.3 MB. So the kernels take whole sub-layers
// (mha_block: plain attention; mla_block: latent attention; ffn_block: router + experts) and a whole decode
// step (DecodeStep), each in one parallel region. Every step is rounded to the storage type where the eager
// PyTorch modules round (for fp32 the roundings are no-ops).
#pragma once
#include <torch/extension.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include "gemv_args.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace decode {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// acc + a * b, rounded once where the CPU has FMA and twice where it has not, explicitly: whether the
// compiler fuses a plain `acc += a * b` is its choice per loop, and every row's sum (one row or many at
// once) must take the same roundings.
inline float multiply_add(float a, float b, float acc) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, acc);
#else
  return acc + a * b;  // (no FMA instruction to fuse it into)
#endif
}

inline uint16_t float_to_bf16(float value) {  // round to nearest even, as PyTorch's conversion does
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

// How far ahead of the row being multiplied `dot` asks for weights (into L2: _MM_HINT_T1). A new
// matrix, or a thread's new run of rows every ~64 KiB (RowClaims), starts the hardware prefetcher afresh,
// and each core can keep only so many misses of its own in flight; asking 2 KiB ahead keeps the memory
// busy across those starts. On the 2-core EPYC (Zen 4), tiny's whole bf16 step went from 78-83 % to
// 86-91 % of the bandwidth bound in the VM's fast memory phase (~67 GB/s) and from 91-96 % to 95-98 %
// in its slow one (~37 GB/s); 1 KiB ahead did about as well, 4 KiB worse, into L1 (T0) no better than none.
constexpr int64_t kPrefetchBytes = 2048;

// Defined by the translation unit that includes this header (see the top of the file). `w` is the
// operand streamed from memory (a weight row, a cached key): the one that is prefetched.
float dot(const uint16_t* w, const uint16_t* x, int64_t n);
float dot(const float* w, const float* x, int64_t n);
float router_dot(const float* w, const float* x, int64_t n);
// out[j] = dot(w, xs[j], n) for j < count, bit for bit, with w read from memory once for all of them.
void dots(const uint16_t* w, const uint16_t* const* xs, int count, int64_t n, float* out);
void dots(const float* w, const float* const* xs, int count, int64_t n, float* out);

// The most rows (sequences) one step takes.
constexpr int kMaxRows = 64;

// How values of a storage type are read, written and rounded (the points where PyTorch rounds a result
// to the tensor's dtype).
template <typename T>
struct Storage;

template <>
struct Storage<uint16_t> {  // bf16 bits
  static constexpr at::ScalarType kType = at::kBFloat16;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(float v) { return float_to_bf16(v); }
  static float round(float v) { return bf16_to_float(float_to_bf16(v)); }
};

template <>
struct Storage<float> {
  static constexpr at::ScalarType kType = at::kFloat;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
  static float round(float v) { return v; }
};

// y[n] = w[n, :] . x for rows [begin, end) of a row-contiguous matrix, fp32 sums.
template <typename T, typename Store>
inline void gemv_rows(const T* w, int64_t row_stride, int64_t cols, const T* x, int64_t begin, int64_t end,
                      Store store) {
  for (int64_t n = begin; n < end; ++n) store(n, dot(w + n * row_stride, x, cols));
}

// AMX (bf16 weights on CPUs with AMX-BF16, decode_bf16.cpp; never fp32): in a step of at least
// tiles_min_rows() rows (0: never), the matrices every row multiplies (attention, shared experts or dense
// MLPs, LM head) take 16 weight rows at a time by up to 16 inputs at once (TDPBF16PS), the phase's inputs
// packed as tiles once. One instruction does 16 x 16 x 32 multiply-adds where vdpbf16ps does 16 x 2: with
// 8-16 rows those matrices were bound by vdpbf16ps, not by memory, on two cores. A routed expert's rows
// (~2 of 16 on average) stay on vdpbf16ps, which keeps up with memory there and streams faster than tile
// loads; so do steps of one or two rows (the default minimum is 3: tiles read one row's weights ~10 %
// slower, and two rows gain nothing). A weight row's sum with an input is made by the same instructions
// in the same order whatever the other inputs of its tile, so among steps on the same side of the minimum
// a row's logits never depend on the others; across it they differ in the order of fp32 sums.
inline std::atomic<int>& tiles_min_rows() {  // (each extension its own; set by decode_bf16.cpp's set_tiles only)
  static std::atomic<int> min_rows{0};
  return min_rows;
}
inline bool tiles_for(const uint16_t*, int rows) {
  const int min_rows = tiles_min_rows().load(std::memory_order_relaxed);
  return min_rows > 0 && rows >= min_rows;
}
inline bool tiles_for(const float*, int) { return false; }
// `count` inputs of `cols` values in this thread's buffer, laid out as tiles: [count / 16][cols / 32][16
// value pairs][16 inputs].
const uint16_t* pack_tiles(const uint16_t* const* xs, int count, int64_t cols);
inline const float* pack_tiles(const float* const*, int, int64_t) { return nullptr; }
// sums[r * 16 * tiles + c] = w[r, :] . input c, for weight rows r < rows (at most 16) and the packed
// inputs c < columns (16 * tiles: the tiles the inputs fill).
void tile_rows(const uint16_t* w, int64_t row_stride, int64_t cols, const uint16_t* packed, int columns, int rows,
               float* sums);
inline void tile_rows(const float*, int64_t, int64_t, const float*, int, int, float*) {}

// A phase's inputs packed as tiles once for all the matrices and chunks it multiplies (none where tiles
// are off or the step has fewer rows than tiles_min_rows). Only one phase's packing is live per thread at a time.
template <typename T>
struct Packed {
  const T* tiles = nullptr;
  int columns = 0;
};

template <typename T>
inline Packed<T> pack_inputs(const T* const* xs, int count, int64_t cols) {
  if (!tiles_for(static_cast<const T*>(nullptr), count)) return {};
  return {pack_tiles(xs, count, cols), count};
}

// y[j][n] = w[n, :] . xs[j] for rows [begin, end) of a row-contiguous matrix and `count` inputs, each
// sum as gemv_rows makes it: store(n, j, sum). On tiles where the inputs come packed (pack_inputs).
template <typename T, typename Store>
inline void gemv_rows_multi(const T* w, int64_t row_stride, int64_t cols, const T* const* xs, int count, int64_t begin,
                            int64_t end, Store store, Packed<T> packed = {}) {
  if (packed.tiles != nullptr) {
    const int width = 16 * ((packed.columns + 15) / 16);
    float sums[16 * kMaxRows];
    for (int64_t n = begin; n < end; n += 16) {
      const int rows = int(std::min<int64_t>(16, end - n));
      tile_rows(w + n * row_stride, row_stride, cols, packed.tiles, packed.columns, rows, sums);
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < count; ++j) store(n + r, j, sums[r * width + j]);
    }
    return;
  }
  if (count == 1) {  // (one row: dot itself, as the single-sequence step always ran)
    for (int64_t n = begin; n < end; ++n) store(n, 0, dot(w + n * row_stride, xs[0], cols));
    return;
  }
  float sums[kMaxRows];
  for (int64_t n = begin; n < end; ++n) {
    dots(w + n * row_stride, xs, count, cols, sums);
    for (int j = 0; j < count; ++j) store(n, j, sums[j]);
  }
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

template <typename T>
inline const T* data_of(const torch::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }

// The share [begin, end) of n rows that thread `thread` of `threads` works on.
inline std::pair<int64_t, int64_t> share(int64_t n, int thread, int threads) {
  return {n * thread / threads, n * (thread + 1) / threads};
}

inline int pool_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// The rows [0, n) of one phase, shared out for load balance. Every thread starts on its own contiguous
// share (the static split, so each streams one long run of memory) and takes it in chunks from the
// front; a thread done with its share takes chunks from the back of another's. With the static split
// alone, on a 2-core EPYC VM at ~66 GB/s, one thread waited at the barriers for ~1 ms of every 21 ms
// step, and one core alone reads at about half the machine's rate. reset() runs outside the region.
class RowClaims {
 public:
  void reset(int64_t n, int team) {
    DECODE_CHECK(n >= 0 && n < (int64_t(1) << 32), "RowClaims: too many rows");
    if (team_ != team) {
      ranges_ = std::make_unique<Range[]>(team);
      team_ = team;
    }
    for (int t = 0; t < team; ++t) {
      const auto [begin, end] = share(n, t, team);
      ranges_[t].packed.store(pack(begin, end), std::memory_order_relaxed);
    }
  }

  // Inside the region, where n is known only there: each thread of the team sets its own share (after
  // reset() for the team outside it). A thread that looks at another's share before that one is set
  // sees it empty (as every share is left at the end of a phase) and leaves it to its owner.
  void reset_own(int64_t n, int thread, int team) {  // (no check: nothing may throw inside the region)
    const auto [begin, end] = share(n, thread, team);
    ranges_[thread].packed.store(pack(begin, end), std::memory_order_relaxed);
  }

  // work(begin, end) on chunks of at most `chunk` rows until no row is left; every thread of the team.
  template <typename Work>
  void run(int thread, int64_t chunk, Work work) {
    Range& own = ranges_[thread];
    uint64_t state = own.packed.load(std::memory_order_relaxed);
    while (front(state) < back(state)) {  // own share, front first
      const int64_t begin = front(state), end = std::min(begin + chunk, back(state));
      if (own.packed.compare_exchange_weak(state, pack(end, back(state)), std::memory_order_relaxed)) {
        work(begin, end);
        state = own.packed.load(std::memory_order_relaxed);
      }
    }
    for (int k = 1; k < team_; ++k) {  // then the others', back first
      Range& other = ranges_[(thread + k) % team_];
      state = other.packed.load(std::memory_order_relaxed);
      while (front(state) < back(state)) {
        const int64_t end = back(state), begin = std::max(front(state), end - chunk);
        if (other.packed.compare_exchange_weak(state, pack(front(state), begin), std::memory_order_relaxed)) {
          work(begin, end);
          state = other.packed.load(std::memory_order_relaxed);
        }
      }
    }
  }

 private:
  struct alignas(64) Range {  // (front << 32) | back, one cache line per thread
    std::atomic<uint64_t> packed{0};
  };
  static uint64_t pack(int64_t front, int64_t back) { return (uint64_t(front) << 32) | uint64_t(back); }
  static int64_t front(uint64_t state) { return int64_t(state >> 32); }
  static int64_t back(uint64_t state) { return int64_t(state & 0xffffffffu); }
  std::unique_ptr<Range[]> ranges_;
  int team_ = 0;
};

// Rows per claimed chunk: ~64 KiB of weights unless said otherwise.
inline int64_t chunk_rows(int64_t row_bytes, int64_t chunk_bytes = 64 << 10) {
  const int64_t rows = std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(row_bytes, 1));
  return tiles_min_rows().load(std::memory_order_relaxed) > 0 ? (rows + 15) / 16 * 16 : rows;  // (whole blocks of tile_rows)
}

template <typename T>
void check_matrix(const torch::Tensor& w, const char* what) {
  DECODE_CHECK(w.scalar_type() == Storage<T>::kType && w.device().is_cpu(), what, ": ", Storage<T>::kType, " CPU tensors only");
  DECODE_CHECK(w.dim() == 2 && w.stride(1) == 1, what, ": weights must be 2-D with contiguous rows");
}


// One query head over `length` cached keys and values (row t of each at k + t * k_row_stride, v + t *
// v_row_stride): scores and the softmax in fp32 (as the official code's softmax), the weighted sum of values
// accumulated in fp32 and rounded once into out[0, d). scores: `length` floats of scratch. The plain loops
// here serve fp32 and head sizes the bf16 build has no vector form for.
template <typename T>
void attend_head_generic(const T* q, const T* k, int64_t k_row_stride, const T* v, int64_t v_row_stride, int64_t length,
                         int64_t d, float scale, float* scores, float* acc, T* out) {
  using S = Storage<T>;
  float best = -INFINITY;
  for (int64_t t = 0; t < length; ++t) {
    scores[t] = dot(k + t * k_row_stride, q, d) * scale;  // (the key is the streamed operand)
    best = std::max(best, scores[t]);
  }
  float total = 0.0f;
  for (int64_t t = 0; t < length; ++t) total += (scores[t] = std::exp(scores[t] - best));
  std::fill(acc, acc + d, 0.0f);
  for (int64_t t = 0; t < length; ++t) {
    const float p = scores[t] / total;
    const T* row = v + t * v_row_stride;
    for (int64_t i = 0; i < d; ++i) acc[i] += p * S::load(row[i]);
  }
  for (int64_t i = 0; i < d; ++i) out[i] = S::store(acc[i]);
}

// Defined by each translation unit: the bf16 one keeps a head's sums in vector registers.
void attend_head(const uint16_t* q, const uint16_t* k, int64_t k_row_stride, const uint16_t* v, int64_t v_row_stride,
                 int64_t length, int64_t d, float scale, float* scores, float* acc, uint16_t* out);
void attend_head(const float* q, const float* k, int64_t k_row_stride, const float* v, int64_t v_row_stride,
                 int64_t length, int64_t d, float scale, float* scores, float* acc, float* out);

// Single-query attention over the cached keys/values, for heads [begin, end): query head h attends with kv head
// h / group. q: heads x d values; head kv's key t at k + kv * k_head_stride + t * k_row_stride (same for v).
template <typename T>
void attend_heads(const T* q, int64_t d, int64_t group, const T* k, int64_t k_head_stride,
                  int64_t k_row_stride, const T* v, int64_t v_head_stride, int64_t v_row_stride, int64_t length,
                  float scale, int64_t begin, int64_t end, T* out) {
  std::vector<float> scores(length), acc(d);
  for (int64_t h = begin; h < end; ++h)
    attend_head(q + h * d, k + (h / group) * k_head_stride, k_row_stride, v + (h / group) * v_head_stride, v_row_stride,
                length, d, scale, scores.data(), acc.data(), out + h * d);
}

// Rotary embedding of one head vector, half-split convention (Llama): rounded like the eager
// ``x * cos + rotate_half(x) * sin`` in the storage type (each product and the sum rounded to it).
template <typename T>
void rope_half_split(const T* x, const T* cos, const T* sin, int64_t d, T* out) {
  using S = Storage<T>;
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float rotated = i < half ? -S::load(x[i + half]) : S::load(x[i - half]);
    const float a = S::round(S::load(x[i]) * S::load(cos[i]));
    const float b = S::round(rotated * S::load(sin[i]));
    out[i] = S::store(a + b);
  }
}

// RMSNorm of one vector, rounded like the eager module: weight * round(x * rsqrt(mean(x^2) + eps)), the
// statistics in fp32.
template <typename T>
void rms_norm_row(const T* x, const T* weight, int64_t d, float eps, T* out) {
  using S = Storage<T>;
  float squares = 0.0f;
  for (int64_t i = 0; i < d; ++i) squares += S::load(x[i]) * S::load(x[i]);
  const float inv_rms = 1.0f / std::sqrt(squares / float(d) + eps);
  for (int64_t i = 0; i < d; ++i)
    out[i] = S::store(S::load(weight[i]) * S::round(S::load(x[i]) * inv_rms));
}

// --------------------------------------------------------------------------------------------------
// Sub-layers of a step's rows as bodies that every thread of a parallel region runs together (they hold
// the barriers between their phases). mha_block, mla_block and ffn_block run one body for one token in a
// region of its own; DecodeStep runs a whole decode step (every layer, the final norm, the LM head) in one
// region.

// The rows of one step: row b decodes at `position[b]` of cache slot `slot[b]` (slots distinct), with
// the RoPE values of its position at cos[b], sin[b]. Activations of the rows are stored one after the
// other ([rows, width]).
template <typename T>
struct StepRows {
  int count = 0;
  int64_t position[kMaxRows], slot[kMaxRows];
  const T *cos[kMaxRows], *sin[kMaxRows];
};

// A plain multi-head attention sub-layer: its norm, weights and caches, checked once.
template <typename T>
struct AttentionSpec {
  const T* norm;
  float eps;
  const T* w[4];  // q [heads*d, D], k [kv*d, D], v [kv*d, D], o [D, heads*d]
  int64_t w_stride[4];
  torch::Tensor bias_f32[4];  // fp32 copies of the biases (or undefined)
  T *k_cache, *v_cache;       // slot 0
  int64_t slots, k_slot_stride, v_slot_stride;
  int64_t k_head_stride, k_row_stride, v_head_stride, v_row_stride, cache_len;
  int64_t hidden, heads, kv_heads, d;
  float scale;
  int64_t qkv_rows() const { return (heads + 2 * kv_heads) * d; }
};

// caches: [kv_heads, T, d] (one sequence) or [slots, kv_heads, T, d], with contiguous rows.
template <typename T>
AttentionSpec<T> attention_spec(const torch::Tensor& norm_weight, double eps, const std::vector<torch::Tensor>& weights,
                             const std::vector<c10::optional<torch::Tensor>>& biases, const torch::Tensor& k_cache,
                             const torch::Tensor& v_cache, double scale) {
  DECODE_CHECK(weights.size() == 4 && (biases.empty() || biases.size() == 4), "mha_block: four weights (q, k, v, o)");
  using S = Storage<T>;
  for (const auto& w : weights) check_matrix<T>(w, "mha_block");
  for (const torch::Tensor* t : {&norm_weight, &k_cache, &v_cache})
    DECODE_CHECK(t->scalar_type() == S::kType && t->device().is_cpu(), "mha_block: ", S::kType, " CPU tensors only");
  DECODE_CHECK(norm_weight.is_contiguous(), "mha_block: the norm weight must be contiguous");
  DECODE_CHECK((k_cache.dim() == 3 || k_cache.dim() == 4) && v_cache.sizes() == k_cache.sizes() && k_cache.stride(-1) == 1 &&
                   v_cache.stride(-1) == 1,
               "mha_block: caches must be [kv_heads, T, d] or [slots, kv_heads, T, d] with contiguous rows");
  const bool one = k_cache.dim() == 3;  // (one sequence)
  const int64_t first = one ? 0 : 1;    // the kv_heads dimension
  AttentionSpec<T> s{};
  s.hidden = norm_weight.numel();
  s.slots = one ? 1 : k_cache.size(0);
  s.kv_heads = k_cache.size(first);
  s.d = k_cache.size(first + 2);
  s.heads = weights[0].size(0) / s.d;
  DECODE_CHECK(s.slots >= 1 && s.d % 2 == 0 && s.heads * s.d == weights[0].size(0) && s.heads % s.kv_heads == 0 &&
                   weights[1].size(0) == s.kv_heads * s.d && weights[2].size(0) == s.kv_heads * s.d &&
                   weights[0].size(1) == s.hidden && weights[1].size(1) == s.hidden && weights[2].size(1) == s.hidden &&
                   weights[3].size(0) == s.hidden && weights[3].size(1) == s.heads * s.d,
               "mha_block: sizes disagree");
  s.norm = data_of<T>(norm_weight);
  s.eps = float(eps);
  for (int i = 0; i < 4; ++i) {
    s.w[i] = data_of<T>(weights[i]);
    s.w_stride[i] = weights[i].stride(0);
    if (!biases.empty()) s.bias_f32[i] = fp32_bias("mha_block", biases[i], weights[i].size(0));
  }
  s.k_cache = reinterpret_cast<T*>(k_cache.data_ptr());
  s.v_cache = reinterpret_cast<T*>(v_cache.data_ptr());
  s.k_slot_stride = one ? 0 : k_cache.stride(0);
  s.v_slot_stride = one ? 0 : v_cache.stride(0);
  s.k_head_stride = k_cache.stride(first);
  s.k_row_stride = k_cache.stride(first + 1);
  s.v_head_stride = v_cache.stride(first);
  s.v_row_stride = v_cache.stride(first + 1);
  s.cache_len = k_cache.size(first + 1);
  s.scale = float(scale);
  return s;
}

// Working memory of the attention body for up to `rows` rows: written by all threads (disjoint parts), the
// norms per thread.
template <typename T>
struct AttentionScratch {
  std::vector<T> normed, projected, rotated_q, attended;
  AttentionScratch(const AttentionSpec<T>& s, int team, int rows)
      : normed(team * rows * s.hidden), projected(rows * s.qkv_rows()), rotated_q(rows * s.heads * s.d),
        attended(rows * s.heads * s.d) {}
};

// The claims of an attention sub-layer's phases: q/k/v rows taken together, the (row, head) pairs, o_proj rows.
struct AttentionClaims {
  RowClaims qkv, heads, o;
  template <typename T>
  void reset(const AttentionSpec<T>& s, int team, int rows) {
    qkv.reset(s.qkv_rows(), team);
    heads.reset(rows * s.heads, team);
    o.reset(s.hidden, team);
  }
};

inline const float* bias_of(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// Pointers to `count` vectors of `width` values stored one after the other.
template <typename T>
inline void row_pointers(const T* base, int64_t width, int count, const T** out) {
  for (int b = 0; b < count; ++b) out[b] = base + b * width;
}

// For each row b: out[b] = x[b] + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),
// n = RMSNorm(x[b]); k and v are written to the row's cache slot at its position, attention covers
// [0, position] of that slot. Each step is rounded to the storage type where the eager modules round (each
// projection, RoPE's products and sum, the attention output, the residual sum). x, out: [rows, hidden];
// `out` must not alias x. The caller's barrier must separate this from whatever reads `out`.
template <typename T>
void attention_body(const AttentionSpec<T>& s, const T* x, const StepRows<T>& rows, T* out, AttentionScratch<T>& scratch,
                    AttentionClaims& claims, int thread, int team) {
  using S = Storage<T>;
  const int count = rows.count;
  const int64_t d = s.d, hidden = s.hidden, qkv_rows = s.qkv_rows(), width = s.heads * d;
  T* normed = scratch.normed.data() + thread * (scratch.normed.size() / team);  // every thread its own copy: no barrier
  for (int b = 0; b < count; ++b) rms_norm_row(x + b * hidden, s.norm, hidden, s.eps, normed + b * hidden);
  const T* inputs[kMaxRows];
  row_pointers<T>(normed, hidden, count, inputs);
  T* projected = scratch.projected.data();  // [rows, q | k | v]
  // q, k, v projections: their rows taken together, in chunks (row r of q/k/v is column r of `projected`).
  const int64_t starts[4] = {0, s.heads * d, (s.heads + s.kv_heads) * d, qkv_rows};
  Packed<T> packed = pack_inputs<T>(inputs, count, hidden);
  claims.qkv.run(thread, chunk_rows(hidden * 2), [&](int64_t first, int64_t last) {
    for (int i = 0; i < 3; ++i) {
      const int64_t begin = std::max(first, starts[i]) - starts[i], end = std::min(last, starts[i + 1]) - starts[i];
      if (begin >= end) continue;
      const float* bias = bias_of(s.bias_f32[i]);
      T* dst = projected + starts[i];
      gemv_rows_multi(s.w[i], s.w_stride[i], hidden, inputs, count, begin, end, [&](int64_t n, int b, float sum) {
        dst[b * qkv_rows + n] = S::store(bias ? sum + bias[n] : sum);
      }, packed);
    }
  });
#pragma omp barrier
#pragma omp single
  {
    for (int b = 0; b < count; ++b) {
      const T *row = projected + b * qkv_rows, *cos = rows.cos[b], *sin = rows.sin[b];
      T* k_cache = s.k_cache + rows.slot[b] * s.k_slot_stride + rows.position[b] * s.k_row_stride;
      T* v_cache = s.v_cache + rows.slot[b] * s.v_slot_stride + rows.position[b] * s.v_row_stride;
      for (int64_t h = 0; h < s.kv_heads; ++h) {
        rope_half_split(row + starts[1] + h * d, cos, sin, d, k_cache + h * s.k_head_stride);
        std::memcpy(v_cache + h * s.v_head_stride, row + starts[2] + h * d, d * sizeof(T));
      }
      for (int64_t h = 0; h < s.heads; ++h) rope_half_split(row + h * d, cos, sin, d, scratch.rotated_q.data() + b * width + h * d);
    }
  }  // (implicit barrier)
  claims.heads.run(thread, 1, [&](int64_t begin, int64_t end) {  // (head by head: balanced like the rows)
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / s.heads, h = unit % s.heads;
      attend_heads(scratch.rotated_q.data() + b * width, d, s.heads / s.kv_heads, s.k_cache + rows.slot[b] * s.k_slot_stride,
                   s.k_head_stride, s.k_row_stride, s.v_cache + rows.slot[b] * s.v_slot_stride, s.v_head_stride,
                   s.v_row_stride, rows.position[b] + 1, s.scale, h, h + 1, scratch.attended.data() + b * width);
    }
  });
#pragma omp barrier
  const float* bias = bias_of(s.bias_f32[3]);
  row_pointers<T>(scratch.attended.data(), width, count, inputs);
  packed = pack_inputs<T>(inputs, count, width);
  claims.o.run(thread, chunk_rows(width * 2), [&](int64_t begin, int64_t end) {
    gemv_rows_multi(s.w[3], s.w_stride[3], width, inputs, count, begin, end, [&](int64_t n, int b, float sum) {
      out[b * hidden + n] = S::store(S::load(x[b * hidden + n]) + S::round(bias ? sum + bias[n] : sum));
    }, packed);
  });
}

// --------------------------------------------------------------------------------------------------
// Multi-head latent attention (MLA: small, base). Per token the cache holds the normalised latent
// [rank] and one rotated key [rope] shared by all heads. kv_b [heads*(nope+v), rank] is never expanded
// into per-head keys and values: it is folded into the query (its first `nope` rows of each head, W_UK)
// and into the output (its last `v` rows, W_UV), and the heads attend over the cached latents directly,
// with the query-side vectors in fp32, as the eager CPU decode does (_attend_absorbed_cpu).

// fp32 sum of w[i] * x[i] (a row of the storage type, an fp32 vector) and acc[i] += a * row[i]: MLA's
// query-side vectors stay fp32. The bf16 versions are written out with AVX-512 in decode_bf16.cpp; for
// fp32 the compiler vectorises plain loops.
float dot_f32(const uint16_t* w, const float* x, int64_t n);
void axpy_f32(float* acc, float a, const uint16_t* row, int64_t n);
inline float dot_f32(const float* w, const float* x, int64_t n) { return dot(w, x, n); }
inline void axpy_f32(float* acc, float a, const float* row, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * row[i];
}

// The same for up to kLatentHeadBlock fp32 vectors at once against one row (which is read and widened
// once for all of them): out[j] = row . xs[j * x_stride : +n], and acc[j * acc_stride + i] += a[j] * row[i].
void dots_f32(const uint16_t* row, const float* xs, int64_t x_stride, int64_t count, int64_t n, float* out);
void axpys_f32(const uint16_t* row, const float* a, int64_t count, int64_t n, float* acc, int64_t acc_stride);
inline void dots_f32(const float* row, const float* xs, int64_t x_stride, int64_t count, int64_t n, float* out) {
  for (int64_t j = 0; j < count; ++j) out[j] = dot(row, xs + j * x_stride, n);
}
inline void axpys_f32(const float* row, const float* a, int64_t count, int64_t n, float* acc, int64_t acc_stride) {
  for (int64_t j = 0; j < count; ++j) axpy_f32(acc + j * acc_stride, a[j], row, n);
}

// MLA's rotary part: its dimensions come as interleaved pairs (x0, x1, x2, x3, ...), which the eager code
// reorders to (x0, x2, ..., x1, x3, ...) before the half-split rotation. tmp: d values of scratch.
template <typename T>
void rope_interleaved(const T* x, const T* cos, const T* sin, int64_t d, T* tmp, T* out) {
  for (int64_t i = 0; i < d / 2; ++i) {
    tmp[i] = x[2 * i];
    tmp[d / 2 + i] = x[2 * i + 1];
  }
  rope_half_split(tmp, cos, sin, d, out);
}

// An MLA sub-layer: its norms, weights and latent cache, checked once. The query comes from q_proj, or
// (q_rank > 0) from q_a_proj, its RMSNorm and q_b_proj. Biases (attention_bias) on q_a, kv_a and o only.
template <typename T>
struct MlaSpec {
  const T* norm;
  float eps;
  const T *q_in, *kv_a, *kv_b, *o, *q_b;  // q_in: q_proj [heads*(nope+rope), D] or q_a_proj [q_rank, D]
  int64_t q_in_stride, kv_a_stride, kv_b_stride, o_stride, q_b_stride;
  torch::Tensor q_in_bias, kv_a_bias, o_bias;  // fp32 copies (or undefined)
  const T *kv_a_norm, *q_a_norm;
  float kv_a_eps, q_a_eps;
  T *latent_cache, *k_pe_cache;  // slot 0: [T, rank], [T, rope]
  int64_t slots, latent_slot_stride, k_pe_slot_stride;
  int64_t latent_stride, k_pe_stride, cache_len;
  int64_t hidden, heads, nope, rope, v, rank, q_rank;  // q_rank 0: no query LoRA
  float scale;
  int64_t q_dim() const { return nope + rope; }
  int64_t q_in_rows() const { return q_rank > 0 ? q_rank : heads * q_dim(); }
};

// weights: q_in, kv_a [rank+rope, D], kv_b [heads*(nope+v), rank], o [D, heads*v], then q_b
// [heads*(nope+rope), q_rank] when the query has a LoRA; biases: empty or one (possibly undefined) per
// weight (q_in, kv_a, o may have one); q_a_norm: given exactly when q_b is. Caches: [T, rank] and [T, rope]
// (one sequence) or [slots, T, rank] and [slots, T, rope].
template <typename T>
MlaSpec<T> mla_spec(const torch::Tensor& norm_weight, double eps, const std::vector<torch::Tensor>& weights,
                    const std::vector<c10::optional<torch::Tensor>>& biases, const torch::Tensor& kv_a_norm, double kv_a_eps,
                    const c10::optional<torch::Tensor>& q_a_norm, double q_a_eps, const torch::Tensor& latent_cache,
                    const torch::Tensor& k_pe_cache, int64_t heads, int64_t nope, int64_t rope, int64_t v, double scale) {
  using S = Storage<T>;
  const char* what = "mla_block";
  DECODE_CHECK(weights.size() == 4 || weights.size() == 5, what, ": weights q_in, kv_a, kv_b, o (and q_b with a query LoRA)");
  DECODE_CHECK(biases.empty() || biases.size() == weights.size(), what, ": one bias (or None) per weight");
  const bool lora = weights.size() == 5;
  DECODE_CHECK(lora == (q_a_norm.has_value() && q_a_norm->defined()), what, ": q_a_norm goes with q_b");
  for (const auto& w : weights) check_matrix<T>(w, what);
  std::vector<const torch::Tensor*> vectors = {&norm_weight, &kv_a_norm, &latent_cache, &k_pe_cache};
  if (lora) vectors.push_back(&*q_a_norm);
  for (const torch::Tensor* t : vectors)
    DECODE_CHECK(t->scalar_type() == S::kType && t->device().is_cpu(), what, ": ", S::kType, " CPU tensors only");
  DECODE_CHECK(norm_weight.is_contiguous() && kv_a_norm.is_contiguous() && (!lora || q_a_norm->is_contiguous()),
               what, ": norm weights must be contiguous");
  DECODE_CHECK((latent_cache.dim() == 2 || latent_cache.dim() == 3) && k_pe_cache.dim() == latent_cache.dim() &&
                   latent_cache.stride(-1) == 1 && k_pe_cache.stride(-1) == 1 &&
                   latent_cache.sizes().slice(0, latent_cache.dim() - 1) == k_pe_cache.sizes().slice(0, k_pe_cache.dim() - 1),
               what, ": caches must be [T, rank] and [T, rope] or [slots, T, rank] and [slots, T, rope] with contiguous rows");
  const bool one = latent_cache.dim() == 2;  // (one sequence)
  MlaSpec<T> s{};
  s.hidden = norm_weight.numel();
  s.heads = heads, s.nope = nope, s.rope = rope, s.v = v;
  s.rank = latent_cache.size(-1);
  s.q_rank = lora ? weights[0].size(0) : 0;
  DECODE_CHECK(heads > 0 && nope >= 0 && rope > 0 && rope % 2 == 0 && v > 0 && k_pe_cache.size(-1) == rope &&
                   kv_a_norm.numel() == s.rank && weights[0].size(1) == s.hidden &&
                   (lora || weights[0].size(0) == heads * (nope + rope)) &&
                   weights[1].size(0) == s.rank + rope && weights[1].size(1) == s.hidden &&
                   weights[2].size(0) == heads * (nope + v) && weights[2].size(1) == s.rank &&
                   weights[3].size(0) == s.hidden && weights[3].size(1) == heads * v &&
                   (!lora || (weights[4].size(0) == heads * (nope + rope) && weights[4].size(1) == s.q_rank &&
                              q_a_norm->numel() == s.q_rank)),
               what, ": sizes disagree");
  s.norm = data_of<T>(norm_weight);
  s.eps = float(eps);
  const T** pointers[5] = {&s.q_in, &s.kv_a, &s.kv_b, &s.o, &s.q_b};
  int64_t* strides[5] = {&s.q_in_stride, &s.kv_a_stride, &s.kv_b_stride, &s.o_stride, &s.q_b_stride};
  for (size_t i = 0; i < weights.size(); ++i) {
    *pointers[i] = data_of<T>(weights[i]);
    *strides[i] = weights[i].stride(0);
  }
  torch::Tensor* bias_copies[5] = {&s.q_in_bias, &s.kv_a_bias, nullptr, &s.o_bias, nullptr};
  for (size_t i = 0; i < biases.size(); ++i) {
    torch::Tensor copy = fp32_bias(what, biases[i], weights[i].size(0));
    if (!copy.defined()) continue;
    DECODE_CHECK(bias_copies[i] != nullptr, what, ": kv_b and q_b have no bias");
    *bias_copies[i] = copy;
  }
  s.kv_a_norm = data_of<T>(kv_a_norm);
  s.kv_a_eps = float(kv_a_eps);
  s.q_a_norm = lora ? data_of<T>(*q_a_norm) : nullptr;
  s.q_a_eps = float(q_a_eps);
  s.latent_cache = reinterpret_cast<T*>(latent_cache.data_ptr());
  s.k_pe_cache = reinterpret_cast<T*>(k_pe_cache.data_ptr());
  s.slots = one ? 1 : latent_cache.size(0);
  s.latent_slot_stride = one ? 0 : latent_cache.stride(0);
  s.k_pe_slot_stride = one ? 0 : k_pe_cache.stride(0);
  s.latent_stride = latent_cache.stride(-2);
  s.k_pe_stride = k_pe_cache.stride(-2);
  s.cache_len = latent_cache.size(-2);
  s.scale = float(scale);
  return s;
}

// Working memory of the MLA body for up to `rows` rows: written by all threads (disjoint parts), the
// norms per thread.
template <typename T>
struct MlaScratch {
  std::vector<T> normed, q_in, q_a_normed, q, kv_a, q_pe, k_pe_tmp, attended;
  MlaScratch(const MlaSpec<T>& s, int team, int rows)
      : normed(team * rows * s.hidden), q_in(rows * s.q_in_rows()), q_a_normed(team * rows * s.q_rank),
        q(rows * s.heads * s.q_dim()), kv_a(rows * (s.rank + s.rope)), q_pe(rows * s.heads * s.rope), k_pe_tmp(s.rope),
        attended(rows * s.heads * s.v) {}
};

// Heads of one row taken together in the attention phase (see attend_latent_heads).
constexpr int64_t kLatentHeadBlock = 4;

// The claims of an MLA sub-layer's phases: q_in and kv_a rows taken together, q_b rows, (row, block of
// heads) pairs, o rows.
struct MlaClaims {
  RowClaims in, q_b, heads, o;
  template <typename T>
  void reset(const MlaSpec<T>& s, int team, int rows) {
    in.reset(s.q_in_rows() + s.rank + s.rope, team);
    q_b.reset(s.q_rank > 0 ? s.heads * s.q_dim() : 0, team);
    heads.reset(rows * ((s.heads + kLatentHeadBlock - 1) / kLatentHeadBlock), team);
    o.reset(s.hidden, team);
  }
};

// Heads [begin, end) of the absorbed attention over positions [0, length) of one sequence's caches
// (latent [T, rank], k_pe [T, rope], rows at the spec's strides): q [heads, nope+rope] (its nope part),
// q_pe [heads, rope] (rotated) -> out [heads, v]. Per head, in fp32:
//   q_latent = W_UK^T q_nope; score_t = (q_latent . latent_t + q_pe . k_pe_t) * scale;
//   context = softmax(score) . latent; out = W_UV context (rounded once to the storage type).
// The heads of a call (up to kLatentHeadBlock) go through the cache together: each cached latent is read
// and widened once for all of them; each head's sums are the same whichever heads it goes with. (A small
// layer's whole sub-layer at 4,000 positions on the 2-core EPYC: 2.01-2.09 ms, head by head 2.16-2.33;
// 8 heads per claim: 2.46.)
template <typename T>
void attend_latent_heads(const MlaSpec<T>& s, const T* latent, const T* k_pe, const T* q, const T* q_pe, int64_t length,
                         int64_t begin, int64_t end, T* out) {
  using S = Storage<T>;
  const int64_t count = end - begin, rank = s.rank, rope = s.rope;
  std::vector<float> q_latent(count * rank, 0.0f), q_pe_f(count * rope), scores(count * length), context(count * rank, 0.0f);
  for (int64_t j = 0; j < count; ++j) {
    const int64_t h = begin + j;
    const T* w_uk = s.kv_b + h * (s.nope + s.v) * s.kv_b_stride;
    for (int64_t i = 0; i < s.nope; ++i) axpy_f32(&q_latent[j * rank], S::load(q[h * s.q_dim() + i]), w_uk + i * s.kv_b_stride, rank);
    for (int64_t i = 0; i < rope; ++i) q_pe_f[j * rope + i] = S::load(q_pe[h * rope + i]);
  }
  float latent_part[kLatentHeadBlock], rope_part[kLatentHeadBlock];
  for (int64_t t = 0; t < length; ++t) {
    dots_f32(latent + t * s.latent_stride, q_latent.data(), rank, count, rank, latent_part);
    dots_f32(k_pe + t * s.k_pe_stride, q_pe_f.data(), rope, count, rope, rope_part);
    for (int64_t j = 0; j < count; ++j) scores[j * length + t] = (latent_part[j] + rope_part[j]) * s.scale;
  }
  for (int64_t j = 0; j < count; ++j) {  // softmax: probabilities in place
    float* row = &scores[j * length];
    const float best = *std::max_element(row, row + length);
    float total = 0.0f;
    for (int64_t t = 0; t < length; ++t) total += (row[t] = std::exp(row[t] - best));
    for (int64_t t = 0; t < length; ++t) row[t] /= total;
  }
  float weight[kLatentHeadBlock];
  for (int64_t t = 0; t < length; ++t) {
    for (int64_t j = 0; j < count; ++j) weight[j] = scores[j * length + t];
    axpys_f32(latent + t * s.latent_stride, weight, count, rank, context.data(), rank);
  }
  for (int64_t j = 0; j < count; ++j) {
    const int64_t h = begin + j;
    const T* w_uv = s.kv_b + (h * (s.nope + s.v) + s.nope) * s.kv_b_stride;
    for (int64_t c = 0; c < s.v; ++c) out[h * s.v + c] = S::store(dot_f32(w_uv + c * s.kv_b_stride, &context[j * rank], rank));
  }
}

// For each row b: out[b] = x[b] + o_proj(MLA(RMSNorm(x[b]))) (its latent and rotated key are written to
// its cache slot at its position first, attention covers [0, position] of that slot). Rounded to the
// storage type where the eager modules round: each projection, the norms, RoPE's products and sum, the
// attention output, the residual sum. x, out: [rows, hidden]; `out` must not alias x; the caller's
// barrier separates this from readers of out.
template <typename T>
void mla_body(const MlaSpec<T>& s, const T* x, const StepRows<T>& rows, T* out, MlaScratch<T>& scratch, MlaClaims& claims,
              int thread, int team) {
  using S = Storage<T>;
  const int count = rows.count;
  const int64_t hidden = s.hidden, q_rows = s.q_in_rows(), kv_rows = s.rank + s.rope, q_width = s.heads * s.q_dim();
  T* normed = scratch.normed.data() + thread * (scratch.normed.size() / team);  // every thread its own copy: no barrier
  for (int b = 0; b < count; ++b) rms_norm_row(x + b * hidden, s.norm, hidden, s.eps, normed + b * hidden);
  const T* inputs[kMaxRows];
  row_pointers<T>(normed, hidden, count, inputs);
  // q_in and kv_a rows taken together (row r of kv_a is row q_in_rows + r).
  const float *q_bias = bias_of(s.q_in_bias), *kv_bias = bias_of(s.kv_a_bias);
  T *q_in = scratch.q_in.data(), *kv_a = scratch.kv_a.data();  // [rows, q_rows], [rows, rank + rope]
  Packed<T> packed = pack_inputs<T>(inputs, count, hidden);
  claims.in.run(thread, chunk_rows(hidden * int64_t(sizeof(T))), [&](int64_t first, int64_t last) {
    if (first < q_rows)
      gemv_rows_multi(s.q_in, s.q_in_stride, hidden, inputs, count, first, std::min(last, q_rows), [&](int64_t n, int b, float sum) {
        q_in[b * q_rows + n] = S::store(q_bias ? sum + q_bias[n] : sum);
      }, packed);
    if (last > q_rows)
      gemv_rows_multi(s.kv_a, s.kv_a_stride, hidden, inputs, count, std::max(first, q_rows) - q_rows, last - q_rows,
                      [&](int64_t n, int b, float sum) { kv_a[b * kv_rows + n] = S::store(kv_bias ? sum + kv_bias[n] : sum); },
                      packed);
  });
#pragma omp barrier
  const T* q = q_in;  // [rows, heads * q_dim]
  if (s.q_rank > 0) {
    T* q_normed = scratch.q_a_normed.data() + thread * (scratch.q_a_normed.size() / team);
    for (int b = 0; b < count; ++b) rms_norm_row(q_in + b * q_rows, s.q_a_norm, s.q_rank, s.q_a_eps, q_normed + b * s.q_rank);
    row_pointers<T>(q_normed, s.q_rank, count, inputs);
    T* q_full = scratch.q.data();
    packed = pack_inputs<T>(inputs, count, s.q_rank);
    claims.q_b.run(thread, chunk_rows(s.q_rank * int64_t(sizeof(T))), [&](int64_t begin, int64_t end) {
      gemv_rows_multi(s.q_b, s.q_b_stride, s.q_rank, inputs, count, begin, end,
                      [&](int64_t n, int b, float sum) { q_full[b * q_width + n] = S::store(sum); }, packed);
    });
#pragma omp barrier
    q = q_full;
  }
#pragma omp single
  {
    for (int b = 0; b < count; ++b) {
      const T *row = kv_a + b * kv_rows, *cos = rows.cos[b], *sin = rows.sin[b];
      const int64_t slot = rows.slot[b], position = rows.position[b];
      rms_norm_row(row, s.kv_a_norm, s.rank, s.kv_a_eps, s.latent_cache + slot * s.latent_slot_stride + position * s.latent_stride);
      rope_interleaved(row + s.rank, cos, sin, s.rope, scratch.k_pe_tmp.data(),
                       s.k_pe_cache + slot * s.k_pe_slot_stride + position * s.k_pe_stride);
      for (int64_t h = 0; h < s.heads; ++h)
        rope_interleaved(q + b * q_width + h * s.q_dim() + s.nope, cos, sin, s.rope, scratch.k_pe_tmp.data(),
                         scratch.q_pe.data() + (b * s.heads + h) * s.rope);
    }
  }  // (implicit barrier)
  const int64_t blocks = (s.heads + kLatentHeadBlock - 1) / kLatentHeadBlock;
  claims.heads.run(thread, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / blocks, first = (unit % blocks) * kLatentHeadBlock, slot = rows.slot[b];
      attend_latent_heads(s, s.latent_cache + slot * s.latent_slot_stride, s.k_pe_cache + slot * s.k_pe_slot_stride,
                          q + b * q_width, scratch.q_pe.data() + b * s.heads * s.rope, rows.position[b] + 1, first,
                          std::min(first + kLatentHeadBlock, s.heads), scratch.attended.data() + b * s.heads * s.v);
    }
  });
#pragma omp barrier
  const float* o_bias = bias_of(s.o_bias);
  row_pointers<T>(scratch.attended.data(), s.heads * s.v, count, inputs);
  packed = pack_inputs<T>(inputs, count, s.heads * s.v);
  claims.o.run(thread, chunk_rows(s.heads * s.v * int64_t(sizeof(T))), [&](int64_t begin, int64_t end) {
    gemv_rows_multi(s.o, s.o_stride, s.heads * s.v, inputs, count, begin, end, [&](int64_t n, int b, float sum) {
      out[b * hidden + n] = S::store(S::load(x[b * hidden + n]) + S::round(o_bias ? sum + o_bias[n] : sum));
    }, packed);
  });
}

template <typename T>
struct SwigluWeights {  // one SwiGLU expert: gate/up [inter, hidden] and down [hidden, inter], compact rows
  const T *gate, *up, *down;
  int64_t inter;
};

// The router of the official code for one token, in fp32: logits = W x; softmax or sigmoid scores;
// greedy, group-limited greedy or noaux_tc selection of top_k experts; optional normalisation; scaling.
// Ties go to the lower expert id. Only configurations where the official selection has no ties by
// construction are accepted (see ffn_spec): the official code zeroes the scores of dropped groups
// (masked_fill 0.0), so a dropped expert can tie with others and win where a kept score is not above
// zero (noaux_tc's biased scores can be negative; top_k larger than the experts kept), and which one
// wins is then up to torch.topk.
struct RouterSpec {
  const float* weight;            // [experts, hidden]
  const float* correction_bias;   // [experts] (noaux_tc) or null
  int64_t experts, top_k, n_group, topk_group;
  bool softmax, norm_topk_prob;
  std::string method;
  float scale;
};

inline std::vector<int64_t> top_indices(const std::vector<float>& values, int64_t k) {
  std::vector<int64_t> order(values.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int64_t a, int64_t b) { return values[a] > values[b] || (values[a] == values[b] && a < b); });
  order.resize(k);
  return order;
}

// Router logits (F.linear(x.float(), weight)) of experts [begin, end).
inline void router_logits(const RouterSpec& r, const float* xf, int64_t hidden, int64_t begin, int64_t end, float* logits) {
  for (int64_t e = begin; e < end; ++e) logits[e] = router_dot(r.weight + e * hidden, xf, hidden);
}

// The chosen experts and their weights, from all router logits.
inline void select_experts(const RouterSpec& r, const float* logits, std::vector<int64_t>& ids, std::vector<float>& weights) {
  std::vector<float> scores(logits, logits + r.experts);
  if (r.softmax) {
    const float top = *std::max_element(scores.begin(), scores.end());
    float total = 0.0f;
    for (float& s : scores) total += (s = std::exp(s - top));
    for (float& s : scores) s /= total;
  } else {
    for (float& s : scores) s = 1.0f / (1.0f + std::exp(-s));
  }
  std::vector<float> chosen_from = scores;  // what the top-k runs over
  if (r.method == "noaux_tc")  // (one group only: see ffn_spec)
    for (int64_t e = 0; e < r.experts; ++e) chosen_from[e] += r.correction_bias[e];
  if (r.method == "group_limited_greedy") {  // keep the topk_group groups with the best expert, zero the others
    const int64_t per_group = r.experts / r.n_group;
    std::vector<float> group_scores(r.n_group);
    for (int64_t g = 0; g < r.n_group; ++g)
      group_scores[g] = *std::max_element(chosen_from.begin() + g * per_group, chosen_from.begin() + (g + 1) * per_group);
    std::vector<bool> keep(r.n_group, false);
    for (int64_t g : top_indices(group_scores, r.topk_group)) keep[g] = true;
    for (int64_t e = 0; e < r.experts; ++e)
      if (!keep[e / per_group]) chosen_from[e] = 0.0f;
  }
  ids = top_indices(chosen_from, r.top_k);
  weights.resize(r.top_k);
  for (int64_t i = 0; i < r.top_k; ++i) weights[i] = r.method == "noaux_tc" ? scores[ids[i]] : chosen_from[ids[i]];
  if (r.top_k > 1 && r.norm_topk_prob) {
    float total = 0.0f;
    for (float w : weights) total += w;
    for (float& w : weights) w /= (total + 1e-20f);
  }
  for (float& w : weights) w *= r.scale;
}

// A feed-forward sub-layer: its norm, the router and expert table (MoE) and the always-on SwiGLU weights
// (a dense MLP, or the shared experts), checked once.
template <typename T>
struct FfnSpec {
  const T* norm;
  float eps;
  int64_t hidden;
  bool routed;  // a MoE layer
  RouterSpec router;
  const int64_t* expert_pointers;  // [experts, 3]: gate, up, down data pointers
  int64_t expert_inter;
  bool has_shared;
  SwigluWeights<T> shared;
  int64_t max_inter_total;  // the hidden activations of every expert that can run together
};

template <typename T>
SwigluWeights<T> swiglu_of(const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down, int64_t hidden) {
  for (const torch::Tensor* w : {&gate, &up, &down}) {
    check_matrix<T>(*w, "ffn_block");
    DECODE_CHECK(w->is_contiguous(), "ffn_block: expert weights must be contiguous");
  }
  const int64_t inter = gate.size(0);
  DECODE_CHECK(gate.size(1) == hidden && up.sizes() == gate.sizes() && down.size(0) == hidden && down.size(1) == inter,
               "ffn_block: SwiGLU weights do not fit a hidden size of ", hidden);
  return {data_of<T>(gate), data_of<T>(up), data_of<T>(down), inter};
}

// A dense SwiGLU MLP (no router; `shared` = its weights) or a MoE layer: the router (fp32 weight
// [E, hidden], optional noaux_tc correction bias, the selection method and its parameters) picks top_k of
// the experts listed in `expert_table` ([E, 3] int64: data pointers of each expert's compact gate
// [inter, hidden], up [inter, hidden], down [hidden, inter] weights, kept alive by the caller), plus
// the always-on shared experts (`shared`, optional).
template <typename T>
FfnSpec<T> ffn_spec(const torch::Tensor& norm_weight, double eps, const c10::optional<torch::Tensor>& router_weight,
                 const c10::optional<torch::Tensor>& correction_bias, const std::string& method, const std::string& scoring,
                 int64_t top_k, int64_t n_group, int64_t topk_group, bool norm_topk_prob, double scale,
                 const c10::optional<torch::Tensor>& expert_table, int64_t expert_inter, const std::vector<torch::Tensor>& shared) {
  using S = Storage<T>;
  DECODE_CHECK(norm_weight.scalar_type() == S::kType && norm_weight.device().is_cpu() && norm_weight.is_contiguous(),
               "ffn_block: the norm weight must be contiguous ", S::kType, " on the CPU");
  DECODE_CHECK(shared.empty() || shared.size() == 3, "ffn_block: shared = (gate, up, down) or nothing");
  FfnSpec<T> s{};
  s.norm = data_of<T>(norm_weight);
  s.eps = float(eps);
  s.hidden = norm_weight.numel();
  s.routed = router_weight.has_value() && router_weight->defined();
  if (s.routed) {
    DECODE_CHECK(expert_table.has_value() && expert_table->defined(), "ffn_block: a router needs the expert table");
    const auto& w = *router_weight;
    DECODE_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(1) == s.hidden,
                 "ffn_block: router weight must be contiguous fp32 [experts, ", s.hidden, "]");
    const auto& table = *expert_table;
    DECODE_CHECK(table.scalar_type() == at::kLong && table.is_contiguous() && table.dim() == 2 && table.size(0) == w.size(0) &&
                     table.size(1) == 3, "ffn_block: expert table must be int64 [experts, 3]");
    DECODE_CHECK(method == "greedy" || method == "group_limited_greedy" || method == "noaux_tc", "ffn_block: method ", method);
    DECODE_CHECK(scoring == "softmax" || scoring == "sigmoid", "ffn_block: scoring ", scoring);
    const int64_t n_experts = w.size(0);
    DECODE_CHECK(top_k >= 1 && top_k <= n_experts && n_group >= 1 && n_experts % n_group == 0 && topk_group >= 1 &&
                     topk_group <= n_group, "ffn_block: routing parameters");
    DECODE_CHECK(method != "noaux_tc" || n_group == 1, "ffn_block: noaux_tc with several groups is left to the eager layers");
    DECODE_CHECK(method != "group_limited_greedy" || top_k <= topk_group * (n_experts / n_group),
                 "ffn_block: group-limited routing with more experts than the kept groups hold is left to the eager layers");
    DECODE_CHECK(expert_inter > 0, "ffn_block: expert intermediate size");
    const float* bias = nullptr;
    if (method == "noaux_tc") {
      DECODE_CHECK(correction_bias.has_value() && correction_bias->defined() && correction_bias->scalar_type() == at::kFloat &&
                       correction_bias->is_contiguous() && correction_bias->numel() == n_experts,
                   "ffn_block: noaux_tc needs an fp32 correction bias per expert");
      bias = correction_bias->data_ptr<float>();
    }
    s.router = RouterSpec{w.data_ptr<float>(), bias, n_experts, top_k, n_group, topk_group, scoring == "softmax",
                          norm_topk_prob, method, float(scale)};
    s.expert_pointers = table.data_ptr<int64_t>();
    s.expert_inter = expert_inter;
    s.max_inter_total = top_k * expert_inter;
  }
  s.has_shared = !shared.empty();
  if (s.has_shared) {
    s.shared = swiglu_of<T>(shared[0], shared[1], shared[2], s.hidden);
    s.max_inter_total += s.shared.inter;
  }
  DECODE_CHECK(s.routed || s.has_shared, "ffn_block: neither a router nor shared weights");
  return s;
}

template <typename T>
struct FfnScratch {
  std::vector<T> normed;                  // [team][rows][hidden]
  std::vector<float> normed_f32, logits;  // [team][rows][hidden], [rows][experts]
  std::vector<T> h;                       // hidden activations of the experts that run, for their rows
  std::vector<float> expert_out;          // [rows][top_k][hidden]: each row's chosen experts' outputs
  std::vector<float> routed_sum;          // [rows][hidden]
  int64_t routed_layers = 0, routed_run = 0;  // MoE layers stepped, and the routed experts they streamed (thread 0 counts)
  FfnScratch(int64_t hidden, int64_t experts, int64_t top_k, int64_t inter_total, int team, int rows)
      : normed(team * rows * hidden), normed_f32(team * rows * hidden), logits(rows * std::max<int64_t>(experts, 1)),
        h(rows * inter_total), expert_out(rows * std::max<int64_t>(top_k, 1) * hidden), routed_sum(rows * hidden) {}
};

// An expert that runs in a step, with the rows routed to it: member j is row row[j], for which this is
// its choice number choice[j] (-1: the shared experts or a dense MLP, which every row runs).
template <typename T>
struct ActiveExpert {
  SwigluWeights<T> weights;
  int count = 0;
  int row[kMaxRows], choice[kMaxRows];
  int64_t first_row = 0;  // where its gate/up rows start among all the experts' rows
  int64_t h_offset = 0;   // where its hidden activations start in `h` ([count][inter])
};

// For each row b: out[b] = x[b] + ffn(RMSNorm(x[b])): the chosen experts (weights from the router) and the
// shared ones, with PyTorch's roundings to the storage type (each projection, silu and the product;
// written r() below), combined as the decoder layer does:
//   routed = r(sum_e weight_e * expert_e(n))   (fp32 sum over the row's chosen experts, in their order)
//   y      = r(routed + shared(n))              (with shared experts; else y = routed, or the dense MLP)
//   out    = r(x + y)
// Phases: router logits (each thread its share of the experts, for every row), then the rows of the
// gate/up pairs of every expert that any row chose (each expert once, for all its rows; claimed in
// chunks, see RowClaims; `up_claims` set inside the region, where the experts are known), then the output
// rows in chunks of kDownChunkRows, each chunk expert by expert. A row's weighted sum over its experts
// runs in its own order of choice whatever order the experts are streamed in. x, out: [rows, hidden];
// `out` must not alias x.
//
// A down chunk switches streams once per expert, and the rows just past each expert's block (prefetched
// by dot) are only used at the thread's next chunk: long chunks keep the switches few. Tiny's bf16 step
// in the fast memory phase of the 2-core EPYC: 64 rows 83-85 % of the bound, 320 rows 86-89 %, 640 (no
// load balancing left in this phase) the same as 320; 32 rows worse; no difference in the slow phase.
constexpr int64_t kDownChunkRows = 320;

template <typename T>
void ffn_body(const FfnSpec<T>& s, const T* x, int count, T* out, FfnScratch<T>& scratch, RowClaims& up_claims,
              RowClaims& down_claims, int thread, int team) {
  const int64_t hidden = s.hidden;
  T* normed = scratch.normed.data() + thread * (scratch.normed.size() / team);  // every thread its own copy
  for (int b = 0; b < count; ++b) rms_norm_row(x + b * hidden, s.norm, hidden, s.eps, normed + b * hidden);
  using S = Storage<T>;
  const int64_t top_k = s.routed ? s.router.top_k : 0;
  std::vector<ActiveExpert<T>> experts;  // every thread makes the same list
  experts.reserve((s.routed ? s.router.experts : 0) + 1);
  std::vector<float> weights(count * top_k);  // [rows][top_k]
  if (s.routed) {
    const int64_t n_experts = s.router.experts;
    float* xf = scratch.normed_f32.data() + thread * (scratch.normed_f32.size() / team);
    for (int64_t i = 0; i < count * hidden; ++i) xf[i] = S::load(normed[i]);
    const auto [begin, end] = share(n_experts, thread, team);
    for (int b = 0; b < count; ++b)
      router_logits(s.router, xf + b * hidden, hidden, begin, end, scratch.logits.data() + b * n_experts);
#pragma omp barrier
    // Every thread selects the same experts from the same logits; the experts any row chose run once,
    // in the order of their ids (their order in memory).
    std::vector<int> slot_of(n_experts, -1);
    std::vector<int64_t> ids;
    std::vector<float> row_weights;
    std::vector<std::pair<int64_t, int>> chosen;  // (expert, row * top_k + choice)
    for (int b = 0; b < count; ++b) {
      select_experts(s.router, scratch.logits.data() + b * n_experts, ids, row_weights);
      for (int64_t k = 0; k < top_k; ++k) {
        weights[b * top_k + k] = row_weights[k];
        chosen.emplace_back(ids[k], int(b * top_k + k));
      }
    }
    std::sort(chosen.begin(), chosen.end());  // by expert, then by row: each expert's rows in order
    for (const auto& [id, member] : chosen) {
      if (slot_of[id] < 0) {
        slot_of[id] = int(experts.size());
        const int64_t* pointers = s.expert_pointers + 3 * id;
        experts.emplace_back();
        experts.back().weights = {reinterpret_cast<const T*>(pointers[0]), reinterpret_cast<const T*>(pointers[1]),
                                  reinterpret_cast<const T*>(pointers[2]), s.expert_inter};
      }
      ActiveExpert<T>& e = experts[slot_of[id]];
      e.row[e.count] = member / int(top_k);
      e.choice[e.count] = member % int(top_k);
      ++e.count;
    }
  }
  const size_t routed = experts.size();
  if (s.routed && thread == 0) ++scratch.routed_layers, scratch.routed_run += int64_t(routed);
  if (s.has_shared) {
    experts.emplace_back();
    ActiveExpert<T>& e = experts.back();
    e.weights = s.shared;
    e.count = count;
    for (int b = 0; b < count; ++b) e.row[b] = b, e.choice[b] = -1;
  }
  int64_t rows_total = 0, h_total = 0;
  for (auto& e : experts) {
    e.first_row = rows_total, e.h_offset = h_total;
    rows_total += e.weights.inter;
    h_total += e.count * e.weights.inter;
  }
  T* h = scratch.h.data();
  const T* inputs[kMaxRows];
  row_pointers<T>(normed, hidden, count, inputs);
  const Packed<T> packed = pack_inputs<T>(inputs, count, hidden);  // (for the shared experts: every row, in order)
  // The experts' gate/up rows taken together (row r of expert e is row first_row + r), in chunks: for
  // each chunk the gate rows, then the up rows (one stream from memory at a time). Each chunk switches
  // streams twice: chunks of ~256 KiB (tiny: 51 rows) stream the fast memory phase at 93-94 % of the
  // probe where ~64 KiB (12 rows) did 90-92 %.
  up_claims.reset_own(rows_total, thread, team);
  up_claims.run(thread, chunk_rows(2 * hidden * int64_t(sizeof(T)), 256 << 10), [&](int64_t first, int64_t last) {
    for (const auto& e : experts) {
      const int64_t inter = e.weights.inter;
      const int64_t begin = std::max(first, e.first_row) - e.first_row, end = std::min(last, e.first_row + inter) - e.first_row;
      if (begin >= end) continue;
      for (int j = 0; j < e.count; ++j) inputs[j] = normed + e.row[j] * hidden;
      T* he = h + e.h_offset;  // [count][inter]
      const Packed<T> tiles = e.choice[0] < 0 ? packed : Packed<T>{};  // (routed experts: vectors)
      gemv_rows_multi(e.weights.gate, hidden, hidden, inputs, e.count, begin, end, [&](int64_t i, int j, float sum) {
        he[j * inter + i] = S::store(silu(S::round(sum)));
      }, tiles);
      gemv_rows_multi(e.weights.up, hidden, hidden, inputs, e.count, begin, end, [&](int64_t i, int j, float sum) {
        he[j * inter + i] = S::store(S::load(he[j * inter + i]) * S::round(sum));
      }, tiles);
    }
  });
#pragma omp barrier
  float *expert_out = scratch.expert_out.data(), *routed_sum = scratch.routed_sum.data();
  auto emit = [&](int b, int64_t n, T y) { out[b * hidden + n] = S::store(S::load(x[b * hidden + n]) + S::load(y)); };
  const T* shared_inputs[kMaxRows];
  Packed<T> shared_packed;
  if (s.has_shared) {
    const int64_t inter = experts[routed].weights.inter;
    row_pointers<T>(h + experts[routed].h_offset, inter, count, shared_inputs);
    shared_packed = pack_inputs<T>(shared_inputs, count, inter);
  }
  // The output rows in chunks, each chunk through every expert in turn.
  down_claims.run(thread, kDownChunkRows, [&](int64_t begin, int64_t end) {
    for (size_t a = 0; a < routed; ++a) {
      const ActiveExpert<T>& e = experts[a];
      const int64_t inter = e.weights.inter;
      for (int j = 0; j < e.count; ++j) inputs[j] = h + e.h_offset + j * inter;
      gemv_rows_multi(e.weights.down, inter, inter, inputs, e.count, begin, end, [&](int64_t n, int j, float sum) {
        expert_out[(e.row[j] * top_k + e.choice[j]) * hidden + n] = sum;
      });
    }
    for (int b = 0; b < count && routed; ++b) {  // each row's sum over its experts, in its order of choice
      for (int64_t n = begin; n < end; ++n) {
        float sum = 0.0f;
        for (int64_t k = 0; k < top_k; ++k) sum += weights[b * top_k + k] * S::round(expert_out[(b * top_k + k) * hidden + n]);
        routed_sum[b * hidden + n] = sum;
      }
    }
    if (s.has_shared) {
      const ActiveExpert<T>& shared = experts[routed];
      const int64_t inter = shared.weights.inter;
      gemv_rows_multi(shared.weights.down, inter, inter, shared_inputs, count, begin, end, [&](int64_t n, int b, float sum) {
        const float routed_part = routed ? S::round(routed_sum[b * hidden + n]) : 0.0f;
        emit(b, n, S::store(routed_part + S::round(sum)));
      }, shared_packed);
    } else {
      for (int b = 0; b < count; ++b)
        for (int64_t n = begin; n < end; ++n) emit(b, n, S::store(routed_sum[b * hidden + n]));
    }
  });
}

// One parallel region of the pool's threads (one thread inside another region) running body(thread, team).
template <typename Body>
void in_parallel(Body body) {
  const int threads = pool_threads();
#pragma omp parallel num_threads(threads) if (threads > 1)
  body(omp_get_thread_num(), omp_get_num_threads());
}

template <typename T>
torch::Tensor one_token(const torch::Tensor& x, int64_t hidden, const char* what) {
  using S = Storage<T>;
  const auto xc = x.reshape({-1}).contiguous();
  DECODE_CHECK(xc.scalar_type() == S::kType && xc.device().is_cpu() && xc.numel() == hidden, what, ": x must be ",
               hidden, " ", S::kType, " values on the CPU");
  return xc;
}

// The rows of a one-token call: position `position` of slot 0, RoPE values cos/sin.
template <typename T>
StepRows<T> one_row(int64_t position, const T* cos, const T* sin) {
  StepRows<T> rows;
  rows.count = 1;
  rows.position[0] = position;
  rows.slot[0] = 0;
  rows.cos[0] = cos;
  rows.sin[0] = sin;
  return rows;
}

template <typename T>
void check_rope(const torch::Tensor& cos, const torch::Tensor& sin, int64_t d, const char* what) {
  using S = Storage<T>;
  for (const torch::Tensor* t : {&cos, &sin})
    DECODE_CHECK(t->scalar_type() == S::kType && t->device().is_cpu() && t->is_contiguous() && t->numel() == d, what,
                 ": cos/sin must be ", d, " contiguous ", S::kType, " values");
}


// A whole attention sub-layer of plain multi-head attention for one token, in one parallel region:
//   x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))  with n = RMSNorm(x)
// (see attention_body). weights: [q, k, v, o] ([heads*d, D], [kv*d, D], [kv*d, D], [D, heads*d]); biases:
// empty or four (possibly undefined) tensors; caches: [kv_heads, T, d] (or [1, kv_heads, T, d]); cos/sin: d
// values. Returns [D].
template <typename T>
torch::Tensor mha_block(const torch::Tensor& x, const torch::Tensor& norm_weight, double eps,
                             const std::vector<torch::Tensor>& weights, const std::vector<c10::optional<torch::Tensor>>& biases,
                             const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor k_cache, torch::Tensor v_cache,
                             int64_t position, double scale) {
  const auto nw = norm_weight.contiguous();
  const AttentionSpec<T> spec = attention_spec<T>(nw, eps, weights, biases, k_cache, v_cache, scale);
  const auto xc = one_token<T>(x, spec.hidden, "mha_block");
  const auto cc = cos.contiguous(), sc = sin.contiguous();
  check_rope<T>(cc, sc, spec.d, "mha_block");
  DECODE_CHECK(position >= 0 && position < spec.cache_len, "mha_block: position ", position, " outside the cache");
  DECODE_CHECK(spec.slots == 1, "mha_block: caches of one sequence (DecodeStep takes several)");
  auto out = torch::empty({spec.hidden}, xc.options());
  const int team_size = pool_threads();
  AttentionScratch<T> scratch(spec, team_size, 1);
  AttentionClaims claims;
  claims.reset(spec, team_size, 1);
  const StepRows<T> rows = one_row<T>(position, data_of<T>(cc), data_of<T>(sc));
  in_parallel([&](int thread, int team) {
    attention_body(spec, data_of<T>(xc), rows, reinterpret_cast<T*>(out.data_ptr()), scratch, claims, thread, team);
  });
  return out.view(x.sizes());
}

// A whole MLA sub-layer for one token in one parallel region: x + o_proj(MLA(RMSNorm(x))) with the
// latent and rotated key written to the caches at `position` (see mla_spec for the arguments, mla_body for
// the arithmetic). cos/sin: rope values. Returns [D].
template <typename T>
torch::Tensor mla_block(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t position,
                        const torch::Tensor& norm_weight, double eps, const std::vector<torch::Tensor>& weights,
                        const std::vector<c10::optional<torch::Tensor>>& biases, const torch::Tensor& kv_a_norm,
                        double kv_a_eps, const c10::optional<torch::Tensor>& q_a_norm, double q_a_eps,
                        torch::Tensor latent_cache, torch::Tensor k_pe_cache, int64_t heads, int64_t nope, int64_t rope,
                        int64_t v, double scale) {
  const MlaSpec<T> spec = mla_spec<T>(norm_weight, eps, weights, biases, kv_a_norm, kv_a_eps, q_a_norm, q_a_eps, latent_cache,
                                      k_pe_cache, heads, nope, rope, v, scale);
  const auto xc = one_token<T>(x, spec.hidden, "mla_block");
  const auto cc = cos.contiguous(), sc = sin.contiguous();
  check_rope<T>(cc, sc, spec.rope, "mla_block");
  DECODE_CHECK(position >= 0 && position < spec.cache_len, "mla_block: position ", position, " outside the cache");
  DECODE_CHECK(spec.slots == 1, "mla_block: caches of one sequence (DecodeStep takes several)");
  auto out = torch::empty({spec.hidden}, xc.options());
  const int team_size = pool_threads();
  MlaScratch<T> scratch(spec, team_size, 1);
  MlaClaims claims;
  claims.reset(spec, team_size, 1);
  const StepRows<T> rows = one_row<T>(position, data_of<T>(cc), data_of<T>(sc));
  in_parallel([&](int thread, int team) {
    mla_body(spec, data_of<T>(xc), rows, reinterpret_cast<T*>(out.data_ptr()), scratch, claims, thread, team);
  });
  return out.view(x.sizes());
}

// The whole feed-forward sub-layer of one token in one parallel region: x + ffn(RMSNorm(x)), where
// ffn is a dense SwiGLU MLP or a MoE layer (see ffn_spec and ffn_body).
template <typename T>
torch::Tensor ffn_block(const torch::Tensor& x, const torch::Tensor& norm_weight, double eps,
                             const c10::optional<torch::Tensor>& router_weight, const c10::optional<torch::Tensor>& correction_bias,
                             const std::string& method, const std::string& scoring, int64_t top_k, int64_t n_group,
                             int64_t topk_group, bool norm_topk_prob, double scale,
                             const c10::optional<torch::Tensor>& expert_table, int64_t expert_inter,
                             const std::vector<torch::Tensor>& shared) {
  const auto nw = norm_weight.contiguous();
  const FfnSpec<T> spec = ffn_spec<T>(nw, eps, router_weight, correction_bias, method, scoring, top_k, n_group, topk_group,
                                norm_topk_prob, scale, expert_table, expert_inter, shared);
  const auto xc = one_token<T>(x, spec.hidden, "ffn_block");
  auto out = torch::empty_like(xc);
  const int team_size = pool_threads();
  FfnScratch<T> scratch(spec.hidden, spec.routed ? spec.router.experts : 0, spec.routed ? spec.router.top_k : 0,
                        spec.max_inter_total, team_size, 1);
  RowClaims up_claims, down_claims;
  up_claims.reset(0, team_size);  // (each thread sets its share in the region)
  down_claims.reset(spec.hidden, team_size);
  in_parallel([&](int thread, int team) {
    ffn_body(spec, data_of<T>(xc), 1, reinterpret_cast<T*>(out.data_ptr()), scratch, up_claims, down_claims, thread, team);
  });
  return out.view(x.sizes());
}

// --------------------------------------------------------------------------------------------------
// One thread's share of an argmax over values offered in any order, with torch.argmax's answer: the
// first NaN if there is one, else the first index of the maximum.
struct ArgmaxPart {
  float best = -INFINITY;
  int64_t index = std::numeric_limits<int64_t>::max();
  int64_t nan_index = std::numeric_limits<int64_t>::max();

  void offer(int64_t n, float v) {
    if (v != v) {
      nan_index = std::min(nan_index, n);
    } else if (v > best || (v == best && n < index)) {
      best = v;
      index = n;
    }
  }

  static int64_t combine(const ArgmaxPart* parts, int count) {
    ArgmaxPart all;
    for (int t = 0; t < count; ++t) {
      all.nan_index = std::min(all.nan_index, parts[t].nan_index);
      if (parts[t].index != std::numeric_limits<int64_t>::max()) all.offer(parts[t].index, parts[t].best);
    }
    return all.nan_index != std::numeric_limits<int64_t>::max() ? all.nan_index : all.index;
  }
};

// A whole decode step in one parallel region: the tokens' embeddings, every decoder layer (attention_body
// or mla_body, then ffn_body), the final RMSNorm and the LM head, with no Python and no thread wake-up
// between them. Built once per model and cache (the Python side adds the layers with the same arguments
// as mha_block / mla_block and ffn_block, its caches of every slot, and keeps the tensors alive).
// step_rows() decodes one token in each of several cache slots at once (the serving engine's batch),
// step() one token in slot 0; both return the logits as the eager model does: fp32 values of the LM-head
// output in the storage type. A row's logits are the same bit for bit whatever the other rows are.
template <typename T>
class DecodeStep {
  using S = Storage<T>;

 public:
  DecodeStep(const torch::Tensor& embedding, const torch::Tensor& cos_table, const torch::Tensor& sin_table,
             const torch::Tensor& final_norm, double final_eps, const torch::Tensor& lm_head)
      : embedding_(embedding), cos_(cos_table.contiguous()), sin_(sin_table.contiguous()), final_norm_(final_norm.contiguous()),
        lm_head_(lm_head), final_eps_(float(final_eps)) {
    check_matrix<T>(embedding_, "DecodeStep");
    check_matrix<T>(lm_head_, "DecodeStep");
    hidden_ = embedding_.size(1);
    DECODE_CHECK(lm_head_.size(1) == hidden_ && final_norm_.numel() == hidden_ && final_norm_.scalar_type() == S::kType,
                 "DecodeStep: embedding, final norm and LM head disagree on the hidden size");
    DECODE_CHECK(cos_.dim() == 2 && sin_.sizes() == cos_.sizes() && cos_.scalar_type() == S::kType &&
                     sin_.scalar_type() == S::kType, "DecodeStep: RoPE tables must be [positions, d] of the weights' dtype");
  }

  // A layer with plain multi-head attention (the arguments of mha_block, then those of ffn_block).
  void add_layer(const torch::Tensor& attn_norm, double attn_eps, const std::vector<torch::Tensor>& weights,
                 const std::vector<c10::optional<torch::Tensor>>& biases, const torch::Tensor& k_cache,
                 const torch::Tensor& v_cache, double scale, const torch::Tensor& ffn_norm, double ffn_eps,
                 const c10::optional<torch::Tensor>& router_weight, const c10::optional<torch::Tensor>& correction_bias,
                 const std::string& method, const std::string& scoring, int64_t top_k, int64_t n_group, int64_t topk_group,
                 bool norm_topk_prob, double routed_scale, const c10::optional<torch::Tensor>& expert_table,
                 int64_t expert_inter, const std::vector<torch::Tensor>& shared) {
    DECODE_CHECK(mla_.empty(), "DecodeStep: every layer must have the same kind of attention");
    keep_alive_.push_back(attn_norm.contiguous());
    const AttentionSpec<T> attention = attention_spec<T>(keep_alive_.back(), attn_eps, weights, biases, k_cache, v_cache, scale);
    DECODE_CHECK(attention.hidden == hidden_, "DecodeStep: layer sizes disagree with the embedding");
    DECODE_CHECK(attention_.empty() || (attention.heads == attention_[0].heads && attention.kv_heads == attention_[0].kv_heads &&
                                        attention.d == attention_[0].d),
                 "DecodeStep: every layer's attention must have the first one's heads and head size");
    DECODE_CHECK(cos_.size(1) == attention.d, "DecodeStep: RoPE tables are for head size ", cos_.size(1));
    for (const auto& t : weights) keep_alive_.push_back(t);
    for (const torch::Tensor* t : {&k_cache, &v_cache}) keep_alive_.push_back(*t);
    check_slots(attention.slots);
    add_ffn(ffn_norm, ffn_eps, router_weight, correction_bias, method, scoring, top_k, n_group, topk_group, norm_topk_prob,
            routed_scale, expert_table, expert_inter, shared);
    attention_.push_back(attention);
  }

  // A layer with multi-head latent attention (the arguments of mla_block after the position, then those
  // of ffn_block).
  void add_mla_layer(const torch::Tensor& attn_norm, double attn_eps, const std::vector<torch::Tensor>& weights,
                     const std::vector<c10::optional<torch::Tensor>>& biases, const torch::Tensor& kv_a_norm, double kv_a_eps,
                     const c10::optional<torch::Tensor>& q_a_norm, double q_a_eps, const torch::Tensor& latent_cache,
                     const torch::Tensor& k_pe_cache, int64_t heads, int64_t nope, int64_t rope, int64_t v, double scale,
                     const torch::Tensor& ffn_norm, double ffn_eps, const c10::optional<torch::Tensor>& router_weight,
                     const c10::optional<torch::Tensor>& correction_bias, const std::string& method,
                     const std::string& scoring, int64_t top_k, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                     double routed_scale, const c10::optional<torch::Tensor>& expert_table, int64_t expert_inter,
                     const std::vector<torch::Tensor>& shared) {
    DECODE_CHECK(attention_.empty(), "DecodeStep: every layer must have the same kind of attention");
    std::vector<torch::Tensor> norms = {attn_norm.contiguous(), kv_a_norm.contiguous()};
    if (q_a_norm.has_value() && q_a_norm->defined()) norms.push_back(q_a_norm->contiguous());
    const c10::optional<torch::Tensor> q_norm = norms.size() == 3 ? c10::optional<torch::Tensor>(norms[2]) : c10::nullopt;
    const MlaSpec<T> mla = mla_spec<T>(norms[0], attn_eps, weights, biases, norms[1], kv_a_eps, q_norm, q_a_eps, latent_cache,
                                       k_pe_cache, heads, nope, rope, v, scale);
    DECODE_CHECK(mla.hidden == hidden_, "DecodeStep: layer sizes disagree with the embedding");
    DECODE_CHECK(mla_.empty() || (mla.heads == mla_[0].heads && mla.nope == mla_[0].nope && mla.rope == mla_[0].rope &&
                                  mla.v == mla_[0].v && mla.rank == mla_[0].rank && mla.q_rank == mla_[0].q_rank),
                 "DecodeStep: every layer's attention must have the first one's shape");
    DECODE_CHECK(cos_.size(1) == mla.rope, "DecodeStep: RoPE tables are for ", cos_.size(1), " rotary dimensions");
    for (const auto& t : norms) keep_alive_.push_back(t);
    for (const auto& t : weights) keep_alive_.push_back(t);
    for (const torch::Tensor* t : {&latent_cache, &k_pe_cache}) keep_alive_.push_back(*t);
    check_slots(mla.slots);
    add_ffn(ffn_norm, ffn_eps, router_weight, correction_bias, method, scoring, top_k, n_group, topk_group, norm_topk_prob,
            routed_scale, expert_table, expert_inter, shared);
    mla_.push_back(mla);
  }

  // Logits [V] fp32 of `token` at `position` of cache slot 0 (its key and value are written to every
  // layer's cache): step_rows with one row.
  torch::Tensor step(int64_t token, int64_t position) {
    return step_rows_of(std::vector<int64_t>{token}, std::vector<int64_t>{position}, std::vector<int64_t>{0}).view({-1});
  }

  // Logits [B, V] fp32: row b decodes token tokens[b] at position positions[b] of cache slot slots[b]
  // (its key/value or latent written there; attention over positions 0..positions[b] of that slot only).
  // The slots of one call are distinct. int64 tensors [B] or lists.
  torch::Tensor step_rows(const torch::Tensor& tokens, const torch::Tensor& positions, const torch::Tensor& slots) {
    return step_rows_of(int64_values(tokens, "tokens"), int64_values(positions, "positions"), int64_values(slots, "slots"));
  }

  torch::Tensor step_rows_of(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                             const std::vector<int64_t>& slots) {
    DECODE_CHECK(!ffn_.empty(), "DecodeStep: no layers");
    const int64_t count = int64_t(tokens.size());
    DECODE_CHECK(positions.size() == tokens.size() && slots.size() == tokens.size(),
                 "DecodeStep: tokens, positions and slots must have the same length (got ", count, ", ",
                 int64_t(positions.size()), ", ", int64_t(slots.size()), ")");
    DECODE_CHECK(count >= 1 && count <= max_rows(), "DecodeStep: 1 to ", max_rows(), " rows per step (the cache has ",
                 slots_, " slots), got ", count);
    const int64_t cache_len = mla_.empty() ? attention_[0].cache_len : mla_[0].cache_len;
    std::vector<bool> taken(slots_, false);
    for (int64_t b = 0; b < count; ++b) {
      DECODE_CHECK(tokens[b] >= 0 && tokens[b] < embedding_.size(0), "DecodeStep: token id ", tokens[b],
                   " outside the vocabulary of ", embedding_.size(0));
      DECODE_CHECK(positions[b] >= 0 && positions[b] < cos_.size(0), "DecodeStep: position ", positions[b],
                   " outside the RoPE table");
      DECODE_CHECK(positions[b] < cache_len, "DecodeStep: position ", positions[b], " outside the cache of ", cache_len,
                   " positions");
      DECODE_CHECK(slots[b] >= 0 && slots[b] < slots_, "DecodeStep: slot ", slots[b], " outside the cache's ", slots_, " slots");
      DECODE_CHECK(!taken[slots[b]], "DecodeStep: slot ", slots[b], " given twice (one row per slot)");
      taken[slots[b]] = true;
    }
    const int team_size = pool_threads();
    if (!scratch_ready_ || team_size != scratch_team_) make_scratch(team_size);
    const int rows_count = int(count);
    for (size_t layer = 0; layer < ffn_.size(); ++layer) {
      if (mla_.empty())
        attention_claims_[layer].reset(attention_[layer], team_size, rows_count);
      else
        mla_claims_[layer].reset(mla_[layer], team_size, rows_count);
      up_claims_[layer].reset(0, team_size);  // (each thread sets its share in the region)
      down_claims_[layer].reset(hidden_, team_size);
    }
    lm_head_claims_.reset(lm_head_.size(0), team_size);
    const int64_t vocab = lm_head_.size(0), d = cos_.size(1);
    auto logits = torch::empty({count, vocab}, torch::dtype(torch::kFloat32));
    float* lp = logits.data_ptr<float>();
    T *x = x_.data(), *mid = mid_.data();
    StepRows<T> rows;
    rows.count = rows_count;
    for (int b = 0; b < rows_count; ++b) {
      std::memcpy(x + b * hidden_, data_of<T>(embedding_) + tokens[b] * embedding_.stride(0), hidden_ * sizeof(T));
      rows.position[b] = positions[b];
      rows.slot[b] = slots[b];
      rows.cos[b] = data_of<T>(cos_) + positions[b] * d;
      rows.sin[b] = data_of<T>(sin_) + positions[b] * d;
    }
    const int rows_per_thread = max_rows();
    for (ArgmaxPart& part : argmax_parts_) part = ArgmaxPart{};  // (a thread the region may not get leaves its own empty)
    in_parallel([&](int thread, int team) {
      for (size_t layer = 0; layer < ffn_.size(); ++layer) {
        if (mla_.empty())
          attention_body(attention_[layer], x, rows, mid, *attention_scratch_, attention_claims_[layer], thread, team);
        else
          mla_body(mla_[layer], x, rows, mid, *mla_scratch_, mla_claims_[layer], thread, team);
#pragma omp barrier
        ffn_body(ffn_[layer], mid, rows_count, x, *ffn_scratch_, up_claims_[layer], down_claims_[layer], thread, team);
#pragma omp barrier
      }
      T* normed = final_normed_.data() + thread * rows_per_thread * hidden_;
      const T* inputs[kMaxRows];
      for (int b = 0; b < rows_count; ++b) {
        rms_norm_row(x + b * hidden_, data_of<T>(final_norm_), hidden_, final_eps_, normed + b * hidden_);
        inputs[b] = normed + b * hidden_;
      }
      ArgmaxPart* parts = argmax_parts_.data() + thread * rows_per_thread;
      const Packed<T> packed = pack_inputs<T>(inputs, rows_count, hidden_);
      lm_head_claims_.run(thread, chunk_rows(hidden_ * int64_t(sizeof(T))), [&](int64_t begin, int64_t end) {
        gemv_rows_multi(data_of<T>(lm_head_), lm_head_.stride(0), hidden_, inputs, rows_count, begin, end,
                        [&](int64_t n, int b, float sum) {
                          float& logit = lp[b * vocab + n];
                          logit = S::round(sum);
                          parts[b].offer(n, logit);
                        }, packed);
      });
    });
    last_argmaxes_.assign(rows_count, -1);
    std::vector<ArgmaxPart> row_parts(team_size);
    for (int b = 0; b < rows_count; ++b) {
      for (int t = 0; t < team_size; ++t) row_parts[t] = argmax_parts_[t * rows_per_thread + b];
      last_argmaxes_[b] = ArgmaxPart::combine(row_parts.data(), team_size);
    }
    return logits;
  }

  // The index of the first maximum of the last step's logits (torch.argmax's answer: the first NaN if
  // any), found while they were written: of its first row (last_argmax) or of each row. Greedy decoding
  // reads it instead of going over the 0.5 MB of logits again, which had left the caches of the core that
  // samples: ~0.14 ms a token.
  int64_t last_argmax() const { return last_argmaxes_.empty() ? -1 : last_argmaxes_[0]; }
  std::vector<int64_t> last_argmaxes() const { return last_argmaxes_; }

  // The cache slots of every layer (rows of one step go to distinct slots).
  int64_t slots() const { return slots_; }

  // (MoE layers stepped, routed experts streamed in them) since the last call, which starts the count
  // anew: how many experts a step's rows share, for benchmarks.
  std::pair<int64_t, int64_t> take_routed_counts() {
    if (!ffn_scratch_) return {0, 0};
    const std::pair<int64_t, int64_t> counts{ffn_scratch_->routed_layers, ffn_scratch_->routed_run};
    ffn_scratch_->routed_layers = ffn_scratch_->routed_run = 0;
    return counts;
  }

 private:
  // The values of a 1-D int64 CPU tensor.
  static std::vector<int64_t> int64_values(const torch::Tensor& t, const char* what) {
    DECODE_CHECK(t.scalar_type() == at::kLong && t.device().is_cpu() && t.dim() == 1, "DecodeStep: ", what,
                 " must be a 1-D int64 CPU tensor (or a list of ints)");
    const auto c = t.contiguous();
    return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  }

  void check_slots(int64_t slots) {
    DECODE_CHECK(ffn_.empty() || slots == slots_, "DecodeStep: every layer's cache must have the same slots");
    slots_ = slots;
  }

  int max_rows() const { return int(std::min<int64_t>(slots_, kMaxRows)); }

  void add_ffn(const torch::Tensor& ffn_norm, double ffn_eps, const c10::optional<torch::Tensor>& router_weight,
               const c10::optional<torch::Tensor>& correction_bias, const std::string& method, const std::string& scoring,
               int64_t top_k, int64_t n_group, int64_t topk_group, bool norm_topk_prob, double routed_scale,
               const c10::optional<torch::Tensor>& expert_table, int64_t expert_inter, const std::vector<torch::Tensor>& shared) {
    keep_alive_.push_back(ffn_norm.contiguous());
    const FfnSpec<T> ffn = ffn_spec<T>(keep_alive_.back(), ffn_eps, router_weight, correction_bias, method, scoring, top_k, n_group,
                                       topk_group, norm_topk_prob, routed_scale, expert_table, expert_inter, shared);
    DECODE_CHECK(ffn.hidden == hidden_, "DecodeStep: layer sizes disagree with the embedding");
    for (const auto* t : {&router_weight, &correction_bias, &expert_table})
      if (t->has_value() && (*t)->defined()) keep_alive_.push_back(**t);
    for (const auto& t : shared) keep_alive_.push_back(t);
    ffn_.push_back(ffn);
  }

  void make_scratch(int team) {
    int64_t experts = 0, top_k = 0, inter_total = 0;
    for (const auto& f : ffn_) {
      experts = std::max(experts, f.routed ? f.router.experts : 0);
      top_k = std::max(top_k, f.routed ? f.router.top_k : 0);
      inter_total = std::max(inter_total, f.max_inter_total);
    }
    const int rows = max_rows();
    // (add_layer / add_mla_layer: one attention shape for all layers)
    if (mla_.empty())
      attention_scratch_ = std::make_unique<AttentionScratch<T>>(attention_[0], team, rows);
    else
      mla_scratch_ = std::make_unique<MlaScratch<T>>(mla_[0], team, rows);
    ffn_scratch_ = std::make_unique<FfnScratch<T>>(hidden_, experts, top_k, inter_total, team, rows);
    attention_claims_ = std::vector<AttentionClaims>(attention_.size());
    mla_claims_ = std::vector<MlaClaims>(mla_.size());
    up_claims_ = std::vector<RowClaims>(ffn_.size());
    down_claims_ = std::vector<RowClaims>(ffn_.size());
    x_.assign(rows * hidden_, 0);
    mid_.assign(rows * hidden_, 0);
    final_normed_.assign(team * rows * hidden_, 0);
    argmax_parts_.assign(team * rows, ArgmaxPart{});
    scratch_team_ = team;
    scratch_ready_ = true;
  }

  torch::Tensor embedding_, cos_, sin_, final_norm_, lm_head_;
  float final_eps_;
  int64_t hidden_ = 0;
  std::vector<AttentionSpec<T>> attention_;  // plain-attention layers, or
  std::vector<MlaSpec<T>> mla_;              // MLA layers (one kind per model)
  std::vector<FfnSpec<T>> ffn_;
  std::vector<torch::Tensor> keep_alive_;
  std::unique_ptr<AttentionScratch<T>> attention_scratch_;
  std::unique_ptr<MlaScratch<T>> mla_scratch_;
  std::unique_ptr<FfnScratch<T>> ffn_scratch_;
  std::vector<AttentionClaims> attention_claims_;
  std::vector<MlaClaims> mla_claims_;
  std::vector<RowClaims> up_claims_, down_claims_;
  RowClaims lm_head_claims_;
  std::vector<ArgmaxPart> argmax_parts_;  // [team][rows]
  std::vector<int64_t> last_argmaxes_;
  int64_t slots_ = 0;
  std::vector<T> x_, mid_, final_normed_;
  int scratch_team_ = 0;
  bool scratch_ready_ = false;
};


// x: K values (any shape with K elements); w: [N, K] with contiguous rows (any row stride); bias: [N] or
// undefined. Returns [N] in the storage type: the fp32 sum (+ bias) rounded once, as F.linear does.
template <typename T>
torch::Tensor gemv(const char* name, const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  const GemvArgs args = gemv_args(name, Storage<T>::kType, x, w, bias);
  const float* bp = args.bias_f32.defined() ? args.bias_f32.data_ptr<float>() : nullptr;
  auto out = torch::empty({args.rows}, x.options());
  auto* op = reinterpret_cast<T*>(out.data_ptr());
  at::parallel_for(0, args.rows, 16, [&](int64_t begin, int64_t end) {
    gemv_rows(data_of<T>(w), args.row_stride, args.cols, data_of<T>(args.x), begin, end,
              [&](int64_t n, float sum) { op[n] = Storage<T>::store(bp ? sum + bp[n] : sum); });
  });
  return out;
}

// The largest of v[begin, end) (NaNs aside), vectorised; `nans` counts the NaNs among them.
inline float max_counting_nans(const float* v, int64_t begin, int64_t end, int& nans) {
  float best = -INFINITY;
  int count = 0;
#pragma omp simd reduction(max : best) reduction(+ : count)
  for (int64_t i = begin; i < end; ++i) {
    best = v[i] > best ? v[i] : best;
    count += v[i] != v[i];
  }
  nans = count;
  return best;
}

// The index of the first maximum of an fp32 vector, as torch.argmax (a NaN counts as the maximum: the
// first NaN). One call instead of the ~10 small PyTorch ops of generation._argmax: between two decode
// steps, which stream the weights through every cache level, each of those ran from cold caches (greedy
// sampling took 0.29 ms per token inside generation against 0.04 ms in a warm loop; now 0.165 ms).
inline int64_t first_argmax(const torch::Tensor& values) {
  DECODE_CHECK(values.scalar_type() == at::kFloat && values.device().is_cpu() && values.dim() == 1 && values.is_contiguous() &&
                   values.numel() > 0, "first_argmax: a non-empty contiguous fp32 CPU vector");
  const float* v = values.data_ptr<float>();
  const int64_t n = values.numel();
  int nans = 0;
  const float best = max_counting_nans(v, 0, n, nans);
  if (nans) {  // torch.argmax: the first NaN
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(v[i])) return i;
  }
  // The first index holding `best`: a vectorised test per block finds its block, a scan of that block the
  // index. (A scalar search alone went through half of a 129k vocabulary on average: 46 us of 55.)
  constexpr int64_t kBlock = 256;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t i = start; i < end; ++i) hit |= v[i] == best;
    if (hit) {
      for (int64_t i = start; i < end; ++i)
        if (v[i] == best) return i;
    }
  }
  return 0;  // (unreachable)
}

// What sampling may draw from, in one pass over fp32 logits [V] and a few blocks of them: the ids of every
// logit at or above the k-th largest (ties with it included, as torch.topk's k-th value with >= selects
// them), in ascending order, and those logits, after the repetition penalty on the ids in `seen` (Hugging
// Face's rule: a negative logit times `penalty`, another divided by it; repeats in `seen` count once).
// Returns nothing where a logit is NaN, or for tensors other than contiguous fp32 logits and int64 ids on
// the CPU (left to PyTorch). In PyTorch this was a clone for the penalty, torch.topk and a comparison over
// the whole vocabulary: ~1 ms per token right after a decode step, whose weight stream leaves none of it
// in the caches.
inline c10::optional<std::tuple<torch::Tensor, torch::Tensor>> sampling_candidates(const torch::Tensor& logits,
                                                                                   const torch::Tensor& seen,
                                                                                   double penalty, int64_t k) {
  // Other tensors are not for this kernel: nothing (the caller's PyTorch path takes them), checked here
  // rather than in Python, where each check ran from cold caches after a decode step.
  if (logits.scalar_type() != at::kFloat || !logits.device().is_cpu() || logits.dim() != 1 || !logits.is_contiguous() ||
      seen.scalar_type() != at::kLong || !seen.device().is_cpu() || seen.dim() != 1)
    return c10::nullopt;
  const int64_t n = logits.numel();
  DECODE_CHECK(k >= 1 && k <= n, "sampling_candidates: k must be in [1, ", n, "]");
  const float* v = logits.data_ptr<float>();
  const float p = float(penalty);
  // The penalised ids, once each and in order, with their new values.
  std::vector<int64_t> seen_ids;
  const auto seen_c = seen.contiguous();
  const int64_t* sp = seen_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < seen_c.numel(); ++i) {
    DECODE_CHECK(sp[i] >= 0 && sp[i] < n, "sampling_candidates: seen id ", sp[i], " outside the vocabulary of ", n);
    seen_ids.push_back(sp[i]);
  }
  std::sort(seen_ids.begin(), seen_ids.end());
  seen_ids.erase(std::unique(seen_ids.begin(), seen_ids.end()), seen_ids.end());
  std::vector<uint64_t> is_seen((n + 63) / 64, 0);
  std::vector<float> seen_values;
  for (int64_t id : seen_ids) {
    is_seen[id >> 6] |= uint64_t(1) << (id & 63);
    seen_values.push_back(v[id] < 0 ? v[id] * p : v[id] / p);
  }
  auto unseen = [&](int64_t i) { return !((is_seen[i >> 6] >> (i & 63)) & 1); };
  // The maxima of blocks of 64 raw logits, in one vectorised pass (the only one over the whole vector).
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<float> block_max(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    int nans = 0;
    block_max[b] = max_counting_nans(v, b * kBlock, std::min(n, (b + 1) * kBlock), nans);
    if (nans) return c10::nullopt;
  }
  // A floor under the k-th largest: the k-th largest block maximum (k blocks hold a value at least that
  // large). The k-th largest value is then found among the values >= floor alone, in a min-heap of k,
  // from the few blocks that reach it; the penalised values are offered apart from the scan (a raw
  // block maximum says nothing about them). A penalty can lower values below the floor: if fewer than k
  // values reach it, the floor is dropped and every block is scanned.
  auto kth_from = [&](float floor) -> c10::optional<float> {
    std::vector<float> heap;
    heap.reserve(k);
    int64_t reaching = 0;
    auto offer = [&](float value) {
      if (!(value >= floor)) return;
      ++reaching;
      if (int64_t(heap.size()) < k) {
        heap.push_back(value);
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      } else if (value > heap.front()) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
        heap.back() = value;
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      }
    };
    for (int64_t b = 0; b < blocks; ++b) {
      if (!(block_max[b] >= floor)) continue;
      for (int64_t i = b * kBlock, end = std::min(n, i + kBlock); i < end; ++i)
        if (unseen(i)) offer(v[i]);
    }
    for (float value : seen_values) offer(value);
    if (reaching < k) return c10::nullopt;
    return heap.front();
  };
  float floor = -INFINITY;
  if (k <= blocks) {
    std::vector<float> maxima = block_max;
    std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), std::greater<float>());
    floor = maxima[k - 1];
  }
  c10::optional<float> found = kth_from(floor);
  if (!found) found = kth_from(-INFINITY);
  const float kth = *found;
  // Every value >= kth, ids ascending: the unseen ones from the blocks that reach kth, merged with the seen ones.
  std::vector<int64_t> ids;
  std::vector<float> values;
  size_t next_seen = 0;
  auto take_seen_below = [&](int64_t limit) {
    for (; next_seen < seen_ids.size() && seen_ids[next_seen] < limit; ++next_seen)
      if (seen_values[next_seen] >= kth) {
        ids.push_back(seen_ids[next_seen]);
        values.push_back(seen_values[next_seen]);
      }
  };
  for (int64_t b = 0; b < blocks; ++b) {
    if (!(block_max[b] >= kth)) continue;
    for (int64_t i = b * kBlock, end = std::min(n, i + kBlock); i < end; ++i) {
      if (v[i] >= kth && unseen(i)) {
        take_seen_below(i);
        ids.push_back(i);
        values.push_back(v[i]);
      }
    }
  }
  take_seen_below(n);
  auto id_tensor = torch::empty({int64_t(ids.size())}, torch::kInt64);
  auto value_tensor = torch::empty({int64_t(values.size())}, torch::kFloat32);
  std::copy(ids.begin(), ids.end(), id_tensor.data_ptr<int64_t>());
  std::copy(values.begin(), values.end(), value_tensor.data_ptr<float>());
  return std::make_tuple(id_tensor, value_tensor);
}

// One token drawn as generation.sample draws it on the CPU: the candidates of sampling_candidates, their
// logits over `temperature`, the smallest set of the most likely ones that holds `top_p` of the mass
// (sampling_probs' rule: drop the least likely while the mass of those dropped, with them, stays within
// 1 - top_p; the most likely always stays), then one draw by the inverse of the cumulative
// distribution, with a uniform from `generator` (the default CPU generator when none). In one call:
// after a decode step every PyTorch op runs from cold caches, and the ~10 small ones of the Python path
// took ~0.5 ms a token. Nothing where a logit is NaN (left to PyTorch).
inline c10::optional<int64_t> draw_top_k(const torch::Tensor& logits, const torch::Tensor& seen, double penalty, int64_t k,
                                         double temperature, double top_p, c10::optional<at::Generator> generator) {
  DECODE_CHECK(temperature > 0, "draw_top_k: the temperature must be positive");
  const auto found = sampling_candidates(logits, seen, penalty, k);
  if (!found) return c10::nullopt;
  const torch::Tensor& id_tensor = std::get<0>(*found);
  const torch::Tensor& value_tensor = std::get<1>(*found);
  const int64_t count = id_tensor.numel();
  const int64_t* ids = id_tensor.data_ptr<int64_t>();
  const float* values = value_tensor.data_ptr<float>();
  std::vector<float> scaled(count);
  const float t = float(temperature);
  float top = -INFINITY;
  for (int64_t i = 0; i < count; ++i) top = std::max(top, scaled[i] = values[i] / t);
  // Softmax over the candidates, in fp32.
  std::vector<float> probs(count);
  float total = 0.0f;
  for (int64_t i = 0; i < count; ++i) total += (probs[i] = std::exp(scaled[i] - top));
  for (float& p : probs) p /= total;
  if (top_p < 1.0) {  // ascending order of probability; drop from the least likely while the mass so far <= 1 - top_p
    std::vector<int64_t> order(count);
    for (int64_t i = 0; i < count; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return scaled[a] < scaled[b]; });
    const float limit = float(1.0 - top_p);
    float mass = 0.0f;
    for (int64_t j = 0; j + 1 < count; ++j) {  // (the last, most likely, always stays)
      mass += probs[order[j]];
      if (!(mass <= limit)) break;
      probs[order[j]] = 0.0f;
    }
    float kept = 0.0f;
    for (float p : probs) kept += p;
    for (float& p : probs) p /= kept;
  }
  at::CPUGeneratorImpl* engine = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  uint32_t bits;
  {
    std::lock_guard<std::mutex> lock(engine->mutex_);
    bits = engine->random();
  }
  const float u = float(bits >> 8) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
  float cumulative = 0.0f;
  int64_t last = -1;
  for (int64_t i = 0; i < count; ++i) {
    if (probs[i] <= 0.0f) continue;
    last = i;
    cumulative += probs[i];
    if (u < cumulative) return ids[i];
  }
  return ids[last];  // (rounding left u at or above the total)
}

// The Python names of the layer kernels for storage type T: ffn_block_<suffix>, mha_block_<suffix> and
// the DecodeStep class.
// The long calls (a layer, a whole step, a linear) give up the GIL while they run: they touch no Python
// object, and holding it for a step (40-200 ms) stalled every other Python thread of the process, the
// server's event loop and a stream's reader among them (a reader got its token a step late).
using ReleaseGil = pybind11::call_guard<pybind11::gil_scoped_release>;

template <typename T>
void bind_layer_kernels(pybind11::module_& m, const std::string& suffix) {
  m.def("first_argmax", &first_argmax, "index of the first maximum of an fp32 vector (as torch.argmax)");
  m.def("sampling_candidates", &sampling_candidates,
        "ids (ascending) and penalised values of the logits at or above the k-th largest, ties included");
  m.def("draw_top_k", &draw_top_k, "one token drawn from the top-k candidates after the penalty, temperature and top-p");
  m.def(("ffn_block_" + suffix).c_str(), &ffn_block<T>, ReleaseGil(),
        "RMSNorm + router + chosen and shared experts (or a dense MLP) + residual, one token");
  m.def(("mha_block_" + suffix).c_str(), &mha_block<T>, ReleaseGil(),
        "RMSNorm + q/k/v + RoPE + cache write + attention + o_proj + residual, one token");
  m.def(("mla_block_" + suffix).c_str(), &mla_block<T>, ReleaseGil(),
        "RMSNorm + MLA projections + latent cache write + absorbed attention + o_proj + residual, one token");
  pybind11::class_<DecodeStep<T>>(m, "DecodeStep", "a whole decode step in one parallel region")
      .def(pybind11::init<const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, double,
                          const torch::Tensor&>())
      .def("add_layer", &DecodeStep<T>::add_layer)
      .def("add_mla_layer", &DecodeStep<T>::add_mla_layer)
      .def("step", &DecodeStep<T>::step, ReleaseGil())
      .def("step_rows", &DecodeStep<T>::step_rows, ReleaseGil(), "logits [B, V] of tokens [B] at positions [B] of cache slots [B]",
           pybind11::arg("tokens"), pybind11::arg("positions"), pybind11::arg("slots"))
      .def("step_rows", &DecodeStep<T>::step_rows_of, ReleaseGil(), pybind11::arg("tokens"), pybind11::arg("positions"),
           pybind11::arg("slots"))
      .def("last_argmax", &DecodeStep<T>::last_argmax)
      .def("last_argmaxes", &DecodeStep<T>::last_argmaxes)
      .def("take_routed_counts", &DecodeStep<T>::take_routed_counts)
      .def_property_readonly("slots", &DecodeStep<T>::slots);
}

}  // namespace decode
