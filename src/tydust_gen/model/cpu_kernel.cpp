// tydust-gen's CPU kernel for the decode step's skinny products: y = x W^T with few rows.
//
// A MusicGen decode step multiplies every decoder weight matrix by only 2 rows
// (the guided and unguided halves; 2·takes with variations), so its time is the
// time to stream the weights from memory. MKL's small-N sgemm reaches 50-80 % of
// this machine's read bandwidth on it; this kernel reads each weight once, as
// one sequential stream per thread, from a blocked copy of the weight:
//
//   blocked[b][c][j][l] = W[4 b + j][16 c + l]     shape [out/4, in/16, 4, 16]
//
// so the 4 rows of a block sit next to each other 16 columns at a time (4-row
// blocks measured 3-8 % faster here than 8-row ones; software prefetch was slower).
// Each thread takes whole blocks, keeps R x G partial sums in vector registers (G
// rows of the block at a time: all 4 for R <= 4, 2 for more rows) and reduces them
// at the end of the row. Vectors are GCC's generic 16-float vectors, so the same
// source compiles to AVX-512, AVX2 or NEON with -march=native. Sums are in a
// different order than MKL's: results agree to float32 rounding, not bit for bit.
//
// Built by tydust_gen/cpu_kernel.py on first use; registered as torch.ops.tydust.skinny_mm
// (one product) and torch.ops.tydust.layers_step (every decoder layer of one decode step).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));

constexpr int64_t kBlockRows = 4;
constexpr int64_t kChunk = 16;

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

// Pairwise sum of the 16 lanes (halves, then quarters, ...): a few vector adds, not 15 scalar ones.
inline float reduce16(v16 v) {
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
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
  constexpr int G = R <= 4 ? 4 : 2;
  const int64_t blocks = out / kBlockRows;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) { block_range<R, G>(wb, x, y, out, in, b0, b1); });
}

// x [R, in] float32 (R <= 8), wb [out/4, in/16, 4, 16] float32 contiguous -> y [R, out].
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

// ---------------------------------------------------------------------------------------
// One pre-LN decoder layer for one new position, in one call (the eager CPU decode step).
//
// Same math as fastloop._decoder's single-position branch: layer norm -> fused q/k/v
// (q rows pre-scaled by 1/sqrt(hd)) -> write k, v at `pos` -> attention over cache
// positions [0, pos] -> out projection + residual; layer norm -> cross q -> attention
// over the text keys (scale, additive mask bias) -> out projection + residual; layer
// norm -> fc1 -> exact GELU -> fc2 + residual. Python would spend ~25 dispatches per
// layer on this; here it is one call and ONE OpenMP parallel region (torch's own
// OpenMP runtime and thread count): the threads split each product's blocks and the
// attention's (row, head) pairs, and meet at barriers between phases. A fork/join per
// phase (9 a layer) cost ~3.8 ms a step on this 2-core machine; barriers cost little.

inline void share(int64_t n, int tid, int nth, int64_t& lo, int64_t& hi) {
  lo = n * tid / nth;
  hi = n * (tid + 1) / nth;
}

// This thread's share of the blocks of x [rows, in] times blocked wb -> y [rows, out].
void skinny_share(const float* x, const at::Tensor& wb, float* y, int64_t rows, int tid, int nth) {
  const int64_t out = wb.size(0) * kBlockRows, in = wb.size(1) * kChunk;
  const float* wp = wb.data_ptr<float>();
  int64_t b0, b1;
  share(wb.size(0), tid, nth, b0, b1);
  if (b0 >= b1) return;
  switch (rows) {
    case 1: block_range<1, 4>(wp, x, y, out, in, b0, b1); break;
    case 2: block_range<2, 4>(wp, x, y, out, in, b0, b1); break;
    case 3: block_range<3, 4>(wp, x, y, out, in, b0, b1); break;
    case 4: block_range<4, 4>(wp, x, y, out, in, b0, b1); break;
    case 5: block_range<5, 2>(wp, x, y, out, in, b0, b1); break;
    case 6: block_range<6, 2>(wp, x, y, out, in, b0, b1); break;
    case 7: block_range<7, 2>(wp, x, y, out, in, b0, b1); break;
    default: block_range<8, 2>(wp, x, y, out, in, b0, b1); break;
  }
}

void layer_norm_rows(const float* x, float* y, const float* w, const float* b, double eps, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < d; ++i) mean += xr[i];
    mean /= d;
    for (int64_t i = 0; i < d; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const float rstd = static_cast<float>(1.0 / std::sqrt(var / d + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] - m) * rstd * w[i] + b[i];
  }
}

