// Plain multi-head attention (deepseek-vl2-tiny) for the rows of a decode step, and the pieces every
// attention shares: RMSNorm, half-split RoPE, one query head over the cached keys and values.
#pragma once
#include "gemv_args.h"
#include "matrix.h"

namespace decode {

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
  Matrix<T> w[4];  // q [heads*d, D], k [kv*d, D], v [kv*d, D], o [D, heads*d], one format for all
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
AttentionSpec<T> attention_spec(const torch::Tensor& norm_weight, double eps,
                                const std::vector<std::vector<torch::Tensor>>& weights,
                             const std::vector<c10::optional<torch::Tensor>>& biases, const torch::Tensor& k_cache,
                             const torch::Tensor& v_cache, double scale) {
  DECODE_CHECK(weights.size() == 4 && (biases.empty() || biases.size() == 4), "mha_block: four weights (q, k, v, o)");
  using S = Storage<T>;
  const std::vector<Matrix<T>> w = matrices_of<T>(weights, "mha_block");
  for (const auto& m : w) DECODE_CHECK(m.format == w[0].format, "mha_block: q, k, v and o must have one format");
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
  s.heads = w[0].rows / s.d;
  DECODE_CHECK(s.slots >= 1 && s.d % 2 == 0 && s.heads * s.d == w[0].rows && s.heads % s.kv_heads == 0 &&
                   w[1].rows == s.kv_heads * s.d && w[2].rows == s.kv_heads * s.d && w[0].cols == s.hidden &&
                   w[1].cols == s.hidden && w[2].cols == s.hidden && w[3].rows == s.hidden && w[3].cols == s.heads * s.d,
               "mha_block: sizes disagree");
  s.norm = data_of<T>(norm_weight);
  s.eps = float(eps);
  for (int i = 0; i < 4; ++i) {
    s.w[i] = w[i];
    if (!biases.empty()) s.bias_f32[i] = fp32_bias("mha_block", biases[i], w[i].rows);
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
  const Operands<T> normed_in = operands<T>(s.w[0].format, inputs, count, hidden);
  claims.qkv.run(thread, chunk_rows(s.w[0].row_bytes()), [&](int64_t first, int64_t last) {
    for (int i = 0; i < 3; ++i) {
      const int64_t begin = std::max(first, starts[i]) - starts[i], end = std::min(last, starts[i + 1]) - starts[i];
      if (begin >= end) continue;
      const float* bias = bias_of(s.bias_f32[i]);
      T* dst = projected + starts[i];
      gemv_rows_multi(s.w[i], normed_in, begin, end, [&](int64_t n, int b, float sum) {
        dst[b * qkv_rows + n] = S::store(bias ? sum + bias[n] : sum);
      });
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
  const Operands<T> attended_in = operands<T>(s.w[3].format, inputs, count, width);
  claims.o.run(thread, chunk_rows(s.w[3].row_bytes()), [&](int64_t begin, int64_t end) {
    gemv_rows_multi(s.w[3], attended_in, begin, end, [&](int64_t n, int b, float sum) {
      out[b * hidden + n] = S::store(S::load(x[b * hidden + n]) + S::round(bias ? sum + bias[n] : sum));
    });
  });
}

}  // namespace decode
