// tydust-gen's CPU kernel for the decode step's skinny products: y = x W^T with few rows.
//
// A MusicGen decode step multiplies every decoder weight matrix by only 2 rows
// (the guided and unguided halves; 2·takes with variations), so its time is the
// time to stream the weights from memory. MKL's small-N sgemm reaches 50-80 % of
// this machine's read bandwidth on it; this kernel reads each weight once, straight
// from the model's own row-major [out, in] tensor: each thread takes whole groups of
// 4 output rows (a contiguous stretch of memory) and walks their 4 rows side by side,
// 16 columns at a time. Earlier versions read a blocked copy [out/4, in/16, 4, 16]
// (one stream per thread); that copy doubled the decoder's weights in memory (+1.1 GB
// for musicgen-small), so the kernel now reads the weights where they are, with the
// same arithmetic. Each thread keeps R x G partial sums in vector registers (G rows
// of the group at a time: all 4 for R <= 4, 2 for more rows) and reduces them at the
// end of the row. Vectors are GCC's generic 16-float vectors, so the same source
// compiles to AVX-512, AVX2 or NEON with -march=native. Sums are in a different order
// than MKL's: results agree to float32 rounding, not bit for bit.
//
// Every input is checked (dtype, contiguity, device, every shape against the others)
// before a pointer is read, and a bad one raises ValueError in Python: the pointer
// arithmetic below trusts the shapes completely.
//
// Built by tydust_gen/model/cpu_kernel.py on first use; registered as torch.ops.tydust.skinny_mm
// (one input times one or more weights) and torch.ops.tydust.layers_step (every decoder layer of one decode step).

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

// Output rows [4 b0, 4 b1) of y = x W^T for R input rows; W row-major [out, in]; y row r at y + r * ys.
template <int R, int G>
void block_range(const float* wp, const float* x, float* y, int64_t ys, int64_t in, int64_t b0, int64_t b1) {
  const int64_t chunks = in / kChunk;
  for (int64_t b = b0; b < b1; ++b) {
    for (int g = 0; g < kBlockRows / G; ++g) {
      v16 acc[R][G];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < G; ++j) acc[r][j] = v16{};
      const int64_t row = b * kBlockRows + g * G;
      const float* w = wp + row * in;
      for (int64_t c = 0; c < chunks; ++c) {
        v16 wv[G];
        for (int j = 0; j < G; ++j) wv[j] = load16(w + j * in + c * kChunk);
        for (int r = 0; r < R; ++r) {
          const v16 xv = load16(x + r * in + c * kChunk);
          for (int j = 0; j < G; ++j) acc[r][j] += wv[j] * xv;
        }
      }
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < G; ++j) y[r * ys + row + j] = reduce16(acc[r][j]);
    }
  }
}

// y [R, sum of outs] = x times every weight of ws (each [out_i, in]), their outputs side by side,
// in one parallel region: the threads split the row groups of all weights together.
template <int R>
void run_rows(const std::vector<const float*>& wp, const std::vector<int64_t>& outs, const float* x, float* y,
              int64_t total, int64_t in) {
  constexpr int G = R <= 4 ? 4 : 2;
  std::vector<int64_t> first(outs.size() + 1, 0);  // first row group of each weight
  for (size_t i = 0; i < outs.size(); ++i) first[i + 1] = first[i] + outs[i] / kBlockRows;
  at::parallel_for(0, first.back(), 4, [&](int64_t b0, int64_t b1) {
    int64_t col = 0;
    for (size_t i = 0; i < outs.size(); col += outs[i], ++i) {
      const int64_t lo = std::max(b0, first[i]), hi = std::min(b1, first[i + 1]);
      if (lo < hi) block_range<R, G>(wp[i], x, y + col, total, in, lo - first[i], hi - first[i]);
    }
  });
}

const char* dtype_name(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

// A weight the products can read: [out, in] float32 CPU contiguous, out % 4 == 0, in % 16 == 0.
void check_weight(const at::Tensor& w, const char* what, int64_t out, int64_t in) {
  TORCH_CHECK_VALUE(w.device().is_cpu(), what, ": must be on the CPU, got ", w.device());
  TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat, what, ": must be float32, got ", dtype_name(w));
  TORCH_CHECK_VALUE(w.dim() == 2, what, ": must be a matrix [out, in], got ", w.dim(), " dimensions");
  TORCH_CHECK_VALUE(w.is_contiguous(), what, ": must be contiguous (row-major)");
  TORCH_CHECK_VALUE(w.size(0) % kBlockRows == 0 && w.size(1) % kChunk == 0, what, ": shape [", w.size(0), ", ",
                    w.size(1), "] needs out % 4 == 0 and in % 16 == 0");
  TORCH_CHECK_VALUE(in < 0 || w.size(1) == in, what, ": has ", w.size(1), " columns, expected ", in);
  TORCH_CHECK_VALUE(out < 0 || w.size(0) == out, what, ": has ", w.size(0), " rows, expected ", out);
}