// Attention of one query per (row, head) over `len` keys, for pairs [t0, t1) of rows x heads.
// q: [rows, H*hd] (row stride q_stride); k, v: [rows, H, cap, hd]; bias: [rows, len] additive or
// nullptr; out: [rows, H*hd]; s: scratch of `len` floats.
void attend_range(const float* q, int64_t q_stride, const float* k, const float* v, int64_t cap, int64_t len,
                  const float* bias, float scale, float* out, int64_t heads, int64_t hd, int64_t t0, int64_t t1,
                  float* s) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r = t / heads, h = t % heads;
    const float* qv = q + r * q_stride + h * hd;
    const float* kb = k + t * cap * hd;
    const float* vb = v + t * cap * hd;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < len; ++j) {
      float acc = 0.0f;
      if (hd % kChunk == 0) {
        v16 part{};
        for (int64_t e = 0; e < hd; e += kChunk) part += load16(qv + e) * load16(kb + j * hd + e);
        acc = reduce16(part);
      } else {
        for (int64_t e = 0; e < hd; ++e) acc += qv[e] * kb[j * hd + e];
      }
      acc *= scale;
      if (bias) acc += bias[r * len + j];
      s[j] = acc;
      mx = std::max(mx, acc);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < len; ++j) {
      s[j] = std::exp(s[j] - mx);
      total += s[j];
    }
    float* o = out + r * heads * hd + h * hd;
    if (hd % kChunk == 0 && hd <= 8 * kChunk) {
      v16 acc[8];
      const int64_t n = hd / kChunk;
      for (int64_t e = 0; e < n; ++e) acc[e] = v16{};
      for (int64_t j = 0; j < len; ++j) {
        const float p = s[j] / total;
        for (int64_t e = 0; e < n; ++e) acc[e] += p * load16(vb + j * hd + e * kChunk);
      }
      for (int64_t e = 0; e < n; ++e) std::memcpy(o + e * kChunk, &acc[e], sizeof(v16));
    } else {
      for (int64_t e = 0; e < hd; ++e) o[e] = 0.0f;
      for (int64_t j = 0; j < len; ++j) {
        const float p = s[j] / total;
        for (int64_t e = 0; e < hd; ++e) o[e] += p * vb[j * hd + e];
      }
    }
  }
}

// One layer in place on xp [rows, d]. w: the layer's 12 tensors (ln1 w, ln1 b, qkv, self_out,
// ln2 w, ln2 b, cross_q, cross_out, ln3 w, ln3 b, fc1, fc2; projections blocked); sk, sv: its
// self-attention cache [rows, H, cap, hd]; ck, cv: its text keys/values [rows, H, text, hd];
// cbias: [rows, text] additive; eps: its three layer-norm epsilons.
struct Scratch {
  std::vector<float> h, a, y, g;
  Scratch(int64_t rows, int64_t d, int64_t ffn) : h(rows * d), a(rows * d), y(rows * std::max<int64_t>(3 * d, ffn)), g(rows * d) {}
};

void layer_impl(float* xp, int64_t rows, int64_t d, int64_t heads, const at::Tensor* w, const at::Tensor& skt,
                const at::Tensor& svt, const at::Tensor& ckt, const at::Tensor& cvt, const float* cbias,
                int64_t pos, float cscale, const double* eps, Scratch& buf) {
  auto f = [](const at::Tensor& t) { return t.data_ptr<float>(); };
  const int64_t hd = d / heads, cap = skt.size(2), text = ckt.size(2), ffn = w[10].size(0) * kBlockRows;
  float* sk = f(skt);
  float* sv = f(svt);
  const float* ck = f(ckt);
  const float* cv = f(cvt);
  float* hp = buf.h.data();
  float* ap = buf.a.data();
  float* yp = buf.y.data();
  float* gp = buf.g.data();
  const int threads = std::max(1, at::get_num_threads());

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    std::vector<float> scratch(std::max<int64_t>(pos + 1, text));
    int64_t t0, t1;
    share(rows * heads, tid, nth, t0, t1);

    // self-attention
#pragma omp single
    layer_norm_rows(xp, hp, f(w[0]), f(w[1]), eps[0], rows, d);
    skinny_share(hp, w[2], yp, rows, tid, nth);  // [rows, 3d]: q | k | v
#pragma omp barrier
#pragma omp single
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t hh = 0; hh < heads; ++hh) {
        std::memcpy(sk + ((r * heads + hh) * cap + pos) * hd, yp + r * 3 * d + d + hh * hd, hd * sizeof(float));
        std::memcpy(sv + ((r * heads + hh) * cap + pos) * hd, yp + r * 3 * d + 2 * d + hh * hd, hd * sizeof(float));
      }
    attend_range(yp, 3 * d, sk, sv, cap, pos + 1, nullptr, 1.0f, ap, heads, hd, t0, t1, scratch.data());
