// ATen launcher of the CUDA kernels: checks arguments, allocates outputs, launches
// (lse_kernels.cu does the work) and registers the CUDA implementations of the ops
// whose schemas are defined in csrc/ops.cpp.
//
// Options (op arguments):
//   deterministic: no float atomics. Column statistics come from a second, transposed
//     forward pass and dk from a second backward pass over column blocks (run-to-run
//     bitwise identical).
//   tf32: fp32 inputs use TF32 tensor cores instead of the fp32 SIMT path.
//   poison (tests): outputs start as NaN, so an unwritten entry shows.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cuda/lse_kernels.h"

namespace ck {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "contrastive_kernels (cuda): unsupported dtype ", t.scalar_type(),
                  "; expected float32, float64, float16 or bfloat16");
  }
  return DType::kFloat32;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda(), "contrastive_kernels (cuda): q and k must be CUDA tensors");
  TORCH_CHECK(q.device() == k.device(), "contrastive_kernels (cuda): q and k are on different devices (",
              q.device(), ", ", k.device(), ")");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, "contrastive_kernels (cuda): q and k must be 2-D, got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), "contrastive_kernels (cuda): q and k feature sizes differ: ",
              q.size(1), " vs ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "contrastive_kernels (cuda): q and k dtypes differ: ",
              q.scalar_type(), " vs ", k.scalar_type());
  dtype_of(q);
}

at::ScalarType acc_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A statistic vector: (len,) on q's device, cast to the accumulation type, contiguous.
at::Tensor stat(const at::Tensor& t, int64_t len, at::ScalarType acc, const at::Tensor& q,
                const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, "contrastive_kernels (cuda): ", name,
              " must have shape (", len, "), got ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), "contrastive_kernels (cuda): ", name, " is on ", t.device(),
              ", q on ", q.device());
  return t.to(acc).contiguous();
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "contrastive_kernels (cuda): ", what, " failed: ",
              cudaGetErrorString(err));
}

const at::Tensor& checked(const at::Tensor& q, const at::Tensor& k, bool self_mask) {
  check_inputs(q, k);
  TORCH_CHECK(!self_mask || q.size(0) == k.size(0),
              "contrastive_kernels (cuda): self_mask needs N == M, got ", q.size(0), " and ",
              k.size(0));
  return q;
}

// What both ops start with: checked inputs, q's device made current, contiguous q and k,
// and the launch settings.
struct Call {
  Call(const at::Tensor& q_in, const at::Tensor& k_in, bool self_mask, bool tf32_)
      : n(checked(q_in, k_in, self_mask).size(0)), m(k_in.size(0)), d(q_in.size(1)),
        guard(q_in.device()), q(q_in.contiguous()), k(k_in.contiguous()), acc(acc_type(q_in)),
        dt(dtype_of(q_in)), tf32(tf32_),
        stream(c10::cuda::getCurrentCUDAStream()) {}
  void forward(const LseForwardArgs& a, const char* what) const {
    check(lse_forward_rows(dt, tf32, a, stream), what);
  }
  void backward(const LseBackwardArgs& a, const char* what) const {
    check(lse_backward_rows(dt, tf32, a, stream), what);
  }
  int64_t n, m, d;
  c10::cuda::CUDAGuard guard;  // before the copies and the stream: they use q's device
  at::Tensor q, k;
  at::ScalarType acc;
  DType dt;
  bool tf32;
  cudaStream_t stream;
};