// x [R, in] float32 (1 <= R <= 8) times each w_i [out_i, in] (float32, contiguous) -> y [R, sum out_i]:
// the products of one input with several weights (q, k, v; the output heads), as one product
// with the weights stacked would give, without stacking them (that would copy the weights).
at::Tensor skinny_mm(const at::Tensor& x, at::TensorList ws) {
  TORCH_CHECK_VALUE(!ws.empty(), "skinny_mm: no weights");
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
                    "skinny_mm: x must be a float32 CPU matrix, got ", dtype_name(x), " with ", x.dim(), " dimensions");
  const int64_t in = ws[0].dim() == 2 ? ws[0].size(1) : -1, rows = x.size(0);
  std::vector<const float*> wp;
  std::vector<int64_t> outs;
  int64_t total = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    const std::string what = "skinny_mm: weight " + std::to_string(i);
    check_weight(ws[i], what.c_str(), -1, in);
    wp.push_back(ws[i].data_ptr<float>());
    outs.push_back(ws[i].size(0));
    total += ws[i].size(0);
  }
  TORCH_CHECK_VALUE(x.size(1) == in, "skinny_mm: x has ", x.size(1), " columns, the weight ", in);
  TORCH_CHECK_VALUE(rows >= 1 && rows <= 8, "skinny_mm: 1 to 8 rows, got ", rows);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({rows, total}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (rows) {
    case 1: run_rows<1>(wp, outs, xp, yp, total, in); break;
    case 2: run_rows<2>(wp, outs, xp, yp, total, in); break;
    case 3: run_rows<3>(wp, outs, xp, yp, total, in); break;
    case 4: run_rows<4>(wp, outs, xp, yp, total, in); break;
    case 5: run_rows<5>(wp, outs, xp, yp, total, in); break;
    case 6: run_rows<6>(wp, outs, xp, yp, total, in); break;
    case 7: run_rows<7>(wp, outs, xp, yp, total, in); break;
    default: run_rows<8>(wp, outs, xp, yp, total, in); break;
  }
  return y;
}

// ---------------------------------------------------------------------------------------
// One pre-LN decoder layer for one new position, in one call (the eager CPU decode step).
//
// Same math as fast._decoder's single-position branch: layer norm -> q, k, v (the model's
// three projections) -> write k, v at `pos` -> attention over cache positions [0, pos]
// (scores scaled by 1/sqrt(hd), as transformers does) -> out projection + residual; layer norm -> cross q -> attention
// over the text keys (scale, additive mask bias) -> out projection + residual; layer
// norm -> fc1 -> exact GELU -> fc2 + residual. Python would spend ~25 dispatches per
// layer on this; here it is one call and ONE OpenMP parallel region (torch's own
// OpenMP runtime and thread count): the threads split each product's row groups and the
// attention's (row, head) pairs, and meet at barriers between phases. A fork/join per
// phase (9 a layer) cost ~3.8 ms a step on this 2-core machine; barriers cost little.

inline void share(int64_t n, int tid, int nth, int64_t& lo, int64_t& hi) {
  lo = n * tid / nth;
  hi = n * (tid + 1) / nth;
}

