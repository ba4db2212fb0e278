// Fused CPU kernels: the row/column log-sum-exp of S = scale * q k^T and its gradient, and
// the sigmoid loss's row sums and gradient (siglip_tiles).
// Algorithm: docs/DESIGN.md, sections 3 and 4. Per-element math: common/tile_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common/tile_math.h"

namespace {

constexpr int64_t kRows = 256;   // rows of a tile
constexpr int64_t kCols = 256;   // columns of a tile
constexpr int64_t kPartialBudget = int64_t(1) << 30;  // bytes for per-stripe dk partials

// exp for the vectorized loops: branch free, ~2 ulp, exactly 0 below -87.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CK_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CK_MULTIVERSION
#endif

#if defined(__GNUC__)
#define CK_INLINE inline __attribute__((always_inline))
#else
#define CK_INLINE inline
#endif

// exp(x) for x <= 0 (the argument is a logit minus its running max): 0 below -87,
// NaN for NaN (a NaN logit must reach the log-sum-exp, not count as masked). Always
// inlined: a call inside a loop stops its vectorization.
CK_INLINE float exp_poly(float x) {
  const float lo = -87.0f;
  const bool nan = x != x;
  const bool zero = x < lo;  // also -inf
  x = std::min(std::max(lo, x), 88.0f);  // NaN -> lo: (lo < NaN) is false
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  // Taylor series of exp(r) to r^7 (|r| <= ln2/2: truncation error < 1e-8).
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return nan ? NAN : (zero ? 0.0f : p * scale);
}

struct FastExp {
  CK_INLINE float operator()(float x) const { return exp_poly(x); }
  CK_INLINE double operator()(double x) const { return std::exp(x); }
};

// ---- tile passes; x is a rows x cols tile of logits (row-major, leading dim cols)

// max_j x[j] (-inf for none), 16 lanes wide: an elementwise max vectorizes where a scalar
// max reduction does not (about 20x faster). A NaN may or may not win; the caller's sum
// of exp(x - max) is NaN either way.
CK_INLINE float row_max(const float* x, int64_t cols) {
  constexpr int64_t kLanes = 16;
  float lanes[kLanes];
  for (int64_t t = 0; t < kLanes; ++t) lanes[t] = -INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= cols; j += kLanes) {
#pragma omp simd
    for (int64_t t = 0; t < kLanes; ++t) lanes[t] = std::max(lanes[t], x[j + t]);
  }
  float mx = -INFINITY;
  for (; j < cols; ++j) mx = std::max(mx, x[j]);
  for (int64_t t = 0; t < kLanes; ++t) mx = std::max(mx, lanes[t]);
  return mx;
}

// Row partials: m[i] = max_j x_ij, l[i] = sum_j exp(x_ij - m[i]).
template <typename T>
void row_partials(const T* x, int64_t rows, int64_t cols, T* m, T* l);

template <>
CK_MULTIVERSION void row_partials<float>(const float* x, int64_t rows, int64_t cols, float* m, float* l) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * cols;
    const float mx = row_max(xi, cols);
    const float ref = std::isinf(mx) ? 0.0f : mx;  // all -inf: any finite reference
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) sum += exp_poly(xi[j] - ref);
    m[i] = mx;
    l[i] = sum;
  }
}

template <>
void row_partials<double>(const double* x, int64_t rows, int64_t cols, double* m, double* l) {
  for (int64_t i = 0; i < rows; ++i) {
    const double* xi = x + i * cols;
    double mx = -INFINITY;
    for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, xi[j]);
    const double ref = std::isinf(mx) ? 0.0 : mx;
    double sum = 0.0;
    for (int64_t j = 0; j < cols; ++j) sum += std::exp(xi[j] - ref);
    m[i] = mx;
    l[i] = sum;
  }
}

// Column partials, same as rows on the transpose: walks rows so the inner loop is contiguous
// (ld: the row stride of x, >= cols).
template <typename T>
void col_partials(const T* x, int64_t rows, int64_t cols, int64_t ld, T* m, T* l);

template <>
CK_MULTIVERSION void col_partials<float>(const float* x, int64_t rows, int64_t cols, int64_t ld,
                                         float* m, float* l) {
  for (int64_t j = 0; j < cols; ++j) { m[j] = -INFINITY; l[j] = 0.0f; }
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) m[j] = std::max(m[j], xi[j]);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const float ref = m[j] == -INFINITY ? 0.0f : m[j];
      l[j] += exp_poly(xi[j] - ref);
    }
  }
}

