// A whole decode step in one parallel region (DecodeStep), the single sub-layer calls (mha_block, mla_block,
// ffn_block) and the linears of one row, with their Python bindings (bind_layer_kernels).
//
// A step decodes one token of each of several sequences (rows; the serving engine's batch): every weight
// matrix is streamed once for all the rows, and in a MoE layer each expert chosen by any row is streamed
// once for the rows routed to it. Each row's arithmetic is exactly what it is alone (the same sums in the
// same order), so a row's logits never depend on the other rows of its step (bf16 on AMX tiles aside: see
// tiles_min_rows in dense.h).
//
// Every call has a fixed cost (Python, pybind, waking the thread pool, the hardware prefetchers ramping up
// on a new matrix), which is large next to one expert's 2.3 MB. So the kernels take whole sub-layers and a
// whole decode step, each in one parallel region. Every step is rounded to the storage type where the eager
// PyTorch modules round (for fp32 the roundings are no-ops).
#pragma once
#include "ffn.h"
#include "gemv_args.h"
#include "mla.h"
#include "sampling.h"

#include <limits>
#include <string>
#include <utility>

namespace decode {

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
                        const std::vector<std::vector<torch::Tensor>>& weights,
                        const std::vector<c10::optional<torch::Tensor>>& biases,
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
                        const torch::Tensor& norm_weight, double eps, const std::vector<std::vector<torch::Tensor>>& weights,
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
                             const c10::optional<torch::Tensor>& expert_table, int64_t expert_inter, int64_t expert_format,
                             int64_t expert_group, const std::vector<std::vector<torch::Tensor>>& shared) {
  const auto nw = norm_weight.contiguous();
  const FfnSpec<T> spec = ffn_spec<T>(nw, eps, router_weight, correction_bias, method, scoring, top_k, n_group, topk_group,
                                      norm_topk_prob, scale, expert_table, expert_inter, expert_format, expert_group, shared);
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
             const torch::Tensor& final_norm, double final_eps, const std::vector<torch::Tensor>& lm_head)
      : embedding_(embedding), cos_(cos_table.contiguous()), sin_(sin_table.contiguous()), final_norm_(final_norm.contiguous()),
        lm_head_(matrix_of<T>(lm_head, "DecodeStep")), final_eps_(float(final_eps)) {
    check_matrix<T>(embedding_, "DecodeStep");
    for (const auto& t : lm_head) keep_alive_.push_back(t);
    hidden_ = embedding_.size(1);
    DECODE_CHECK(lm_head_.cols == hidden_ && final_norm_.numel() == hidden_ && final_norm_.scalar_type() == S::kType,
                 "DecodeStep: embedding, final norm and LM head disagree on the hidden size");
    DECODE_CHECK(cos_.dim() == 2 && sin_.sizes() == cos_.sizes() && cos_.scalar_type() == S::kType &&
                     sin_.scalar_type() == S::kType, "DecodeStep: RoPE tables must be [positions, d] of the weights' dtype");
  }

  // A layer with plain multi-head attention (the arguments of mha_block, then those of ffn_block).
  void add_layer(const torch::Tensor& attn_norm, double attn_eps, const std::vector<std::vector<torch::Tensor>>& weights,
                 const std::vector<c10::optional<torch::Tensor>>& biases, const torch::Tensor& k_cache,
                 const torch::Tensor& v_cache, double scale, const torch::Tensor& ffn_norm, double ffn_eps,
                 const c10::optional<torch::Tensor>& router_weight, const c10::optional<torch::Tensor>& correction_bias,
                 const std::string& method, const std::string& scoring, int64_t top_k, int64_t n_group, int64_t topk_group,
                 bool norm_topk_prob, double routed_scale, const c10::optional<torch::Tensor>& expert_table,
                 int64_t expert_inter, int64_t expert_format, int64_t expert_group,
                 const std::vector<std::vector<torch::Tensor>>& shared) {
    DECODE_CHECK(mla_.empty(), "DecodeStep: every layer must have the same kind of attention");
    keep_alive_.push_back(attn_norm.contiguous());
    const AttentionSpec<T> attention = attention_spec<T>(keep_alive_.back(), attn_eps, weights, biases, k_cache, v_cache, scale);
    DECODE_CHECK(attention.hidden == hidden_, "DecodeStep: layer sizes disagree with the embedding");
    DECODE_CHECK(attention_.empty() || (attention.heads == attention_[0].heads && attention.kv_heads == attention_[0].kv_heads &&
                                        attention.d == attention_[0].d),
                 "DecodeStep: every layer's attention must have the first one's heads and head size");
    DECODE_CHECK(cos_.size(1) == attention.d, "DecodeStep: RoPE tables are for head size ", cos_.size(1));
    keep(weights);
    for (const torch::Tensor* t : {&k_cache, &v_cache}) keep_alive_.push_back(*t);
    check_slots(attention.slots);
    add_ffn(ffn_norm, ffn_eps, router_weight, correction_bias, method, scoring, top_k, n_group, topk_group, norm_topk_prob,
            routed_scale, expert_table, expert_inter, expert_format, expert_group, shared);
    attention_.push_back(attention);
  }

  // A layer with multi-head latent attention (the arguments of mla_block after the position, then those
  // of ffn_block).
  void add_mla_layer(const torch::Tensor& attn_norm, double attn_eps, const std::vector<std::vector<torch::Tensor>>& weights,
                     const std::vector<c10::optional<torch::Tensor>>& biases, const torch::Tensor& kv_a_norm, double kv_a_eps,
                     const c10::optional<torch::Tensor>& q_a_norm, double q_a_eps, const torch::Tensor& latent_cache,
                     const torch::Tensor& k_pe_cache, int64_t heads, int64_t nope, int64_t rope, int64_t v, double scale,
                     const torch::Tensor& ffn_norm, double ffn_eps, const c10::optional<torch::Tensor>& router_weight,
                     const c10::optional<torch::Tensor>& correction_bias, const std::string& method,
                     const std::string& scoring, int64_t top_k, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                     double routed_scale, const c10::optional<torch::Tensor>& expert_table, int64_t expert_inter,
                     int64_t expert_format, int64_t expert_group, const std::vector<std::vector<torch::Tensor>>& shared) {
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
    keep(weights);
    for (const torch::Tensor* t : {&latent_cache, &k_pe_cache}) keep_alive_.push_back(*t);
    check_slots(mla.slots);
    add_ffn(ffn_norm, ffn_eps, router_weight, correction_bias, method, scoring, top_k, n_group, topk_group, norm_topk_prob,
            routed_scale, expert_table, expert_inter, expert_format, expert_group, shared);
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
    lm_head_claims_.reset(lm_head_.rows, team_size);
    const int64_t vocab = lm_head_.rows, d = cos_.size(1);
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
      const Operands<T> normed_in = operands<T>(lm_head_.format, inputs, rows_count, hidden_);
      lm_head_claims_.run(thread, chunk_rows(lm_head_.row_bytes()), [&](int64_t begin, int64_t end) {
        gemv_rows_multi(lm_head_, normed_in, begin, end, [&](int64_t n, int b, float sum) {
          float& logit = lp[b * vocab + n];
          logit = S::round(sum);
          parts[b].offer(n, logit);
        });
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
               const c10::optional<torch::Tensor>& expert_table, int64_t expert_inter, int64_t expert_format,
               int64_t expert_group, const std::vector<std::vector<torch::Tensor>>& shared) {
    keep_alive_.push_back(ffn_norm.contiguous());
    const FfnSpec<T> ffn = ffn_spec<T>(keep_alive_.back(), ffn_eps, router_weight, correction_bias, method, scoring, top_k, n_group,
                                       topk_group, norm_topk_prob, routed_scale, expert_table, expert_inter, expert_format,
                                       expert_group, shared);
    DECODE_CHECK(ffn.hidden == hidden_, "DecodeStep: layer sizes disagree with the embedding");
    for (const auto* t : {&router_weight, &correction_bias, &expert_table})
      if (t->has_value() && (*t)->defined()) keep_alive_.push_back(**t);
    keep(shared);
    ffn_.push_back(ffn);
  }

  void keep(const std::vector<std::vector<torch::Tensor>>& matrices) {
    for (const auto& parts : matrices)
      for (const auto& t : parts) keep_alive_.push_back(t);
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

  torch::Tensor embedding_, cos_, sin_, final_norm_;
  Matrix<T> lm_head_;
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

// A quantized linear of one row: x (K values of the storage type), matrix [weight_packed, weight_scale]
// (matrix.h), bias [N] or undefined. Returns [N] in the storage type, the fp32 sum (+ bias) rounded once.
template <typename T>
torch::Tensor quantized_gemv(const torch::Tensor& x, const std::vector<torch::Tensor>& matrix,
                             const c10::optional<torch::Tensor>& bias) {
  DECODE_CHECK(matrix.size() == 2, "gemv_q: a quantized matrix [weight_packed, weight_scale]");
  const Matrix<T> w = matrix_of<T>(matrix, "gemv_q");
  const auto xc = x.reshape({-1}).contiguous();
  DECODE_CHECK(xc.scalar_type() == Storage<T>::kType && xc.device().is_cpu() && xc.numel() == w.cols, "gemv_q: x must be ",
               w.cols, " ", Storage<T>::kType, " values on the CPU");
  const torch::Tensor bias_f32 = fp32_bias("gemv_q", bias, w.rows);
  const float* bp = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  auto out = torch::empty({w.rows}, xc.options());
  auto* op = reinterpret_cast<T*>(out.data_ptr());
  const T* input = data_of<T>(xc);
  RowClaims claims;
  claims.reset(w.rows, pool_threads());
  in_parallel([&](int thread, int team) {
    const Operands<T> in = operands<T>(w.format, &input, 1, w.cols);
    claims.run(thread, chunk_rows(w.row_bytes()), [&](int64_t begin, int64_t end) {
      gemv_rows_multi(w, in, begin, end, [&](int64_t n, int, float sum) { op[n] = Storage<T>::store(bp ? sum + bp[n] : sum); });
    });
  });
  return out;
}

// y[j] = w @ xs[j] (+ bias) for the rows of xs [count, K] (storage type) with a quantized matrix (matrix.h):
// [count, N] of the storage type, each sum rounded once, every thread of the pool claiming chunks of the
// weight rows. A few prompt rows routed to one expert multiply the stored integers without dequantizing
// the matrix first (quantize.quantized_linear).
template <typename T>
torch::Tensor quantized_rows(const torch::Tensor& xs, const std::vector<torch::Tensor>& matrix,
                             const c10::optional<torch::Tensor>& bias) {
  DECODE_CHECK(matrix.size() == 2, "rows_q: a quantized matrix [weight_packed, weight_scale]");
  const Matrix<T> w = matrix_of<T>(matrix, "rows_q");
  const auto x = xs.contiguous();
  DECODE_CHECK(x.scalar_type() == Storage<T>::kType && x.dim() == 2 && x.size(1) == w.cols && x.size(0) >= 1 &&
                   x.size(0) <= kMaxRows, "rows_q: xs must be [1..", kMaxRows, ", ", w.cols, "] ", Storage<T>::kType);
  const int count = int(x.size(0));
  const torch::Tensor bias_f32 = fp32_bias("rows_q", bias, w.rows);
  const float* bp = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  torch::Tensor out = torch::empty({count, w.rows}, x.options());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const T* inputs[kMaxRows];
  row_pointers<T>(data_of<T>(x), w.cols, count, inputs);
  RowClaims claims;
  claims.reset(w.rows, pool_threads());
  in_parallel([&](int thread, int team) {
    const Operands<T> in = operands<T>(w.format, inputs, count, w.cols);
    claims.run(thread, chunk_rows(w.row_bytes()), [&](int64_t begin, int64_t end) {
      gemv_rows_multi(w, in, begin, end, [&](int64_t n, int j, float sum) {
        op[j * w.rows + n] = Storage<T>::store(bp ? sum + bp[n] : sum);
      });
    });
  });
  return out;
}

// A quantized matrix [weight_packed, weight_scale] as [rows, cols] values of the storage type: q * scale in
// fp32, rounded once (quantize.dequantize's values), every thread its share of the rows. A prompt's rows
// multiply the dequantized matrix: PyTorch's unpacking took ~8 ns a weight, half of tiny's quantized prefill.
template <typename T>
torch::Tensor dequantized(const std::vector<torch::Tensor>& matrix) {
  DECODE_CHECK(matrix.size() == 2, "dequantized: a quantized matrix [weight_packed, weight_scale]");
  const Matrix<T> w = matrix_of<T>(matrix, "dequantized");
  torch::Tensor out = torch::empty({w.rows, w.cols}, torch::dtype(Storage<T>::kType));
  T* op = reinterpret_cast<T*>(out.data_ptr());
  at::parallel_for(0, w.rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(w.cols);
    for (int64_t n = begin; n < end; ++n) {
      dequantize_row(w, n, row.data());
      for (int64_t i = 0; i < w.cols; ++i) op[n * w.cols + i] = Storage<T>::store(row[i]);
    }
  });
  return out;
}

// For the tests and benchmarks of the products alone: the fp32 sums w[n, :] . xs[j] [count, N] of a matrix
// in any format (matrix.h) with the rows of xs [count, K] (storage type), through the step's row products;
// `plain`: quantized rows through the plain C++ path whatever the CPU has (the vector path's reference).
template <typename T>
torch::Tensor matrix_rows(const torch::Tensor& xs, const std::vector<torch::Tensor>& matrix, bool plain) {
  const Matrix<T> w = matrix_of<T>(matrix, "matrix_rows");
  const auto x = xs.contiguous();
  DECODE_CHECK(x.scalar_type() == Storage<T>::kType && x.dim() == 2 && x.size(1) == w.cols && x.size(0) >= 1 &&
                   x.size(0) <= kMaxRows, "matrix_rows: xs must be [1..", kMaxRows, ", ", w.cols, "]");
  const int count = int(x.size(0));
  torch::Tensor out = torch::empty({count, w.rows}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  const T* inputs[kMaxRows];
  row_pointers<T>(data_of<T>(x), w.cols, count, inputs);
  const Operands<T> in = operands<T>(w.format, inputs, count, w.cols);
  for (int64_t n = 0; n < w.rows; ++n) {
    float sums[kMaxRows];
    if (plain && w.format == Format::kInt8) {
      int8_dots_plain(w.int8_row(n), in.q, count, w.cols, sums);
      for (int j = 0; j < count; ++j) sums[j] *= bf16_to_float(w.scales[n]);
    } else if (plain && w.format == Format::kInt4) {
      int4_dots_plain(w.int4_row(n), w.scale_row(n), w.group, in.q, count, w.cols, sums);
    } else {
      gemv_rows_multi(w, in, n, n + 1, [&](int64_t, int j, float sum) { sums[j] = sum; });
    }
    for (int j = 0; j < count; ++j) op[j * w.rows + n] = sums[j];
  }
  return out;
}

// The Python names of the layer kernels for storage type T: gemv_q_<suffix>, matrix_rows_<suffix>,
// ffn_block_<suffix>, mha_block_<suffix>, mla_block_<suffix> and the DecodeStep class.
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
  m.def(("gemv_q_" + suffix).c_str(), &quantized_gemv<T>, ReleaseGil(), "a quantized linear of one row (int8 or int4 weights)",
        pybind11::arg("x"), pybind11::arg("matrix"), pybind11::arg("bias") = pybind11::none());
  m.def(("dequantized_" + suffix).c_str(), &dequantized<T>, ReleaseGil(), "a quantized matrix's values (q * scale)",
        pybind11::arg("matrix"));
  m.def(("rows_q_" + suffix).c_str(), &quantized_rows<T>, ReleaseGil(), "a quantized linear of up to 64 rows",
        pybind11::arg("xs"), pybind11::arg("matrix"), pybind11::arg("bias") = pybind11::none());
  m.def(("matrix_rows_" + suffix).c_str(), &matrix_rows<T>, ReleaseGil(),
        "fp32 sums of a matrix (any format) with each row of xs, through the step's row products", pybind11::arg("xs"),
        pybind11::arg("matrix"), pybind11::arg("plain") = false);
  m.def(("ffn_block_" + suffix).c_str(), &ffn_block<T>, ReleaseGil(),
        "RMSNorm + router + chosen and shared experts (or a dense MLP) + residual, one token");
  m.def(("mha_block_" + suffix).c_str(), &mha_block<T>, ReleaseGil(),
        "RMSNorm + q/k/v + RoPE + cache write + attention + o_proj + residual, one token");
  m.def(("mla_block_" + suffix).c_str(), &mla_block<T>, ReleaseGil(),
        "RMSNorm + MLA projections + latent cache write + absorbed attention + o_proj + residual, one token");
  pybind11::class_<DecodeStep<T>>(m, "DecodeStep", "a whole decode step in one parallel region")
      .def(pybind11::init<const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, double,
                          const std::vector<torch::Tensor>&>())
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
