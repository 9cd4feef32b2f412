// Batch-1 (decode) kernels for bf16 weights on x86 CPUs with AVX512-BF16.
//
// Decoding streams every active weight once per token, so these loops only have to keep up with memory.
// vdpbf16ps multiplies 32 bf16 pairs and accumulates them into 16 fp32 lanes in one instruction, with no
// separate bf16 -> fp32 conversion; PyTorch's generic bf16 kernel converts first and tops out at ~47 GB/s
// on the 2-core EPYC this was measured on, where this one reaches ~62 GB/s (the memory's read rate).
//
// Every call has a fixed cost (Python, pybind, waking the thread pool, the hardware prefetchers ramping up
// on a new matrix), which is large next to one expert's 2.3 MB. So the kernels below take whole
// sub-layers (mha_block_bf16: attention; ffn_block_bf16: router + experts; gemv_bf16_many: the
// projections of one input) and, for plain-attention models, a whole decode step (DecodeStep), each in
// one parallel region.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include "gemv_args.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

inline uint16_t float_to_bf16(float value) {  // round to nearest even, as PyTorch's conversion does
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline __m512bh load_bf16x32(const uint16_t* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

inline float dot_bf16(const uint16_t* a, const uint16_t* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
    acc0 = _mm512_dpbf16_ps(acc0, load_bf16x32(a + k), load_bf16x32(b + k));
    acc1 = _mm512_dpbf16_ps(acc1, load_bf16x32(a + k + 32), load_bf16x32(b + k + 32));
  }
  for (; k + 32 <= n; k += 32) acc0 = _mm512_dpbf16_ps(acc0, load_bf16x32(a + k), load_bf16x32(b + k));
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; k < n; ++k) sum += bf16_to_float(a[k]) * bf16_to_float(b[k]);
  return sum;
}

// y[n] = w[n, :] . x for rows [begin, end) of a row-contiguous bf16 matrix, fp32 sums.
template <typename Store>
inline void gemv_rows(const uint16_t* w, int64_t row_stride, int64_t cols, const uint16_t* x, int64_t begin, int64_t end,
                      Store store) {
  for (int64_t n = begin; n < end; ++n) store(n, dot_bf16(w + n * row_stride, x, cols));
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

inline const uint16_t* bf16_data(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

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
    TORCH_CHECK(n >= 0 && n < (int64_t(1) << 32), "RowClaims: too many rows");
    if (team_ != team) {
      ranges_ = std::make_unique<Range[]>(team);
      team_ = team;
    }
    for (int t = 0; t < team; ++t) {
      const auto [begin, end] = share(n, t, team);
      ranges_[t].packed.store(pack(begin, end), std::memory_order_relaxed);
    }
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

// Rows per claimed chunk: ~64 KiB of weights.
inline int64_t chunk_rows(int64_t row_bytes) { return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(row_bytes, 1)); }

void check_matrix(const torch::Tensor& w, const char* what) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.device().is_cpu(), what, ": bf16 CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, what, ": weights must be 2-D with contiguous rows");
}

}  // namespace

// x: K bf16 values (any shape with K elements); w: [N, K] bf16, rows contiguous (any row stride);
// bias: [N] bf16 or undefined. Returns [N] bf16: the fp32 sum (+ bias) rounded once, as F.linear does.
torch::Tensor gemv_bf16(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  const GemvArgs args = gemv_args("gemv_bf16", at::kBFloat16, x, w, bias);
  const float* bp = args.bias_f32.defined() ? args.bias_f32.data_ptr<float>() : nullptr;
  auto out = torch::empty({args.rows}, x.options());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, args.rows, 16, [&](int64_t begin, int64_t end) {
    gemv_rows(bf16_data(w), args.row_stride, args.cols, bf16_data(args.x), begin, end,
              [&](int64_t n, float sum) { op[n] = float_to_bf16(bp ? sum + bp[n] : sum); });
  });
  return out;
}

// Single-query attention over bf16 keys/values, for heads [begin, end): query head h attends with kv head
// h / group. q: heads x d values; head kv's key t at k + kv * k_head_stride + t * k_row_stride (same for v).
// Scores and the softmax are fp32 (as the official code's softmax), the weighted sum of values is
// accumulated in fp32 and rounded once.
static void attend_heads(const uint16_t* q, int64_t d, int64_t group, const uint16_t* k, int64_t k_head_stride,
                  int64_t k_row_stride, const uint16_t* v, int64_t v_head_stride, int64_t v_row_stride, int64_t length,
                  float scale, int64_t begin, int64_t end, uint16_t* out) {
  std::vector<float> scores(length), acc(d);
  for (int64_t h = begin; h < end; ++h) {
    const uint16_t* kh = k + (h / group) * k_head_stride;
    const uint16_t* vh = v + (h / group) * v_head_stride;
    float best = -INFINITY;
    for (int64_t t = 0; t < length; ++t) {
      scores[t] = dot_bf16(q + h * d, kh + t * k_row_stride, d) * scale;
      best = std::max(best, scores[t]);
    }
    float total = 0.0f;
    for (int64_t t = 0; t < length; ++t) total += (scores[t] = std::exp(scores[t] - best));
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t t = 0; t < length; ++t) {
      const float p = scores[t] / total;
      const uint16_t* row = vh + t * v_row_stride;
      for (int64_t i = 0; i < d; ++i) acc[i] += p * bf16_to_float(row[i]);
    }
    for (int64_t i = 0; i < d; ++i) out[h * d + i] = float_to_bf16(acc[i]);
  }
}

