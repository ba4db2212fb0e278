"""Time of a forward + backward step with trainable vs frozen keys (CPU backends).

    python bench/frozen_keys.py [--n 8192] [--d 256] [--repeats 5]

Frozen keys (a memory bank, a locked tower) skip dk: one GEMM pass of the four.
Medians of --repeats steps, both variants alternating in one process.
"""
import argparse
import statistics
import sys

import torch

import contrastive_kernels as ck
from harness import inputs, seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    q, k = inputs(a.n, a.d)
    k = k.detach()
    print(f"# symmetric CLIP, fp32, N={a.n}, D={a.d}, {torch.get_num_threads()} threads, "
          f"median of {a.repeats}")
    for backend in ck.available_backends("cpu"):
        if backend == "triton":
            continue
        times = {True: [], False: []}
        for _ in range(a.repeats):
            for trainable in (True, False):
                kk = k.detach().requires_grad_(trainable)

                def step():
                    loss = ck.info_nce(q, kk, symmetric=True, backend=backend)
                    torch.autograd.grad(loss, [x for x in (q, kk) if x.requires_grad])
                times[trainable].append(seconds(step))
        t_all, t_frozen = statistics.median(times[True]), statistics.median(times[False])
        print(f"{backend:>6}: keys trained {t_all:.3f} s, keys frozen {t_frozen:.3f} s "
              f"({t_frozen / t_all:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
