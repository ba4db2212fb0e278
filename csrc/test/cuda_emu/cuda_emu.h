// A CUDA emulator for the device code of csrc/cuda/, so that the CUDA backend's kernels
// run (slowly) on the CPU in the test suite (tests/cuda_emu.py builds it; see
// docs/DESIGN.md, "How it is tested"). Not a general emulator: what lse_kernels.cuh uses.
//
// A launch runs its blocks one after another. The threads of a block are fibers
// (ucontext) on one OS thread, switched only at __syncthreads, warp shuffles and
// atomicCAS, in index order (CK_EMU_REVERSE=1: reverse order, which exposes a read that
// misses a barrier from the other side). Shared memory (__shared__ is `static`) keeps
// what the previous block left (CUDA's is undefined). A barrier that some threads never reach
// (a deadlock or divergent __syncthreads) fails the launch with an error and a message.
// nvcuda::wmma fragments hold the whole tile in every lane; mma_sync accumulates in
// float, as the tensor cores do.
#pragma once
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace ck_emu {

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  bool done = false;
};

// The fibers' stacks, reused by every block and launch.
inline std::vector<std::vector<char>>& stacks(int n) {
  static std::vector<std::vector<char>> pool;
  while (static_cast<int>(pool.size()) < n) pool.emplace_back(256 * 1024);
  return pool;
}

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int current = 0;
  bool progress = false;
  // block barrier
  int arrived = 0;
  unsigned gen = 0;
  int or_acc = 0, or_result = 0;
  // warp barriers and shuffle slots
  std::vector<int> warp_arrived;
  std::vector<unsigned> warp_gen;
  std::vector<double> slot;
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline uint3& block_idx() {
  static uint3 v;
  return v;
}
inline dim3& block_dim() {
  static dim3 v;
  return v;
}
inline dim3& grid_dim() {
  static dim3 v;
  return v;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline Fiber& self() { return block()->fibers[block()->current]; }
inline int linear_tid() { return static_cast<int>(self().tid.x); }

// Back to the scheduler; `waiting`: this thread made no progress (it waits at a barrier).
inline void yield(bool waiting) {
  Block& b = *block();
  if (!waiting) b.progress = true;
  swapcontext(&b.fibers[b.current].ctx, &b.sched);
}

// Waits until `count` threads have arrived at the barrier (arrived, gen); the last to
// arrive runs `last` before releasing the others.
template <typename F>
inline void barrier(int& arrived, unsigned& gen, int count, F last) {
  Block& b = *block();
  const unsigned g = gen;
  b.progress = true;
  if (++arrived == count) {
    arrived = 0;
    last();
    ++gen;
    return;
  }
  while (gen == g) yield(true);
}

inline int syncthreads_or(int p) {
  Block& b = *block();
  b.or_acc |= (p != 0);
  barrier(b.arrived, b.gen, static_cast<int>(b.fibers.size()), [&b]() {
    b.or_result = b.or_acc;
    b.or_acc = 0;
  });
  return b.or_result;
}

inline void syncthreads() { syncthreads_or(0); }

inline void syncwarp() {
  Block& b = *block();
  const int w = linear_tid() / 32;
  barrier(b.warp_arrived[w], b.warp_gen[w], 32, []() {});
}

template <typename V>
inline V shfl_xor(V v, int lane_mask) {
  static_assert(sizeof(V) <= sizeof(double), "shuffle of a wider type");
  Block& b = *block();
  const int t = linear_tid();
  double box = 0;
  std::memcpy(&box, &v, sizeof(V));
  b.slot[t] = box;
  syncwarp();
  const int src = (t & ~31) | ((t & 31) ^ lane_mask);
  V out;
  std::memcpy(&out, &b.slot[src], sizeof(V));
  syncwarp();  // every lane has read before a slot is written again
  return out;
}

inline void trampoline();
inline std::function<void()>*& body() {
  static std::function<void()>* f = nullptr;
  return f;
}

// Runs `kernel` over every block of the grid; false (with a message) on a deadlock.
inline bool run(dim3 grid, dim3 threads, const std::function<void()>& kernel) {
  const int nt = static_cast<int>(threads.x * threads.y * threads.z);
  if (nt <= 0 || nt % 32 != 0 || threads.y != 1 || threads.z != 1) {
    std::fprintf(stderr, "ck_emu: unsupported block shape (%u, %u, %u)\n", threads.x, threads.y,
                 threads.z);
    return false;
  }
  const bool reverse = std::getenv("CK_EMU_REVERSE") && std::getenv("CK_EMU_REVERSE")[0] == '1';
  grid_dim() = grid;
  block_dim() = threads;
  std::function<void()> f = kernel;
  body() = &f;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx() = make_uint3(bx, by, bz);
        Block b;
        b.fibers.resize(nt);
        b.warp_arrived.assign(nt / 32, 0);
        b.warp_gen.assign(nt / 32, 0);
        b.slot.assign(nt, 0.0);
        block() = &b;
        for (int t = 0; t < nt; ++t) {
          Fiber& fb = b.fibers[t];
          fb.tid = make_uint3(static_cast<unsigned>(t), 0, 0);
          std::vector<char>& stack = stacks(nt)[t];
          getcontext(&fb.ctx);
          fb.ctx.uc_stack.ss_sp = stack.data();
          fb.ctx.uc_stack.ss_size = stack.size();
          fb.ctx.uc_link = &b.sched;
          makecontext(&fb.ctx, reinterpret_cast<void (*)()>(&trampoline), 0);
        }
        int live = nt;
        while (live > 0) {
          b.progress = false;
          for (int s = 0; s < nt; ++s) {
            const int t = reverse ? nt - 1 - s : s;
            if (b.fibers[t].done) continue;
            b.current = t;
            swapcontext(&b.sched, &b.fibers[t].ctx);
            if (b.fibers[t].done) --live;
          }
          if (live > 0 && !b.progress) {
            std::fprintf(stderr,
                         "ck_emu: block (%u, %u, %u): %d of %d threads wait at a barrier that "
                         "the others never reach (deadlock or divergent __syncthreads)\n",
                         bx, by, bz, live, nt);
            block() = nullptr;
            return false;
          }
        }
        block() = nullptr;
      }
  return true;
}

