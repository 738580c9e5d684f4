// tydust-gen's CPU kernel for the decode step's skinny products: y = x W^T with few rows.
//
// A MusicGen decode step multiplies every decoder weight matrix by only 2 rows
// (the guided and unguided halves; 2·takes with variations), so its time is the
// time to stream the weights from memory. MKL's small-N sgemm reaches about 80 %
// of this machine's read bandwidth on it; this kernel reads each weight once, as
// one sequential stream per thread, from a blocked copy of the weight:
//
//   blocked[b][c][j][l] = W[8 b + j][16 c + l]     shape [out/8, in/16, 8, 16]
//
// so the 8 rows of a block sit next to each other 16 columns at a time. Each
// thread takes whole blocks, keeps R x G partial sums in vector registers (G rows
// of the block at a time, G = 8 for R <= 2) and reduces them at the end of the
// row. Vectors are GCC's generic 16-float vectors, so the same source compiles to
// AVX-512, AVX2 or NEON with -march=native. Sums are in a different order than
// MKL's: results agree to float32 rounding, not bit for bit.
//
// Built by tydust_gen/cpu_kernel.py on first use; registered as torch.ops.tydust.skinny_mm.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace {

typedef float v16 __attribute__((vector_size(64)));

constexpr int64_t kBlockRows = 8;
constexpr int64_t kChunk = 16;

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float reduce16(v16 v) {
  float s = 0.0f;
  for (int k = 0; k < 16; ++k) s += v[k];
  return s;
}

// Rows [g·G, g·G + G) of blocks [b0, b1) for R input rows.
template <int R, int G>
void block_range(const float* wb, const float* x, float* y, int64_t out, int64_t in, int64_t b0, int64_t b1) {
  const int64_t chunks = in / kChunk;
  for (int64_t b = b0; b < b1; ++b) {
    for (int g = 0; g < kBlockRows / G; ++g) {
      v16 acc[R][G];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < G; ++j) acc[r][j] = v16{};
      const float* w = wb + (b * chunks * kBlockRows + g * G) * kChunk;
      for (int64_t c = 0; c < chunks; ++c, w += kBlockRows * kChunk) {
        v16 wv[G];
        for (int j = 0; j < G; ++j) wv[j] = load16(w + j * kChunk);
        for (int r = 0; r < R; ++r) {
          const v16 xv = load16(x + r * in + c * kChunk);
          for (int j = 0; j < G; ++j) acc[r][j] += wv[j] * xv;
        }
      }
      const int64_t row = b * kBlockRows + g * G;
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < G; ++j) y[r * out + row + j] = reduce16(acc[r][j]);
    }
  }
}

template <int R>
void run_rows(const float* wb, const float* x, float* y, int64_t out, int64_t in) {
  constexpr int G = R <= 2 ? 8 : (R <= 4 ? 4 : 2);
  const int64_t blocks = out / kBlockRows;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) { block_range<R, G>(wb, x, y, out, in, b0, b1); });
}

// x [R, in] float32 (R <= 8), wb [out/8, in/16, 8, 16] float32 contiguous -> y [R, out].
at::Tensor skinny_mm(const at::Tensor& x, const at::Tensor& wb) {
  TORCH_CHECK(wb.dim() == 4 && wb.size(2) == kBlockRows && wb.size(3) == kChunk, "skinny_mm: weight is not blocked");
  TORCH_CHECK(wb.is_contiguous() && wb.scalar_type() == at::kFloat, "skinny_mm: weight must be contiguous float32");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "skinny_mm: x must be a float32 matrix");
  const int64_t out = wb.size(0) * kBlockRows, in = wb.size(1) * kChunk, rows = x.size(0);
  TORCH_CHECK(x.size(1) == in, "skinny_mm: x has ", x.size(1), " columns, the weight ", in);
  TORCH_CHECK(rows >= 1 && rows <= 8, "skinny_mm: 1 to 8 rows, got ", rows);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({rows, out}, xc.options());
  const float* wp = wb.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (rows) {
    case 1: run_rows<1>(wp, xp, yp, out, in); break;
    case 2: run_rows<2>(wp, xp, yp, out, in); break;
    case 3: run_rows<3>(wp, xp, yp, out, in); break;
    case 4: run_rows<4>(wp, xp, yp, out, in); break;
    case 5: run_rows<5>(wp, xp, yp, out, in); break;
    case 6: run_rows<6>(wp, xp, yp, out, in); break;
    case 7: run_rows<7>(wp, xp, yp, out, in); break;
    default: run_rows<8>(wp, xp, yp, out, in); break;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(tydust, m) { m.def("skinny_mm(Tensor x, Tensor wb) -> Tensor"); }

TORCH_LIBRARY_IMPL(tydust, CPU, m) { m.impl("skinny_mm", &skinny_mm); }
