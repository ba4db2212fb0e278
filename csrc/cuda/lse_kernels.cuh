// Device code of the CUDA backend: tiled S = scale * q k^T with an online
// log-sum-exp (forward) and recomputation of S (backward). No torch includes.
// The per-element math (OnlineLSE, backward_lse, tile_grad, excluded) is shared with
// the CPU kernel through common/tile_math.h.
//
// One CTA of 128 threads (4 warps) owns a block of BM rows and sweeps all column
// blocks of BN; the head dimension d is consumed in chunks of BK staged in shared
// memory (zero padded past d, n and m, so any sizes work). Per column block:
//   1. S tile (BM x BN, fp32 or fp64 accumulation) -> shared memory,
//   2. element-wise pass over the tile (mask, scale, exp) from shared memory,
//   3. backward only: dq_blk += dS k_blk and (atomic mode) dk_blk += dS^T q_blk,
//      chunk by chunk of BK columns of d.
// "Engines" do the products: nvcuda::wmma for fp16/bf16 (m16n16k16, fp32 accumulate)
// and TF32 (m16n16k8), a register-tiled SIMT loop for fp32 and fp64.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <type_traits>

#include "common/tile_math.h"

namespace ck {
namespace cuda_impl {

constexpr int kThreads = 128;  // 4 warps

enum class Mma { Simt, Wmma16, Tf32 };

// ---- element conversions (torch builds nvcc with __CUDA_NO_HALF_CONVERSIONS__) ----
template <typename T> __device__ __forceinline__ T zero_of();
template <> __device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <> __device__ __forceinline__ double zero_of<double>() { return 0.0; }
template <> __device__ __forceinline__ __half zero_of<__half>() { return __ushort_as_half(0); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() {
  return __ushort_as_bfloat16(0);
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- tile shapes and shared memory -------------------------------------------------
template <typename T, Mma M> struct Traits;
template <> struct Traits<__half, Mma::Wmma16> {
  using Acc = float;
  static constexpr int BM = 64, BN = 64, BK = 32;
  static constexpr int LDI = BK + 8, LDS = BN + 4, LDP = BN + 8, LDO = BK + 4;
  // dS is rounded to fp16 for the second product: scale each tile by a power of two
  // so that small gradients (e.g. 1/N-weighted) do not flush to zero.
  static constexpr bool kScaleDS = true;
};
template <> struct Traits<__nv_bfloat16, Mma::Wmma16> {
  using Acc = float;
  static constexpr int BM = 64, BN = 64, BK = 32;
  static constexpr int LDI = BK + 8, LDS = BN + 4, LDP = BN + 8, LDO = BK + 4;
  static constexpr bool kScaleDS = false;  // bf16 has fp32's range
};
template <> struct Traits<float, Mma::Tf32> {
  using Acc = float;
  static constexpr int BM = 64, BN = 64, BK = 32;
  static constexpr int LDI = BK + 4, LDS = BN + 4, LDP = LDS, LDO = BK + 4;
  static constexpr bool kScaleDS = false;
};
template <> struct Traits<float, Mma::Simt> {
  using Acc = float;
  static constexpr int BM = 64, BN = 64, BK = 32;
  static constexpr int LDI = BK + 1, LDS = BN + 1, LDP = LDS, LDO = BK + 1;
  static constexpr bool kScaleDS = false;
};
template <> struct Traits<double, Mma::Simt> {
  using Acc = double;
  static constexpr int BM = 32, BN = 32, BK = 16;
  static constexpr int LDI = BK + 1, LDS = BN + 1, LDP = LDS, LDO = BK + 1;
  static constexpr bool kScaleDS = false;
};

// fp16/bf16 keep dS in its own buffer of T (the fp32 S buffer then holds the product
// output); the other paths overwrite S with dS in place and have a separate output.
template <typename T, Mma M>
struct alignas(128) Smem {
  using Tr = Traits<T, M>;
  using Acc = typename Tr::Acc;
  static constexpr bool kSepP = (M == Mma::Wmma16);
  alignas(128) Acc s[Tr::BM * Tr::LDS];
  alignas(128) T qs[Tr::BM * Tr::LDI];
  alignas(128) T ks[Tr::BN * Tr::LDI];
  alignas(128) T p[kSepP ? Tr::BM * Tr::LDP : 1];
  alignas(128) Acc out[kSepP ? 1 : Tr::BM * Tr::LDO];
  Acc row_a[Tr::BM], row_b[Tr::BM];  // forward: running (max, sum); backward: (lse, g)
  Acc col_a[Tr::BN], col_b[Tr::BN];  // backward: (lse_c, g_c) of the current column block
  Acc row_sp[Tr::BM], row_sg[Tr::BM];  // SigLIP: the rows' sums of loss terms and dz
  int row_id[Tr::BM], col_id[Tr::BN];  // SigLIP: positive ids (-1: none)
  unsigned int amax_bits;            // max |dS| of the tile (fp16 scaling)
};

// ---- engines: S += qs ks^T over one BK chunk, and out = P V / P^T V -------------------
// SIMT: thread (tr, tc) = (tid / 16, tid % 16) owns rows tr + 8a, columns tc + 16b.
template <typename T, typename Acc, int BM, int BN, int BK, int LDI>
struct SimtQK {
  static constexpr int RA = BM / 8, CB = BN / 16;
  Acc acc[RA][CB];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int a = 0; a < RA; ++a)
#pragma unroll
      for (int b = 0; b < CB; ++b) acc[a][b] = Acc(0);
  }
  __device__ __forceinline__ void step(const T* qs, const T* ks) {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll 4
    for (int d = 0; d < BK; ++d) {
      Acc x[RA], y[CB];
#pragma unroll
      for (int a = 0; a < RA; ++a) x[a] = static_cast<Acc>(qs[(tr + 8 * a) * LDI + d]);
#pragma unroll
      for (int b = 0; b < CB; ++b) y[b] = static_cast<Acc>(ks[(tc + 16 * b) * LDI + d]);
#pragma unroll
      for (int a = 0; a < RA; ++a)
#pragma unroll
        for (int b = 0; b < CB; ++b) acc[a][b] = fma(x[a], y[b], acc[a][b]);
    }
  }
  template <int LDS>
  __device__ __forceinline__ void store(Acc* s) const {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll
    for (int a = 0; a < RA; ++a)
#pragma unroll
      for (int b = 0; b < CB; ++b) s[(tr + 8 * a) * LDS + tc + 16 * b] = acc[a][b];
  }
};

// out[ROWS x BK] = P[ROWS x KD] V[KD x BK]   (kTransP: P is stored as [KD x ROWS])
template <typename Acc, bool kTransP, int ROWS, int KD, int BK, int LDP, int LDV, int LDO,
          typename TP, typename TV>
__device__ __forceinline__ void simt_pv(Acc* out, const TP* P, const TV* V) {
  constexpr int RA = ROWS / 8, CB = BK / 16;
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  Acc acc[RA][CB];
#pragma unroll
  for (int a = 0; a < RA; ++a)
#pragma unroll
    for (int b = 0; b < CB; ++b) acc[a][b] = Acc(0);
#pragma unroll 4
  for (int kk = 0; kk < KD; ++kk) {
    Acc x[RA], y[CB];
#pragma unroll
    for (int a = 0; a < RA; ++a)
      x[a] = static_cast<Acc>(kTransP ? P[kk * LDP + tr + 8 * a] : P[(tr + 8 * a) * LDP + kk]);
#pragma unroll
    for (int b = 0; b < CB; ++b) y[b] = static_cast<Acc>(V[kk * LDV + tc + 16 * b]);
#pragma unroll
    for (int a = 0; a < RA; ++a)
#pragma unroll
      for (int b = 0; b < CB; ++b) acc[a][b] = fma(x[a], y[b], acc[a][b]);
  }
#pragma unroll
  for (int a = 0; a < RA; ++a)
#pragma unroll
    for (int b = 0; b < CB; ++b) out[(tr + 8 * a) * LDO + tc + 16 * b] = acc[a][b];
}

// Tensor cores via nvcuda::wmma. TE is the element type in shared memory (__half,
// __nv_bfloat16, or float for TF32); 64 x 64 S tile, warps in a 2 x 2 grid of 32 x 32.
template <typename TE>
struct WmmaKind {
  static constexpr bool kTf32 = std::is_same<TE, float>::value;
  static constexpr int FK = kTf32 ? 8 : 16;
  using AT = typename std::conditional<kTf32, nvcuda::wmma::precision::tf32, TE>::type;
};

template <typename Frag>
__device__ __forceinline__ void to_tf32(Frag& f) {
#pragma unroll
  for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
}

template <typename TE, int BK, int LDI>
struct WmmaQK {
  using K = WmmaKind<TE>;
  static constexpr int FK = K::FK;
  using AT = typename K::AT;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, FK, float> acc[2][2];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b) nvcuda::wmma::fill_fragment(acc[a][b], 0.f);
  }
  __device__ __forceinline__ void step(const TE* qs, const TE* ks) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;
#pragma unroll
    for (int kk = 0; kk < BK; kk += FK) {
      wmma::fragment<wmma::matrix_a, 16, 16, FK, AT, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, FK, AT, wmma::col_major> fb[2];
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        wmma::load_matrix_sync(fa[a], qs + (wr * 32 + 16 * a) * LDI + kk, LDI);
        if constexpr (K::kTf32) to_tf32(fa[a]);
      }
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        // B[kk + x][col] = ks[col][kk + x]: column-major with leading dimension LDI
        wmma::load_matrix_sync(fb[b], ks + (wc * 32 + 16 * b) * LDI + kk, LDI);
        if constexpr (K::kTf32) to_tf32(fb[b]);
      }
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
    }
  }
  template <int LDS>
  __device__ __forceinline__ void store(float* s) const {
    const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
        nvcuda::wmma::store_matrix_sync(s + (wr * 32 + 16 * a) * LDS + wc * 32 + 16 * b, acc[a][b],
                                        LDS, nvcuda::wmma::mem_row_major);
  }
};

