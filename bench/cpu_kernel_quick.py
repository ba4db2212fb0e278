"""Quick CPU-kernel timing: fused symmetric forward+backward vs 4 GEMMs and the naive loss.

python bench/cpu_kernel_quick.py [N] [D] [reps]
"""
import sys

import torch

import contrastive_kernels  # noqa: F401  (loads the ops)
from harness import SCALE, inputs, median_time, naive_loss

ops = torch.ops.contrastive_kernels


def med(fn, reps):
    return median_time(fn, reps, warmup=1)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    d = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    q, k = inputs(n, d, requires_grad=False)
    s = SCALE
    g = torch.full((n,), 0.5 / n)

    def fused():
        lr, lc = ops.lse_forward(q, k, s, False, True)
        ops.lse_backward(q, k, s, False, lr, lc, g, g)

    def naive():
        naive_loss(q.clone().requires_grad_(), k.clone().requires_grad_(), s).backward()

    kt = k.T.contiguous()
    for _ in range(1):
        t_gemm = med(lambda: torch.mm(q, kt), reps)
        t_fused = med(fused, reps)
        t_naive = med(naive, reps)
    print(f"N=M={n} D={d} threads={torch.get_num_threads()}: t_gemm={t_gemm:.3f}s "
          f"fused fwd+bwd={t_fused:.3f}s ({t_fused / (4 * t_gemm):.2f} x 4 GEMM) "
          f"naive={t_naive:.3f}s (fused/naive={t_fused / t_naive:.2f})")


if __name__ == "__main__":
    main()
