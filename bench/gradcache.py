"""One two-tower CLIP training step on the CPU: ck.GradCache + fused loss vs the naive step.

    python bench/gradcache.py                 # N = 8192 and 65536, chunk 1024 (about 2-3 min)
    python bench/gradcache.py --n 65536 --chunk 1024 --dim 64 --threads 2 --steps 5
    python bench/gradcache.py --methods gradcache,fused-whole,naive --json out.json

Model: two MLP towers (in -> hidden -> hidden -> dim, GELU), unit-norm embeddings, a
learnable logit scale, symmetric InfoNCE. A step is zero_grad, forward + backward, SGD.

Methods:
  gradcache    ck.GradCache(towers, ck.FusedInfoNCE, chunk): chunked encoding with cached
               embedding gradients, fused loss (no N x N logits, one chunk of activations)
  naive        whole-batch encoding, then torch cross-entropy on the full N x N logits
  fused-whole  whole-batch encoding, fused loss (separates the two savings)

Each (N, method) runs in a fresh process (default allocator settings, so the peak
includes what glibc keeps cached): inputs and model are made, the method runs once on
256 rows (kernels loaded, threads started, a small peak), then --steps timed steps.
Time: their median. Peak: getrusage's ru_maxrss. Above inputs: the peak minus the RSS
before the timed steps (inputs, model, loaded code and thread pools). The loss column
is the first step's: the same model and data for every method at one N.
A method whose estimated need exceeds --budget-gib is skipped with its estimate.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

GiB, MiB = 1 << 30, 1 << 20
METHODS = ("gradcache", "naive", "fused-whole")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="8192,65536", help="batch sizes, comma-separated")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=64, help="embedding width")
    ap.add_argument("--in-dim", type=int, default=128, help="input width of both towers")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    ap.add_argument("--budget-gib", type=float, default=16.0,
                    help="skip a method whose estimate exceeds this")
    ap.add_argument("--methods", default="gradcache,naive")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--worker-n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.ns = [int(x) for x in args.n.split(",")]
    except ValueError:
        ap.error(f"--n must be comma-separated integers, got {args.n!r}")
    args.method_list = args.methods.split(",")
    bad = [m for m in args.method_list if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS}")
    for name in ("chunk", "dim", "in_dim", "hidden", "threads", "steps"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if any(n <= 0 for n in args.ns):
        ap.error("--n values must be positive")
    return args


def estimate(method, n, args):
    """Bytes a step needs above the inputs, roughly: N x N float32 buffers of the naive
    loss (logits, two log-softmaxes and their gradients: about 5), activations kept for
    backward (per row and tower: the input, 4 hidden-wide tensors, 2 dim-wide ones; x1.5
    for the backward's temporaries), embeddings and their gradients."""
    rows = min(n, args.chunk) if method == "gradcache" else n
    acts = int(1.5 * rows * 4 * 2 * (args.in_dim + 4 * args.hidden + 2 * args.dim))
    embs = 4 * n * 2 * args.dim * 4
    squares = 5 * 4 * n * n if method == "naive" else 0
    return squares + acts + embs


# ----------------------------------------------------------------------------- worker

def current_rss():
    """The RSS now (VmRSS), or ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args):
    import torch
    import torch.nn.functional as F

    import contrastive_kernels as ck

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(args.in_dim, args.hidden), torch.nn.GELU(),
                torch.nn.Linear(args.hidden, args.hidden), torch.nn.GELU(),
                torch.nn.Linear(args.hidden, args.dim))

        def forward(self, x):
            return F.normalize(self.net(x), dim=-1)

    towers = [Tower(), Tower()]
    log_scale = torch.nn.Parameter(torch.tensor(2.659))     # log(1 / 0.07)
    params = [p for t in towers for p in t.parameters()] + [log_scale]
    opt = torch.optim.SGD(params, lr=0.01)
    fused = ck.FusedInfoNCE(symmetric=True)

    def fused_loss(q, k):
        return fused(q, k, logit_scale=log_scale.exp())

    def naive_loss(q, k):
        logits = log_scale.exp() * q @ k.T
        target = torch.arange(q.shape[0])
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    gc = ck.GradCache(towers, fused_loss, args.chunk)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        if args.worker == "gradcache":
            loss = gc(x, y)
        else:
            fn = naive_loss if args.worker == "naive" else fused_loss
            loss = fn(towers[0](x), towers[1](y))
            loss.backward()
            loss = loss.detach()
        opt.step()
        return float(loss)

    g = torch.Generator().manual_seed(1)
    n = args.worker_n
    x = torch.randn(n, args.in_dim, generator=g)
    y = x + 0.5 * torch.randn(n, args.in_dim, generator=g)      # paired views
    small = min(n, 256)
    state = [p.detach().clone() for p in params]
    step(x[:small], y[:small])                                  # warm-up
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s)
    opt = torch.optim.SGD(params, lr=0.01)
    base = current_rss()
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step(x, y))
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(dict(times=times, losses=losses, base=base, peak=peak)))


# ----------------------------------------------------------------------------- parent

def run(args, method, n):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--worker-n", str(n),
           "--chunk", str(args.chunk), "--dim", str(args.dim), "--in-dim", str(args.in_dim),
           "--hidden", str(args.hidden), "--threads", str(args.threads),
           "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{method} at N={n} failed (exit status {out.returncode}):\n"
                       f"{out.stderr[-2000:]}")


def size(b):
    return f"{b / GiB:.1f} GiB" if b >= GiB else f"{b / MiB:.0f} MiB"


def main(args):
    import torch
    print(f"two-tower CLIP step on the CPU: torch {torch.__version__}, {args.threads} threads, "
          f"in {args.in_dim} -> hidden {args.hidden} -> dim {args.dim}, chunk {args.chunk}, "
          f"median of {args.steps} steps, budget {args.budget_gib:g} GiB", flush=True)
    rows = []
    for n in args.ns:
        for method in args.method_list:
            need = estimate(method, n, args)
            row = dict(n=n, method=method, estimate_bytes=need)
            if need > args.budget_gib * GiB:
                row["skipped"] = (f"would need {size(need)} > budget "
                                  f"{args.budget_gib:g} GiB")
                print(f"  N={n:6d} {method:11s} skipped: {row['skipped']}", flush=True)
            else:
                t0 = time.perf_counter()
                r = run(args, method, n)
                row.update(r, time_s=statistics.median(r["times"]), loss=r["losses"][0],
                           peak_bytes=r["peak"], above_inputs_bytes=r["peak"] - r["base"])
                print(f"  N={n:6d} {method:11s} {row['time_s']:7.2f} s/step, peak "
                      f"{r['peak'] / MiB:.0f} MiB ({time.perf_counter() - t0:.0f} s)", flush=True)
            rows.append(row)
    print()
    head = (f"{'N':>6}  {'method':11s}  {'loss':>8}  {'s/step':>7}  {'peak RSS':>10}  "
            f"{'above inputs':>12}  {'estimate':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        est = f"{r['estimate_bytes'] / GiB:7.2f} G"
        if "skipped" in r:
            print(f"{r['n']:6d}  {r['method']:11s}  {'-':>8}  {'-':>7}  {'-':>10}  "
                  f"{'-':>12}  {est:>9}  skipped: {r['skipped']}")
            continue
        print(f"{r['n']:6d}  {r['method']:11s}  {r['loss']:8.4f}  {r['time_s']:7.2f}  "
              f"{r['peak_bytes'] / MiB:6.0f} MiB  {r['above_inputs_bytes'] / MiB:8.0f} MiB  "
              f"{est:>9}")
    if args.json:
        meta = dict(torch=torch.__version__, threads=args.threads, cpus=os.cpu_count(),
                    machine=platform.processor() or platform.machine(),
                    load_avg=os.getloadavg(), argv=sys.argv[1:])
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, config={k: v for k, v in vars(args).items()
                                              if not k.startswith("worker")},
                           results=rows), f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    a = parse()
    if a.worker:
        worker(a)
    else:
        main(a)
