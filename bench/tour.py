"""`make bench` by default: the library in about a minute and a half on 2 cores.

  1. the same loss and gradients as the materialized loss (every CPU backend);
  2. the headline: in a memory budget for the loss step (--budget-gib, 2 GiB), the largest
     batch the naive loss fits, and a batch 4x larger that the fused loss runs, time and
     peak memory side by side (each run a fresh process);
  3. speed at small and medium N (--min-n .. --max-n, 256 .. 4096, D = 256): naive,
     `auto` (what ck.info_nce does by default), the `cpu` kernel and the GEMM floor,
     interleaved in one process, median of several rounds; the crossover; the same for
     the sigmoid loss (open_clip's SigLipLoss against ck.siglip_loss's `auto`);
  4. a few training steps of a tiny two-tower CLIP model (examples/train_clip.py), fused
     (GradCache + FusedInfoNCE) against naive, with memory;
  5. bench/results/tour.json and tour.png (time and memory against N).

The full sweep and the acceptance targets: --full, --targets (bench/README.md).
"""
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import sweep
from harness import SCALE, SIGLIP_BIAS, SIGLIP_SCALE
from harness import inputs as make_inputs
from sweep import GiB, MiB, log

HEADLINE_D = 128
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "train_clip.py")


# ---------------------------------------------------------------- speed, in one process

def _speed_here(spec):
    """Interleaved rounds at each N: every method once per round; medians."""
    import contrastive_kernels as ck
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    d, out = spec["d"], []
    for n in spec["sizes"]:
        q, k = make_inputs(n, d)
        steps = {m: sweep.step_fn(m, n, d) for m in spec["methods"]}
        times = {m: [] for m in steps}
        for m, f in steps.items():          # warm-up: kernels loaded, buffers sized
            q.grad = k.grad = None
            f(q, k)
        t_start = time.perf_counter()
        rounds = 0
        while rounds < spec["max_rounds"] and (
                rounds < spec["min_rounds"] or time.perf_counter() - t_start < spec["per_n_s"]):
            for m, f in steps.items():
                q.grad = k.grad = None
                t0 = time.perf_counter()
                f(q, k)
                times[m].append(time.perf_counter() - t0)
            rounds += 1
        row = dict(n=n, d=d, rounds=rounds,
                   time_s={m: statistics.median(t) for m, t in times.items()})
        if "auto" in steps:
            row["auto_path"] = auto_path(q, k)
        if "siglip-auto" in steps:
            row["siglip_auto_path"] = auto_path(q, k, siglip=True)
        out.append(row)
        del q, k
    return dict(status="ok", rows=out, threads=torch.get_num_threads(),
                ck_version=ck.__version__)


def auto_path(q, k, siglip=False):
    """What `auto` runs for this symmetric CLIP call (siglip: the sigmoid-loss step of
    sweep.step_fn): "dense" or a backend's name."""
    from contrastive_kernels import dense
    from contrastive_kernels.backends import REGISTRY, Call
    from contrastive_kernels.options import make_options
    from contrastive_kernels.problem import check_inputs, check_siglip
    opts = make_options()
    if siglip:
        p = check_siglip(q, k, None, None, None, SIGLIP_SCALE, SIGLIP_BIAS, "mean")
        if dense.siglip_eligible(p, opts, "auto", None):
            return "dense"
    else:
        p = check_inputs(q, k, None, None, None, None, SCALE, None, True, 0.0, "mean")
        if dense.eligible(p, opts, "auto"):
            return "dense"
    call = Call(q.device, q.dtype, q.shape[0], k.shape[0], q.shape[1], False, not siglip,
                loss="siglip" if siglip else "info_nce")
    return REGISTRY.select("auto", call, opts).name


def _speed_worker(conn, spec):
    try:
        res = _speed_here(spec)
    except BaseException as e:
        res = dict(status="failed", note=f"{type(e).__name__}: {e}"[:300])
    conn.send(res)
    conn.close()


