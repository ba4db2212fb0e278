// Per-tile math shared by every C++ backend (CPU and CUDA). No torch includes.
//
// Notation (docs/DESIGN.md): S_ij = scale * <q_i, k_j>. A row (or column) keeps a
// running log-sum-exp as (m, l): m the largest logit seen, l = sum exp(S - m).
#pragma once
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always inlined: the CPU kernel's vectorized loops need these inside them
#define CK_HD inline __attribute__((always_inline))
#else
#define CK_HD inline
#endif

namespace ck {

template <typename T>
CK_HD T neg_inf() { return -static_cast<T>(INFINITY); }

template <typename T>
CK_HD T nan_value() { return static_cast<T>(NAN); }

template <typename T>
CK_HD T ck_exp(T x) { return exp(x); }
template <>
CK_HD float ck_exp<float>(float x) { return expf(x); }

template <typename T>
CK_HD T ck_log(T x) { return log(x); }
template <>
CK_HD float ck_log<float>(float x) { return logf(x); }

// Running log-sum-exp of one row or column.
template <typename T>
struct OnlineLSE {
  T m;  // running max (-inf while empty)
  T l;  // sum of exp(x - m)

  CK_HD static OnlineLSE empty() { return {neg_inf<T>(), T(0)}; }

  // Merge a partial (m2, l2), e.g. one tile's max and sum, or another thread's. A NaN
  // in either is kept (NaN logits make the log-sum-exp NaN, as in the reference).
  CK_HD void merge(T m2, T l2) {
    if (m2 != m2 || l2 != l2) {
      m = l = nan_value<T>();
      return;
    }
    if (m2 == neg_inf<T>()) return;
    if (m2 > m) {
      l = l * ck_exp<T>(m - m2) + l2;  // exp(-inf) = 0 when this one was empty
      m = m2;
    } else {
      l += l2 * ck_exp<T>(m2 - m);
    }
  }
  CK_HD void merge(const OnlineLSE& o) { merge(o.m, o.l); }

  // Add one logit.
  CK_HD void push(T x) { merge(x, T(1)); }

  // log sum exp; -inf for a row with no valid entry, NaN if a logit was NaN.
  CK_HD T finish() const { return m == neg_inf<T>() ? m : m + ck_log<T>(l); }
};

// lse as used in backward: a row with no valid entry (lse = -inf) gets
// probabilities exp(S - inf) = 0 instead of NaN.
template <typename T>
CK_HD T backward_lse(T lse) { return lse == neg_inf<T>() ? static_cast<T>(INFINITY) : lse; }

// The exp used by default; a backend may pass a faster one (the CPU kernel's
// vectorizable polynomial, say) to the helpers below.
struct Exp {
  template <typename T>
  CK_HD T operator()(T x) const { return ck_exp<T>(x); }
};

// Gradient of sum_i g_r[i] * LSE_rows[i] + sum_j g_c[j] * LSE_cols[j] with respect
// to one logit S_ij: the softmax part of dS. Pass g_c = 0 for one direction.
// lse_r and lse_c must already be passed through backward_lse.
template <typename T, typename E = Exp>
CK_HD T tile_grad(T s, T lse_r, T g_r, T lse_c, T g_c, E exp_fn = E()) {
  return g_r * exp_fn(s - lse_r) + g_c * exp_fn(s - lse_c);
}

// log(1 + x); a backend may pass a faster one (the CPU kernel's polynomial).
struct Log1p {
  template <typename T>
  CK_HD T operator()(T x) const { return log1p(x); }
};

// The sigmoid loss (SigLIP) at one logit z = scale * <q_i, k_j> + bias, from one exp of
// -|z| (never overflows): softplus(z) = max(z, 0) + log1p(exp(-|z|)), the loss of a
// negative pair, and sigmoid(z), its derivative (siglip_term below: either pair). NaN in,
// NaN out.
template <typename T, typename E = Exp, typename L = Log1p>
CK_HD void softplus_sigmoid(T z, T& softplus, T& sigmoid, E exp_fn = E(), L log1p_fn = L()) {
  const T e = exp_fn(z < T(0) ? z : -z);
  const T inv = T(1) / (T(1) + e);
  softplus = (z > T(0) ? z : T(0)) + log1p_fn(e);
  sigmoid = z >= T(0) ? inv : e * inv;
  if (z != z) softplus = sigmoid = z;
}

// One entry of the sigmoid loss with its target: loss = softplus(-y z), the term itself
// (a positive's is never formed as softplus(z) - z, which cancels when the pair is
// confident), and dz = sigmoid(z) - [positive] = -y sigmoid(-y z), its derivative.
template <typename T, typename E = Exp, typename L = Log1p>
CK_HD void siglip_term(T z, bool positive, T& loss, T& dz, E exp_fn = E(),
                       L log1p_fn = L()) {
  T sg;
  softplus_sigmoid(positive ? -z : z, loss, sg, exp_fn, log1p_fn);
  dz = positive ? -sg : sg;
}

// The diagonal of the full matrix is excluded under self-contrast.
CK_HD bool excluded(bool self_mask, long long i, long long j) { return self_mask && i == j; }

}  // namespace ck
