// A weight matrix in any of the formats (dense.h: the model's dtype; int8.h; int4.h) behind one interface,
// so that the layer bodies (attention.h, mla.h, ffn.h) never branch on the format:
//   Matrix<T>         where a matrix's rows and scales are, and in which format
//   Operands<T>       a phase's inputs, each in the form the phase's matrices take (prepared once per phase)
//   gemv_rows_multi   y[j][n] = w[n, :] . x_j for a range of rows n and every input j
//   row_dot_f32 / row_axpy_f32   one row against fp32 vectors (MLA's absorbed attention)
#pragma once
#include "dense.h"
#include "int4.h"
#include "int8.h"

namespace decode {

enum class Format : int { kDense = 0, kInt8 = 1, kInt4 = 2 };

template <typename T>
struct Matrix {
  Format format = Format::kDense;
  const void* data = nullptr;        // row n at data + n * row_stride elements (T; bytes for int8 / int4)
  int64_t row_stride = 0;
  const uint16_t* scales = nullptr;  // bf16: int8 one per row; int4 `cols / group` per row
  int64_t scale_stride = 1;          // scales per row
  int64_t rows = 0, cols = 0, group = 0;

  const T* dense_row(int64_t n) const { return static_cast<const T*>(data) + n * row_stride; }
  const int8_t* int8_row(int64_t n) const { return static_cast<const int8_t*>(data) + n * row_stride; }
  const uint8_t* int4_row(int64_t n) const { return static_cast<const uint8_t*>(data) + n * row_stride; }
  const uint16_t* scale_row(int64_t n) const { return scales + n * scale_stride; }
  int64_t row_bytes() const {
    return format == Format::kDense ? cols * int64_t(sizeof(T)) : format == Format::kInt8 ? cols : cols / 2;
  }
};

// A matrix from its tensors: [weight] (T, 2-D, contiguous rows) or [weight_packed, weight_scale] as
// deepseek_vl2/quantize.py lays them out (int8 [rows, cols] with bf16 [rows, 1]; uint8 [rows, cols / 2] with
// bf16 [rows, cols / group], group a multiple of 8), compact.
template <typename T>
Matrix<T> matrix_of(const std::vector<torch::Tensor>& parts, const char* what) {
  DECODE_CHECK(parts.size() == 1 || parts.size() == 2, what, ": a matrix is [weight] or [weight_packed, weight_scale]");
  Matrix<T> m;
  const torch::Tensor& w = parts[0];
  if (parts.size() == 1) {
    check_matrix<T>(w, what);
    m.data = w.data_ptr();
    m.row_stride = w.stride(0);
    m.rows = w.size(0), m.cols = w.size(1);
    return m;
  }
  const torch::Tensor& s = parts[1];
  DECODE_CHECK(w.device().is_cpu() && s.device().is_cpu() && w.dim() == 2 && w.is_contiguous() && s.is_contiguous() &&
                   s.scalar_type() == at::kBFloat16 && s.dim() == 2 && s.size(0) == w.size(0) && s.size(1) >= 1,
               what, ": a quantized matrix is compact [rows, ...] CPU data with compact bf16 scales [rows, groups]");
  m.data = w.data_ptr();
  m.row_stride = w.size(1);
  m.scales = reinterpret_cast<const uint16_t*>(s.data_ptr());
  m.rows = w.size(0);
  if (w.scalar_type() == at::kChar) {
    DECODE_CHECK(s.size(1) == 1, what, ": int8 weights take one scale per row");
    m.format = Format::kInt8, m.cols = w.size(1);
  } else {
    DECODE_CHECK(w.scalar_type() == at::kByte, what, ": quantized weights are int8 or packed int4 (uint8)");
    m.format = Format::kInt4, m.cols = 2 * w.size(1);
    DECODE_CHECK(m.cols % s.size(1) == 0, what, ": ", s.size(1), " groups do not divide ", m.cols, " inputs");
    m.group = m.cols / s.size(1);
    m.scale_stride = s.size(1);
    DECODE_CHECK(int4_group_ok(m.group), what, ": int4 groups of ", m.group, " inputs (the kernels take multiples of 8)");
  }
  return m;
}

// The matrices of a list of them (as matrix_of), and a pointer table's view of one matrix whose shape the
// table's owner knows (the routed experts: ffn.h).
template <typename T>
std::vector<Matrix<T>> matrices_of(const std::vector<std::vector<torch::Tensor>>& parts, const char* what) {
  std::vector<Matrix<T>> out;
  for (const auto& p : parts) out.push_back(matrix_of<T>(p, what));
  return out;
}

template <typename T>
Matrix<T> compact_matrix(Format format, const void* data, const void* scales, int64_t rows, int64_t cols, int64_t group) {
  Matrix<T> m;
  m.format = format, m.data = data, m.scales = static_cast<const uint16_t*>(scales), m.rows = rows, m.cols = cols;
  m.group = format == Format::kInt4 ? group : 0;
  m.scale_stride = format == Format::kInt4 ? cols / group : 1;
  m.row_stride = format == Format::kDense ? cols : m.row_bytes();
  return m;
}

// A phase's inputs: `count` vectors of `cols` values, as stored (x) and in the form the phase's matrices
// take: packed as AMX tiles (dense bf16 with enough rows), or prepared as integer limbs (int8, int4).
template <typename T>
struct Operands {
  int count = 0;
  int64_t cols = 0;
  Format format = Format::kDense;
  const T* x[kMaxRows] = {};
  QuantInput q[kMaxRows] = {};
  Packed<T> tiles;
  Int8Tiles int8_tiles;  // (int8 matrices on AMX-INT8: int8.h)