template <>
void col_partials<double>(const double* x, int64_t rows, int64_t cols, int64_t ld, double* m,
                          double* l) {
  for (int64_t j = 0; j < cols; ++j) { m[j] = -INFINITY; l[j] = 0.0; }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) m[j] = std::max(m[j], x[i * ld + j]);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const double ref = m[j] == -INFINITY ? 0.0 : m[j];
      l[j] += std::exp(x[i * ld + j] - ref);
    }
}

// dS: y_ij = g_r[i] exp(x_ij - lse_r[i]) + g_c[j] exp(x_ij - lse_c[j]) (y may be x: in
// place). lse values are already passed through ck::backward_lse; g_c == nullptr: rows only.
template <typename T>
void grad_tile(const T* x, T* y, int64_t rows, int64_t cols, const T* lse_r, const T* g_r,
               const T* lse_c, const T* g_c);

template <>
CK_MULTIVERSION void grad_tile<float>(const float* x, float* y, int64_t rows, int64_t cols,
                                      const float* lse_r, const float* g_r, const float* lse_c,
                                      const float* g_c) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * cols;
    float* yi = y + i * cols;
    const float lr = lse_r[i], gr = g_r[i];
    if (g_c) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j)
        yi[j] = ck::tile_grad(xi[j], lr, gr, lse_c[j], g_c[j], FastExp());
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) yi[j] = gr * exp_poly(xi[j] - lr);
    }
  }
}

template <>
void grad_tile<double>(const double* x, double* y, int64_t rows, int64_t cols,
                       const double* lse_r, const double* g_r, const double* lse_c,
                       const double* g_c) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      y[i * cols + j] = g_c ? ck::tile_grad(x[i * cols + j], lse_r[i], g_r[i], lse_c[j], g_c[j])
                            : g_r[i] * std::exp(x[i * cols + j] - lse_r[i]);
}

// The positive shift (margin, decoupled): x_ij += delta[i] where rid[i] == cid[j]
// (delta = -inf leaves the entry out). rid < 0: the row has no positive in this block.
template <typename T>
void shift_tile(T* x, int64_t rows, int64_t cols, const int32_t* rid, const int32_t* cid,
                const T* delta) {
  for (int64_t i = 0; i < rows; ++i) {
    const int32_t r = rid[i];
    if (r < 0) continue;
    const T dl = delta[i];
    T* xi = x + i * cols;
    for (int64_t j = 0; j < cols; ++j)
      if (cid[j] == r) xi[j] += dl;
  }
}

// out[i] += sum_j [rid[i] == cid[j]] x_ij: the shift's gradient from a tile of dS.
template <typename T>
void shift_grad(const T* x, int64_t rows, int64_t cols, const int32_t* rid, const int32_t* cid,
                T* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const int32_t r = rid[i];
    if (r < 0) continue;
    const T* xi = x + i * cols;
    T sum = 0;
    for (int64_t j = 0; j < cols; ++j)
      if (cid[j] == r) sum += xi[j];
    out[i] += sum;
  }
}

// The shift of one call: row ids (N,), key ids (M,) and delta (N,), or none.
struct Shift {
  at::Tensor rid, cid, delta;
  bool on() const { return rid.defined() && rid.numel() > 0; }
  Shift() = default;
  Shift(const at::Tensor& r, const at::Tensor& c, const at::Tensor& d, at::ScalarType acc,
        int64_t n, int64_t m) {
    if (r.numel() == 0) return;
    TORCH_CHECK(r.numel() == n && d.numel() == n && c.numel() == m,
                "rid and delta must have N entries and cid M");
    rid = r.to(at::kInt).contiguous();
    cid = c.to(at::kInt).contiguous();
    delta = d.detach().to(acc).contiguous();
  }
  template <typename T>
  void apply(T* x, int64_t i0, int64_t ni, int64_t j0, int64_t nj) const {
    if (on())
      shift_tile<T>(x, ni, nj, rid.data_ptr<int32_t>() + i0, cid.data_ptr<int32_t>() + j0,
                    delta.data_ptr<T>() + i0);
  }
};

// log(1 + x) for 0 <= x <= 1: 2 atanh(u) with u = x / (2 + x) <= 1/3, its series to u^13
// (truncation < 2e-8 relative); vectorizes, unlike std::log1p. NaN for NaN.
CK_INLINE float log1p_poly(float x) {
  const float u = x / (2.0f + x);
  const float u2 = u * u;
  float p = 1.0f / 13.0f;
  p = p * u2 + 1.0f / 11.0f;
  p = p * u2 + 1.0f / 9.0f;
  p = p * u2 + 1.0f / 7.0f;
  p = p * u2 + 1.0f / 5.0f;
  p = p * u2 + 1.0f / 3.0f;
  p = p * u2 + 1.0f;
  return 2.0f * u * p;
}

struct FastLog1p {
  CK_INLINE float operator()(float x) const { return log1p_poly(x); }
  CK_INLINE double operator()(double x) const { return std::log1p(x); }
};