// This thread's share of the row groups of x [rows, in] times w [out, in] -> y (row r at y + r * ys).
void skinny_share(const float* x, const at::Tensor& w, float* y, int64_t ys, int64_t rows, int tid, int nth) {
  const int64_t in = w.size(1);
  const float* wp = w.data_ptr<float>();
  int64_t b0, b1;
  share(w.size(0) / kBlockRows, tid, nth, b0, b1);
  if (b0 >= b1) return;
  switch (rows) {
    case 1: block_range<1, 4>(wp, x, y, ys, in, b0, b1); break;
    case 2: block_range<2, 4>(wp, x, y, ys, in, b0, b1); break;
    case 3: block_range<3, 4>(wp, x, y, ys, in, b0, b1); break;
    case 4: block_range<4, 4>(wp, x, y, ys, in, b0, b1); break;
    case 5: block_range<5, 2>(wp, x, y, ys, in, b0, b1); break;
    case 6: block_range<6, 2>(wp, x, y, ys, in, b0, b1); break;
    case 7: block_range<7, 2>(wp, x, y, ys, in, b0, b1); break;
    default: block_range<8, 2>(wp, x, y, ys, in, b0, b1); break;
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

// One layer in place on xp [rows, d]. w: the layer's kWeights tensors (ln1 w, ln1 b, q, k, v,
// self_out, ln2 w, ln2 b, cross_q, cross_out, ln3 w, ln3 b, fc1, fc2; projections row-major
// [out, in], the model's own); sk, sv: its self-attention cache [rows, H, cap, hd]; ck, cv: its
// text keys/values [rows, H, text, hd]; cbias: [rows, text] additive; eps: its three epsilons.
constexpr int64_t kWeights = 14;

struct Scratch {
  std::vector<float> h, a, y, g;
  Scratch(int64_t rows, int64_t d, int64_t ffn) : h(rows * d), a(rows * d), y(rows * std::max<int64_t>(3 * d, ffn)), g(rows * d) {}
};

void layer_impl(float* xp, int64_t rows, int64_t d, int64_t heads, const at::Tensor* w, const at::Tensor& skt,
                const at::Tensor& svt, const at::Tensor& ckt, const at::Tensor& cvt, const float* cbias,
                int64_t pos, float sscale, float cscale, const double* eps, Scratch& buf) {
  auto f = [](const at::Tensor& t) { return t.data_ptr<float>(); };
  const int64_t hd = d / heads, cap = skt.size(2), text = ckt.size(2), ffn = w[12].size(0);
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
    // [rows, 3d]: q | k | v, from the model's three projections
    skinny_share(hp, w[2], yp, 3 * d, rows, tid, nth);
    skinny_share(hp, w[3], yp + d, 3 * d, rows, tid, nth);
    skinny_share(hp, w[4], yp + 2 * d, 3 * d, rows, tid, nth);
#pragma omp barrier
#pragma omp single
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t hh = 0; hh < heads; ++hh) {
        std::memcpy(sk + ((r * heads + hh) * cap + pos) * hd, yp + r * 3 * d + d + hh * hd, hd * sizeof(float));
        std::memcpy(sv + ((r * heads + hh) * cap + pos) * hd, yp + r * 3 * d + 2 * d + hh * hd, hd * sizeof(float));
      }
    attend_range(yp, 3 * d, sk, sv, cap, pos + 1, nullptr, sscale, ap, heads, hd, t0, t1, scratch.data());
#pragma omp barrier
    skinny_share(ap, w[5], gp, d, rows, tid, nth);
#pragma omp barrier
#pragma omp single
    {
      for (int64_t i = 0; i < rows * d; ++i) xp[i] += gp[i];
      // cross-attention over the text
      layer_norm_rows(xp, hp, f(w[6]), f(w[7]), eps[1], rows, d);
    }
    skinny_share(hp, w[8], yp, d, rows, tid, nth);
#pragma omp barrier
    attend_range(yp, d, ck, cv, text, text, cbias, cscale, ap, heads, hd, t0, t1, scratch.data());
#pragma omp barrier
    skinny_share(ap, w[9], gp, d, rows, tid, nth);
#pragma omp barrier
#pragma omp single
    {
      for (int64_t i = 0; i < rows * d; ++i) xp[i] += gp[i];
      // feed-forward
      layer_norm_rows(xp, hp, f(w[10]), f(w[11]), eps[2], rows, d);
    }
    skinny_share(hp, w[12], yp, ffn, rows, tid, nth);
#pragma omp barrier
    {
      // exact (erf) GELU, as nn.functional.gelu's default, on this thread's slice. The C
      // library's erf here took 23 us a layer; at::gelu_ called inside this region took 50-60.
      int64_t i0, i1;
      share(rows * ffn, tid, nth, i0, i1);
      for (int64_t i = i0; i < i1; ++i) yp[i] = 0.5f * yp[i] * (1.0f + std::erf(yp[i] * 0.70710678118654752f));
    }
#pragma omp barrier
    skinny_share(yp, w[13], gp, d, rows, tid, nth);
#pragma omp barrier
#pragma omp single
    for (int64_t i = 0; i < rows * d; ++i) xp[i] += gp[i];
  }
}

// A float32 CPU contiguous tensor of exactly this shape.
void check_tensor(const at::Tensor& t, const char* what, int64_t layer, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "layers_step: ", what, " of layer ", layer, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, "layers_step: ", what, " of layer ", layer, " must be float32, got ",
                    dtype_name(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), "layers_step: ", what, " of layer ", layer, " must be contiguous");
  TORCH_CHECK_VALUE(t.sizes() == shape, "layers_step: ", what, " of layer ", layer, " has shape ", t.sizes(),
                    ", expected ", shape);
}