  // Inputs rows[0..n) of these (no tiles: a routed expert's few rows run on vectors).
  Operands pick(const int* rows, int n) const {
    Operands out;
    out.count = n, out.cols = cols, out.format = format;
    for (int j = 0; j < n; ++j) out.x[j] = x[rows[j]], out.q[j] = q[rows[j]];
    return out;
  }
};

// The thread's buffers of prepared inputs: one per `slot`, for the phases whose inputs are alive together
// (see the bodies: 0 a phase's inputs, 1 and 2 those of the feed-forward's down phase).
inline std::vector<uint8_t>& prepared_buffer(int slot) {
  thread_local std::vector<uint8_t> buffers[3];
  return buffers[slot];
}

// `count` inputs (any number) prepared for quantized matrices of `format` into out[0..count), in this
// thread's buffer `slot`.
template <typename T>
void prepare_inputs(Format format, const T* const* xs, int count, int64_t cols, int slot, QuantInput* out) {
  const int64_t each = ((format == Format::kInt8 ? int8_input_bytes(cols) : int4_input_bytes(cols)) + 63) / 64 * 64;
  std::vector<uint8_t>& buffer = prepared_buffer(slot);
  if (buffer.size() < size_t(count * each + 64)) buffer.resize(size_t(count * each + 64));
  uint8_t* base = buffer.data() + (64 - reinterpret_cast<uintptr_t>(buffer.data()) % 64) % 64;
  for (int j = 0; j < count; ++j)
    out[j] = format == Format::kInt8 ? prepare_int8(xs[j], cols, base + j * each) : prepare_int4(xs[j], cols, base + j * each);
}

// The operands of `count` inputs for matrices in `format`, in this thread's buffer `slot`; AMX tiles where
// `tiles` allows them (matrices every row multiplies) and the step has enough rows.
template <typename T>
Operands<T> operands(Format format, const T* const* xs, int count, int64_t cols, int slot = 0, bool tiles = true) {
  Operands<T> in;
  in.count = count, in.cols = cols, in.format = format;
  for (int j = 0; j < count; ++j) in.x[j] = xs[j];
  if (format == Format::kDense) {
    if (tiles) in.tiles = pack_inputs<T>(xs, count, cols);
  } else {
    prepare_inputs(format, xs, count, cols, slot, in.q);
    if (tiles && format == Format::kInt8 && tiles_for(static_cast<const T*>(nullptr), count))
      in.int8_tiles = pack_int8_tiles(static_cast<const T*>(nullptr), in.q, count, cols, slot);
  }
  return in;
}

// y[j][n] = w[n, :] . x_j for rows [begin, end) and every input j: store(n, j, sum). Dense rows take the
// same sums whatever the format of the operands' preparation; the formats' own arithmetic is in their files.
template <typename T, typename Store>
inline void gemv_rows_multi(const Matrix<T>& w, const Operands<T>& in, int64_t begin, int64_t end, Store store) {
  const int count = in.count;
  float sums[kMaxRows];
  switch (w.format) {
    case Format::kDense: {
      if (in.tiles.tiles != nullptr) {
        const int width = 16 * ((in.tiles.columns + 15) / 16);
        float tile_sums[16 * kMaxRows];
        for (int64_t n = begin; n < end; n += 16) {
          const int rows = int(std::min<int64_t>(16, end - n));
          tile_rows(w.dense_row(n), w.row_stride, w.cols, in.tiles.tiles, in.tiles.columns, rows, tile_sums);
          for (int r = 0; r < rows; ++r)
            for (int j = 0; j < count; ++j) store(n + r, j, tile_sums[r * width + j]);
        }
        return;
      }
      if (count == 1) {  // (one row: dot itself, as the single-sequence step always ran)
        for (int64_t n = begin; n < end; ++n) store(n, 0, dot(w.dense_row(n), in.x[0], w.cols));
        return;
      }
      for (int64_t n = begin; n < end; ++n) {
        dots(w.dense_row(n), in.x, count, w.cols, sums);
        for (int j = 0; j < count; ++j) store(n, j, sums[j]);
      }
      return;
    }
    case Format::kInt8:
      if (in.int8_tiles.data != nullptr) {
        const int width = 16 * in.int8_tiles.groups();
        float tile_sums[16 * 16 * ((kMaxRows + kInt8TileInputs - 1) / kInt8TileInputs)];
        for (int64_t n = begin; n < end; n += 16) {
          const int rows = int(std::min<int64_t>(16, end - n));
          int8_tile_rows(static_cast<const T*>(nullptr), w.int8_row(n), w.row_stride, w.scales + n, in.int8_tiles, rows,
                         tile_sums);
          for (int r = 0; r < rows; ++r)
            for (int j = 0; j < count; ++j)
              store(n + r, j, tile_sums[r * width + 16 * (j / kInt8TileInputs) + j % kInt8TileInputs]);
        }
        return;
      }
      for (int64_t n = begin; n < end; ++n) {
        int8_dots(w.int8_row(n), bf16_to_float(w.scales[n]), in.q, count, w.cols, sums);
        for (int j = 0; j < count; ++j) store(n, j, sums[j]);
      }
      return;
    case Format::kInt4: {
      const Int4Layout layout(w.cols, w.group);
      for (int64_t n = begin; n < end; ++n) {
        int4_dots(w.int4_row(n), w.scale_row(n), layout, in.q, count, sums);
        for (int j = 0; j < count; ++j) store(n, j, sums[j]);
      }
      return;
    }
  }
}

// Row n of a quantized matrix as fp32 values q * scale (cols values into out). Plain loops without a
// reduction, which the compiler vectorises.
template <typename T>
inline void dequantize_row(const Matrix<T>& w, int64_t n, float* out) {
  const uint16_t* scales = w.scale_row(n);
  if (w.format == Format::kInt8) {
    const int8_t* q = w.int8_row(n);
    const float s = bf16_to_float(scales[0]);
    for (int64_t i = 0; i < w.cols; ++i) out[i] = float(q[i]) * s;
    return;
  }
  const uint8_t* bytes = w.int4_row(n);
  const int64_t half = w.group / 2;
  for (int64_t g = 0; g < w.cols / w.group; ++g) {
    const float s = bf16_to_float(scales[g]);
    const uint8_t* b = bytes + g * half;
    float* o = out + g * w.group;
    for (int64_t i = 0; i < half; ++i) {
      o[2 * i] = float(int(b[i] & 0x0F) - 8) * s;
      o[2 * i + 1] = float(int(b[i] >> 4) - 8) * s;
    }
  }
}

// MLA's absorbed attention takes single rows of kv_b against fp32 vectors (mla.h). Quantized rows are made
// fp32 first (`scratch`: cols floats), then go through the vectorised fp32 product (router_dot: fp32 rows
// with fp32 inputs). (A plain C++ sum here is a chain the compiler may not reorder: kv_b's rows took ~4x
// the time of the whole rest of a layer of base in int4.)
template <typename T>
inline float row_dot_f32(const Matrix<T>& w, int64_t n, const float* x, float* scratch) {
  if (w.format == Format::kDense) return dot_f32(w.dense_row(n), x, w.cols);
  dequantize_row(w, n, scratch);
  return router_dot(scratch, x, w.cols);
}

// acc[i] += a * w[n, i]: quantized rows scaled as they are read (plain loops the compiler vectorises).
template <typename T>
inline void row_axpy_f32(const Matrix<T>& w, int64_t n, float a, float* acc, float*) {
  if (w.format == Format::kDense) return axpy_f32(acc, a, w.dense_row(n), w.cols);
  const uint16_t* scales = w.scale_row(n);
  if (w.format == Format::kInt8) {
    const int8_t* q = w.int8_row(n);
    const float as = a * bf16_to_float(scales[0]);
    for (int64_t i = 0; i < w.cols; ++i) acc[i] += as * float(q[i]);
    return;
  }
  const uint8_t* bytes = w.int4_row(n);
  const int64_t half = w.group / 2;
  for (int64_t g = 0; g < w.cols / w.group; ++g) {
    const float as = a * bf16_to_float(scales[g]);
    const uint8_t* b = bytes + g * half;
    float* o = acc + g * w.group;
    for (int64_t i = 0; i < half; ++i) {
      o[2 * i] += as * float(int(b[i] & 0x0F) - 8);
      o[2 * i + 1] += as * float(int(b[i] >> 4) - 8);
    }
  }
}

// acc[i] += sum_r a[r] * w[first + r, i] for `count` consecutive rows (MLA's query absorption: W_UK's rows of
// one head). int4 rows whose groups hold whole vectors go through int4_rows_axpy together; others row by row.
template <typename T>
inline void rows_axpy_f32(const Matrix<T>& w, int64_t first, int64_t count, const float* a, float* acc, float* scratch) {
  if (w.format == Format::kInt4 && int4_rows_axpy_fits(w.cols, w.group))
    return int4_rows_axpy(w.int4_row(first), w.row_stride, w.scale_row(first), w.scale_stride, w.cols, w.group, count, a, acc);
  for (int64_t r = 0; r < count; ++r) row_axpy_f32(w, first + r, a[r], acc, scratch);
}

// The same rows and scales seen as a matrix for fp32 inputs (a quantized matrix's products take any
// storage type's inputs once prepared: MLA's fp32 context against kv_b).
template <typename T>
inline Matrix<float> as_fp32_inputs(const Matrix<T>& w) {
  Matrix<float> m;
  m.format = w.format, m.data = w.data, m.row_stride = w.row_stride, m.scales = w.scales, m.scale_stride = w.scale_stride;
  m.rows = w.rows, m.cols = w.cols, m.group = w.group;
  return m;
}

}  // namespace decode