// Rotary embedding of one head vector, half-split convention (Llama): rounded like the eager
// ``x * cos + rotate_half(x) * sin`` in bf16 (each product and the sum rounded to bf16).
static void rope_half_split(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t d, uint16_t* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float rotated = i < half ? -bf16_to_float(x[i + half]) : bf16_to_float(x[i - half]);
    const float a = bf16_to_float(float_to_bf16(bf16_to_float(x[i]) * bf16_to_float(cos[i])));
    const float b = bf16_to_float(float_to_bf16(rotated * bf16_to_float(sin[i])));
    out[i] = float_to_bf16(a + b);
  }
}

// RMSNorm of one bf16 vector (see rms_norm_bf16).
static void rms_norm_row(const uint16_t* x, const uint16_t* weight, int64_t d, float eps, uint16_t* out) {
  float squares = 0.0f;
  for (int64_t i = 0; i < d; ++i) squares += bf16_to_float(x[i]) * bf16_to_float(x[i]);
  const float inv_rms = 1.0f / std::sqrt(squares / float(d) + eps);
  for (int64_t i = 0; i < d; ++i)
    out[i] = float_to_bf16(bf16_to_float(weight[i]) * bf16_to_float(float_to_bf16(bf16_to_float(x[i]) * inv_rms)));
}


// RMSNorm of bf16 vectors (rows of the last dimension), rounded like the eager module:
// weight * bf16(x * rsqrt(mean(x^2) + eps)), the statistics in fp32.
torch::Tensor rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "rms_norm_bf16: bf16 only");
  const auto xc = x.contiguous(), wc = weight.contiguous();
  const int64_t d = wc.numel();
  TORCH_CHECK(xc.size(-1) == d, "rms_norm_bf16: weight has ", d, " values, x rows have ", xc.size(-1));
  auto out = torch::empty_like(xc);
  const uint16_t *xp = bf16_data(xc), *wp = bf16_data(wc);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  for (int64_t row = 0; row < xc.numel() / d; ++row) rms_norm_row(xp + row * d, wp, d, float(eps), op + row * d);
  return out;
}

// Several batch-1 linears in one parallel region: outs[i] = ws[i] @ xs[i] (+ biases[i]), each rounded once
// to bf16 like F.linear. Every thread takes its share of the rows of every matrix, with no barrier between
// matrices. xs[i]: K_i bf16 values; ws[i]: [N_i, K_i]; biases: empty or one (possibly undefined) per weight.
std::vector<torch::Tensor> gemv_bf16_many(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& ws,
                                          const std::vector<c10::optional<torch::Tensor>>& biases) {
  TORCH_CHECK(xs.size() == ws.size() && (biases.empty() || biases.size() == ws.size()), "gemv_bf16_many: list lengths");
  const size_t count = ws.size();
  std::vector<torch::Tensor> inputs, bias_f, outs;
  for (size_t i = 0; i < count; ++i) {
    check_matrix(ws[i], "gemv_bf16_many");
    inputs.push_back(xs[i].reshape({-1}).contiguous());
    TORCH_CHECK(inputs[i].scalar_type() == at::kBFloat16 && inputs[i].numel() == ws[i].size(1),
                "gemv_bf16_many: input ", i, " must hold ", ws[i].size(1), " bf16 values");
    const bool has_bias = !biases.empty() && biases[i].has_value() && biases[i]->defined();
    bias_f.push_back(has_bias ? biases[i]->to(at::kFloat).contiguous() : torch::Tensor());
    if (has_bias) TORCH_CHECK(bias_f[i].numel() == ws[i].size(0), "gemv_bf16_many: bias ", i, " length");
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
      gemv_rows(bf16_data(ws[i]), ws[i].stride(0), ws[i].size(1), bf16_data(inputs[i]), begin, end,
                [&](int64_t n, float sum) { out[n] = float_to_bf16(bias ? sum + bias[n] : sum); });
    }
  }
  return outs;
}


// --------------------------------------------------------------------------------------------------
// Sub-layers of one token as bodies that every thread of a parallel region runs together (they hold
// the barriers between their phases). mha_block_bf16 and ffn_block_bf16 run one body in a region of its
// own; DecodeStep runs a whole decode step (every layer, the final norm, the LM head) in one region.