// out[64 x BK] = P[64 x 64] V[64 x BK], or P^T V (kTransP). Warp w owns output rows
// 16w..16w+15 and all BK columns.
template <typename TE, bool kTransP, int BK, int LDP, int LDV, int LDO>
__device__ __forceinline__ void wmma_pv(float* out, const TE* P, const TE* V) {
  using namespace nvcuda;
  using K = WmmaKind<TE>;
  constexpr int FK = K::FK, NF = BK / 16;
  using AT = typename K::AT;
  using ALayout = typename std::conditional<kTransP, wmma::col_major, wmma::row_major>::type;
  const int w = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, FK, float> acc[NF];
#pragma unroll
  for (int c = 0; c < NF; ++c) wmma::fill_fragment(acc[c], 0.f);
#pragma unroll
  for (int kk = 0; kk < 64; kk += FK) {
    wmma::fragment<wmma::matrix_a, 16, 16, FK, AT, ALayout> fa;
    // row-major A[r][x] = P[(16w + r) * LDP + kk + x]; transposed A[r][x] = P[(kk + x) * LDP + 16w + r]
    wmma::load_matrix_sync(fa, kTransP ? P + kk * LDP + 16 * w : P + 16 * w * LDP + kk, LDP);
    if constexpr (K::kTf32) to_tf32(fa);
#pragma unroll
    for (int c = 0; c < NF; ++c) {
      wmma::fragment<wmma::matrix_b, 16, 16, FK, AT, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, V + kk * LDV + 16 * c, LDV);
      if constexpr (K::kTf32) to_tf32(fb);
      wmma::mma_sync(acc[c], fa, fb, acc[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < NF; ++c)
    wmma::store_matrix_sync(out + 16 * w * LDO + 16 * c, acc[c], LDO, wmma::mem_row_major);
}

// Engine selection.
template <typename T, Mma M> struct Engine {
  using Tr = Traits<T, M>;
  using QK = SimtQK<T, typename Tr::Acc, Tr::BM, Tr::BN, Tr::BK, Tr::LDI>;
  template <bool kTransP, typename TP>
  __device__ __forceinline__ static void pv(typename Tr::Acc* out, const TP* P, const T* V) {
    simt_pv<typename Tr::Acc, kTransP, kTransP ? Tr::BN : Tr::BM, kTransP ? Tr::BM : Tr::BN, Tr::BK,
            Tr::LDP, Tr::LDI, Tr::LDO>(out, P, V);
  }
};
template <typename T> struct WmmaEngine {
  using Tr = Traits<T, std::is_same<T, float>::value ? Mma::Tf32 : Mma::Wmma16>;
  static_assert(Tr::BM == 64 && Tr::BN == 64, "the wmma warp layout assumes 64 x 64 tiles");
  using QK = WmmaQK<T, Tr::BK, Tr::LDI>;
  template <bool kTransP>
  __device__ __forceinline__ static void pv(float* out, const T* P, const T* V) {
    wmma_pv<T, kTransP, Tr::BK, Tr::LDP, Tr::LDI, Tr::LDO>(out, P, V);
  }
};
template <> struct Engine<__half, Mma::Wmma16> : WmmaEngine<__half> {};
template <> struct Engine<__nv_bfloat16, Mma::Wmma16> : WmmaEngine<__nv_bfloat16> {};
template <> struct Engine<float, Mma::Tf32> : WmmaEngine<float> {};

// ---- building blocks ---------------------------------------------------------------
// dst[r][c] = src[(r0 + r) * d + d0 + c], zero outside rows < nrows and columns < d.
template <typename T, int ROWS, int BK, int LDI>
__device__ __forceinline__ void load_chunk(T* dst, const T* __restrict__ src, long long nrows,
                                           long long d, long long r0, long long d0) {
  for (int idx = threadIdx.x; idx < ROWS * BK; idx += kThreads) {
    const int r = idx / BK, c = idx % BK;
    const long long gr = r0 + r, gc = d0 + c;
    dst[r * LDI + c] = (gr < nrows && gc < d) ? src[gr * d + gc] : zero_of<T>();
  }
}

// The t-th column tile a block visits: each block starts at its own tile (blockIdx.x mod
// tiles), so that blocks running at the same time do not merge into the same column
// words (forward) or add into the same dk rows (backward) at once.
__device__ __forceinline__ long long rotated_tile(long long t, long long tiles) {
  const long long jt = static_cast<long long>(blockIdx.x) % tiles + t;
  return jt < tiles ? jt : jt - tiles;
}

// sm.s = q[i0:i0+BM] k[j0:j0+BN]^T (unscaled), ends with a barrier.
template <typename T, Mma M>
__device__ __forceinline__ void compute_s_tile(Smem<T, M>& sm, const T* __restrict__ q,
                                               const T* __restrict__ k, long long n, long long m,
                                               long long d, long long i0, long long j0) {
  using Tr = Traits<T, M>;
  typename Engine<T, M>::QK eng;
  eng.init();
  for (long long d0 = 0; d0 < d; d0 += Tr::BK) {
    load_chunk<T, Tr::BM, Tr::BK, Tr::LDI>(sm.qs, q, n, d, i0, d0);
    load_chunk<T, Tr::BN, Tr::BK, Tr::LDI>(sm.ks, k, m, d, j0, d0);
    __syncthreads();
    eng.step(sm.qs, sm.ks);
    __syncthreads();
  }
  eng.template store<Tr::LDS>(sm.s);
  __syncthreads();
}

// (max, sum exp(x - max)) of `len` values at x[0], x[stride], ...; (-inf, 0) if all -inf,
// (NaN, NaN) if any is NaN (fmax drops NaNs; OnlineLSE::merge keeps this one).
template <typename Acc>
__device__ __forceinline__ void partial_lse(const Acc* x, int stride, int len, Acc& mx, Acc& l) {
  mx = neg_inf<Acc>();
  bool nan = false;
  for (int t = 0; t < len; ++t) {
    const Acc v = x[t * stride];
    nan |= v != v;
    mx = fmax(mx, v);
  }
  l = Acc(0);
  if (nan) {
    mx = l = nan_value<Acc>();
    return;
  }
  if (mx != neg_inf<Acc>())
    for (int t = 0; t < len; ++t) l += ck_exp<Acc>(x[t * stride] - mx);
}

// Merge (mx, l) across groups of G adjacent lanes (G a power of two <= 32).
template <int G, typename Acc>
__device__ __forceinline__ void group_merge(Acc& mx, Acc& l) {
#pragma unroll
  for (int off = 1; off < G; off <<= 1) {
    const Acc m2 = __shfl_xor_sync(0xffffffffu, mx, off);
    const Acc l2 = __shfl_xor_sync(0xffffffffu, l, off);
    OnlineLSE<Acc> st{mx, l};
    st.merge(m2, l2);
    mx = st.m;
    l = st.l;
  }
}

// Column statistics of fp32 runs, merged across row blocks: one 64-bit word per column
// holding (max, sum) as two floats, updated with compare-and-swap.
__device__ __forceinline__ unsigned long long pack_stat(float mx, float l) {
  return (static_cast<unsigned long long>(__float_as_uint(l)) << 32) | __float_as_uint(mx);
}
constexpr unsigned long long kEmptyStat = 0xff800000ull;  // (max = -inf, sum = 0)

__device__ __forceinline__ void atomic_merge_stat(unsigned long long* addr, float mx, float l) {
  unsigned long long old = *reinterpret_cast<volatile unsigned long long*>(addr);
  while (true) {
    OnlineLSE<float> st{__uint_as_float(static_cast<unsigned int>(old & 0xffffffffull)),
                        __uint_as_float(static_cast<unsigned int>(old >> 32))};
    st.merge(mx, l);
    const unsigned long long upd = pack_stat(st.m, st.l);
    if (upd == old) return;
    const unsigned long long prev = atomicCAS(addr, old, upd);
    if (prev == old) return;
    old = prev;
  }
}

// ---- kernels -------------------------------------------------------------------------
template <typename T, Mma M, bool kColsAtomic>
__global__ void __launch_bounds__(kThreads)
lse_forward_kernel(const T* __restrict__ q, const T* __restrict__ k, long long n, long long m,
                   long long d, typename Traits<T, M>::Acc scale, bool self_mask,
                   typename Traits<T, M>::Acc* __restrict__ lse_rows,
                   unsigned long long* __restrict__ colstat) {
  using Tr = Traits<T, M>;
  using Acc = typename Tr::Acc;
  constexpr int BM = Tr::BM, BN = Tr::BN, LDS = Tr::LDS;
  constexpr int TPR = kThreads / BM, TPC = kThreads / BN;  // threads per row / column
  __shared__ Smem<T, M> sm;
  const long long i0 = static_cast<long long>(blockIdx.x) * BM;
  const int tid = threadIdx.x;
  for (int r = tid; r < BM; r += kThreads) {
    sm.row_a[r] = neg_inf<Acc>();
    sm.row_b[r] = Acc(0);
  }
  const long long tiles = (m + BN - 1) / BN;
  for (long long t = 0; t < tiles; ++t) {
    const long long j0 = rotated_tile(t, tiles) * BN;
    compute_s_tile(sm, q, k, n, m, d, i0, j0);
    for (int idx = tid; idx < BM * BN; idx += kThreads) {
      const int r = idx / BN, c = idx % BN;
      const long long i = i0 + r, j = j0 + c;
      const bool ok = i < n && j < m && !excluded(self_mask, i, j);
      sm.s[r * LDS + c] = ok ? scale * sm.s[r * LDS + c] : neg_inf<Acc>();
    }
    __syncthreads();
    {  // rows: TPR adjacent lanes per row, BN / TPR columns each
      const int r = tid / TPR, part = tid % TPR;
      Acc mx, l;
      partial_lse(sm.s + r * LDS + part * (BN / TPR), 1, BN / TPR, mx, l);
      group_merge<TPR>(mx, l);
      if (part == 0) {
        OnlineLSE<Acc> st{sm.row_a[r], sm.row_b[r]};
        st.merge(mx, l);
        sm.row_a[r] = st.m;
        sm.row_b[r] = st.l;
      }
    }
    if constexpr (kColsAtomic) {  // columns: TPC adjacent lanes per column
      const int c = tid / TPC, part = tid % TPC;
      Acc mx, l;
      partial_lse(sm.s + part * (BM / TPC) * LDS + c, LDS, BM / TPC, mx, l);
      group_merge<TPC>(mx, l);
      if (part == 0 && j0 + c < m && mx != neg_inf<Acc>())
        atomic_merge_stat(colstat + j0 + c, static_cast<float>(mx), static_cast<float>(l));
    }
    __syncthreads();
  }
  for (int r = tid; r < BM; r += kThreads) {
    if (i0 + r < n) lse_rows[i0 + r] = OnlineLSE<Acc>{sm.row_a[r], sm.row_b[r]}.finish();
  }
}

template <typename T, Mma M, bool kDkAtomic>
__global__ void __launch_bounds__(kThreads)
lse_backward_kernel(const T* __restrict__ q, const T* __restrict__ k, long long n, long long m,
                    long long d, typename Traits<T, M>::Acc scale, bool self_mask,
                    const typename Traits<T, M>::Acc* __restrict__ lse_r,
                    const typename Traits<T, M>::Acc* __restrict__ g_r,
                    const typename Traits<T, M>::Acc* __restrict__ lse_c,
                    const typename Traits<T, M>::Acc* __restrict__ g_c,
                    typename Traits<T, M>::Acc* __restrict__ dq,
                    typename Traits<T, M>::Acc* __restrict__ dk,
                    const typename Traits<T, M>::Acc* __restrict__ bias,
                    typename Traits<T, M>::Acc* __restrict__ r_out,
                    typename Traits<T, M>::Acc* __restrict__ t_out,
                    const int* __restrict__ rid, const int* __restrict__ cid) {
  using Tr = Traits<T, M>;
  using Acc = typename Tr::Acc;
  using Eng = Engine<T, M>;
  constexpr int BM = Tr::BM, BN = Tr::BN, BK = Tr::BK, LDS = Tr::LDS, LDO = Tr::LDO;
  constexpr bool kSepP = Smem<T, M>::kSepP;
  __shared__ Smem<T, M> sm;
  const long long i0 = static_cast<long long>(blockIdx.x) * BM;
  const int tid = threadIdx.x;
  const Acc inf = -neg_inf<Acc>();
  // An absent term has g = 0 and lse = +inf, so it contributes exactly 0. The sigmoid
  // loss (bias != nullptr) multiplies its g's: an absent one is 1.
  const bool siglip = bias != nullptr;
  const Acc b = siglip ? *bias : Acc(0);
  const Acc absent = siglip ? Acc(1) : Acc(0);
  for (int r = tid; r < BM; r += kThreads) {
    const long long i = i0 + r;
    const bool has = i < n && g_r != nullptr;
    sm.row_a[r] = has && !siglip ? backward_lse(lse_r[i]) : inf;
    sm.row_b[r] = has ? g_r[i] : absent;
    sm.row_sp[r] = sm.row_sg[r] = Acc(0);
    sm.row_id[r] = i < n && rid != nullptr ? rid[i] : -1;
  }
  Acc* out = kSepP ? reinterpret_cast<Acc*>(sm.s) : sm.out;
  const long long tiles = (m + BN - 1) / BN;
  for (long long t = 0; t < tiles; ++t) {
    const long long j0 = rotated_tile(t, tiles) * BN;
    for (int c = tid; c < BN; c += kThreads) {
      const long long j = j0 + c;
      const bool has = j < m && g_c != nullptr;
      sm.col_a[c] = has && !siglip ? backward_lse(lse_c[j]) : inf;
      sm.col_b[c] = has ? g_c[j] : absent;
      sm.col_id[c] = j < m && cid != nullptr ? cid[j] : -1;
    }
    if (tid == 0) sm.amax_bits = 0u;
    compute_s_tile(sm, q, k, n, m, d, i0, j0);  // its barriers publish col_*, amax_bits
    int any = 0;
    float amax = 0.f;
    for (int idx = tid; idx < BM * BN; idx += kThreads) {
      const int r = idx / BN, c = idx % BN;
      const long long i = i0 + r, j = j0 + c;
      Acc g = Acc(0);
      if (i < n && j < m && !excluded(self_mask, i, j)) {
        if (siglip) {
          // positive: equal ids, >= 0 on both sides (so the swapped pass agrees)
          const int ri = sm.row_id[r];
          Acc loss, dz;
          siglip_term<Acc>(scale * sm.s[r * LDS + c] + b, ri >= 0 && ri == sm.col_id[c], loss, dz);
          if (r_out != nullptr) {
            atomicAdd(&sm.row_sp[r], loss);
            atomicAdd(&sm.row_sg[r], dz);
          }
          g = sm.row_b[r] * sm.col_b[c] * dz;
        } else {
          g = tile_grad<Acc>(scale * sm.s[r * LDS + c], sm.row_a[r], sm.row_b[r], sm.col_a[c],
                             sm.col_b[c]);
        }
      }
      sm.s[r * LDS + c] = g;
      any |= (g != Acc(0));
      if (Tr::kScaleDS) amax = fmaxf(amax, fabsf(static_cast<float>(g)));
    }
    if (Tr::kScaleDS) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      if ((tid & 31) == 0) atomicMax(&sm.amax_bits, __float_as_uint(amax));  // amax >= 0
    }
    // the whole tile is zero, or only the sums are wanted: nothing to add
    if (!__syncthreads_or(any) || dq == nullptr) continue;
    Acc inv = Acc(1);
    if constexpr (kSepP) {
      float mul = 1.f;
      if (Tr::kScaleDS) {
        int ex;
        frexpf(__uint_as_float(sm.amax_bits), &ex);  // amax < 2^ex
        const int e = min(14 - ex, 100);             // scaled max < 2^14 (fp16 max 65504)
        mul = ldexpf(1.f, e);
        inv = ldexpf(1.f, -e);
      }
      for (int idx = tid; idx < BM * BN; idx += kThreads) {
        const int r = idx / BN, c = idx % BN;
        sm.p[r * Tr::LDP + c] = from_float<T>(sm.s[r * LDS + c] * mul);
      }
      __syncthreads();
    }
    const auto* P = [&]() {
      if constexpr (kSepP) return static_cast<const T*>(sm.p);
      else return static_cast<const Acc*>(sm.s);
    }();
    for (long long d0 = 0; d0 < d; d0 += BK) {
      load_chunk<T, BN, BK, Tr::LDI>(sm.ks, k, m, d, j0, d0);
      if constexpr (kDkAtomic) load_chunk<T, BM, BK, Tr::LDI>(sm.qs, q, n, d, i0, d0);
      __syncthreads();
      Eng::template pv<false>(out, P, sm.ks);  // (dS k)[BM x BK]
      __syncthreads();
      for (int idx = tid; idx < BM * BK; idx += kThreads) {
        const int r = idx / BK, c = idx % BK;
        const long long i = i0 + r, dd = d0 + c;
        if (i < n && dd < d) dq[i * d + dd] += inv * out[r * LDO + c];
      }
      if constexpr (kDkAtomic) {
        __syncthreads();
        Eng::template pv<true>(out, P, sm.qs);  // (dS^T q)[BN x BK]
        __syncthreads();
        for (int idx = tid; idx < BN * BK; idx += kThreads) {
          const int r = idx / BK, c = idx % BK;
          const long long j = j0 + r, dd = d0 + c;
          if (j < m && dd < d) atomicAdd(dk + j * d + dd, inv * out[r * LDO + c]);
        }
      }
      __syncthreads();
    }
  }
  if (r_out != nullptr) {
    __syncthreads();
    for (int r = tid; r < BM; r += kThreads) {
      if (i0 + r < n) {
        r_out[i0 + r] = sm.row_sp[r];
        t_out[i0 + r] = sm.row_sg[r];
      }
    }
  }
}

__global__ void colstat_init_kernel(unsigned long long* __restrict__ cs, long long m) {
  const long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < m) cs[j] = kEmptyStat;
}

__global__ void colstat_finish_kernel(const unsigned long long* __restrict__ cs,
                                      float* __restrict__ lse, long long m) {
  const long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < m) {
    const unsigned long long v = cs[j];
    lse[j] = OnlineLSE<float>{__uint_as_float(static_cast<unsigned int>(v & 0xffffffffull)),
                              __uint_as_float(static_cast<unsigned int>(v >> 32))}.finish();
  }
}

}  // namespace cuda_impl
}  // namespace ck
