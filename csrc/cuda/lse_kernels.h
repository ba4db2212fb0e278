// Host-side API of the CUDA kernels (lse_kernels.cu). No torch includes, no device
// code: the ATen launcher (lse_cuda.cpp, built by the host compiler) includes this.
//
// All pointers are device pointers to contiguous row-major data:
//   q (n, d), k (m, d) in the input dtype; statistics and raw gradients in the
//   accumulation type Acc (double for kFloat64, float otherwise).
#pragma once
#include <cuda_runtime_api.h>

namespace ck {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// One pass over row blocks of S = scale * q k^T:
//   lse_rows[i] = log sum_j exp(S_ij) over valid j (self_mask drops j == i).
// colstat != nullptr (fp32 statistics only): the column statistics are merged into
// colstat (m packed (max, sum) float pairs, see colstat_init / colstat_finish) in the
// same pass, with a 64-bit compare-and-swap per (row block, column).
struct LseForwardArgs {
  const void* q;
  const void* k;
  long long n, m, d;
  double scale;
  bool self_mask;
  void* lse_rows;                  // (n,) Acc
  unsigned long long* colstat;     // (m,) or nullptr
};

// Row-block pass of the backward, recomputing S (and the sigmoid loss's pass, below):
//   dS_ij = g_r[i] exp(S_ij - lse_r[i]) + g_c[j] exp(S_ij - lse_c[j])   (0 if excluded)
//   dq[i] += sum_j dS_ij k_j                (each block owns its rows: no atomics)
//   dk[j] += sum_i dS_ij q_i                (only if dk != nullptr: float/double atomics)
// The row term (lse_r, g_r) or the column term (lse_c, g_c) may be absent (nullptr).
// dq and dk must be zeroed by the caller. The same kernel with (q, k), (n, m) and the
// row/column terms swapped computes dk alone: that is the deterministic mode.
struct LseBackwardArgs {
  const void* q;
  const void* k;
  long long n, m, d;
  double scale;
  bool self_mask;
  const void* lse_r;  // (n,) Acc or nullptr
  const void* g_r;    // (n,) Acc or nullptr
  const void* lse_c;  // (m,) Acc or nullptr
  const void* g_c;    // (m,) Acc or nullptr
  void* dq;           // (n, d) Acc; nullptr: no gradient (the sums alone)
  void* dk;           // (m, d) Acc or nullptr
  // The sigmoid loss (SigLIP) when bias != nullptr: z = S + bias, entry (i, j) positive
  // iff rid[i] == cid[j] >= 0 (y_ij = +1, else -1), dz_ij = sigmoid(z_ij) - [positive], and
  //   dS_ij = g_r[i] g_c[j] dz_ij   (an absent g is 1; lse_r/lse_c are not read)
  // with, when r_out != nullptr, r_out[i] = sum_j softplus(-y_ij z_ij), t_out[i] = sum_j dz_ij.
  // The transposed pass (q, k swapped) swaps rid and cid too.
  const void* bias = nullptr;  // (1,) Acc, device
  const int* rid = nullptr;    // (n,) int32 row ids (< 0: no positive), or nullptr: none
  const int* cid = nullptr;    // (m,) int32 column ids, or nullptr: none
  void* r_out = nullptr;       // (n,) Acc or nullptr
  void* t_out = nullptr;       // (n,) Acc or nullptr
};

// tf32: fp32 inputs use TF32 tensor cores (wmma m16n16k8) instead of the SIMT path.
cudaError_t lse_forward_rows(DType dtype, bool tf32, const LseForwardArgs& a, cudaStream_t stream);
cudaError_t colstat_init(unsigned long long* colstat, long long m, cudaStream_t stream);
cudaError_t colstat_finish(const unsigned long long* colstat, float* lse_cols, long long m,
                           cudaStream_t stream);
cudaError_t lse_backward_rows(DType dtype, bool tf32, const LseBackwardArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace ck