def speed_sizes(lo, hi):
    """Powers of two from lo to hi and the 1.5x points between them."""
    sizes, n = [], lo
    while n <= hi:
        sizes.append(n)
        if n * 3 // 2 <= hi and n >= 4:
            sizes.append(n * 3 // 2)
        n *= 2
    return sizes


def speed(opts, backends):
    methods = (["naive", "auto"] + [b for b in backends if b == "cpu"]
               + ["siglip-naive", "siglip-auto", "gemm"])
    spec = dict(sizes=speed_sizes(opts.min_n, opts.max_n), d=opts.d, methods=methods,
                threads=opts.threads, min_rounds=opts.min_rounds,
                max_rounds=max(25, opts.min_rounds),
                per_n_s=opts.per_n_s)
    res = sweep.in_fresh_process(_speed_worker, spec, timeout=600)
    if res.get("status") != "ok":
        log(f"  speed run failed: {res.get('note')}")
        return []
    return res["rows"]


def format_speed(rows, siglip=False):
    """The InfoNCE table, or (siglip) the sigmoid loss's: ms and the ratio to the naive
    loss of the same kind, the GEMM floor, and the path auto took."""
    pre = "siglip-" if siglip else ""
    methods = [m for m in rows[0]["time_s"] if m != "gemm" and m.startswith("siglip-") == siglip]
    name = lambda m: m[len(pre):]
    floor, path = (3, "siglip_auto_path") if siglip else (4, "auto_path")
    head = f"{'N':>6}  " + "".join(f"{name(m) + ' ms':>12}{'/naive':>8}" for m in methods) + \
        f"{f'{floor}·gemm ms':>11}  rounds  auto runs"
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r["time_s"]
        cells = "".join(f"{1e3 * t[m]:>12.2f}{t[m] / t[pre + 'naive']:>8.2f}" for m in methods)
        lines.append(f"{r['n']:>6}  {cells}{floor * 1e3 * t['gemm']:>11.2f}  {r['rounds']:>6}  "
                     f"{r.get(path, '')}")
    return "\n".join(lines)


def crossover(rows, method):
    """The smallest measured N from which `method` is at most naive's time at every larger
    measured N, or None."""
    best = None
    for r in reversed(rows):
        if r["time_s"][method] <= r["time_s"]["naive"]:
            best = r["n"]
        else:
            break
    return best


# ---------------------------------------------------------------- headline

def headline_sizes(budget, d, gemm_flops, max_fused_s):
    """(the naive loss's largest power-of-two batch whose estimate fits `budget`, the fused
    batch: 4x that, halved while its estimated time (~6 GEMMs) exceeds max_fused_s)."""
    n = 64
    while sweep.need_bytes("naive", 2 * n, d) <= budget:
        n *= 2
    big = 4 * n
    while big > n and 6 * 2 * big * big * d / gemm_flops > max_fused_s:
        big //= 2
    return n, big


def headline(opts, gemm_flops, avail_fn):
    budget = opts.budget_gib * GiB
    d = HEADLINE_D
    n_naive, n_big = headline_sizes(min(budget, sweep.MEM_FRACTION * avail_fn()), d,
                                    gemm_flops, opts.headline_s)
    sizes = [n for n in (n_naive // 4, n_naive // 2, n_naive) if n >= 64] + \
        [n for n in (2 * n_naive, n_big) if n_big > n_naive and n <= n_big]
    rows = []
    for n in dict.fromkeys(sizes):
        for method in ("naive", "auto"):
            row = dict(method=method, n=n, d=d)
            if method == "naive" and n > n_naive:
                need = sweep.need_bytes("naive", n, d)
                row.update(status="skipped", need=need,
                           note=f"over budget: ~{need / GiB:.1f} GiB")
            else:
                reps = 3 if n <= n_naive // 2 else 1
                res = sweep.measure(method, n, d, repeats=reps, threads=opts.threads,
                                    timeout=600)
                row.update(res)
            rows.append(row)
            if row["status"] == "ok":
                log(f"  N={n:6d} {'naive' if method == 'naive' else 'fused':5s} "
                    f"{row['time_s']:7.3f} s   +{row['above_inputs'] / MiB:7.1f} MiB")
            else:
                log(f"  N={n:6d} {'naive' if method == 'naive' else 'fused':5s} "
                    f"{row['note']}")
    return dict(budget=budget, d=d, n_naive=n_naive, n_big=n_big, rows=rows)


def format_headline(h):
    get = {(r["method"], r["n"]): r for r in h["rows"]}

    def cell(r):
        if r is None:
            return f"{'':>26}"
        if r["status"] != "ok":
            return f"{r['note']:>26}"
        return f"{r['time_s']:>8.2f} s {_mem(r['above_inputs']):>15}"

    head = f"{'N':>7}  {'naive (materialized)':>26}  {'fused (ck.info_nce)':>26}"
    lines = [head, "-" * len(head)]
    for n in sorted({r["n"] for r in h["rows"]}):
        lines.append(f"{n:>7}  {cell(get.get(('naive', n)))}  {cell(get.get(('auto', n)))}")
    return "\n".join(lines)


def _mem(b):
    return f"+{b / GiB:.2f} GiB" if b >= GiB else f"+{b / MiB:.0f} MiB"


def headline_summary(h):
    get = {(r["method"], r["n"]): r for r in h["rows"] if r["status"] == "ok"}
    nv, fs = get.get(("naive", h["n_naive"])), get.get(("auto", h["n_naive"]))
    big = get.get(("auto", h["n_big"]))
    out = []
    if nv and fs:
        out.append(f"at N={h['n_naive']} (the largest naive batch in {h['budget'] / GiB:g} GiB): "
                   f"fused {nv['time_s'] / fs['time_s']:.1f}x faster, "
                   f"{nv['above_inputs'] / max(fs['above_inputs'], MiB):.0f}x less memory")
    if big and h["n_big"] > h["n_naive"]:
        out.append(f"in the same budget the fused loss runs N={h['n_big']} "
                   f"({h['n_big'] // h['n_naive']}x the batch): {big['time_s']:.1f} s, "
                   f"{_mem(big['above_inputs'])}; naive would need "
                   f"~{sweep.need_bytes('naive', h['n_big'], h['d']) / GiB:.1f} GiB")
    return out


# ---------------------------------------------------------------- training demo

def training(opts):
    args = [sys.executable, EXAMPLE] + opts.train_args.split()
    if opts.threads:
        args += ["--threads", str(opts.threads)]
    log("  $ python examples/train_clip.py " + opts.train_args)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        log("  " + lines[-1])
    return dict(status="ok" if proc.wait() == 0 else "failed", output=lines)


# ---------------------------------------------------------------- plot

def plot(speed_rows, head, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    if speed_rows:
        ns = [r["n"] for r in speed_rows]
        for m, style in (("naive", "o-"), ("auto", "s-"), ("cpu", "^-")):
            if m in speed_rows[0]["time_s"]:
                label = {"auto": "ck.info_nce (auto)", "cpu": "cpu kernel"}.get(m, m)
                ax_t.plot(ns, [1e3 * r["time_s"][m] for r in speed_rows], style, label=label)
        ax_t.plot(ns, [4e3 * r["time_s"]["gemm"] for r in speed_rows], "k--",
                  label="4 x gemm (floor)")
        ax_t.set(xscale="log", yscale="log", xlabel="N (= M)",
                 ylabel="forward + backward (ms)",
                 title=f"time, D={speed_rows[0]['d']}")
        ax_t.set_xticks(ns, [str(n) for n in ns], rotation=45)
    ok = [r for r in head["rows"] if r["status"] == "ok"]
    for m, label in (("naive", "naive (measured)"), ("auto", "fused (measured)")):
        pts = sorted((r["n"], r["above_inputs"] / MiB) for r in ok if r["method"] == m)
        if pts:
            ax_m.plot(*zip(*pts), "o-", label=label)
    ns = sorted({r["n"] for r in head["rows"]})
    ax_m.plot(ns, [sweep.need_bytes("naive", n, head["d"]) / MiB for n in ns], "k:",
              label="naive (estimate: 5 N x N fp32)")
    ax_m.axhline(head["budget"] / MiB, color="r", lw=0.8, label="budget")
    ax_m.set(xscale="log", yscale="log", xlabel="N (= M)", ylabel="peak RSS above inputs (MiB)",
             title=f"memory, D={head['d']}")
    ax_m.set_xticks(ns, [str(n) for n in ns], rotation=45)
    for ax in (ax_t, ax_m):
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"symmetric CLIP loss, forward + backward, fp32, "
                 f"{speed_rows[0].get('threads', torch.get_num_threads()) if speed_rows else ''}"
                 f" threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main

def main(opts, avail_fn, info, backends, demo):
    t0 = time.perf_counter()
    gemm_flops = demo.get("gemm_flops", 20e9)

    log("")
    log(f"[2/4] the headline: a {opts.budget_gib:g} GiB budget for the loss step "
        f"(symmetric CLIP, D={HEADLINE_D}, fp32, forward + backward, each run a fresh process)")
    head = headline(opts, gemm_flops, avail_fn)
    log("")
    log(format_headline(head))
    for line in headline_summary(head):
        log("  => " + line)

    log("")
    log(f"[3/4] speed: N={opts.min_n}..{opts.max_n}, D={opts.d}, fp32, forward + backward, "
        f"median of interleaved rounds")
    rows = speed(opts, backends)
    if rows:
        log(format_speed(rows))
        worst = max(r["time_s"]["auto"] / r["time_s"]["naive"] for r in rows)
        from contrastive_kernels.dense import DENSE_MAX
        log(f"  => ck.info_nce (auto) vs naive: {worst:.2f}x at worst over N={rows[0]['n']}.."
            f"{rows[-1]['n']} (auto computes N*M <= 2^{DENSE_MAX.bit_length() - 1} logits "
            f"as one materialized tile, larger problems with the fused kernel)")
        if "cpu" in rows[0]["time_s"]:
            c = crossover(rows, "cpu")
            log("  => the cpu kernel alone is at most naive's time from N=" + str(c)
                if c else "  => the cpu kernel alone was slower than naive at every N here")
        if "siglip-auto" in rows[0]["time_s"]:
            log("")
            log(f"  the sigmoid loss (SigLIP, s={SIGLIP_SCALE:g}, b={SIGLIP_BIAS:g}): open_clip's "
                f"SigLipLoss (naive) against ck.siglip_loss (auto); its floor is 3 GEMMs")
            log(format_speed(rows, siglip=True))
            t = [r["time_s"] for r in rows]
            worst = max(x["siglip-auto"] / x["siglip-naive"] for x in t)
            log(f"  => ck.siglip_loss (auto) vs naive: {worst:.2f}x at worst over "
                f"N={rows[0]['n']}..{rows[-1]['n']}")

    train = None
    if not opts.no_train:
        log("")
        log("[4/4] training: a tiny two-tower CLIP model on synthetic pairs, fused "
            "(ck.GradCache + ck.FusedInfoNCE) vs naive")
        train = training(opts)

    elapsed = time.perf_counter() - t0
    os.makedirs(opts.out, exist_ok=True)
    json_path = os.path.join(opts.out, "tour.json")
    with open(json_path, "w") as f:
        json.dump(dict(case="tour", machine=info, demo=demo, options=vars(opts),
                       backends=backends, headline=head, speed=rows, training=train,
                       elapsed_s=elapsed), f, indent=1)
    png_path = os.path.join(opts.out, "tour.png")
    plot(rows, head, png_path)
    log("")
    log(f"wrote {json_path} and {png_path} ({elapsed:.0f} s)")
    log("more: python bench/sweep.py --full (N up to 65536, SigLIP, variants), --targets "
        "(acceptance checks), bench/README.md")
    return 0 if (train is None or train["status"] == "ok") else 1