// The sigmoid loss's pass over a tile of s <q_i, k_j>: z = x + bias, positive where
// rid[i] == cid[j] (ids of the tile's rows and columns, cid >= 0; rid nullptr or < 0:
// none; a row with rid[i] >= 0 reads cid). With sums, adds
// each row's loss sum_j softplus(-y_ij z_ij) to r[i] and sum_j dz_ij to t[i]; with grad,
// x_ij <- g[i] dz_ij (g == nullptr: 1), dz = sigmoid(z) - [positive] (ck::siglip_term).
template <typename T>
void siglip_tile(T* x, int64_t rows, int64_t cols, T bias, const int* rid, const int* cid,
                 const T* g, bool grad, T* r, T* t);

// One row of siglip_tile<float>: kIds tests the ids (the row has a positive among the
// keys), kStore writes g dz over x; the sign -y is a factor, so that the loop vectorizes.
template <bool kIds, bool kStore>
CK_INLINE void siglip_row(float* xi, int64_t cols, float bias, int ri, const int* cid,
                          float gi, float& sp_sum, float& dz_sum) {
  float sps = 0.0f, dzs = 0.0f;
#pragma omp simd reduction(+ : sps, dzs)
  for (int64_t j = 0; j < cols; ++j) {
    const float minus_y = kIds && cid[j] == ri ? -1.0f : 1.0f;
    float sp, sg;
    ck::softplus_sigmoid(minus_y * (xi[j] + bias), sp, sg, FastExp(), FastLog1p());
    sps += sp;
    dzs += minus_y * sg;
    if constexpr (kStore) xi[j] = gi * minus_y * sg;
  }
  sp_sum = sps, dz_sum = dzs;
}

template <>
CK_MULTIVERSION void siglip_tile<float>(float* x, int64_t rows, int64_t cols, float bias,
                                        const int* rid, const int* cid, const float* g,
                                        bool grad, float* r, float* t) {
  for (int64_t i = 0; i < rows; ++i) {
    float* xi = x + i * cols;
    const float gi = g ? g[i] : 1.0f;
    const int ri = rid ? rid[i] : -1;
    float sp_sum, dz_sum;
    if (ri < 0)   // no positive in this row: the loop without the id test
      grad ? siglip_row<false, true>(xi, cols, bias, ri, cid, gi, sp_sum, dz_sum)
           : siglip_row<false, false>(xi, cols, bias, ri, cid, gi, sp_sum, dz_sum);
    else
      grad ? siglip_row<true, true>(xi, cols, bias, ri, cid, gi, sp_sum, dz_sum)
           : siglip_row<true, false>(xi, cols, bias, ri, cid, gi, sp_sum, dz_sum);
    if (r) r[i] += sp_sum, t[i] += dz_sum;
  }
}

template <>
void siglip_tile<double>(double* x, int64_t rows, int64_t cols, double bias, const int* rid,
                         const int* cid, const double* g, bool grad, double* r, double* t) {
  for (int64_t i = 0; i < rows; ++i) {
    const double gi = g ? g[i] : 1.0;
    const int ri = rid ? rid[i] : -1;
    for (int64_t j = 0; j < cols; ++j) {
      double sp, dz;
      ck::siglip_term(x[i * cols + j] + bias, ri >= 0 && cid[j] == ri, sp, dz);
      if (r) { r[i] += sp; t[i] += dz; }
      if (grad) x[i * cols + j] = gi * dz;
    }
  }
}

// ---- shared set-up

struct Tile {
  at::Tensor buf;  // kRows * kCols scratch, reused for every tile of a stripe
  // S = scale * a @ b^T for row block [i0, i0+ni) of a and [j0, j0+nj) of b, as an
  // ni x nj view (beta = 0: the scratch's old contents, NaN included, are ignored).
  at::Tensor logits(const at::Tensor& a, const at::Tensor& b, double scale, int64_t i0,
                    int64_t ni, int64_t j0, int64_t nj, bool self_mask) {
    at::Tensor s = at::from_blob(buf.data_ptr(), {ni, nj}, buf.options());
    at::addmm_out(s, s, a.narrow(0, i0, ni), b.narrow(0, j0, nj).t(), /*beta=*/0, /*alpha=*/scale);
    if (self_mask) mask_diagonal(s, i0, j0);
    return s;
  }
  static void mask_diagonal(at::Tensor& s, int64_t i0, int64_t j0) {
    const int64_t ni = s.size(0), nj = s.size(1);
    const int64_t lo = std::max(i0, j0), hi = std::min(i0 + ni, j0 + nj);
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "mask_diagonal", [&] {
      scalar_t* p = s.data_ptr<scalar_t>();
      for (int64_t d = lo; d < hi; ++d) p[(d - i0) * nj + (d - j0)] = -INFINITY;
    });
  }
};

