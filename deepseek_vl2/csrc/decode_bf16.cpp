// Batch-1 (decode) kernels for bf16 weights on x86 CPUs with AVX512-BF16.
//
// Decoding streams every active weight once per token, so these loops only have to keep up with memory.
// vdpbf16ps multiplies 32 bf16 pairs and accumulates them into 16 fp32 lanes in one instruction, with no
// separate bf16 -> fp32 conversion; PyTorch's generic bf16 kernel converts first and tops out at ~47 GB/s
// on the 2-core EPYC this was measured on, where this one reaches ~62 GB/s (the memory's read rate).
//
// Every call has a fixed cost (Python, pybind, waking the thread pool, the hardware prefetchers ramping up
// on a new matrix), which is large next to one expert's 2.3 MB. So the layer-level kernels below take all
// matrices of a step at once and run them in one parallel region: gemv_bf16_many (q/k/v, ...) and
// swiglu_moe_bf16 (a token through its chosen experts and the shared ones).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

void check_matrix(const torch::Tensor& w, const char* what) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.device().is_cpu(), what, ": bf16 CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, what, ": weights must be 2-D with contiguous rows");
}

}  // namespace

// x: K bf16 values (any shape with K elements); w: [N, K] bf16, rows contiguous (any row stride);
// bias: [N] bf16 or undefined. Returns [N] bf16: the fp32 sum (+ bias) rounded once, as F.linear does.
torch::Tensor gemv_bf16(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 tensors only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv_bf16: CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "gemv_bf16: weight must be 2-D with contiguous rows");
  const auto xc = x.reshape({-1}).contiguous();
  const int64_t rows = w.size(0), cols = w.size(1), row_stride = w.stride(0);
  TORCH_CHECK(xc.numel() == cols, "gemv_bf16: x has ", xc.numel(), " values, weight rows have ", cols);

  torch::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == rows, "gemv_bf16: bias has ", bias->numel(), " values, weight has ", rows, " rows");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto out = torch::empty({rows}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t cols64 = cols / 64 * 64, cols32 = cols / 32 * 32;

  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* row = wp + n * row_stride;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k < cols64; k += 64) {  // two independent accumulators hide the instruction's latency
        acc0 = _mm512_dpbf16_ps(acc0, load_bf16x32(row + k), load_bf16x32(xp + k));
        acc1 = _mm512_dpbf16_ps(acc1, load_bf16x32(row + k + 32), load_bf16x32(xp + k + 32));
      }
      for (; k < cols32; k += 32) acc0 = _mm512_dpbf16_ps(acc0, load_bf16x32(row + k), load_bf16x32(xp + k));
      float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
      for (; k < cols; ++k) sum += bf16_to_float(row[k]) * bf16_to_float(xp[k]);
      op[n] = float_to_bf16(bp ? sum + bp[n] : sum);
    }
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

// Decode attention for one query token over a bf16 cache, no copies of the cache:
// q: [heads, d]; k, v: [kv_heads, T, d] (rows contiguous, any other strides, e.g. views of the
// preallocated cache). Returns [heads, d] bf16.
torch::Tensor attend_one_query_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "attend_one_query_bf16: bf16 only");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes(), "attend_one_query_bf16: shapes");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "attend_one_query_bf16: cache rows must be contiguous");
  const auto qc = q.contiguous();
  const int64_t heads = qc.size(0), d = qc.size(1), kv_heads = k.size(0);
  TORCH_CHECK(k.size(2) == d && heads % kv_heads == 0, "attend_one_query_bf16: head sizes disagree");
  auto out = torch::empty({heads, d}, q.options());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    attend_heads(bf16_data(qc), d, heads / kv_heads, bf16_data(k), k.stride(0), k.stride(1), bf16_data(v), v.stride(0),
                 v.stride(1), k.size(1), float(scale), begin, end, op);
  });
  return out;
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

