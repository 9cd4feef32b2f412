// Sampling on the CPU in one call each (after a decode step every PyTorch op runs from cold caches): the
// argmax, the top-k candidates after the repetition penalty, one draw after temperature and top-p.
#pragma once
#include <torch/extension.h>
#include <ATen/CPUGeneratorImpl.h>

#include "check.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

namespace decode {

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

}  // namespace decode