// Rows split into `stripes` contiguous ranges of whole tiles, one per task.
struct Stripes {
  int64_t n, count, per;
  Stripes(int64_t n_, int64_t want) : n(n_) {
    const int64_t blocks = (n + kRows - 1) / kRows;
    count = std::max<int64_t>(1, std::min(want, blocks));
    per = (blocks + count - 1) / count * kRows;
  }
  int64_t begin(int64_t s) const { return std::min(n, s * per); }
  int64_t end(int64_t s) const { return std::min(n, (s + 1) * per); }
};

// poison (an op argument the test suite sets): outputs and scratch start as NaN, so
// any element a kernel fails to write shows up in the results.
at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts, bool poison) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// dq and dk accumulators of a backward pass over row stripes: dk has one partial per
// stripe (the stripe count capped so that they stay under kPartialBudget), summed at the
// end. A gradient not needed is neither allocated nor computed (returned empty).
struct GradAccumulators {
  Stripes st;
  at::Tensor dq;
  std::vector<at::Tensor> dk_parts;  // separate tensors: the added ones are freed on return
  GradAccumulators(const at::Tensor& qa, int64_t m, bool need_dq, bool need_dk)
      : st(qa.size(0), stripes(qa, m, need_dk)) {
    const int64_t n = qa.size(0), d = qa.size(1);
    dq = at::zeros({need_dq ? n : 0, d}, qa.options());
    for (int64_t s = 0; s < st.count; ++s) dk_parts.push_back(at::zeros({need_dk ? m : 0, d}, qa.options()));
  }
  static int64_t stripes(const at::Tensor& qa, int64_t m, bool need_dk) {
    const int64_t bytes = m * qa.size(1) * static_cast<int64_t>(qa.element_size());
    return !need_dk ? at::get_num_threads() :
        std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, kPartialBudget / std::max<int64_t>(bytes, 1)));
  }
  at::Tensor dk() {
    for (int64_t s = 1; s < st.count; ++s) dk_parts[0].add_(dk_parts[s]);
    return dk_parts[0];
  }
};

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A new contiguous copy of the log-sum-exps v in dtype acc, through ck::backward_lse (a
// line with lse = -inf gets probability 0).
at::Tensor backward_lses(const at::Tensor& v, at::ScalarType acc) {
  at::Tensor out = v.to(acc).contiguous().clone();
  AT_DISPATCH_FLOATING_TYPES(acc, "backward_lse", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < out.numel(); ++i) p[i] = ck::backward_lse(p[i]);
  });
  return out;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, bool self_mask) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, "q and k must be 2-D");
  TORCH_CHECK(q.size(1) == k.size(1), "q and k must have the same embedding dim");
  TORCH_CHECK(q.size(0) > 0 && k.size(0) > 0, "q and k must have rows");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must have the same dtype");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "q must be floating point");
  TORCH_CHECK(!self_mask || q.size(0) == k.size(0), "self_mask needs as many keys as queries");
}

// The sigmoid loss's positive ids: int32, contiguous, (N,) and (M,), on the CPU.
void check_ids(const at::Tensor& rid, const at::Tensor& cid, int64_t n, int64_t m) {
  for (const at::Tensor* x : {&rid, &cid})
    TORCH_CHECK(x->scalar_type() == at::kInt && x->is_contiguous() && x->dim() == 1 &&
                    x->device().is_cpu(),
                "rid and cid must be contiguous 1-D int32 CPU tensors");
  TORCH_CHECK(rid.numel() == n && cid.numel() == m, "rid must have N entries and cid M");
}

// ---- ops

