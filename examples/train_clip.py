"""Train a tiny two-tower CLIP model on synthetic pairs with ck.GradCache, on the CPU.

    python examples/train_clip.py                       # batch 16384, 50 steps, budget 0.25 GiB
    python examples/train_clip.py --loss siglip         # ck.FusedSigLIPLoss, learnable bias
    python examples/train_clip.py --batch 512 --chunk 128 --steps 3 --naive-steps 2 \
        --memory-budget 0.004                           # a smoke run (seconds)

Data: a latent z ~ N(0, I) seen through two fixed random linear maps plus noise, an
"image" and a "text" vector of the same pair. Two MLP towers, unit-norm embeddings, a
learnable logit scale (and bias for SigLIP), AdamW.

Fused path: every step encodes the whole batch chunk by chunk with ck.GradCache and
computes ck.FusedInfoNCE (or ck.FusedSigLIPLoss) on it, never holding the N x N logits
nor more than one chunk of activations. Naive path: whole-batch encoding and the loss
on the materialized logits (torch cross-entropy / log-sigmoid). The naive path's memory
at the fused batch is estimated; it is run at the largest batch whose estimate fits in
--memory-budget. Each path runs in a fresh process (peak RSS from getrusage); it prints
the loss per step, the time per step and the peak memory of both.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

GiB = 1 << 30
MiB = 1 << 20
LATENT, IMAGE, TEXT = 32, 128, 96


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16384, help="fused batch size")
    ap.add_argument("--chunk", type=int, default=1024, help="GradCache chunk size")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--naive-steps", type=int, default=5, help="steps of the naive path")
    ap.add_argument("--memory-budget", type=float, default=0.25,
                    help="GiB the naive path may use (above the set-up)")
    ap.add_argument("--loss", choices=("infonce", "siglip"), default="infonce")
    ap.add_argument("--dim", type=int, default=64, help="embedding width")
    ap.add_argument("--hidden", type=int, default=256, help="tower hidden width")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-every", type=int, default=5)
    ap.add_argument("--worker", choices=("fused", "naive"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("batch", "chunk", "steps", "dim", "hidden", "threads", "print_every"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.naive_steps < 0 or args.memory_budget <= 0:
        ap.error("--naive-steps must be >= 0 and --memory-budget positive")
    return args


def naive_bytes(n, args):
    """Estimated memory of one naive step at batch n: N x N float32 buffers (InfoNCE:
    logits, two log-softmaxes, their gradients, about 5; SigLIP: logits, labels,
    products, log-sigmoid and gradients, about 6) plus the towers' activations."""
    squares = 5 if args.loss == "infonce" else 6
    acts = n * 4 * 3 * (2 * args.hidden + args.dim) * 2
    return squares * 4 * n * n + acts


def naive_batch(args):
    """Largest batch (a multiple of 64, at most --batch) whose naive estimate fits."""
    budget = args.memory_budget * GiB
    n = min(args.batch, int(math.sqrt(budget / (4 * 5))) + 64) // 64 * 64
    while n >= 64 and naive_bytes(n, args) > budget:
        n -= 64
    return n if n >= 64 else 0


# ----------------------------------------------------------------------------- worker

