// Instantiations and launchers of the CUDA kernels (see lse_kernels.cuh). Torch-free:
// compiled on its own by tests/test_cuda_build.py.
#include "cuda/lse_kernels.h"
#include "cuda/lse_kernels.cuh"

namespace ck {
namespace cuda {
namespace {

using cuda_impl::Mma;
using cuda_impl::Traits;

template <typename T, Mma M>
cudaError_t forward_t(const LseForwardArgs& a, cudaStream_t stream) {
  using Tr = Traits<T, M>;
  using Acc = typename Tr::Acc;
  const long long blocks = (a.n + Tr::BM - 1) / Tr::BM;
  if (blocks == 0) return cudaSuccess;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  Acc* lse = static_cast<Acc*>(a.lse_rows);
  const Acc scale = static_cast<Acc>(a.scale);
  if (a.colstat != nullptr) {
    if constexpr (std::is_same<Acc, float>::value) {
      cuda_impl::lse_forward_kernel<T, M, true><<<static_cast<unsigned>(blocks), cuda_impl::kThreads, 0,
                                                  stream>>>(q, k, a.n, a.m, a.d, scale, a.self_mask,
                                                            lse, a.colstat);
    } else {
      return cudaErrorInvalidValue;  // fp64 column statistics use a second (transposed) pass
    }
  } else {
    cuda_impl::lse_forward_kernel<T, M, false><<<static_cast<unsigned>(blocks), cuda_impl::kThreads, 0,
                                                 stream>>>(q, k, a.n, a.m, a.d, scale, a.self_mask,
                                                           lse, nullptr);
  }
  return cudaGetLastError();
}

template <typename T, Mma M>
cudaError_t backward_t(const LseBackwardArgs& a, cudaStream_t stream) {
  using Tr = Traits<T, M>;
  using Acc = typename Tr::Acc;
  const long long blocks = (a.n + Tr::BM - 1) / Tr::BM;
  if (blocks == 0) return cudaSuccess;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const Acc* lse_r = static_cast<const Acc*>(a.lse_r);
  const Acc* g_r = static_cast<const Acc*>(a.g_r);
  const Acc* lse_c = static_cast<const Acc*>(a.lse_c);
  const Acc* g_c = static_cast<const Acc*>(a.g_c);
  Acc* dq = static_cast<Acc*>(a.dq);
  Acc* dk = static_cast<Acc*>(a.dk);
  const Acc* bias = static_cast<const Acc*>(a.bias);
  Acc* r_out = static_cast<Acc*>(a.r_out);
  Acc* t_out = static_cast<Acc*>(a.t_out);
  const int* rid = a.rid;
  const int* cid = a.cid;
  if (r_out != nullptr && (t_out == nullptr || bias == nullptr)) return cudaErrorInvalidValue;
  if (dk != nullptr && dq == nullptr) return cudaErrorInvalidValue;
  const Acc scale = static_cast<Acc>(a.scale);
  const unsigned grid = static_cast<unsigned>(blocks);
  if (dk != nullptr)
    cuda_impl::lse_backward_kernel<T, M, true><<<grid, cuda_impl::kThreads, 0, stream>>>(
        q, k, a.n, a.m, a.d, scale, a.self_mask, lse_r, g_r, lse_c, g_c, dq, dk, bias, r_out,
        t_out, rid, cid);
  else
    cuda_impl::lse_backward_kernel<T, M, false><<<grid, cuda_impl::kThreads, 0, stream>>>(
        q, k, a.n, a.m, a.d, scale, a.self_mask, lse_r, g_r, lse_c, g_c, dq, nullptr, bias,
        r_out, t_out, rid, cid);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lse_forward_rows(DType dtype, bool tf32, const LseForwardArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return tf32 ? forward_t<float, Mma::Tf32>(a, stream) : forward_t<float, Mma::Simt>(a, stream);
    case DType::kFloat64: return forward_t<double, Mma::Simt>(a, stream);
    case DType::kFloat16: return forward_t<__half, Mma::Wmma16>(a, stream);
    case DType::kBFloat16: return forward_t<__nv_bfloat16, Mma::Wmma16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t lse_backward_rows(DType dtype, bool tf32, const LseBackwardArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return tf32 ? backward_t<float, Mma::Tf32>(a, stream) : backward_t<float, Mma::Simt>(a, stream);
    case DType::kFloat64: return backward_t<double, Mma::Simt>(a, stream);
    case DType::kFloat16: return backward_t<__half, Mma::Wmma16>(a, stream);
    case DType::kBFloat16: return backward_t<__nv_bfloat16, Mma::Wmma16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t colstat_init(unsigned long long* colstat, long long m, cudaStream_t stream) {
  if (m <= 0) return cudaSuccess;
  cuda_impl::colstat_init_kernel<<<static_cast<unsigned>((m + 255) / 256), 256, 0, stream>>>(colstat, m);
  return cudaGetLastError();
}

cudaError_t colstat_finish(const unsigned long long* colstat, float* lse_cols, long long m,
                           cudaStream_t stream) {
  if (m <= 0) return cudaSuccess;
  cuda_impl::colstat_finish_kernel<<<static_cast<unsigned>((m + 255) / 256), 256, 0, stream>>>(
      colstat, lse_cols, m);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ck