std::tuple<at::Tensor, at::Tensor> lse_forward_impl(const at::Tensor& q, const at::Tensor& k,
                                                    double scale, bool self_mask, bool cols,
                                                    bool poison, const Shift& shift) {
  const auto acc = acc_type(q);
  // detach: parallel workers do not inherit the caller's no-grad mode.
  const at::Tensor qa = q.detach().to(acc).contiguous();
  const at::Tensor ka = k.detach().to(acc).contiguous();
  const int64_t n = q.size(0), m = k.size(0);
  at::Tensor lse_r = new_buffer({n}, q.options().dtype(acc), poison);
  const Stripes st(n, at::get_num_threads());
  // Column partials per stripe, merged after the parallel loop.
  at::Tensor col_m = new_buffer({cols ? st.count : 0, m}, lse_r.options(), poison);
  at::Tensor col_l = new_buffer({cols ? st.count : 0, m}, lse_r.options(), poison);

  AT_DISPATCH_FLOATING_TYPES(acc, "lse_forward_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, st.count, 1, [&](int64_t s0, int64_t s1) {
      Tile tile{new_buffer({kRows * kCols}, lse_r.options(), poison)};
      std::vector<T> tm(std::max(kRows, kCols)), tl(std::max(kRows, kCols));
      std::vector<ck::OnlineLSE<T>> rows(kRows);
      for (int64_t s = s0; s < s1; ++s) {
        std::vector<ck::OnlineLSE<T>> col_acc;
        if (cols) col_acc.assign(m, ck::OnlineLSE<T>::empty());
        for (int64_t i0 = st.begin(s); i0 < st.end(s); i0 += kRows) {
          const int64_t ni = std::min(kRows, n - i0);
          std::fill(rows.begin(), rows.end(), ck::OnlineLSE<T>::empty());
          for (int64_t j0 = 0; j0 < m; j0 += kCols) {
            const int64_t nj = std::min(kCols, m - j0);
            at::Tensor x = tile.logits(qa, ka, scale, i0, ni, j0, nj, self_mask);
            shift.apply<T>(x.data_ptr<T>(), i0, ni, j0, nj);
            const T* xp = x.data_ptr<T>();
            row_partials<T>(xp, ni, nj, tm.data(), tl.data());
            for (int64_t i = 0; i < ni; ++i) rows[i].merge(tm[i], tl[i]);
            if (cols) {
              col_partials<T>(xp, ni, nj, nj, tm.data(), tl.data());
              for (int64_t j = 0; j < nj; ++j) col_acc[j0 + j].merge(tm[j], tl[j]);
            }
          }
          T* out = lse_r.data_ptr<T>() + i0;
          for (int64_t i = 0; i < ni; ++i) out[i] = rows[i].finish();
        }
        if (cols) {
          T* pm = col_m.data_ptr<T>() + s * m;
          T* pl = col_l.data_ptr<T>() + s * m;
          for (int64_t j = 0; j < m; ++j) { pm[j] = col_acc[j].m; pl[j] = col_acc[j].l; }
        }
      }
    });
  });

  at::Tensor lse_c = new_buffer({cols ? m : 0}, lse_r.options(), poison);
  if (cols) {
    AT_DISPATCH_FLOATING_TYPES(acc, "lse_forward_cpu_cols", [&] {
      using T = scalar_t;
      const T* pm = col_m.data_ptr<T>();
      const T* pl = col_l.data_ptr<T>();
      T* out = lse_c.data_ptr<T>();
      at::parallel_for(0, m, 4096, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          auto c = ck::OnlineLSE<T>::empty();
          for (int64_t s = 0; s < st.count; ++s) c.merge(pm[s * m + j], pl[s * m + j]);
          out[j] = c.finish();
        }
      });
    });
  }
  return {lse_r, lse_c};
}

std::tuple<at::Tensor, at::Tensor> lse_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                   double scale, bool self_mask, bool cols,
                                                   bool /*deterministic: always*/, bool /*tf32*/,
                                                   bool poison) {
  check_inputs(q, k, self_mask);
  return lse_forward_impl(q, k, scale, self_mask, cols, poison, Shift());
}

std::tuple<at::Tensor, at::Tensor> lse_forward_ext_cpu(
    const at::Tensor& q, const at::Tensor& k, double scale, bool self_mask, bool cols,
    const at::Tensor& rid, const at::Tensor& cid, const at::Tensor& delta,
    bool /*deterministic: always*/, bool /*tf32*/, bool poison) {
  check_inputs(q, k, self_mask);
  return lse_forward_impl(q, k, scale, self_mask, cols, poison,
                          Shift(rid, cid, delta, acc_type(q), q.size(0), k.size(0)));
}