// All L layers for one position: x [R, D]; weights: kWeights per layer, layer after layer; caches:
// self_k, self_v, cross_k, cross_v per layer, then the cross bias [R, S] once; eps: 3 per layer.
// self_scale: 1/sqrt(head dim) for the self-attention scores (q comes unscaled from the model's
// q projection); cross_scale likewise for the text. Returns the new x [R, D] (before the final
// layer norm). One call per decode step, so Python and the dispatcher are paid once a step, not
// once a layer. Every tensor is checked against x's rows, the hidden size, the heads, the first
// fc1's width and the first cache's length before any pointer is read.
at::Tensor layers_step(const at::Tensor& x_in, at::TensorList w, at::TensorList c, int64_t pos, int64_t heads,
                       double self_scale, double cross_scale, at::ArrayRef<double> eps) {
  const int64_t layers = static_cast<int64_t>(w.size()) / kWeights;
  TORCH_CHECK_VALUE(layers >= 1 && static_cast<int64_t>(w.size()) == kWeights * layers, "layers_step: ", kWeights,
                    " weights per layer, got ", w.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(c.size()) == 4 * layers + 1 && static_cast<int64_t>(eps.size()) == 3 * layers,
                    "layers_step: 4 caches and 3 epsilons per layer, then the cross bias");
  TORCH_CHECK_VALUE(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
                    "layers_step: x must be a float32 CPU matrix [rows, hidden]");
  const int64_t rows = x_in.size(0), d = x_in.size(1);
  TORCH_CHECK_VALUE(rows >= 1 && rows <= 8, "layers_step: 1 to 8 rows, got ", rows);
  TORCH_CHECK_VALUE(heads >= 1 && d % heads == 0, "layers_step: hidden size ", d, " not divisible by ", heads, " heads");
  TORCH_CHECK_VALUE(d % kChunk == 0, "layers_step: hidden size ", d, " is not a multiple of ", kChunk);
  check_weight(w[12], "layers_step: fc1 of layer 0", -1, d);
  TORCH_CHECK_VALUE(c[0].dim() == 4, "layers_step: self-attention keys of layer 0 must be [rows, heads, positions, head dim]");
  const int64_t hd = d / heads, ffn = w[12].size(0), cap = c[0].size(2);
  TORCH_CHECK_VALUE(ffn % kChunk == 0, "layers_step: feed-forward width ", ffn, " is not a multiple of ", kChunk);
  TORCH_CHECK_VALUE(pos >= 0 && pos < cap, "layers_step: position ", pos, " outside the cache of ", cap, " positions");
  const at::Tensor& bias = c[4 * layers];
  TORCH_CHECK_VALUE(bias.dim() == 2, "layers_step: cross bias must be [rows, text]");
  const int64_t text = bias.size(1);
  TORCH_CHECK_VALUE(text >= 1, "layers_step: empty text");
  check_tensor(bias, "cross bias", 0, {rows, text});
  const char* names[kWeights] = {"ln1 weight", "ln1 bias", "q", "k", "v", "self_out", "ln2 weight", "ln2 bias",
                                 "cross_q", "cross_out", "ln3 weight", "ln3 bias", "fc1", "fc2"};
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* lw = &w[kWeights * l];
    for (int64_t i = 0; i < kWeights; ++i) {
      const std::string what = std::string("layers_step: ") + names[i] + " of layer " + std::to_string(l);
      const int64_t out = i == 12 ? ffn : d, in = i == 13 ? ffn : d;
      if (i == 0 || i == 1 || i == 6 || i == 7 || i == 10 || i == 11)
        check_tensor(lw[i], names[i], l, {d});
      else
        check_weight(lw[i], what.c_str(), out, in);
    }
    check_tensor(c[4 * l], "self-attention keys", l, {rows, heads, cap, hd});
    check_tensor(c[4 * l + 1], "self-attention values", l, {rows, heads, cap, hd});
    check_tensor(c[4 * l + 2], "text keys", l, {rows, heads, text, hd});
    check_tensor(c[4 * l + 3], "text values", l, {rows, heads, text, hd});
  }
  at::Tensor x = x_in.contiguous().clone();
  Scratch buf(rows, d, ffn);
  float* xp = x.data_ptr<float>();
  for (int64_t l = 0; l < layers; ++l) {
    layer_impl(xp, rows, d, heads, &w[kWeights * l], c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3],
               bias.data_ptr<float>(), pos, static_cast<float>(self_scale), static_cast<float>(cross_scale),
               &eps[3 * l], buf);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY(tydust, m) {
  m.def("skinny_mm(Tensor x, Tensor[] weights) -> Tensor");
  m.def("layers_step(Tensor x, Tensor[] weights, Tensor[] caches, int pos, int heads, float self_scale, float cross_scale, float[] eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(tydust, CPU, m) {
  m.impl("skinny_mm", &skinny_mm);
  m.impl("layers_step", &layers_step);
}
