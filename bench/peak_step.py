"""Peak memory of one forward + backward step beyond the inputs, on the CPU.

    python bench/peak_step.py [--n 16384] [--d 256] [--backends cpu,torch]
                              [--cases clip,supcon,smoothing,ntxent] [--dtypes float32,bfloat16]

Each case runs in a fresh process with a fixed glibc mmap threshold, so that large
buffers are mapped and unmapped and the peak RSS (VmHWM, reset just before the step)
follows what is live. It prints the peak above the inputs, the gradients' size, and
the ratio. tests/test_memory.py runs the same worker (`--worker`).
"""
import argparse
import json
import os
import subprocess
import sys

MiB = 1 << 20
CASES = ("clip", "supcon", "smoothing", "ntxent", "frozen_keys")


def worker(backend, case, n, d, dtype, threads=2):
    import torch
    import torch.nn.functional as F

    import contrastive_kernels as ck
    from harness import reset_peak
    from harness import status_bytes as status   # (VmRSS, VmHWM)
    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)

    def make(rows, seed):
        g = torch.Generator().manual_seed(seed)
        kw = dict(clip=dict(symmetric=True),
                  supcon=dict(symmetric=True, labels=torch.arange(rows) % 37),
                  smoothing=dict(symmetric=True, label_smoothing=0.1),
                  ntxent=dict(symmetric=True), frozen_keys=dict(symmetric=True))[case]
        q = F.normalize(torch.randn(rows, d, generator=g), dim=1).to(dt).requires_grad_()
        k = None if case == "ntxent" else \
            F.normalize(torch.randn(rows, d, generator=g), dim=1).to(dt)
        if k is not None and case != "frozen_keys":   # frozen: a memory bank, a locked tower
            k.requires_grad_()
        return q, k, kw

    def step(q, k, kw):
        loss = ck.info_nce(q, k, backend=backend, **kw)
        return torch.autograd.grad(loss, [x for x in (q, k) if x is not None and x.requires_grad])

    step(*make(256, 0))                  # load the code, start the thread pool
    q, k, kw = make(n, 1)
    base = status()[0]
    reset_peak()
    grads = step(q, k, kw)
    return dict(backend=backend, case=case, n=n, d=d, dtype=dtype, threads=threads,
                above=status()[1] - base, grads=sum(g.numel() * g.element_size() for g in grads))


def measure(backend, case, n, d, dtype="float32", timeout=600):
    """Runs `worker` in a fresh process; returns its dict."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", backend, case,
                          str(n), str(d), dtype], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{backend}/{case} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        b, c, n, d, dt = argv[1:6]
        print(json.dumps(worker(b, c, int(n), int(d), dt)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--backends", default="cpu,torch")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    a = ap.parse_args(argv)
    print(f"# N={a.n} D={a.d}, 2 threads: peak RSS of one step above the inputs")
    print(f"{'backend':>8} {'case':>10} {'dtype':>9} {'peak MiB':>9} {'grads MiB':>10} {'peak/grads':>11}")
    for b in a.backends.split(","):
        for dt in a.dtypes.split(","):
            for c in a.cases.split(","):
                r = measure(b, c, a.n, a.d, dt)
                print(f"{b:>8} {c:>10} {dt:>9} {r['above'] / MiB:9.1f} {r['grads'] / MiB:10.1f} "
                      f"{r['above'] / r['grads']:11.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