inline void trampoline() {
  (*body())();
  Block& b = *block();
  b.fibers[b.current].done = true;
  b.progress = true;
  // returning switches to uc_link (the scheduler)
}

// kernel<<<grid, block, smem, stream>>>(args): tests/cuda_emu.py rewrites it to
// ck_emu::launch(&kernel, grid, block, smem, stream)(args).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, threads;
  template <typename... A>
  void operator()(A&&... a) const {
    std::tuple<P...> args(std::forward<A>(a)...);
    auto k = kernel;
    if (!run(grid, threads, [&]() { std::apply(k, args); })) last_error() = cudaErrorLaunchFailure;
  }
};
template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 threads, size_t = 0,
                    cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, threads};
}

}  // namespace ck_emu

// ---- built-in variables and intrinsics --------------------------------------------------
#define threadIdx (::ck_emu::self().tid)
#define blockIdx (::ck_emu::block_idx())
#define blockDim (::ck_emu::block_dim())
#define gridDim (::ck_emu::grid_dim())

inline void __syncthreads() { ck_emu::syncthreads(); }
inline int __syncthreads_or(int p) { return ck_emu::syncthreads_or(p); }
inline void __syncwarp(unsigned = 0xffffffffu) { ck_emu::syncwarp(); }
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int = 32) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "ck_emu: partial-warp shuffles are not emulated\n");
    std::abort();
  }
  return ck_emu::shfl_xor(v, lane_mask);
}

inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
  const unsigned old = *p;
  if (v > old) *p = v;
  return old;
}
// A switch point: other threads run first, so that a compare-and-swap loop sees its
// word change under it and retries.
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp,
                                    unsigned long long v) {
  ck_emu::yield(false);
  const unsigned long long old = *p;
  if (old == cmp) *p = v;
  return old;
}

// CUDA's integer min/max of device code
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// ---- nvcuda::wmma: every lane holds the whole fragment --------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// fp32 -> tf32: 10 mantissa bits, round to nearest (ties away from zero).
inline float __float_to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  unsigned u = __float_as_uint(x);
  u += 0x1000u;
  u &= 0xffffe000u;
  return __uint_as_float(u);
}

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  using element_type =
      typename std::conditional<std::is_same<T, precision::tf32>::value, float, T>::type;
  static constexpr int num_elements = rows * cols;
  element_type x[rows * cols];
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) {
  for (int t = 0; t < f.num_elements; ++t) f.x[t] = static_cast<typename fragment<Use, M, N, K, T, L>::element_type>(v);
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  constexpr bool col = std::is_same<L, col_major>::value;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = col ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm,
                             layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                              layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * N + c];
}

template <int M, int N, int K, typename TA, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k)
        acc += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
      out[i * N + j] = acc;
    }
  for (int t = 0; t < M * N; ++t) d.x[t] = out[t];
}
}  // namespace wmma
}  // namespace nvcuda