// A whole attention sub-layer of plain multi-head attention for one token, in one parallel region:
//   x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))  with n = RMSNorm(x),
// k and v written to the caches at `position`, attention over [0, position]. Every step is rounded to bf16
// where the eager modules round (each projection, RoPE's products and sum, the attention output, the sum
// with the residual). weights: [q, k, v, o] ([heads*d, D], [kv*d, D], [kv*d, D], [D, heads*d]); biases:
// empty or four (possibly undefined) tensors; caches: [kv_heads, T, d]. Returns [D] bf16.
torch::Tensor mha_block_bf16(const torch::Tensor& x, const torch::Tensor& norm_weight, double eps,
                             const std::vector<torch::Tensor>& weights, const std::vector<c10::optional<torch::Tensor>>& biases,
                             const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor k_cache, torch::Tensor v_cache,
                             int64_t position, double scale) {
  TORCH_CHECK(weights.size() == 4 && (biases.empty() || biases.size() == 4), "mha_block_bf16: four weights (q, k, v, o)");
  for (const auto& w : weights) check_matrix(w, "mha_block_bf16");
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&x, &norm_weight, &cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu(), "mha_block_bf16: bf16 CPU tensors only");
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() && k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "mha_block_bf16: caches must be [kv_heads, T, d] with contiguous rows");
  const auto xc = x.reshape({-1}).contiguous(), nw = norm_weight.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  const int64_t hidden = xc.numel(), kv_heads = k_cache.size(0), d = k_cache.size(2), heads = weights[0].size(0) / d;
  TORCH_CHECK(position >= 0 && position < k_cache.size(1), "mha_block_bf16: position ", position, " outside the cache");
  TORCH_CHECK(nw.numel() == hidden && d % 2 == 0 && cc.numel() == d && sc.numel() == d && heads * d == weights[0].size(0) &&
                  heads % kv_heads == 0 && weights[1].size(0) == kv_heads * d && weights[2].size(0) == kv_heads * d &&
                  weights[0].size(1) == hidden && weights[1].size(1) == hidden && weights[2].size(1) == hidden &&
                  weights[3].size(0) == hidden && weights[3].size(1) == heads * d,
              "mha_block_bf16: sizes disagree");
  std::vector<torch::Tensor> bias_f(4);
  for (size_t i = 0; i < biases.size(); ++i)
    if (biases[i].has_value() && biases[i]->defined()) bias_f[i] = biases[i]->to(at::kFloat).contiguous();

  std::vector<uint16_t> normed(hidden), projected(weights[0].size(0) + 2 * kv_heads * d), rotated_q(heads * d), attended(heads * d);
  rms_norm_row(bf16_data(xc), bf16_data(nw), hidden, float(eps), normed.data());
  uint16_t* projection_out[3] = {projected.data(), projected.data() + heads * d, projected.data() + (heads + kv_heads) * d};
  auto* kcache = reinterpret_cast<uint16_t*>(k_cache.data_ptr());
  auto* vcache = reinterpret_cast<uint16_t*>(v_cache.data_ptr());
  auto out = torch::empty({hidden}, xc.options());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const uint16_t* xp = bf16_data(xc);
  const int threads = pool_threads();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
    for (int i = 0; i < 3; ++i) {  // q, k, v projections: every thread its share of each
      const float* bias = bias_f[i].defined() ? bias_f[i].data_ptr<float>() : nullptr;
      const auto [begin, end] = share(weights[i].size(0), thread, team);
      uint16_t* dst = projection_out[i];
      gemv_rows(bf16_data(weights[i]), weights[i].stride(0), hidden, normed.data(), begin, end,
                [&](int64_t n, float sum) { dst[n] = float_to_bf16(bias ? sum + bias[n] : sum); });
    }
#pragma omp barrier
#pragma omp single
    {
      for (int64_t h = 0; h < kv_heads; ++h) {
        rope_half_split(projection_out[1] + h * d, bf16_data(cc), bf16_data(sc), d,
                        kcache + h * k_cache.stride(0) + position * k_cache.stride(1));
        std::memcpy(vcache + h * v_cache.stride(0) + position * v_cache.stride(1), projection_out[2] + h * d, d * sizeof(uint16_t));
      }
      for (int64_t h = 0; h < heads; ++h)
        rope_half_split(projection_out[0] + h * d, bf16_data(cc), bf16_data(sc), d, rotated_q.data() + h * d);
    }  // (implicit barrier)
    {
      const auto [begin, end] = share(heads, thread, team);
      attend_heads(rotated_q.data(), d, heads / kv_heads, kcache, k_cache.stride(0), k_cache.stride(1), vcache,
                   v_cache.stride(0), v_cache.stride(1), position + 1, float(scale), begin, end, attended.data());
    }