std::tuple<at::Tensor, at::Tensor> lse_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                    double scale, bool self_mask, bool cols,
                                                    bool deterministic, bool tf32, bool poison) {
  const Call c(q_in, k_in, self_mask, tf32);
  const int64_t n = c.n, m = c.m, d = c.d;
  const at::Tensor &q = c.q, &k = c.k;
  at::Tensor lse_r = at::empty({n}, q.options().dtype(c.acc));
  at::Tensor lse_c = at::empty({cols ? m : 0}, q.options().dtype(c.acc));
  if (poison) {  // the test suite sets it: an unwritten entry stays NaN
    lse_r.fill_(std::numeric_limits<double>::quiet_NaN());
    lse_c.fill_(std::numeric_limits<double>::quiet_NaN());
  }

  LseForwardArgs a{q.data_ptr(), k.data_ptr(), n, m, d, scale, self_mask, lse_r.data_ptr(), nullptr};
  if (cols && c.acc == at::kFloat && !deterministic && m > 0) {
    // one pass: column (max, sum) pairs merged across row blocks by compare-and-swap
    at::Tensor colstat = at::empty({m}, q.options().dtype(at::kLong));
    auto* cs = reinterpret_cast<unsigned long long*>(colstat.data_ptr<int64_t>());
    check(colstat_init(cs, m, c.stream), "colstat_init");
    a.colstat = cs;
    c.forward(a, "lse_forward");
    check(colstat_finish(cs, lse_c.data_ptr<float>(), m, c.stream), "colstat_finish");
  } else {
    c.forward(a, "lse_forward");
    if (cols) {  // the columns of S are the rows of S^T = scale k q^T
      LseForwardArgs t{k.data_ptr(), q.data_ptr(), m, n, d, scale, self_mask, lse_c.data_ptr(), nullptr};
      c.forward(t, "lse_forward (columns)");
    }
  }
  return {lse_r, lse_c};
}

std::tuple<at::Tensor, at::Tensor> lse_backward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     double scale, bool self_mask,
                                                     const at::Tensor& lse_r_in,
                                                     const at::Tensor& lse_c_in,
                                                     const at::Tensor& g_r_in,
                                                     const at::Tensor& g_c_in, bool need_dq,
                                                     bool need_dk, bool deterministic, bool tf32,
                                                     bool poison) {
  const Call c(q_in, k_in, self_mask, tf32);
  const int64_t n = c.n, m = c.m, d = c.d;
  const at::Tensor &q = c.q, &k = c.k;

  const at::Tensor lse_r = stat(lse_r_in, n, c.acc, q, "lse_r");
  const at::Tensor g_r = stat(g_r_in, n, c.acc, q, "g_r");
  const bool has_c = lse_c_in.numel() > 0 && g_c_in.numel() > 0;
  TORCH_CHECK(has_c || m == 0 || (lse_c_in.numel() == 0 && g_c_in.numel() == 0),
              "contrastive_kernels (cuda): lse_c and g_c must both be given or both be empty");
  at::Tensor lse_c, g_c;
  if (has_c) {
    lse_c = stat(lse_c_in, m, c.acc, q, "lse_c");
    g_c = stat(g_c_in, m, c.acc, q, "g_c");
  }
  // A gradient not needed is neither allocated nor computed (returned empty).
  at::Tensor dq = at::zeros({need_dq ? n : 0, d}, q.options().dtype(c.acc));
  at::Tensor dk = at::zeros({need_dk ? m : 0, d}, q.options().dtype(c.acc));
  // (dq and dk start at zero: the kernels add into them. poison has nothing to fill.)
  (void)poison;
  if (n == 0 || m == 0 || d == 0 || !(need_dq || need_dk)) return {dq, dk};

  const void* lc = has_c ? lse_c.data_ptr() : nullptr;
  const void* gc = has_c ? g_c.data_ptr() : nullptr;
  // Rows: dq of S (and dk by float atomics, unless deterministic). Columns: dk alone,
  // the same row pass on S^T with the row and column terms swapped.
  LseBackwardArgs rows{q.data_ptr(), k.data_ptr(), n, m, d, scale, self_mask, lse_r.data_ptr(),
                       g_r.data_ptr(), lc, gc, dq.data_ptr(), nullptr};
  const LseBackwardArgs cols{k.data_ptr(), q.data_ptr(), m, n, d, scale, self_mask, lc, gc,
                             lse_r.data_ptr(), g_r.data_ptr(), dk.data_ptr(), nullptr};
  if (need_dq && need_dk && !deterministic) {
    rows.dk = dk.data_ptr();
    c.backward(rows, "lse_backward");
  } else {
    if (need_dq) c.backward(rows, "lse_backward (rows)");
    if (need_dk) c.backward(cols, "lse_backward (columns)");
  }
  return {dq, dk};
}

