// Torch-free test of the shared per-tile math (csrc/common/tile_math.h), run by ctest.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/tile_math.h"

static int failures = 0;

static void check(bool ok, const char* what, double got, double want) {
  if (!ok) {
    std::printf("FAIL %s: got %.17g, want %.17g\n", what, got, want);
    ++failures;
  }
}

static double direct_lse(const std::vector<double>& x) {
  double m = -INFINITY;
  for (double v : x) m = std::max(m, v);
  if (m == -INFINITY) return m;
  long double s = 0;
  for (double v : x) s += std::exp(static_cast<long double>(v - m));
  return m + std::log(static_cast<double>(s));
}

template <typename T>
static void test_merge_any_split(std::mt19937& gen, double tol) {
  std::uniform_real_distribution<double> u(-300.0, 300.0);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<double> x(1 + gen() % 97);
    for (double& v : x) v = u(gen);
    if (trial % 7 == 0) x[gen() % x.size()] = -INFINITY;  // a masked entry
    // Push one by one.
    auto a = ck::OnlineLSE<T>::empty();
    for (double v : x) a.push(static_cast<T>(v));
    // Split into random chunks, reduce each, merge the partials in reverse order.
    std::vector<ck::OnlineLSE<T>> parts;
    for (size_t i = 0; i < x.size();) {
      size_t n = 1 + gen() % 9;
      auto p = ck::OnlineLSE<T>::empty();
      for (size_t j = i; j < std::min(x.size(), i + n); ++j) p.push(static_cast<T>(x[j]));
      parts.push_back(p);
      i += n;
    }
    auto b = ck::OnlineLSE<T>::empty();
    for (size_t i = parts.size(); i-- > 0;) b.merge(parts[i]);
    const double want = direct_lse(x);
    check(std::fabs(a.finish() - want) <= tol * std::fabs(want) + tol, "push order", a.finish(), want);
    check(std::fabs(b.finish() - want) <= tol * std::fabs(want) + tol, "merge order", b.finish(), want);
  }
}

static void test_infinities() {
  auto e = ck::OnlineLSE<double>::empty();
  check(e.finish() == -INFINITY, "empty is -inf", e.finish(), -INFINITY);
  e.push(-static_cast<double>(INFINITY));
  e.push(-static_cast<double>(INFINITY));
  check(e.finish() == -INFINITY, "all -inf is -inf", e.finish(), -INFINITY);
  auto a = ck::OnlineLSE<double>::empty();
  a.push(2.0);
  a.merge(ck::OnlineLSE<double>::empty());
  check(a.finish() == 2.0, "merging empty changes nothing", a.finish(), 2.0);
  auto b = ck::OnlineLSE<double>::empty();
  b.merge(a);
  check(b.finish() == 2.0, "empty merged with x is x", b.finish(), 2.0);
  // A NaN logit (or a partial whose sum is NaN) makes the result NaN, whatever comes
  // before or after it: it is not an empty partial.
  const double nan = NAN;
  for (int at = 0; at < 3; ++at) {
    auto r = ck::OnlineLSE<double>::empty();
    for (int t = 0; t < 3; ++t) r.push(t == at ? nan : (t == 0 ? 1.0 : -static_cast<double>(INFINITY)));
    check(std::isnan(r.finish()), "a NaN logit gives NaN", r.finish(), nan);
  }
  auto p = ck::OnlineLSE<double>::empty();
  p.merge(-static_cast<double>(INFINITY), nan);  // all-NaN tile whose max dropped the NaNs
  p.merge(3.0, 1.0);
  check(std::isnan(p.finish()), "a NaN sum gives NaN", p.finish(), nan);
  // Large logits do not overflow: log(exp(1000) + exp(1000)) = 1000 + log 2.
  auto c = ck::OnlineLSE<float>::empty();
  c.push(1000.0f);
  c.push(1000.0f);
  check(std::fabs(c.finish() - (1000.0f + std::log(2.0f))) < 1e-3f, "no overflow", c.finish(),
        1000.0 + std::log(2.0));
}

static void test_tile_grad() {
  const double s = 1.5, lr = 2.0, gr = 0.25, lc = 3.0, gc = 0.5;
  const double want = gr * std::exp(s - lr) + gc * std::exp(s - lc);
  const double got = ck::tile_grad(s, lr, gr, lc, gc);
  check(std::fabs(got - want) < 1e-15, "tile_grad formula", got, want);
  // A row with no valid entry (lse = -inf) gets probability 0, not NaN.
  const double inf_row = ck::tile_grad(s, ck::backward_lse(-static_cast<double>(INFINITY)), 1.0, lc, 0.0);
  check(inf_row == 0.0, "masked row gives 0", inf_row, 0.0);
  check(ck::backward_lse(1.25) == 1.25, "backward_lse keeps finite values", ck::backward_lse(1.25), 1.25);
  // A masked logit (-inf) gives 0.
  const double masked = ck::tile_grad(-static_cast<double>(INFINITY), lr, gr, lc, gc);
  check(masked == 0.0, "masked logit gives 0", masked, 0.0);
  check(ck::excluded(true, 3, 3) && !ck::excluded(true, 3, 4) && !ck::excluded(false, 3, 3),
        "excluded", 0, 0);
}

int main() {
  std::mt19937 gen(1234);
  test_merge_any_split<double>(gen, 1e-12);
  test_merge_any_split<float>(gen, 1e-5);
  test_infinities();
  test_tile_grad();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("tile_math: all checks passed\n");
  return 0;
}