// dq, dk and (with the shift and need_dshift) the shift's gradient per row. With product
// operands pq (N x D'), pk (M x D') (defined, non-empty: the teacher's passes), the logits
// come from q, k but dq = dS pk and dk = dS^T pq.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward_impl(
    const at::Tensor& q, const at::Tensor& k, double scale, bool self_mask,
    const at::Tensor& lse_r, const at::Tensor& lse_c, const at::Tensor& g_r,
    const at::Tensor& g_c, bool need_dq, bool need_dk, bool poison, const Shift& shift,
    bool need_dshift, const at::Tensor& pq = at::Tensor(), const at::Tensor& pk = at::Tensor()) {
  const auto acc = acc_type(q);
  const int64_t n = q.size(0), m = k.size(0), d = q.size(1);
  const bool cols = g_c.numel() > 0;
  TORCH_CHECK(lse_r.numel() == n && g_r.numel() == n, "lse_r and g_r must have N entries");
  TORCH_CHECK(!cols || (lse_c.numel() == m && g_c.numel() == m), "lse_c and g_c must have M entries");
  // detach: parallel workers do not inherit the caller's no-grad mode.
  const at::Tensor qa = q.detach().to(acc).contiguous();
  const at::Tensor ka = k.detach().to(acc).contiguous();
  const bool prod = pq.defined() && pq.numel() > 0;
  const at::Tensor pqa = prod ? pq.detach().to(acc).contiguous() : qa;
  const at::Tensor pka = prod ? pk.detach().to(acc).contiguous() : ka;
  const at::Tensor lr = backward_lses(lse_r.detach(), acc);
  const at::Tensor gr = g_r.detach().to(acc).contiguous();
  const at::Tensor lc = cols ? backward_lses(lse_c.detach(), acc) : at::Tensor();
  const at::Tensor gc = cols ? g_c.detach().to(acc).contiguous() : at::Tensor();

  GradAccumulators acc_g(pqa, m, need_dq, need_dk);
  const Stripes& st = acc_g.st;
  at::Tensor& dq = acc_g.dq;
  need_dshift = need_dshift && shift.on();
  // each stripe owns its rows of dshift
  at::Tensor dshift = at::zeros({need_dshift ? n : 0}, qa.options());
  if (!need_dq && !need_dk && !need_dshift) return {dq, acc_g.dk(), dshift};

  AT_DISPATCH_FLOATING_TYPES(acc, "lse_backward_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, st.count, 1, [&](int64_t s0, int64_t s1) {
      Tile tile{new_buffer({kRows * kCols}, qa.options(), poison)};
      for (int64_t s = s0; s < s1; ++s) {
        at::Tensor dk = acc_g.dk_parts[s];
        for (int64_t i0 = st.begin(s); i0 < st.end(s); i0 += kRows) {
          const int64_t ni = std::min(kRows, n - i0);
          for (int64_t j0 = 0; j0 < m; j0 += kCols) {
            const int64_t nj = std::min(kCols, m - j0);
            at::Tensor x = tile.logits(qa, ka, scale, i0, ni, j0, nj, self_mask);
            shift.apply<T>(x.data_ptr<T>(), i0, ni, j0, nj);
            grad_tile<T>(x.data_ptr<T>(), x.data_ptr<T>(), ni, nj, lr.data_ptr<T>() + i0, gr.data_ptr<T>() + i0,
                         cols ? lc.data_ptr<T>() + j0 : nullptr, cols ? gc.data_ptr<T>() + j0 : nullptr);
            if (need_dshift)
              shift_grad<T>(x.data_ptr<T>(), ni, nj, shift.rid.data_ptr<int32_t>() + i0,
                            shift.cid.data_ptr<int32_t>() + j0, dshift.data_ptr<T>() + i0);
            if (need_dq) dq.narrow(0, i0, ni).addmm_(x, pka.narrow(0, j0, nj));
            if (need_dk) dk.narrow(0, j0, nj).addmm_(x.t(), pqa.narrow(0, i0, ni));
          }
        }
      }
    });
  });
  return {dq, acc_g.dk(), dshift};
}

