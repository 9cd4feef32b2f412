// The feed-forward sub-layer of a decode step's rows: the router and the routed experts (MoE layers), the
// shared experts, or a dense SwiGLU MLP.
#pragma once
#include "matrix.h"

#include <string>

namespace decode {

template <typename T>
struct SwigluWeights {  // one SwiGLU expert: gate/up [inter, hidden] and down [hidden, inter], one format
  Matrix<T> gate, up, down;
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
  const int64_t* expert_pointers;  // [experts, 6]: gate, up, down data pointers, then their scales' (or 0)
  int64_t expert_inter;
  Format expert_format;
  int64_t expert_group;
  bool has_shared;
  SwigluWeights<T> shared;
  int64_t max_inter_total;  // the hidden activations of every expert that can run together
};

template <typename T>
SwigluWeights<T> swiglu_of(const std::vector<std::vector<torch::Tensor>>& weights, int64_t hidden) {
  const std::vector<Matrix<T>> w = matrices_of<T>(weights, "ffn_block");
  for (const auto& parts : weights)
    for (const auto& t : parts) DECODE_CHECK(t.is_contiguous(), "ffn_block: expert weights must be contiguous");
  const int64_t inter = w[0].rows;
  DECODE_CHECK(w[0].cols == hidden && w[1].rows == inter && w[1].cols == hidden && w[2].rows == hidden && w[2].cols == inter &&
                   w[1].format == w[0].format && w[2].format == w[0].format,
               "ffn_block: SwiGLU weights do not fit a hidden size of ", hidden, " (or differ in format)");
  return {w[0], w[1], w[2], inter};
}

// A dense SwiGLU MLP (no router; `shared` = its weights) or a MoE layer: the router (fp32 weight
// [E, hidden], optional noaux_tc correction bias, the selection method and its parameters) picks top_k of
// the experts listed in `expert_table` ([E, 6] int64: data pointers of each expert's compact gate
// [inter, hidden], up [inter, hidden], down [hidden, inter] weights and of their scales, 0 for weights in the
// storage type; all in `expert_format` (0 the storage type, 1 int8, 2 int4 in groups of `expert_group`),
// kept alive by the caller), plus the always-on shared experts (`shared`, optional, in the same format).
template <typename T>
FfnSpec<T> ffn_spec(const torch::Tensor& norm_weight, double eps, const c10::optional<torch::Tensor>& router_weight,
                 const c10::optional<torch::Tensor>& correction_bias, const std::string& method, const std::string& scoring,
                 int64_t top_k, int64_t n_group, int64_t topk_group, bool norm_topk_prob, double scale,
                 const c10::optional<torch::Tensor>& expert_table, int64_t expert_inter, int64_t expert_format,
                 int64_t expert_group, const std::vector<std::vector<torch::Tensor>>& shared) {
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
                     table.size(1) == 6, "ffn_block: expert table must be int64 [experts, 6]");
    DECODE_CHECK(expert_format >= 0 && expert_format <= 2 && (expert_format != 2 || int4_group_ok(expert_group)),
                 "ffn_block: expert format ", expert_format, " (group ", expert_group, ")");
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
    s.expert_format = Format(expert_format);
    s.expert_group = expert_group;
    s.max_inter_total = top_k * expert_inter;
  }
  s.has_shared = !shared.empty();
  if (s.has_shared) {
    s.shared = swiglu_of<T>(shared, s.hidden);
    s.max_inter_total += s.shared.inter;
    DECODE_CHECK(!s.routed || s.shared.gate.format == s.expert_format, "ffn_block: shared and routed experts differ in format");
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
        const int64_t* p = s.expert_pointers + 6 * id;
        const int64_t inter = s.expert_inter, hidden = s.hidden;
        auto matrix = [&](int which, int64_t rows, int64_t cols) {
          return compact_matrix<T>(s.expert_format, reinterpret_cast<const void*>(p[which]),
                                   reinterpret_cast<const void*>(p[3 + which]), rows, cols, s.expert_group);
        };
        experts.emplace_back();
        experts.back().weights = {matrix(0, inter, hidden), matrix(1, inter, hidden), matrix(2, hidden, inter), inter};
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
  const Format format = s.routed ? s.expert_format : s.shared.gate.format;
  const Operands<T> normed_in = operands<T>(format, inputs, count, hidden);  // (tiles: for the shared experts)
  // The experts' gate/up rows taken together (row r of expert e is row first_row + r), in chunks: for
  // each chunk the gate rows, then the up rows (one stream from memory at a time). Each chunk switches
  // streams twice: chunks of ~256 KiB (tiny: 51 rows) stream the fast memory phase at 93-94 % of the
  // probe where ~64 KiB (12 rows) did 90-92 %.
  up_claims.reset_own(rows_total, thread, team);
  const int64_t gate_row_bytes = experts.empty() ? 1 : experts[0].weights.gate.row_bytes();
  up_claims.run(thread, chunk_rows(2 * gate_row_bytes, 256 << 10), [&](int64_t first, int64_t last) {
    for (const auto& e : experts) {
      const int64_t inter = e.weights.inter;
      const int64_t begin = std::max(first, e.first_row) - e.first_row, end = std::min(last, e.first_row + inter) - e.first_row;
      if (begin >= end) continue;
      T* he = h + e.h_offset;  // [count][inter]
      const Operands<T> in = e.choice[0] < 0 ? normed_in : normed_in.pick(e.row, e.count);  // (routed experts: vectors)
      gemv_rows_multi(e.weights.gate, in, begin, end, [&](int64_t i, int j, float sum) { he[j * inter + i] = S::store(sum); });
      for (int j = 0; j < e.count; ++j) silu_in_place(he + j * inter + begin, end - begin);
      gemv_rows_multi(e.weights.up, in, begin, end, [&](int64_t i, int j, float sum) {
        he[j * inter + i] = S::store(S::load(he[j * inter + i]) * S::round(sum));
      });
    }
  });
#pragma omp barrier
  float *expert_out = scratch.expert_out.data(), *routed_sum = scratch.routed_sum.data();
  auto emit = [&](int b, int64_t n, T y) { out[b * hidden + n] = S::store(S::load(x[b * hidden + n]) + S::load(y)); };
  Operands<T> shared_h_in;
  if (s.has_shared) {
    const int64_t inter = experts[routed].weights.inter;
    const T* shared_inputs[kMaxRows];
    row_pointers<T>(h + experts[routed].h_offset, inter, count, shared_inputs);
    shared_h_in = operands<T>(format, shared_inputs, count, inter, 1);
  }
  // The routed experts' hidden activations, all prepared once (quantized formats) for every chunk.
  std::vector<const T*> routed_h;
  for (size_t a = 0; a < routed; ++a)
    for (int j = 0; j < experts[a].count; ++j) routed_h.push_back(h + experts[a].h_offset + j * experts[a].weights.inter);
  std::vector<QuantInput> routed_prepared(routed_h.size());
  std::vector<size_t> first_input(routed + 1, 0);
  for (size_t a = 0; a < routed; ++a) first_input[a + 1] = first_input[a] + size_t(experts[a].count);
  if (format != Format::kDense && routed)
    prepare_inputs(format, routed_h.data(), int(routed_h.size()), s.expert_inter, 2, routed_prepared.data());
  // The output rows in chunks, each chunk through every expert in turn.
  down_claims.run(thread, kDownChunkRows, [&](int64_t begin, int64_t end) {
    for (size_t a = 0; a < routed; ++a) {
      const ActiveExpert<T>& e = experts[a];
      Operands<T> in;
      in.count = e.count, in.cols = e.weights.inter, in.format = format;
      for (int j = 0; j < e.count; ++j) in.x[j] = routed_h[first_input[a] + j], in.q[j] = routed_prepared[first_input[a] + j];
      gemv_rows_multi(e.weights.down, in, begin, end, [&](int64_t n, int j, float sum) {
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
      gemv_rows_multi(shared.weights.down, shared_h_in, begin, end, [&](int64_t n, int b, float sum) {
        const float routed_part = routed ? S::round(routed_sum[b * hidden + n]) : 0.0f;
        emit(b, n, S::store(routed_part + S::round(sum)));
      });
    } else {
      for (int b = 0; b < count; ++b)
        for (int64_t n = begin; n < end; ++n) emit(b, n, S::store(routed_sum[b * hidden + n]));
    }
  });
}


}  // namespace decode