namespace {

// A plain multi-head attention sub-layer: its norm, weights and caches, checked once.
struct AttentionSpec {
  const uint16_t* norm;
  float eps;
  const uint16_t* w[4];  // q [heads*d, D], k [kv*d, D], v [kv*d, D], o [D, heads*d]
  int64_t w_stride[4];
  torch::Tensor bias_f32[4];  // fp32 copies of the biases (or undefined)
  uint16_t *k_cache, *v_cache;
  int64_t k_head_stride, k_row_stride, v_head_stride, v_row_stride, cache_len;
  int64_t hidden, heads, kv_heads, d;
  float scale;
};

AttentionSpec attention_spec(const torch::Tensor& norm_weight, double eps, const std::vector<torch::Tensor>& weights,
                             const std::vector<c10::optional<torch::Tensor>>& biases, const torch::Tensor& k_cache,
                             const torch::Tensor& v_cache, double scale) {
  TORCH_CHECK(weights.size() == 4 && (biases.empty() || biases.size() == 4), "mha_block_bf16: four weights (q, k, v, o)");
  for (const auto& w : weights) check_matrix(w, "mha_block_bf16");
  for (const torch::Tensor* t : {&norm_weight, &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu(), "mha_block_bf16: bf16 CPU tensors only");
  TORCH_CHECK(norm_weight.is_contiguous(), "mha_block_bf16: the norm weight must be contiguous");
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() && k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "mha_block_bf16: caches must be [kv_heads, T, d] with contiguous rows");
  AttentionSpec s{};
  s.hidden = norm_weight.numel();
  s.kv_heads = k_cache.size(0);
  s.d = k_cache.size(2);
  s.heads = weights[0].size(0) / s.d;
  TORCH_CHECK(s.d % 2 == 0 && s.heads * s.d == weights[0].size(0) && s.heads % s.kv_heads == 0 &&
                  weights[1].size(0) == s.kv_heads * s.d && weights[2].size(0) == s.kv_heads * s.d &&
                  weights[0].size(1) == s.hidden && weights[1].size(1) == s.hidden && weights[2].size(1) == s.hidden &&
                  weights[3].size(0) == s.hidden && weights[3].size(1) == s.heads * s.d,
              "mha_block_bf16: sizes disagree");
  s.norm = bf16_data(norm_weight);
  s.eps = float(eps);
  for (int i = 0; i < 4; ++i) {
    s.w[i] = bf16_data(weights[i]);
    s.w_stride[i] = weights[i].stride(0);
    if (!biases.empty() && biases[i].has_value() && biases[i]->defined()) {
      s.bias_f32[i] = biases[i]->to(at::kFloat).contiguous();
      TORCH_CHECK(s.bias_f32[i].numel() == weights[i].size(0), "mha_block_bf16: bias ", i, " length");
    }
  }
  s.k_cache = reinterpret_cast<uint16_t*>(k_cache.data_ptr());
  s.v_cache = reinterpret_cast<uint16_t*>(v_cache.data_ptr());
  s.k_head_stride = k_cache.stride(0);
  s.k_row_stride = k_cache.stride(1);
  s.v_head_stride = v_cache.stride(0);
  s.v_row_stride = v_cache.stride(1);
  s.cache_len = k_cache.size(1);
  s.scale = float(scale);
  return s;
}

// Working memory of the attention body: written by all threads (disjoint parts), the norm per thread.
struct AttentionScratch {
  std::vector<uint16_t> normed, projected, rotated_q, attended;
  AttentionScratch(const AttentionSpec& s, int team)
      : normed(team * s.hidden), projected((s.heads + 2 * s.kv_heads) * s.d), rotated_q(s.heads * s.d), attended(s.heads * s.d) {}
};

// The claims of an attention sub-layer's two streaming phases: q/k/v rows taken together, o_proj rows.
struct AttentionClaims {
  RowClaims qkv, o;
  void reset(const AttentionSpec& s, int team) {
    qkv.reset((s.heads + 2 * s.kv_heads) * s.d, team);
    o.reset(s.hidden, team);
  }
};

inline const float* bias_of(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// out = x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))), n = RMSNorm(x); k and v are
// written to the caches at `position`, attention covers [0, position]. Each step is rounded to bf16 where
// the eager modules round (each projection, RoPE's products and sum, the attention output, the residual
// sum). `out` must not alias x. The caller's barrier must separate this from whatever reads `out`.
void attention_body(const AttentionSpec& s, const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t position,
                    uint16_t* out, AttentionScratch& scratch, AttentionClaims& claims, int thread, int team) {
  uint16_t* normed = scratch.normed.data() + thread * s.hidden;  // every thread its own copy: no barrier needed
  rms_norm_row(x, s.norm, s.hidden, s.eps, normed);
  const int64_t d = s.d;
  uint16_t* projection_out[3] = {scratch.projected.data(), scratch.projected.data() + s.heads * d,
                                 scratch.projected.data() + (s.heads + s.kv_heads) * d};
  // q, k, v projections: their rows taken together, in chunks (row r of q/k/v is row r of `projected`).
  const int64_t starts[4] = {0, s.heads * d, (s.heads + s.kv_heads) * d, (s.heads + 2 * s.kv_heads) * d};
  claims.qkv.run(thread, chunk_rows(s.hidden * 2), [&](int64_t first, int64_t last) {
    for (int i = 0; i < 3; ++i) {
      const int64_t begin = std::max(first, starts[i]) - starts[i], end = std::min(last, starts[i + 1]) - starts[i];
      if (begin >= end) continue;
      const float* bias = bias_of(s.bias_f32[i]);
      uint16_t* dst = projection_out[i];
      gemv_rows(s.w[i], s.w_stride[i], s.hidden, normed, begin, end,
                [&](int64_t n, float sum) { dst[n] = float_to_bf16(bias ? sum + bias[n] : sum); });
    }
  });
#pragma omp barrier
#pragma omp single
  {
    for (int64_t h = 0; h < s.kv_heads; ++h) {
      rope_half_split(projection_out[1] + h * d, cos, sin, d, s.k_cache + h * s.k_head_stride + position * s.k_row_stride);
      std::memcpy(s.v_cache + h * s.v_head_stride + position * s.v_row_stride, projection_out[2] + h * d, d * sizeof(uint16_t));
    }
    for (int64_t h = 0; h < s.heads; ++h) rope_half_split(projection_out[0] + h * d, cos, sin, d, scratch.rotated_q.data() + h * d);
  }  // (implicit barrier)
  {
    const auto [begin, end] = share(s.heads, thread, team);
    attend_heads(scratch.rotated_q.data(), d, s.heads / s.kv_heads, s.k_cache, s.k_head_stride, s.k_row_stride, s.v_cache,
                 s.v_head_stride, s.v_row_stride, position + 1, s.scale, begin, end, scratch.attended.data());
  }
#pragma omp barrier
  const float* bias = bias_of(s.bias_f32[3]);
  claims.o.run(thread, chunk_rows(s.heads * d * 2), [&](int64_t begin, int64_t end) {
    gemv_rows(s.w[3], s.w_stride[3], s.heads * d, scratch.attended.data(), begin, end, [&](int64_t n, float sum) {
      out[n] = float_to_bf16(bf16_to_float(x[n]) + bf16_to_float(float_to_bf16(bias ? sum + bias[n] : sum)));
    });
  });
}

struct SwigluWeights {  // one SwiGLU expert: gate/up [inter, hidden] and down [hidden, inter], compact rows
  const uint16_t *gate, *up, *down;
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

std::vector<int64_t> top_indices(const std::vector<float>& values, int64_t k) {
  std::vector<int64_t> order(values.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int64_t a, int64_t b) { return values[a] > values[b] || (values[a] == values[b] && a < b); });
  order.resize(k);
  return order;
}

// Router logits (F.linear(x.float(), weight)) of experts [begin, end).
void router_logits(const RouterSpec& r, const float* xf, int64_t hidden, int64_t begin, int64_t end, float* logits) {
  const int64_t hidden16 = hidden / 16 * 16;
  for (int64_t e = begin; e < end; ++e) {
    const float* row = r.weight + e * hidden;
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i < hidden16; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(row + i), _mm512_loadu_ps(xf + i), acc);
    float sum = _mm512_reduce_add_ps(acc);
    for (; i < hidden; ++i) sum += row[i] * xf[i];
    logits[e] = sum;
  }
}

// The chosen experts and their weights, from all router logits.
void select_experts(const RouterSpec& r, const float* logits, std::vector<int64_t>& ids, std::vector<float>& weights) {
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
struct FfnSpec {
  const uint16_t* norm;
  float eps;
  int64_t hidden;
  bool routed;  // a MoE layer
  RouterSpec router;
  const int64_t* expert_pointers;  // [experts, 3]: gate, up, down data pointers
  int64_t expert_inter;
  bool has_shared;
  SwigluWeights shared;
  int64_t max_inter_total;  // the hidden activations of every expert that can run together
};

SwigluWeights swiglu_of(const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down, int64_t hidden) {
  for (const torch::Tensor* w : {&gate, &up, &down}) {
    check_matrix(*w, "ffn_block_bf16");
    TORCH_CHECK(w->is_contiguous(), "ffn_block_bf16: expert weights must be contiguous");
  }
  const int64_t inter = gate.size(0);
  TORCH_CHECK(gate.size(1) == hidden && up.sizes() == gate.sizes() && down.size(0) == hidden && down.size(1) == inter,
              "ffn_block_bf16: SwiGLU weights do not fit a hidden size of ", hidden);
  return {bf16_data(gate), bf16_data(up), bf16_data(down), inter};
}

// A dense SwiGLU MLP (no router; `shared` = its weights) or a MoE layer: the router (fp32 weight
// [E, hidden], optional noaux_tc correction bias, the selection method and its parameters) picks top_k of
// the experts listed in `expert_table` ([E, 3] int64: data pointers of each expert's compact gate
// [inter, hidden], up [inter, hidden], down [hidden, inter] bf16 weights, kept alive by the caller), plus
// the always-on shared experts (`shared`, optional).
FfnSpec ffn_spec(const torch::Tensor& norm_weight, double eps, const c10::optional<torch::Tensor>& router_weight,
                 const c10::optional<torch::Tensor>& correction_bias, const std::string& method, const std::string& scoring,
                 int64_t top_k, int64_t n_group, int64_t topk_group, bool norm_topk_prob, double scale,
                 const c10::optional<torch::Tensor>& expert_table, int64_t expert_inter, const std::vector<torch::Tensor>& shared) {
  TORCH_CHECK(norm_weight.scalar_type() == at::kBFloat16 && norm_weight.device().is_cpu() && norm_weight.is_contiguous(),
              "ffn_block_bf16: the norm weight must be contiguous bf16 on the CPU");
  TORCH_CHECK(shared.empty() || shared.size() == 3, "ffn_block_bf16: shared = (gate, up, down) or nothing");
  FfnSpec s{};
  s.norm = bf16_data(norm_weight);
  s.eps = float(eps);
  s.hidden = norm_weight.numel();
  s.routed = router_weight.has_value() && router_weight->defined();
  if (s.routed) {
    TORCH_CHECK(expert_table.has_value() && expert_table->defined(), "ffn_block_bf16: a router needs the expert table");
    const auto& w = *router_weight;
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(1) == s.hidden,
                "ffn_block_bf16: router weight must be contiguous fp32 [experts, ", s.hidden, "]");
    const auto& table = *expert_table;
    TORCH_CHECK(table.scalar_type() == at::kLong && table.is_contiguous() && table.dim() == 2 && table.size(0) == w.size(0) &&
                    table.size(1) == 3, "ffn_block_bf16: expert table must be int64 [experts, 3]");
    TORCH_CHECK(method == "greedy" || method == "group_limited_greedy" || method == "noaux_tc", "ffn_block_bf16: method ", method);
    TORCH_CHECK(scoring == "softmax" || scoring == "sigmoid", "ffn_block_bf16: scoring ", scoring);
    const int64_t n_experts = w.size(0);
    TORCH_CHECK(top_k >= 1 && top_k <= n_experts && n_group >= 1 && n_experts % n_group == 0 && topk_group >= 1 &&
                    topk_group <= n_group, "ffn_block_bf16: routing parameters");
    TORCH_CHECK(method != "noaux_tc" || n_group == 1, "ffn_block_bf16: noaux_tc with several groups is left to the eager layers");
    TORCH_CHECK(method != "group_limited_greedy" || top_k <= topk_group * (n_experts / n_group),
                "ffn_block_bf16: group-limited routing with more experts than the kept groups hold is left to the eager layers");
    TORCH_CHECK(expert_inter > 0, "ffn_block_bf16: expert intermediate size");
    const float* bias = nullptr;
    if (method == "noaux_tc") {
      TORCH_CHECK(correction_bias.has_value() && correction_bias->defined() && correction_bias->scalar_type() == at::kFloat &&
                      correction_bias->is_contiguous() && correction_bias->numel() == n_experts,
                  "ffn_block_bf16: noaux_tc needs an fp32 correction bias per expert");
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
    s.shared = swiglu_of(shared[0], shared[1], shared[2], s.hidden);
    s.max_inter_total += s.shared.inter;
  }
  TORCH_CHECK(s.routed || s.has_shared, "ffn_block_bf16: neither a router nor shared weights");
  return s;
}

struct FfnScratch {
  std::vector<uint16_t> normed;           // [team][hidden]
  std::vector<float> normed_f32, logits;  // [team][hidden], [experts]
  std::vector<uint16_t> h;                // hidden activations of the experts that run
  std::vector<float> routed_sum;          // [hidden]
  FfnScratch(int64_t hidden, int64_t experts, int64_t inter_total, int team)
      : normed(team * hidden), normed_f32(team * hidden), logits(std::max<int64_t>(experts, 1)), h(inter_total), routed_sum(hidden) {}
};

// out = x + ffn(RMSNorm(x)): the chosen experts (weights from the router) and the shared ones, with
// PyTorch's bf16 roundings (each projection, silu and the product rounded to bf16), combined as the
// decoder layer does:
//   routed = bf16(sum_e weight_e * expert_e(n))   (fp32 sum over the chosen experts, in order)
//   y      = bf16(routed + shared(n))              (with shared experts; else y = routed, or the dense MLP)
//   out    = bf16(x + y)
// Phases: router logits (each thread its share of the experts), then the rows of every gate/up pair
// (claimed in chunks, see RowClaims; `up_claims` reset for max_inter_total rows), then every thread its
// share of the output rows, expert by expert, so each thread streams one matrix at a time. `out` must
// not alias x.
constexpr int64_t kDownChunkRows = 64;

void ffn_body(const FfnSpec& s, const uint16_t* x, uint16_t* out, FfnScratch& scratch, RowClaims& up_claims,
              RowClaims& down_claims, int thread, int team) {
  const int64_t hidden = s.hidden;
  uint16_t* normed = scratch.normed.data() + thread * hidden;
  rms_norm_row(x, s.norm, hidden, s.eps, normed);
  std::vector<SwigluWeights> experts;
  std::vector<float> weights;
  if (s.routed) {
    float* xf = scratch.normed_f32.data() + thread * hidden;
    for (int64_t i = 0; i < hidden; ++i) xf[i] = bf16_to_float(normed[i]);
    const auto [begin, end] = share(s.router.experts, thread, team);
    router_logits(s.router, xf, hidden, begin, end, scratch.logits.data());
#pragma omp barrier
    std::vector<int64_t> ids;  // every thread selects the same experts from the same logits
    select_experts(s.router, scratch.logits.data(), ids, weights);
    for (int64_t id : ids) {
      const int64_t* row = s.expert_pointers + 3 * id;
      experts.push_back({reinterpret_cast<const uint16_t*>(row[0]), reinterpret_cast<const uint16_t*>(row[1]),
                         reinterpret_cast<const uint16_t*>(row[2]), s.expert_inter});
    }
  }
  const size_t routed = experts.size();
  if (s.has_shared) experts.push_back(s.shared);
  const size_t count = experts.size();
  std::vector<int64_t> offset(count + 1, 0);  // where expert e's hidden activations start in `h`
  for (size_t e = 0; e < count; ++e) offset[e + 1] = offset[e] + experts[e].inter;
  uint16_t* h = scratch.h.data();
  // The experts' rows taken together (row r of expert e is row offset[e] + r of `h`), in chunks: for
  // each chunk the gate rows, then the up rows (one stream from memory at a time).
  up_claims.run(thread, chunk_rows(4 * hidden), [&](int64_t first, int64_t last) {
    for (size_t e = 0; e < count; ++e) {
      const int64_t begin = std::max(first, offset[e]) - offset[e], end = std::min(last, offset[e + 1]) - offset[e];
      if (begin >= end) continue;
      uint16_t* he = h + offset[e];
      gemv_rows(experts[e].gate, hidden, hidden, normed, begin, end, [&](int64_t i, float sum) {
        he[i] = float_to_bf16(silu(bf16_to_float(float_to_bf16(sum))));
      });
      gemv_rows(experts[e].up, hidden, hidden, normed, begin, end, [&](int64_t i, float sum) {
        he[i] = float_to_bf16(bf16_to_float(he[i]) * bf16_to_float(float_to_bf16(sum)));
      });
    }
  });
#pragma omp barrier
  float* routed_sum = scratch.routed_sum.data();
  auto emit = [&](int64_t n, uint16_t y) { out[n] = float_to_bf16(bf16_to_float(x[n]) + bf16_to_float(y)); };
  // The output rows in chunks (each chunk through every expert in turn: the sum over experts is in order).
  down_claims.run(thread, kDownChunkRows, [&](int64_t begin, int64_t end) {
    std::fill(routed_sum + begin, routed_sum + end, 0.0f);
    for (size_t e = 0; e < routed; ++e) {
      const float weight = weights[e];
      gemv_rows(experts[e].down, experts[e].inter, experts[e].inter, h + offset[e], begin, end,
                [&](int64_t n, float sum) { routed_sum[n] += weight * bf16_to_float(float_to_bf16(sum)); });
    }
    if (s.has_shared) {
      const SwigluWeights& shared = experts[routed];
      gemv_rows(shared.down, shared.inter, shared.inter, h + offset[routed], begin, end, [&](int64_t n, float sum) {
        const float routed_part = routed ? bf16_to_float(float_to_bf16(routed_sum[n])) : 0.0f;
        emit(n, float_to_bf16(routed_part + bf16_to_float(float_to_bf16(sum))));
      });
    } else {
      for (int64_t n = begin; n < end; ++n) emit(n, float_to_bf16(routed_sum[n]));
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

torch::Tensor one_token(const torch::Tensor& x, int64_t hidden, const char* what) {
  const auto xc = x.reshape({-1}).contiguous();
  TORCH_CHECK(xc.scalar_type() == at::kBFloat16 && xc.device().is_cpu() && xc.numel() == hidden, what, ": x must be ",
              hidden, " bf16 values on the CPU");
  return xc;
}

void check_rope(const torch::Tensor& cos, const torch::Tensor& sin, int64_t d, const char* what) {
  for (const torch::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu() && t->is_contiguous() && t->numel() == d, what,
                ": cos/sin must be ", d, " contiguous bf16 values");
}

}  // namespace

// A whole attention sub-layer of plain multi-head attention for one token, in one parallel region:
//   x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))  with n = RMSNorm(x)
// (see attention_body). weights: [q, k, v, o] ([heads*d, D], [kv*d, D], [kv*d, D], [D, heads*d]); biases:
// empty or four (possibly undefined) tensors; caches: [kv_heads, T, d]; cos/sin: d values. Returns [D] bf16.
torch::Tensor mha_block_bf16(const torch::Tensor& x, const torch::Tensor& norm_weight, double eps,
                             const std::vector<torch::Tensor>& weights, const std::vector<c10::optional<torch::Tensor>>& biases,
                             const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor k_cache, torch::Tensor v_cache,
                             int64_t position, double scale) {
  const auto nw = norm_weight.contiguous();
  const AttentionSpec spec = attention_spec(nw, eps, weights, biases, k_cache, v_cache, scale);
  const auto xc = one_token(x, spec.hidden, "mha_block_bf16");
  const auto cc = cos.contiguous(), sc = sin.contiguous();
  check_rope(cc, sc, spec.d, "mha_block_bf16");
  TORCH_CHECK(position >= 0 && position < spec.cache_len, "mha_block_bf16: position ", position, " outside the cache");
  auto out = torch::empty({spec.hidden}, xc.options());
  const int team_size = pool_threads();
  AttentionScratch scratch(spec, team_size);
  AttentionClaims claims;
  claims.reset(spec, team_size);
  in_parallel([&](int thread, int team) {
    attention_body(spec, bf16_data(xc), bf16_data(cc), bf16_data(sc), position, reinterpret_cast<uint16_t*>(out.data_ptr()),
                   scratch, claims, thread, team);
  });
  return out.view(x.sizes());
}

// The whole feed-forward sub-layer of one bf16 token in one parallel region: x + ffn(RMSNorm(x)), where
// ffn is a dense SwiGLU MLP or a MoE layer (see ffn_spec and ffn_body).
torch::Tensor ffn_block_bf16(const torch::Tensor& x, const torch::Tensor& norm_weight, double eps,
                             const c10::optional<torch::Tensor>& router_weight, const c10::optional<torch::Tensor>& correction_bias,
                             const std::string& method, const std::string& scoring, int64_t top_k, int64_t n_group,
                             int64_t topk_group, bool norm_topk_prob, double scale,
                             const c10::optional<torch::Tensor>& expert_table, int64_t expert_inter,
                             const std::vector<torch::Tensor>& shared) {
  const auto nw = norm_weight.contiguous();
  const FfnSpec spec = ffn_spec(nw, eps, router_weight, correction_bias, method, scoring, top_k, n_group, topk_group,
                                norm_topk_prob, scale, expert_table, expert_inter, shared);
  const auto xc = one_token(x, spec.hidden, "ffn_block_bf16");
  auto out = torch::empty_like(xc);
  const int team_size = pool_threads();
  FfnScratch scratch(spec.hidden, spec.routed ? spec.router.experts : 0, spec.max_inter_total, team_size);
  RowClaims up_claims, down_claims;
  up_claims.reset(spec.max_inter_total, team_size);
  down_claims.reset(spec.hidden, team_size);
  in_parallel([&](int thread, int team) {
    ffn_body(spec, bf16_data(xc), reinterpret_cast<uint16_t*>(out.data_ptr()), scratch, up_claims, down_claims, thread, team);
  });
  return out.view(x.sizes());
}

// --------------------------------------------------------------------------------------------------
// A whole decode step of a plain-attention model in one parallel region: the token's embedding, every
// decoder layer (attention_body, ffn_body), the final RMSNorm and the LM head, with no Python and no
// thread wake-up between them. Built once per model and cache (the Python side adds the layers with the
// same arguments as mha_block_bf16 / ffn_block_bf16 and keeps the tensors alive); step() returns the
// logits as the eager model does: fp32 values of the bf16 LM-head output.
class DecodeStep {
 public:
  DecodeStep(const torch::Tensor& embedding, const torch::Tensor& cos_table, const torch::Tensor& sin_table,
             const torch::Tensor& final_norm, double final_eps, const torch::Tensor& lm_head)
      : embedding_(embedding), cos_(cos_table.contiguous()), sin_(sin_table.contiguous()), final_norm_(final_norm.contiguous()),
        lm_head_(lm_head), final_eps_(float(final_eps)) {
    check_matrix(embedding_, "DecodeStep");
    check_matrix(lm_head_, "DecodeStep");
    hidden_ = embedding_.size(1);
    TORCH_CHECK(lm_head_.size(1) == hidden_ && final_norm_.numel() == hidden_ && final_norm_.scalar_type() == at::kBFloat16,
                "DecodeStep: embedding, final norm and LM head disagree on the hidden size");
    TORCH_CHECK(cos_.dim() == 2 && sin_.sizes() == cos_.sizes() && cos_.scalar_type() == at::kBFloat16 &&
                    sin_.scalar_type() == at::kBFloat16, "DecodeStep: RoPE tables must be bf16 [positions, d]");
  }

  void add_layer(const torch::Tensor& attn_norm, double attn_eps, const std::vector<torch::Tensor>& weights,
                 const std::vector<c10::optional<torch::Tensor>>& biases, const torch::Tensor& k_cache,
                 const torch::Tensor& v_cache, double scale, const torch::Tensor& ffn_norm, double ffn_eps,
                 const c10::optional<torch::Tensor>& router_weight, const c10::optional<torch::Tensor>& correction_bias,
                 const std::string& method, const std::string& scoring, int64_t top_k, int64_t n_group, int64_t topk_group,
                 bool norm_topk_prob, double routed_scale, const c10::optional<torch::Tensor>& expert_table,
                 int64_t expert_inter, const std::vector<torch::Tensor>& shared) {
    keep_alive_.push_back(attn_norm.contiguous());
    const AttentionSpec attention = attention_spec(keep_alive_.back(), attn_eps, weights, biases, k_cache, v_cache, scale);
    keep_alive_.push_back(ffn_norm.contiguous());
    const FfnSpec ffn = ffn_spec(keep_alive_.back(), ffn_eps, router_weight, correction_bias, method, scoring, top_k, n_group,
                                 topk_group, norm_topk_prob, routed_scale, expert_table, expert_inter, shared);
    TORCH_CHECK(attention.hidden == hidden_ && ffn.hidden == hidden_, "DecodeStep: layer sizes disagree with the embedding");
    TORCH_CHECK(cos_.size(1) == attention.d, "DecodeStep: RoPE tables are for head size ", cos_.size(1));
    for (const auto& t : weights) keep_alive_.push_back(t);
    for (const torch::Tensor* t : {&k_cache, &v_cache}) keep_alive_.push_back(*t);
    for (const auto* t : {&router_weight, &correction_bias, &expert_table})
      if (t->has_value() && (*t)->defined()) keep_alive_.push_back(**t);
    for (const auto& t : shared) keep_alive_.push_back(t);
    attention_.push_back(attention);
    ffn_.push_back(ffn);
  }

  // Logits [V] fp32 of `token` at `position` (its key and value are written to every layer's cache).
  torch::Tensor step(int64_t token, int64_t position) {
    TORCH_CHECK(!attention_.empty(), "DecodeStep: no layers");
    TORCH_CHECK(token >= 0 && token < embedding_.size(0), "DecodeStep: token id ", token, " outside the vocabulary");
    TORCH_CHECK(position >= 0 && position < cos_.size(0), "DecodeStep: position ", position, " outside the RoPE table");
    for (const auto& a : attention_)
      TORCH_CHECK(position < a.cache_len, "DecodeStep: position ", position, " outside the cache");
    const int team_size = pool_threads();
    if (!scratch_ready_ || team_size != scratch_team_) make_scratch(team_size);
    for (size_t layer = 0; layer < attention_.size(); ++layer) {
      attention_claims_[layer].reset(attention_[layer], team_size);
      up_claims_[layer].reset(ffn_[layer].max_inter_total, team_size);
      down_claims_[layer].reset(hidden_, team_size);
    }
    lm_head_claims_.reset(lm_head_.size(0), team_size);
    const int64_t vocab = lm_head_.size(0), d = cos_.size(1);
    auto logits = torch::empty({vocab}, torch::dtype(torch::kFloat32));
    float* lp = logits.data_ptr<float>();
    uint16_t *x = x_.data(), *mid = mid_.data();
    std::memcpy(x, bf16_data(embedding_) + token * embedding_.stride(0), hidden_ * sizeof(uint16_t));
    const uint16_t* cos = bf16_data(cos_) + position * d;
    const uint16_t* sin = bf16_data(sin_) + position * d;
    in_parallel([&](int thread, int team) {
      for (size_t layer = 0; layer < attention_.size(); ++layer) {
        attention_body(attention_[layer], x, cos, sin, position, mid, *attention_scratch_, attention_claims_[layer], thread, team);
#pragma omp barrier
        ffn_body(ffn_[layer], mid, x, *ffn_scratch_, up_claims_[layer], down_claims_[layer], thread, team);
#pragma omp barrier
      }
      uint16_t* normed = final_normed_.data() + thread * hidden_;
      rms_norm_row(x, bf16_data(final_norm_), hidden_, final_eps_, normed);
      lm_head_claims_.run(thread, chunk_rows(hidden_ * 2), [&](int64_t begin, int64_t end) {
        gemv_rows(bf16_data(lm_head_), lm_head_.stride(0), hidden_, normed, begin, end,
                  [&](int64_t n, float sum) { lp[n] = bf16_to_float(float_to_bf16(sum)); });
      });
    });
    return logits;
  }

 private:
  void make_scratch(int team) {
    int64_t experts = 0, inter_total = 0;
    for (const auto& f : ffn_) {
      experts = std::max(experts, f.routed ? f.router.experts : 0);
      inter_total = std::max(inter_total, f.max_inter_total);
    }
    attention_scratch_ = std::make_unique<AttentionScratch>(attention_[0], team);
    for (const auto& a : attention_)  // (layers of one model share their shapes; the largest wins anyway)
      if (a.heads * a.d > attention_[0].heads * attention_[0].d) attention_scratch_ = std::make_unique<AttentionScratch>(a, team);
    ffn_scratch_ = std::make_unique<FfnScratch>(hidden_, experts, inter_total, team);
    attention_claims_ = std::vector<AttentionClaims>(attention_.size());
    up_claims_ = std::vector<RowClaims>(ffn_.size());
    down_claims_ = std::vector<RowClaims>(ffn_.size());
    x_.assign(hidden_, 0);
    mid_.assign(hidden_, 0);
    final_normed_.assign(team * hidden_, 0);
    scratch_team_ = team;
    scratch_ready_ = true;
  }

  torch::Tensor embedding_, cos_, sin_, final_norm_, lm_head_;
  float final_eps_;
  int64_t hidden_ = 0;
  std::vector<AttentionSpec> attention_;
  std::vector<FfnSpec> ffn_;
  std::vector<torch::Tensor> keep_alive_;
  std::unique_ptr<AttentionScratch> attention_scratch_;
  std::unique_ptr<FfnScratch> ffn_scratch_;
  std::vector<AttentionClaims> attention_claims_;
  std::vector<RowClaims> up_claims_, down_claims_;
  RowClaims lm_head_claims_;
  std::vector<uint16_t> x_, mid_, final_normed_;
  int scratch_team_ = 0;
  bool scratch_ready_ = false;
};

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_claims_trace", &row_claims_trace, "test hook: the thread that processed each row claimed in chunks");
  m.def("gemv_bf16", &gemv_bf16, "bf16 batch-1 linear with AVX512-BF16", pybind11::arg("x"), pybind11::arg("w"),
        pybind11::arg("bias") = pybind11::none());
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm of bf16 rows");
  m.def("gemv_bf16_many", &gemv_bf16_many, "several bf16 batch-1 linears in one parallel region");
  m.def("ffn_block_bf16", &ffn_block_bf16, "RMSNorm + router + chosen and shared experts (or a dense MLP) + residual, one token");
  m.def("mha_block_bf16", &mha_block_bf16, "RMSNorm + q/k/v + RoPE + cache write + attention + o_proj + residual, one token");
  pybind11::class_<DecodeStep>(m, "DecodeStep", "a whole bf16 decode step of a plain-attention model in one parallel region")
      .def(pybind11::init<const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, double,
                          const torch::Tensor&>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("step", &DecodeStep::step);
}