std::tuple<at::Tensor, at::Tensor> lse_backward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                    double scale, bool self_mask,
                                                    const at::Tensor& lse_r, const at::Tensor& lse_c,
                                                    const at::Tensor& g_r, const at::Tensor& g_c,
                                                    bool need_dq, bool need_dk,
                                                    bool /*deterministic: always*/,
                                                    bool /*tf32*/, bool poison) {
  check_inputs(q, k, self_mask);
  auto out = lse_backward_impl(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq, need_dk,
                               poison, Shift(), false);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward_ext_cpu(
    const at::Tensor& q, const at::Tensor& k, double scale, bool self_mask,
    const at::Tensor& lse_r, const at::Tensor& lse_c, const at::Tensor& g_r,
    const at::Tensor& g_c, const at::Tensor& rid, const at::Tensor& cid,
    const at::Tensor& delta, const at::Tensor& pq, const at::Tensor& pk, bool need_dq,
    bool need_dk, bool need_dshift, bool /*deterministic: always*/, bool /*tf32*/,
    bool poison) {
  check_inputs(q, k, self_mask);
  if (pq.numel() > 0) {
    TORCH_CHECK(pq.dim() == 2 && pk.dim() == 2 && pq.size(0) == q.size(0) &&
                pk.size(0) == k.size(0) && pq.size(1) == pk.size(1),
                "pq and pk must be N x D' and M x D'");
  }
  return lse_backward_impl(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq, need_dk,
                           poison, Shift(rid, cid, delta, acc_type(q), q.size(0), k.size(0)),
                           need_dshift, pq, pk);
}

// The sigmoid loss's tiles (contract: contrastive_kernels/backends/base.py, siglip_tiles).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_tiles_cpu(
    const at::Tensor& q, const at::Tensor& k, double scale, double bias, const at::Tensor& g_r,
    const at::Tensor& rid, const at::Tensor& cid, bool sums, bool need_dq, bool need_dk,
    bool /*deterministic: always*/, bool /*tf32*/, bool poison) {
  check_inputs(q, k, false);
  const auto acc = acc_type(q);
  const int64_t n = q.size(0), m = k.size(0);
  check_ids(rid, cid, n, m);
  const bool given = g_r.numel() > 0;
  TORCH_CHECK(!given || g_r.numel() == n, "g_r must be empty or have N entries");
  // detach: parallel workers do not inherit the caller's no-grad mode.
  const at::Tensor qa = q.detach().to(acc).contiguous();
  const at::Tensor ka = k.detach().to(acc).contiguous();
  const at::Tensor gr = given ? g_r.detach().to(acc).contiguous() : at::Tensor();
  // r and t: each stripe owns its rows and sets them before adding.
  at::Tensor r = new_buffer({sums ? n : 0}, qa.options(), poison);
  at::Tensor t = new_buffer({sums ? n : 0}, qa.options(), poison);
  GradAccumulators acc_g(qa, m, need_dq, need_dk);
  const Stripes& st = acc_g.st;
  const bool grad = need_dq || need_dk;
  if (!sums && !grad) return {r, t, acc_g.dq, acc_g.dk()};

  AT_DISPATCH_FLOATING_TYPES(acc, "siglip_tiles_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, st.count, 1, [&](int64_t s0, int64_t s1) {
      Tile tile{new_buffer({kRows * kCols}, qa.options(), poison)};
      for (int64_t s = s0; s < s1; ++s) {
        at::Tensor dk = acc_g.dk_parts[s];
        for (int64_t i0 = st.begin(s); i0 < st.end(s); i0 += kRows) {
          const int64_t ni = std::min(kRows, n - i0);
          T* rp = sums ? r.data_ptr<T>() + i0 : nullptr;
          T* tp = sums ? t.data_ptr<T>() + i0 : nullptr;
          if (sums) std::fill(rp, rp + ni, T(0)), std::fill(tp, tp + ni, T(0));
          for (int64_t j0 = 0; j0 < m; j0 += kCols) {
            const int64_t nj = std::min(kCols, m - j0);
            at::Tensor x = tile.logits(qa, ka, scale, i0, ni, j0, nj, false);
            siglip_tile<T>(x.data_ptr<T>(), ni, nj, static_cast<T>(bias),
                           rid.data_ptr<int>() + i0, cid.data_ptr<int>() + j0,
                           given ? gr.data_ptr<T>() + i0 : nullptr, grad, rp, tp);
            if (need_dq) acc_g.dq.narrow(0, i0, ni).addmm_(x, ka.narrow(0, j0, nj));
            if (need_dk) dk.narrow(0, j0, nj).addmm_(x.t(), qa.narrow(0, i0, ni));
          }
        }
      }
    });
  });
  return {r, t, acc_g.dq, acc_g.dk()};
}

// ---- the small-problem path (contrastive_kernels/dense.py): the caller materializes S

void check_dense(const at::Tensor& s) {
  TORCH_CHECK(s.dim() == 2 && s.size(0) > 0 && s.size(1) > 0, "s must be a non-empty matrix");
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
              "s must be float32 or float64");
  TORCH_CHECK(s.is_contiguous(), "s must be contiguous");
}

void check_vector(const at::Tensor& v, const at::Tensor& s, int64_t len, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == len && v.scalar_type() == s.scalar_type(), name,
              " must be a vector of ", len, " entries of s's dtype");
}

// Rows per parallel chunk: about 16K entries each.
int64_t dense_grain(int64_t cols) { return std::max<int64_t>(1, (int64_t(1) << 14) / cols); }

