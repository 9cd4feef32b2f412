// Products with weights in the model's own dtype (bf16 bits as uint16_t, or fp32): defined by the translation
// unit that includes this (decode_bf16.cpp with AVX512-BF16 and AMX tiles, decode_f32.cpp in plain C++ the
// compiler vectorises for the build machine).
//   float dot(const T* w, const T* x, int64_t n)          a weight row with the input
//   void dots(const T* w, const T* const* xs, int count, int64_t n, float* out)   ... with several inputs
//   float router_dot(const float* w, const float* x, int64_t n)   a router row (fp32 weights) with fp32 input
// Decoding streams every active weight once per step, so these loops only have to keep up with memory.
#pragma once
#include "common.h"

namespace decode {

// Defined by the translation unit that includes this header (see the top of the file). `w` is the
// operand streamed from memory (a weight row, a cached key): the one that is prefetched.
float dot(const uint16_t* w, const uint16_t* x, int64_t n);
float dot(const float* w, const float* x, int64_t n);
float router_dot(const float* w, const float* x, int64_t n);
// out[j] = dot(w, xs[j], n) for j < count, bit for bit, with w read from memory once for all of them.
void dots(const uint16_t* w, const uint16_t* const* xs, int count, int64_t n, float* out);
void dots(const float* w, const float* const* xs, int count, int64_t n, float* out);

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


// MLA's query-side vectors stay fp32: the fp32 sum of w[i] * x[i] (a row of the storage type, an fp32
// vector) and acc[i] += a * row[i]. The bf16 versions are written out with AVX-512 in decode_bf16.cpp; for
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

// x = silu(x) in place, rounded to the storage type (the SwiGLU's gate, already rounded): with AVX-512 for
// bf16 (decode_bf16.cpp), the scalar silu for fp32.
void silu_in_place(uint16_t* x, int64_t n);
inline void silu_in_place(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = silu(x[i]);
}

// MLA's absorbed attention for up to 16 heads of one row on AMX tiles, where tiles are on (latent_attention.h,
// bf16 only; false where it does not apply): context[j] = softmax_t(scale (q_latent[j] . latent_t + q_pe[j] .
// k_pe_t)) . latent_t for t < length; q_latent [count, rank] fp32, q_pe [count, rope] bf16, context [count, rank].
bool latent_attention_tiles(const uint16_t* latent, int64_t latent_stride, const uint16_t* k_pe, int64_t k_pe_stride,
                            int64_t length, int64_t rank, int64_t rope, const float* q_latent, const uint16_t* q_pe,
                            int64_t count, float scale, float* context);
inline bool latent_attention_tiles(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, const float*,
                                   const float*, int64_t, float, float*) {
  return false;
}

}  // namespace decode