#pragma omp barrier
    skinny_share(ap, w[3], gp, rows, tid, nth);
#pragma omp barrier
#pragma omp single
    {
      for (int64_t i = 0; i < rows * d; ++i) xp[i] += gp[i];
      // cross-attention over the text
      layer_norm_rows(xp, hp, f(w[4]), f(w[5]), eps[1], rows, d);
    }
    skinny_share(hp, w[6], yp, rows, tid, nth);
#pragma omp barrier
    attend_range(yp, d, ck, cv, text, text, cbias, cscale, ap, heads, hd, t0, t1, scratch.data());
#pragma omp barrier
    skinny_share(ap, w[7], gp, rows, tid, nth);
#pragma omp barrier
#pragma omp single
    {
      for (int64_t i = 0; i < rows * d; ++i) xp[i] += gp[i];
      // feed-forward
      layer_norm_rows(xp, hp, f(w[8]), f(w[9]), eps[2], rows, d);
    }
    skinny_share(hp, w[10], yp, rows, tid, nth);
#pragma omp barrier
    {
      // exact (erf) GELU, as nn.functional.gelu's default, on this thread's slice. The C
      // library's erf here took 23 us a layer; at::gelu_ called inside this region took 50-60.
      int64_t i0, i1;
      share(rows * ffn, tid, nth, i0, i1);
      for (int64_t i = i0; i < i1; ++i) yp[i] = 0.5f * yp[i] * (1.0f + std::erf(yp[i] * 0.70710678118654752f));
    }
#pragma omp barrier
    skinny_share(yp, w[11], gp, rows, tid, nth);
#pragma omp barrier
#pragma omp single
    for (int64_t i = 0; i < rows * d; ++i) xp[i] += gp[i];
  }
}

void check_cache(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat, "layers_step: caches must be contiguous float32");
}

// All L layers for one position: x [R, D]; weights: 12 per layer, layer after layer; caches:
// self_k, self_v, cross_k, cross_v per layer, then the cross bias [R, S] once; eps: 3 per layer.
// Returns the new x [R, D] (before the final layer norm). One call per decode step, so Python
// and the dispatcher are paid once a step, not once a layer.
at::Tensor layers_step(const at::Tensor& x_in, at::TensorList w, at::TensorList c, int64_t pos, int64_t heads,
                       double cross_scale, at::ArrayRef<double> eps) {
  const int64_t layers = static_cast<int64_t>(w.size()) / 12;
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(w.size()) == 12 * layers, "layers_step: 12 weights per layer");
  TORCH_CHECK(static_cast<int64_t>(c.size()) == 4 * layers + 1 && static_cast<int64_t>(eps.size()) == 3 * layers,
              "layers_step: 4 caches and 3 epsilons per layer, then the cross bias");
  at::Tensor x = x_in.contiguous().clone();
  const int64_t rows = x.size(0), d = x.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && rows >= 1 && rows <= 8, "layers_step: x must be float32 with 1 to 8 rows");
  TORCH_CHECK(d % heads == 0, "layers_step: hidden size not divisible by heads");
  for (const auto& t : c) check_cache(t);
  const at::Tensor& bias = c[4 * layers];
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == rows, "layers_step: cross bias must be [rows, text]");
  for (int64_t l = 0; l < layers; ++l) {
    TORCH_CHECK(pos >= 0 && pos < c[4 * l].size(2), "layers_step: position ", pos, " outside the cache");
    TORCH_CHECK(c[4 * l + 2].size(2) == bias.size(1), "layers_step: text length differs from the bias");
    TORCH_CHECK(w[12 * l + 2].size(1) * kChunk == d && w[12 * l + 10].size(0) == w[10].size(0),
                "layers_step: weights do not match the hidden size");
  }
  Scratch buf(rows, d, w[10].size(0) * kBlockRows);
  float* xp = x.data_ptr<float>();
  for (int64_t l = 0; l < layers; ++l) {
    layer_impl(xp, rows, d, heads, &w[12 * l], c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3],
               bias.data_ptr<float>(), pos, static_cast<float>(cross_scale), &eps[3 * l], buf);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY(tydust, m) {
  m.def("skinny_mm(Tensor x, Tensor wb) -> Tensor");
  m.def("layers_step(Tensor x, Tensor[] weights, Tensor[] caches, int pos, int heads, float cross_scale, float[] eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(tydust, CPU, m) {
  m.impl("skinny_mm", &skinny_mm);
  m.impl("layers_step", &layers_step);
}