// Positive ids of the sigmoid loss: (len,) int32, contiguous, on q's device.
void check_ids(const at::Tensor& t, int64_t len, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "contrastive_kernels (cuda): ", name,
              " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, "contrastive_kernels (cuda): ", name,
              " must have shape (", len, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "contrastive_kernels (cuda): ", name, " must be contiguous");
  TORCH_CHECK(t.device() == q.device(), "contrastive_kernels (cuda): ", name, " is on ",
              t.device(), ", q on ", q.device());
}

// The sigmoid loss's tiles (contract: contrastive_kernels/backends/base.py, siglip_tiles):
// the backward kernel's SigLIP mode. Rows: the sums, dq, and dk by atomics unless
// deterministic; then dk comes from the same pass on S^T with g as column weights and
// the ids swapped (rows' ids = cid, columns' = rid).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_tiles_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, double scale, double bias,
    const at::Tensor& g_r_in, const at::Tensor& rid, const at::Tensor& cid, bool sums,
    bool need_dq, bool need_dk, bool deterministic, bool tf32, bool poison) {
  const Call c(q_in, k_in, false, tf32);
  const int64_t n = c.n, m = c.m, d = c.d;
  const at::Tensor &q = c.q, &k = c.k;
  check_ids(rid, n, q, "rid");
  check_ids(cid, m, q, "cid");
  const auto opts = q.options().dtype(c.acc);
  const bool given = g_r_in.numel() > 0;
  const at::Tensor g_r = given ? stat(g_r_in, n, c.acc, q, "g_r") : at::Tensor();
  const at::Tensor b = at::full({1}, bias, opts);
  at::Tensor r = at::empty({sums ? n : 0}, opts);
  at::Tensor t = at::empty({sums ? n : 0}, opts);
  if (poison) {  // the test suite sets it: an unwritten entry stays NaN
    r.fill_(std::numeric_limits<double>::quiet_NaN());
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  at::Tensor dq = at::zeros({need_dq ? n : 0, d}, opts);
  at::Tensor dk = at::zeros({need_dk ? m : 0, d}, opts);
  if (n == 0 || m == 0 || d == 0 || !(sums || need_dq || need_dk)) return {r, t, dq, dk};
  const void* g = given ? g_r.data_ptr() : nullptr;
  LseBackwardArgs rows{q.data_ptr(), k.data_ptr(), n, m, d, scale, false, nullptr, g, nullptr,
                       nullptr, need_dq ? dq.data_ptr() : nullptr, nullptr};
  rows.bias = b.data_ptr();
  rows.rid = rid.data_ptr<int>();
  rows.cid = cid.data_ptr<int>();
  if (sums) {
    rows.r_out = r.data_ptr();
    rows.t_out = t.data_ptr();
  }
  if (need_dq && need_dk && !deterministic) {
    rows.dk = dk.data_ptr();
    c.backward(rows, "siglip_tiles");
    return {r, t, dq, dk};
  }
  if (need_dq || sums) c.backward(rows, "siglip_tiles (rows)");
  if (need_dk) {
    LseBackwardArgs cols{k.data_ptr(), q.data_ptr(), m, n, d, scale, false, nullptr, nullptr,
                         nullptr, g, dk.data_ptr(), nullptr};
    cols.bias = b.data_ptr();
    cols.rid = cid.data_ptr<int>();
    cols.cid = rid.data_ptr<int>();
    c.backward(cols, "siglip_tiles (columns)");
  }
  return {r, t, dq, dk};
}

}  // namespace
}  // namespace cuda
}  // namespace ck

TORCH_LIBRARY_IMPL(contrastive_kernels, CUDA, m) {
  m.impl("lse_forward", &ck::cuda::lse_forward_cuda);
  m.impl("lse_backward", &ck::cuda::lse_backward_cuda);
  m.impl("siglip_tiles", &ck::cuda::siglip_tiles_cuda);
}
