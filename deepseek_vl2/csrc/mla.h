// Multi-head latent attention (MLA: deepseek-vl2-small and base) for the rows of a decode step. Per token
// the cache holds the normalised latent [rank] and one rotated key [rope] shared by all heads. kv_b [heads*(nope+v), rank] is never expanded
// into per-head keys and values: it is folded into the query (its first `nope` rows of each head, W_UK)
// and into the output (its last `v` rows, W_UV), and the heads attend over the cached latents directly,
// with the query-side vectors in fp32, as the eager CPU decode does (_attend_absorbed_cpu).
#pragma once
#include "attention.h"

namespace decode {

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
  Matrix<T> q_in, kv_a, kv_b, o, q_b;  // q_in: q_proj [heads*(nope+rope), D] or q_a_proj [q_rank, D]; one format
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
MlaSpec<T> mla_spec(const torch::Tensor& norm_weight, double eps, const std::vector<std::vector<torch::Tensor>>& weights,
                    const std::vector<c10::optional<torch::Tensor>>& biases, const torch::Tensor& kv_a_norm, double kv_a_eps,
                    const c10::optional<torch::Tensor>& q_a_norm, double q_a_eps, const torch::Tensor& latent_cache,
                    const torch::Tensor& k_pe_cache, int64_t heads, int64_t nope, int64_t rope, int64_t v, double scale) {
  using S = Storage<T>;
  const char* what = "mla_block";
  DECODE_CHECK(weights.size() == 4 || weights.size() == 5, what, ": weights q_in, kv_a, kv_b, o (and q_b with a query LoRA)");
  DECODE_CHECK(biases.empty() || biases.size() == weights.size(), what, ": one bias (or None) per weight");
  const bool lora = weights.size() == 5;
  DECODE_CHECK(lora == (q_a_norm.has_value() && q_a_norm->defined()), what, ": q_a_norm goes with q_b");
  const std::vector<Matrix<T>> w = matrices_of<T>(weights, what);
  for (const auto& m : w) DECODE_CHECK(m.format == w[0].format, what, ": every projection must have one format");
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
  s.q_rank = lora ? w[0].rows : 0;
  DECODE_CHECK(heads > 0 && nope >= 0 && rope > 0 && rope % 2 == 0 && v > 0 && k_pe_cache.size(-1) == rope &&
                   kv_a_norm.numel() == s.rank && w[0].cols == s.hidden && (lora || w[0].rows == heads * (nope + rope)) &&
                   w[1].rows == s.rank + rope && w[1].cols == s.hidden && w[2].rows == heads * (nope + v) &&
                   w[2].cols == s.rank && w[3].rows == s.hidden && w[3].cols == heads * v &&
                   (!lora || (w[4].rows == heads * (nope + rope) && w[4].cols == s.q_rank && q_a_norm->numel() == s.q_rank)),
               what, ": sizes disagree");
  s.norm = data_of<T>(norm_weight);
  s.eps = float(eps);
  Matrix<T>* matrices[5] = {&s.q_in, &s.kv_a, &s.kv_b, &s.o, &s.q_b};
  for (size_t i = 0; i < w.size(); ++i) *matrices[i] = w[i];
  torch::Tensor* bias_copies[5] = {&s.q_in_bias, &s.kv_a_bias, nullptr, &s.o_bias, nullptr};
  for (size_t i = 0; i < biases.size(); ++i) {
    torch::Tensor copy = fp32_bias(what, biases[i], w[i].rows);
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

// Heads of one row taken together in the attention phase (see attend_latent_heads): on vectors 4; on AMX
// tiles up to 16 (a tile's product reads each cached row once for up to 16 heads, and each claim packs
// the row's latents once) but half the heads at most, so that one row's attention is two claims at least:
// base's 32 heads two claims of 16 (with 8 a claim, a 6-layer int4 step measured 28.0 ms against 26.9), small's 16 two of 8.
constexpr int64_t kLatentHeadBlock = 4, kLatentTileHeads = 16;
template <typename T>
int64_t latent_head_block(int64_t heads) {
  if (!std::is_same_v<T, uint16_t> || tiles_min_rows().load(std::memory_order_relaxed) == 0) return kLatentHeadBlock;
  return std::max<int64_t>(1, std::min<int64_t>(kLatentTileHeads, (heads + 1) / 2));
}

// The claims of an MLA sub-layer's phases: q_in and kv_a rows taken together, q_b rows, (row, block of
// heads) pairs, o rows.
struct MlaClaims {
  RowClaims in, q_b, heads, o;
  template <typename T>
  void reset(const MlaSpec<T>& s, int team, int rows) {
    in.reset(s.q_in_rows() + s.rank + s.rope, team);
    q_b.reset(s.q_rank > 0 ? s.heads * s.q_dim() : 0, team);
    const int64_t block = latent_head_block<T>(s.heads);
    heads.reset(rows * ((s.heads + block - 1) / block), team);
    o.reset(s.hidden, team);
  }
};

// Heads [begin, end) of the absorbed attention over positions [0, length) of one sequence's caches
// (latent [T, rank], k_pe [T, rope], rows at the spec's strides): q [heads, nope+rope] (its nope part),
// q_pe [heads, rope] (rotated) -> out [heads, v]. Per head, in fp32:
//   q_latent = W_UK^T q_nope; score_t = (q_latent . latent_t + q_pe . k_pe_t) * scale;
//   context = softmax(score) . latent; out = W_UV context (rounded once to the storage type).
// Where AMX tiles are on (bf16), the scores, softmax and context go to latent_attention_tiles, which rounds
// q_latent and the probabilities to bf16 for its tile products (base's int4 step: see docs/performance.md).
// On vectors the heads of a call (up to kLatentHeadBlock) go through the cache together: each cached latent is read
// and widened once for all of them; each head's sums are the same whichever heads it goes with. (A small
// layer's whole sub-layer at 4,000 positions on the 2-core EPYC: 2.01-2.09 ms, head by head 2.16-2.33;
// 8 heads per claim: 2.46.)
template <typename T>
void attend_latent_heads(const MlaSpec<T>& s, const T* latent, const T* k_pe, const T* q, const T* q_pe, int64_t length,
                         int64_t begin, int64_t end, T* out) {
  using S = Storage<T>;
  const int64_t count = end - begin, rank = s.rank, rope = s.rope;
  std::vector<float> q_latent(count * rank, 0.0f), context(count * rank, 0.0f);
  std::vector<float> row(s.kv_b.format == Format::kDense ? 0 : rank);  // (a quantized kv_b row, as fp32)
  std::vector<float> q_nope(s.nope);
  for (int64_t j = 0; j < count; ++j) {
    const int64_t h = begin + j, w_uk = h * (s.nope + s.v);  // (W_UK's rows of head h in kv_b)
    for (int64_t i = 0; i < s.nope; ++i) q_nope[i] = S::load(q[h * s.q_dim() + i]);
    rows_axpy_f32(s.kv_b, w_uk, s.nope, q_nope.data(), &q_latent[j * rank], row.data());
  }
  if (!latent_attention_tiles(latent, s.latent_stride, k_pe, s.k_pe_stride, length, rank, rope, q_latent.data(),
                              q_pe + begin * rope, count, s.scale, context.data())) {
    DECODE_CHECK(count <= kLatentHeadBlock, "attend_latent_heads: at most ", kLatentHeadBlock, " heads on vectors");
    std::vector<float> q_pe_f(count * rope), scores(count * length);
    for (int64_t i = 0; i < count * rope; ++i) q_pe_f[i] = S::load(q_pe[begin * rope + i]);
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
  }
  for (int64_t j = 0; j < count; ++j) {
    const int64_t h = begin + j;
    const int64_t w_uv = h * (s.nope + s.v) + s.nope;  // (W_UV's rows of head h in kv_b)
    if (s.kv_b.format == Format::kDense) {
      for (int64_t c = 0; c < s.v; ++c) out[h * s.v + c] = S::store(row_dot_f32(s.kv_b, w_uv + c, &context[j * rank], row.data()));
    } else {  // quantized: the head's context prepared once as the format takes it, W_UV's rows by the format's products
      const float* input = &context[j * rank];
      const Operands<float> in = operands<float>(s.kv_b.format, &input, 1, rank, 1);
      gemv_rows_multi(as_fp32_inputs(s.kv_b), in, w_uv, w_uv + s.v,
                      [&](int64_t n, int, float sum) { out[h * s.v + n - w_uv] = S::store(sum); });
    }
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
  const Operands<T> normed_in = operands<T>(s.q_in.format, inputs, count, hidden);
  claims.in.run(thread, chunk_rows(s.q_in.row_bytes()), [&](int64_t first, int64_t last) {
    if (first < q_rows)
      gemv_rows_multi(s.q_in, normed_in, first, std::min(last, q_rows), [&](int64_t n, int b, float sum) {
        q_in[b * q_rows + n] = S::store(q_bias ? sum + q_bias[n] : sum);
      });
    if (last > q_rows)
      gemv_rows_multi(s.kv_a, normed_in, std::max(first, q_rows) - q_rows, last - q_rows,
                      [&](int64_t n, int b, float sum) { kv_a[b * kv_rows + n] = S::store(kv_bias ? sum + kv_bias[n] : sum); });
  });
#pragma omp barrier
  const T* q = q_in;  // [rows, heads * q_dim]
  if (s.q_rank > 0) {
    T* q_normed = scratch.q_a_normed.data() + thread * (scratch.q_a_normed.size() / team);
    for (int b = 0; b < count; ++b) rms_norm_row(q_in + b * q_rows, s.q_a_norm, s.q_rank, s.q_a_eps, q_normed + b * s.q_rank);
    row_pointers<T>(q_normed, s.q_rank, count, inputs);
    T* q_full = scratch.q.data();
    const Operands<T> q_normed_in = operands<T>(s.q_b.format, inputs, count, s.q_rank);
    claims.q_b.run(thread, chunk_rows(s.q_b.row_bytes()), [&](int64_t begin, int64_t end) {
      gemv_rows_multi(s.q_b, q_normed_in, begin, end, [&](int64_t n, int b, float sum) { q_full[b * q_width + n] = S::store(sum); });
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
  const int64_t block = latent_head_block<T>(s.heads), blocks = (s.heads + block - 1) / block;
  claims.heads.run(thread, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / blocks, first = (unit % blocks) * block, slot = rows.slot[b];
      attend_latent_heads(s, s.latent_cache + slot * s.latent_slot_stride, s.k_pe_cache + slot * s.k_pe_slot_stride,
                          q + b * q_width, scratch.q_pe.data() + b * s.heads * s.rope, rows.position[b] + 1, first,
                          std::min(first + block, s.heads), scratch.attended.data() + b * s.heads * s.v);
    }
  });
#pragma omp barrier
  const float* o_bias = bias_of(s.o_bias);
  row_pointers<T>(scratch.attended.data(), s.heads * s.v, count, inputs);
  const Operands<T> attended_in = operands<T>(s.o.format, inputs, count, s.heads * s.v);
  claims.o.run(thread, chunk_rows(s.o.row_bytes()), [&](int64_t begin, int64_t end) {
    gemv_rows_multi(s.o, attended_in, begin, end, [&](int64_t n, int b, float sum) {
      out[b * hidden + n] = S::store(S::load(x[b * hidden + n]) + S::round(o_bias ? sum + o_bias[n] : sum));
    });
  });
}

}  // namespace decode
