// What every decode kernel shares: bf16 <-> fp32, the storage types' roundings, the rows of a step, the
// thread team's claims on the rows of a phase. The products live in a file per weight format (dense.h:
// the model's own dtype, int8.h, int4.h) behind matrix.h; the layer bodies in attention.h, mla.h and ffn.h;
// the whole step in step.h; sampling in sampling.h.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "check.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
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


// Subnormal floats taken as zero (DAZ) and results that would be subnormal flushed to zero (FTZ) while a
// kernel runs, the thread's previous mode restored after. Why: an x86 core takes a microcode assist of
// ~100 cycles for every subnormal operand or result. Attention probabilities far below the largest
// (exp(-90) and less) are subnormal, and so is their product with a cache value: base (MLA) in int4 with
// a sharp softmax spent half of every decode step in the context sum (4.06 tok/s, 31 % of its bound).
// A flushed value is below 2^-126 in magnitude; every sum it would enter is rounded to fp32 or bf16
// anyway, and the eager reference (float64) agrees with either within the tolerance.
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;  // (MXCSR bits 15 and 6)
  unsigned saved_;
#endif
};

// One parallel region of the pool's threads (one thread inside another region) running body(thread, team),
// subnormals flushed in every thread (FlushSubnormals).
template <typename Body>
void in_parallel(Body body) {
  const int threads = pool_threads();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const FlushSubnormals flush;
    body(omp_get_thread_num(), omp_get_num_threads());
  }
}

// Pointers to `count` vectors of `width` values stored one after the other.
template <typename T>
inline void row_pointers(const T* base, int64_t width, int count, const T** out) {
  for (int b = 0; b < count; ++b) out[b] = base + b * width;
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

// The sum of 16 lanes in the order of GCC's _mm512_reduce_add_ps (halves, then quarters, then pairs), so
// that the vector and the plain builds of a kernel add their lanes alike (the tests compare them bit for bit).
inline float reduce16(const float* lanes) {
  float half[8], quarter[4];
  for (int i = 0; i < 8; ++i) half[i] = lanes[8 + i] + lanes[i];
  for (int i = 0; i < 4; ++i) quarter[i] = half[4 + i] + half[i];
  return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

}  // namespace decode
