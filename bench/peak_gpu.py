"""Where a GPU step's peak memory comes from: one symmetric CLIP step (bf16) of a Triton
mode, with torch.cuda.memory_allocated after every aten op of the forward and of the
backward.

    python bench/peak_gpu.py [--n 65536] [--d 768] [--modes low,auto] [--top 6]

For each mode it prints the inputs + gradients (the ideal), the peak of the forward and
of the backward over the ideal, and the ops after which the most memory was allocated
(with the size of their largest output): what to shrink to move the peak.
"""
import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness import inputs

MiB = 1 << 20
MODES = {"low": dict(low_memory=True), "auto": {}, "fused": dict(algorithm="fused")}


class Trace(TorchDispatchMode):
    """Records memory after every aten op, inside the package's custom ops too (their
    Python bodies run under the mode)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from contrastive_kernels.ops import BODIES
        if func in BODIES:
            with self:
                return BODIES[func](*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        big = max((t.numel() * t.element_size() for t in outs if torch.is_tensor(t)), default=0)
        self.rows.append((torch.cuda.memory_allocated(), str(func), big))
        return out


def run(mode, n, d, top):
    import contrastive_kernels as ck
    q, k = inputs(n, d, dtype=torch.bfloat16, device="cuda")
    step = lambda: ck.info_nce(q, k, temperature=0.07, symmetric=True, backend="triton",
                               **MODES[mode])
    torch.autograd.grad(step(), (q, k))          # compile / autotune first
    ideal = 4 * n * d * 2
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with Trace() as tf:
        loss = step()
    torch.cuda.synchronize()
    fwd_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with Trace() as tb:
        grads = torch.autograd.grad(loss, (q, k))
    torch.cuda.synchronize()
    bwd_peak = torch.cuda.max_memory_allocated()
    print(f"{mode}: N={n} D={d} base {base / MiB:.0f} MiB, ideal {ideal / MiB:.0f} MiB, "
          f"forward peak {fwd_peak / ideal:.3f}x, backward peak {bwd_peak / ideal:.3f}x "
          f"(+{(bwd_peak - ideal) / MiB:.1f} MiB)")
    for name, tr in (("fwd", tf), ("bwd", tb)):
        for alloc, fn, big in sorted(tr.rows, reverse=True)[:top]:
            print(f"  {name} {alloc / MiB:9.1f} MiB after {fn} (largest output {big / MiB:.1f} MiB)")
    del grads, loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--modes", default="low,auto")
    ap.add_argument("--top", type=int, default=6)
    a = ap.parse_args(argv)
    for mode in a.modes.split(","):
        run(mode, a.n, a.d, a.top)


if __name__ == "__main__":
    main()
