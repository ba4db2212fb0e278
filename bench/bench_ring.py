"""Ring vs gather for the global-batch loss, gloo on CPU.

    python bench/bench_ring.py [--world 4] [--n 1024] [--d 128] [--reps 5] [--threads 1]
                               [--loss clip|siglip] [--backend torch]

Times forward + backward of the symmetric CLIP loss (--loss siglip: the sigmoid loss,
ring_siglip_loss / gather_siglip_loss, with a learnable bias too) over P processes:
  ring (overlap)  transfers of the next block overlap the compute on the current one
  ring (sync)     each transfer is waited for before computing (overlap=False)
  gather          all-gather with gradient, local queries against all keys
and prints the median over the repetitions (max over ranks of each repetition).
"""
import argparse
import os
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
from harness import inputs, seconds  # noqa: E402

MODES = [("ring (overlap)", "ring", True), ("ring (sync)", "ring", False),
         ("gather", "gather", None)]


def _worker(rank, args, init_file, out):
    torch.set_num_threads(args.threads)
    import contrastive_kernels.distributed as ckd
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=args.world)
    q0, k0 = inputs(args.n, args.d, seed=rank, requires_grad=False)
    results = {}
    for label, mode, overlap in MODES:
        times = []
        for rep in range(args.reps + 1):           # the first repetition warms up
            q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
            scale = torch.tensor(14.0, requires_grad=True)
            bias = torch.tensor(-10.0, requires_grad=True)
            dist.barrier()

            def step():
                if args.loss == "siglip":
                    kw = dict(logit_scale=scale, logit_bias=bias, backend=args.backend)
                    loss = (ckd.ring_siglip_loss(q, k, overlap=overlap, **kw) if mode == "ring"
                            else ckd.gather_siglip_loss(q, k, **kw))
                elif mode == "ring":
                    loss = ckd.ring_info_nce(q, k, symmetric=True, logit_scale=scale,
                                             backend=args.backend, overlap=overlap)
                else:
                    loss = ckd.gather_info_nce(q, k, symmetric=True, logit_scale=scale,
                                               backend=args.backend)
                loss.backward()
            dt = torch.tensor([seconds(step)], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if rep:
                times.append(dt.item())
        results[label] = statistics.median(times)
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--n", type=int, default=1024, help="local batch (queries = keys)")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = mp.start_processes(_worker, args=(args, os.path.join(tmp, "init"), out),
                                   nprocs=args.world, join=False, start_method="spawn")
        results = out.get(timeout=1800)
        procs.join()
    what = "sigmoid loss (SigLIP)" if args.loss == "siglip" else "symmetric InfoNCE"
    print(f"global-batch {what}, gloo CPU, P={args.world}, N_local={args.n}, "
          f"D={args.d}, fp32, backend={args.backend!r}, {args.threads} thread(s)/rank, "
          f"median of {args.reps} (fwd + bwd, slowest rank)")
    base = results["ring (overlap)"]
    print(f"{'mode':<16} {'time (ms)':>10} {'vs ring':>8}")
    for label, _, _ in MODES:
        print(f"{label:<16} {results[label] * 1e3:>10.1f} {results[label] / base:>7.2f}x")


if __name__ == "__main__":
    main()