def worker(args):
    import torch
    import torch.nn.functional as F

    import contrastive_kernels as ck

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    class Tower(torch.nn.Module):
        def __init__(self, d_in):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(d_in, args.hidden), torch.nn.GELU(),
                torch.nn.Linear(args.hidden, args.hidden), torch.nn.GELU(),
                torch.nn.Linear(args.hidden, args.dim))

        def forward(self, x):
            return F.normalize(self.net(x), dim=-1)

    image_tower, text_tower = Tower(IMAGE), Tower(TEXT)
    if args.loss == "infonce":
        scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        bias = None
        fused = ck.FusedInfoNCE(symmetric=True)
        extra = [scale]
    else:
        scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        bias = torch.nn.Parameter(torch.tensor(-10.0))
        fused = ck.FusedSigLIPLoss()
        extra = [scale, bias]
    params = list(image_tower.parameters()) + list(text_tower.parameters()) + extra
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1234)
    to_image = torch.randn(LATENT, IMAGE, generator=g) / math.sqrt(LATENT)
    to_text = torch.randn(LATENT, TEXT, generator=g) / math.sqrt(LATENT)

    def batch(n):
        z = torch.randn(n, LATENT, generator=g)
        return (z @ to_image + 0.5 * torch.randn(n, IMAGE, generator=g),
                z @ to_text + 0.5 * torch.randn(n, TEXT, generator=g))

    def fused_loss(img, txt):
        if bias is None:
            return fused(img, txt, logit_scale=scale.exp())
        return fused(img, txt, scale.exp(), bias)

    def naive_loss(img, txt):
        logits = scale.exp() * img @ txt.T
        if bias is None:
            target = torch.arange(img.shape[0])
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        labels = 2 * torch.eye(img.shape[0]) - 1
        return -F.logsigmoid(labels * (logits + bias)).sum() / img.shape[0]

    gc = ck.GradCache([image_tower, text_tower], fused_loss, args.chunk)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        if args.worker == "fused":
            loss = gc(x, y)
        else:
            loss = naive_loss(image_tower(x), text_tower(y))
            loss.backward()
            loss = loss.detach()
        opt.step()
        return loss.item()

    # load the kernels and start the thread pool at a tiny size, then restore the state
    state = [p.detach().clone() for p in params]
    step(*batch(64))
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    n = args.worker_batch
    steps = args.steps if args.worker == "fused" else args.naive_steps
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    losses, times = [], []
    for i in range(steps):
        x, y = batch(n)
        t0 = time.perf_counter()
        losses.append(step(x, y))
        times.append(time.perf_counter() - t0)
        del x, y
        if i == 0 or (i + 1) % args.print_every == 0 or i == steps - 1:
            print(f"  {args.worker} step {i + 1:3d}  loss {losses[-1]:.4f}  "
                  f"{times[-1]:.2f} s", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(dict(losses=losses, times=times, base=base, peak=peak,
                                      scale=float(scale.detach().exp()))), flush=True)


# ----------------------------------------------------------------------------- parent

def run_worker(args, path, n):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--worker-batch",
           str(n), "--chunk", str(args.chunk), "--steps", str(args.steps),
           "--naive-steps", str(args.naive_steps), "--loss", args.loss, "--dim",
           str(args.dim), "--hidden", str(args.hidden), "--lr", str(args.lr),
           "--threads", str(args.threads), "--seed", str(args.seed),
           "--print-every", str(args.print_every)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0 or result is None:
        raise SystemExit(f"the {path} run failed (exit status {proc.returncode})")
    return result


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def summary(name, n, r):
    t = median(r["times"][1:] or r["times"])    # the first step allocates
    return (f"{name:6s} batch {n:6d}  loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}  "
            f"{t:6.2f} s/step  peak RSS {r['peak'] / MiB:7.0f} MiB "
            f"(+{(r['peak'] - r['base']) / MiB:.0f} MiB over the set-up)")


def main(args):
    loss_name = "FusedInfoNCE" if args.loss == "infonce" else "FusedSigLIPLoss"
    print(f"two-tower CLIP on synthetic pairs, {args.loss}: ck.GradCache + ck.{loss_name}, "
          f"batch {args.batch}, chunk {args.chunk}, {args.steps} steps, "
          f"{args.threads} threads", flush=True)
    fused = run_worker(args, "fused", args.batch)
    need = naive_bytes(args.batch, args)
    n_naive = naive_batch(args)
    print(f"naive at batch {args.batch} would need ~{need / GiB:.2f} GiB "
          f"(budget {args.memory_budget:g} GiB)", flush=True)
    naive = None
    if n_naive and args.naive_steps:
        print(f"naive: largest batch in the budget {n_naive} (est. "
              f"{naive_bytes(n_naive, args) / GiB:.2f} GiB), {args.naive_steps} steps",
              flush=True)
        naive = run_worker(args, "naive", n_naive)
    elif not n_naive:
        print("naive: no batch of 64 or more fits in the budget; not run")
    print()
    print(summary("fused", args.batch, fused))
    if naive is not None:
        print(summary("naive", n_naive, naive))
    first, last = fused["losses"][0], fused["losses"][-1]
    print(f"fused loss {'decreased' if last < first else 'did not decrease'}: "
          f"{first:.4f} -> {last:.4f} over {args.steps} steps "
          f"(logit scale now {fused['scale']:.2f})")


if __name__ == "__main__":
    a = parse()
    if a.worker:
        worker(a)
    else:
        main(a)