#pragma omp barrier
    const float* bias = bias_f[3].defined() ? bias_f[3].data_ptr<float>() : nullptr;
    const auto [begin, end] = share(hidden, thread, team);
    gemv_rows(bf16_data(weights[3]), weights[3].stride(0), heads * d, attended.data(), begin, end, [&](int64_t n, float sum) {
      op[n] = float_to_bf16(bf16_to_float(xp[n]) + bf16_to_float(float_to_bf16(bias ? sum + bias[n] : sum)));
    });
  }
  return out.view(x.sizes());
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

// The MoE router's logits for one token: fp32 weights [E, D] times the bf16 token upcast to fp32 (as
// F.linear(x.float(), weight)). Single-threaded: the weight is a few hundred KB, less than the cost of
// waking the thread pool.
torch::Tensor router_logits_f32(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kFloat && weight.dim() == 2 &&
                  weight.stride(1) == 1, "router_logits_f32: bf16 x and a 2-D fp32 weight with contiguous rows");
  const auto xc = x.reshape({-1}).contiguous();
  const int64_t experts = weight.size(0), d = weight.size(1);
  TORCH_CHECK(xc.numel() == d, "router_logits_f32: x has ", xc.numel(), " values, weight rows have ", d);
  std::vector<float> xf(d);
  for (int64_t i = 0; i < d; ++i) xf[i] = bf16_to_float(bf16_data(xc)[i]);
  auto out = torch::empty({1, experts}, weight.options());
  float* op = out.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t d16 = d / 16 * 16;
  for (int64_t e = 0; e < experts; ++e) {
    const float* row = wp + e * weight.stride(0);
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i < d16; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(row + i), _mm512_loadu_ps(xf.data() + i), acc);
    float sum = _mm512_reduce_add_ps(acc);
    for (; i < d; ++i) sum += row[i] * xf[i];
    op[e] = sum;
  }
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