std::tuple<at::Tensor, at::Tensor> dense_lse_cpu(const at::Tensor& s, bool cols, bool poison) {
  check_dense(s);
  const int64_t n = s.size(0), m = s.size(1);
  at::Tensor lse_r = new_buffer({n}, s.options(), poison);
  at::Tensor lse_c = new_buffer({cols ? m : 0}, s.options(), poison);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "dense_lse_cpu", [&] {
    using T = scalar_t;
    const T* x = s.data_ptr<T>();
    auto finish = [](T mx, T l) {
      auto a = ck::OnlineLSE<T>::empty();
      a.merge(mx, l);
      return a.finish();
    };
    at::parallel_for(0, n, dense_grain(m), [&](int64_t i0, int64_t i1) {
      std::vector<T> tm(i1 - i0), tl(i1 - i0);
      row_partials<T>(x + i0 * m, i1 - i0, m, tm.data(), tl.data());
      for (int64_t i = i0; i < i1; ++i) lse_r.data_ptr<T>()[i] = finish(tm[i - i0], tl[i - i0]);
    });
    if (cols) {
      constexpr int64_t kWidth = 64;  // columns per chunk
      at::parallel_for(0, (m + kWidth - 1) / kWidth, std::max<int64_t>(1, dense_grain(n) / kWidth),
                       [&](int64_t c0, int64_t c1) {
        std::vector<T> tm(kWidth), tl(kWidth);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t j0 = c * kWidth, w = std::min(kWidth, m - j0);
          col_partials<T>(x + j0, n, w, m, tm.data(), tl.data());
          for (int64_t j = 0; j < w; ++j) lse_c.data_ptr<T>()[j0 + j] = finish(tm[j], tl[j]);
        }
      });
    }
  });
  return {lse_r, lse_c};
}

at::Tensor dense_grad_cpu(const at::Tensor& s, const at::Tensor& lse_r, const at::Tensor& g_r,
                          const at::Tensor& lse_c, const at::Tensor& g_c, double scale,
                          bool self_mask, bool poison) {
  check_dense(s);
  const int64_t n = s.size(0), m = s.size(1);
  check_vector(lse_r, s, n, "lse_r");
  check_vector(g_r, s, n, "g_r");
  const bool cols = g_c.numel() > 0;
  if (cols) {
    check_vector(lse_c, s, m, "lse_c");
    check_vector(g_c, s, m, "g_c");
  }
  TORCH_CHECK(!self_mask || n == m, "self_mask needs a square s");
  // the scale goes into the gradients (a broadcast one comes out contiguous)
  const at::Tensor lr = backward_lses(lse_r, s.scalar_type());
  const at::Tensor gr = (g_r * scale).contiguous();
  const at::Tensor lc = cols ? backward_lses(lse_c, s.scalar_type()) : at::Tensor();
  const at::Tensor gc = cols ? (g_c * scale).contiguous() : at::Tensor();
  at::Tensor ds = new_buffer({n, m}, s.options(), poison);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "dense_grad_cpu", [&] {
    using T = scalar_t;
    const T* x = s.data_ptr<T>();
    T* y = ds.data_ptr<T>();
    at::parallel_for(0, n, dense_grain(m), [&](int64_t i0, int64_t i1) {
      grad_tile<T>(x + i0 * m, y + i0 * m, i1 - i0, m, lr.data_ptr<T>() + i0,
                   gr.data_ptr<T>() + i0, cols ? lc.data_ptr<T>() : nullptr,
                   cols ? gc.data_ptr<T>() : nullptr);
      if (self_mask)
        for (int64_t i = i0; i < i1; ++i) y[i * m + i] = T(0);
    });
  });
  return ds;
}

// The sigmoid loss on a materialized tile (siglip_tile over all of it): s <- dz in place,
// r[i] = the row's loss, t[i] = sum_j dz_ij.
std::tuple<at::Tensor, at::Tensor> dense_siglip_cpu(at::Tensor& s, double bias,
                                                     const at::Tensor& rid,
                                                     const at::Tensor& cid, bool poison) {
  check_dense(s);
  const int64_t n = s.size(0), m = s.size(1);
  check_ids(rid, cid, n, m);
  at::Tensor r = new_buffer({n}, s.options(), poison);
  at::Tensor t = new_buffer({n}, s.options(), poison);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "dense_siglip_cpu", [&] {
    using T = scalar_t;
    T* x = s.data_ptr<T>();
    at::parallel_for(0, n, dense_grain(m), [&](int64_t i0, int64_t i1) {
      T* rp = r.data_ptr<T>() + i0;
      T* tp = t.data_ptr<T>() + i0;
      std::fill(rp, rp + (i1 - i0), T(0));
      std::fill(tp, tp + (i1 - i0), T(0));
      siglip_tile<T>(x + i0 * m, i1 - i0, m, static_cast<T>(bias), rid.data_ptr<int>() + i0,
                     cid.data_ptr<int>(), nullptr, true, rp, tp);
    });
  });
  return {r, t};
}

}  // namespace

TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) {
  m.impl("lse_forward", &lse_forward_cpu);
  m.impl("lse_backward", &lse_backward_cpu);
  m.impl("siglip_tiles", &siglip_tiles_cpu);
  m.impl("lse_forward_ext", &lse_forward_ext_cpu);
  m.impl("lse_backward_ext", &lse_backward_ext_cpu);
  m.impl("dense_lse", &dense_lse_cpu);
  m.impl("dense_grad", &dense_grad_cpu);
  m.impl("dense_siglip", &dense_siglip_cpu);
}