// One token through SwiGLU experts, ``down(silu(gate(x)) * up(x))``, with PyTorch's bf16 roundings (each
// projection, silu and the product are rounded to bf16), combined as the MoE layer does:
//   routed = bf16(sum_e weights[e] * expert_e(x))   (fp32 sum over the first n_routed experts, in order)
//   out    = bf16(routed + shared(x))                (when the lists hold one more, shared, expert)
//   out    = bf16(residual + out)                    (when a residual [D] is given: the decoder's sum)
// x: [D] bf16; gates/ups: [I_e, D]; downs: [D, I_e]. Two phases in one parallel region: every thread
// computes its share of the rows of every gate/up pair, then (after a barrier) its share of the output
// rows, expert by expert, so each thread streams one matrix at a time.
torch::Tensor swiglu_moe_bf16(const torch::Tensor& x, const std::vector<torch::Tensor>& gates,
                              const std::vector<torch::Tensor>& ups, const std::vector<torch::Tensor>& downs,
                              const std::vector<double>& weights, const c10::optional<torch::Tensor>& residual) {
  const size_t experts = gates.size(), routed = weights.size();
  TORCH_CHECK(ups.size() == experts && downs.size() == experts && (experts == routed || experts == routed + 1),
              "swiglu_moe_bf16: gates/ups/downs must list the routed experts (one weight each), then optionally a shared one");
  const auto xc = x.reshape({-1}).contiguous();
  TORCH_CHECK(xc.scalar_type() == at::kBFloat16, "swiglu_moe_bf16: x must be bf16");
  const int64_t hidden = xc.numel();
  std::vector<int64_t> offset(experts + 1, 0);  // where expert e's hidden activations start in `h`
  for (size_t e = 0; e < experts; ++e) {
    check_matrix(gates[e], "swiglu_moe_bf16");
    check_matrix(ups[e], "swiglu_moe_bf16");
    check_matrix(downs[e], "swiglu_moe_bf16");
    const int64_t inter = gates[e].size(0);
    TORCH_CHECK(gates[e].size(1) == hidden && ups[e].sizes() == gates[e].sizes() && downs[e].size(0) == hidden &&
                    downs[e].size(1) == inter,
                "swiglu_moe_bf16: expert ", e, " has shapes that do not fit a hidden size of ", hidden);
    offset[e + 1] = offset[e] + inter;
  }
  std::vector<uint16_t> h(offset[experts]);
  std::vector<float> routed_sum(hidden, 0.0f);

  auto out = torch::empty({hidden}, xc.options());
  const uint16_t* xp = bf16_data(xc);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const bool has_shared = experts > routed;
  torch::Tensor residual_c;
  if (residual.has_value() && residual->defined()) {
    residual_c = residual->reshape({-1}).contiguous();
    TORCH_CHECK(residual_c.scalar_type() == at::kBFloat16 && residual_c.numel() == hidden, "swiglu_moe_bf16: residual must be ", hidden, " bf16 values");
  }
  const uint16_t* res = residual_c.defined() ? bf16_data(residual_c) : nullptr;
  auto emit = [&](int64_t n, uint16_t y) { op[n] = res ? float_to_bf16(bf16_to_float(res[n]) + bf16_to_float(y)) : y; };
  const int threads = pool_threads();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
    for (size_t e = 0; e < experts; ++e) {
      const auto [begin, end] = share(gates[e].size(0), thread, team);
      // The gate rows, then the up rows: one stream from memory at a time.
      uint16_t* he = h.data() + offset[e];
      gemv_rows(bf16_data(gates[e]), gates[e].stride(0), hidden, xp, begin, end, [&](int64_t i, float sum) {
        he[i] = float_to_bf16(silu(bf16_to_float(float_to_bf16(sum))));
      });
      gemv_rows(bf16_data(ups[e]), ups[e].stride(0), hidden, xp, begin, end, [&](int64_t i, float sum) {
        he[i] = float_to_bf16(bf16_to_float(he[i]) * bf16_to_float(float_to_bf16(sum)));
      });
    }
#pragma omp barrier
    const auto [begin, end] = share(hidden, thread, team);
    for (size_t e = 0; e < routed; ++e) {
      const float weight = float(weights[e]);
      gemv_rows(bf16_data(downs[e]), downs[e].stride(0), downs[e].size(1), h.data() + offset[e], begin, end,
                [&](int64_t n, float sum) { routed_sum[n] += weight * bf16_to_float(float_to_bf16(sum)); });
    }
    if (has_shared) {
      const size_t e = routed;
      gemv_rows(bf16_data(downs[e]), downs[e].stride(0), downs[e].size(1), h.data() + offset[e], begin, end,
                [&](int64_t n, float sum) {
                  const float routed_part = routed ? bf16_to_float(float_to_bf16(routed_sum[n])) : 0.0f;
                  emit(n, float_to_bf16(routed_part + bf16_to_float(float_to_bf16(sum))));
                });
    } else {
      for (int64_t n = begin; n < end; ++n) emit(n, float_to_bf16(routed_sum[n]));
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend_one_query_bf16", &attend_one_query_bf16, "single-query attention over a bf16 cache");
  m.def("gemv_bf16", &gemv_bf16, "bf16 batch-1 linear with AVX512-BF16", pybind11::arg("x"), pybind11::arg("w"),
        pybind11::arg("bias") = pybind11::none());
  m.def("router_logits_f32", &router_logits_f32, "fp32 router logits of one bf16 token");
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm of bf16 rows");
  m.def("gemv_bf16_many", &gemv_bf16_many, "several bf16 batch-1 linears in one parallel region");
  m.def("swiglu_moe_bf16", &swiglu_moe_bf16, "one token through weighted SwiGLU experts (+ a shared one)",
        pybind11::arg("x"), pybind11::arg("gates"), pybind11::arg("ups"), pybind11::arg("downs"), pybind11::arg("weights"),
        pybind11::arg("residual") = pybind11::none());
  m.def("mha_block_bf16", &mha_block_bf16, "RMSNorm + q/k/v + RoPE + cache write + attention + o_proj + residual, one token");
}
