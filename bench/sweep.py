"""Benchmark and demo: `python bench/sweep.py` (what `make bench` runs; also
`python -m contrastive_kernels.bench` from the source checkout).

Workloads, forward and backward, fp32, M = N: the symmetric CLIP loss and the sigmoid
loss (SigLIP, s = 10, b = -10). Rows for each N:
  naive   what users write today: logits = s * q @ k.T, then
          (CE(logits, arange) + CE(logits.T, arange)) / 2, forward + backward;
  <name>  each backend available on the CPU (ck.available_backends("cpu"), less the
          Triton interpreter);
  siglip-naive   open_clip's SigLipLoss: -sum log sigmoid(labels * (s q k^T + b)) / N;
  siglip-<name>  ck.siglip_loss on each CPU backend (its default: the 3-pass schedule);
  siglip-<name>-4p  the same with passes=4;
  gemm    one N x N x D matmul, torch.mm((N, D) @ (D, N)), measured in the same run.
          A fused loss does 4 such GEMMs (1 forward; backward recomputes the logits
          and does 2 more for the gradients), so 4 * t_gemm is its floor (the sigmoid
          loss's 3-pass schedule does 3).

Every case runs in a fresh process (forked from a server that only imported
torch), so its peak RSS is its own. "above inputs" is the peak RSS minus the RSS
after the inputs were allocated (a tiny warm-up runs first, so code loading and
the thread pool are not counted). Cases that would not fit in memory, or would
take longer than --budget-s, are skipped with the estimate, before they run.

Cases (--case):
  sweep    (default) N = --min-n .. --max-n (powers of two), D = --d (256)
  memory   N = 32768, D = 128: the fused loss stays far below one N x N matrix
  variants the InfoNCE variants on the cpu backend (cpu:margin, cpu:dcl, cpu:temp,
           cpu:teacher (a teacher of D = 256, weight 0.5), each
           symmetric CLIP with the variant), timed side by side with plain cpu and gemm at
           N = 8192, D = 256 (2048 with --quick): their cost relative to plain InfoNCE;
           also run after the default sweep
  targets  (also --targets) the acceptance checks, printed as PASS/FAIL lines:
           N = 8192, D = 256: t_cpu <= 0.85 t_naive and t_cpu <= 1.25 * 4 t_gemm;
           N = 32768, D = 128: cpu peak above inputs <= 1 GiB; the same three for
           siglip-cpu against siglip-naive.
"""
import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time

import torch

from harness import SCALE, SIGLIP_BIAS, SIGLIP_SCALE, naive_loss, naive_siglip, reset_peak, status_bytes
from harness import inputs as _make_inputs

GiB = 1 << 30
MiB = 1 << 20
TILE = 2048                 # tile side assumed for the fused memory estimate
GEMM_BLOCK_BYTES = 512 * MiB  # the gemm row writes its output in row blocks of at most this
MEM_FRACTION = 0.75         # use at most this fraction of MemAvailable
# Time of one forward + backward in units of t_gemm, used before a method was measured.
PRIOR_GEMMS = {"gemm": 1.0, "naive": 10.0, "cpu": 6.0, "torch": 14.0, "siglip-naive": 12.0,
               "siglip-cpu": 5.0, "siglip-cpu-4p": 6.0, "siglip-torch": 14.0,
               "siglip-torch-4p": 16.0}
TARGET_N, TARGET_D = 8192, 256
# The InfoNCE variants (--case variants): the info_nce keyword arguments of each, given N.
VARIANTS = {
    "margin": lambda n: dict(margin=0.2),                      # AM-softmax
    "dcl": lambda n: dict(decoupled=True),                     # decoupled
    "temp": lambda n: dict(temperature=torch.full((n,), 0.07, requires_grad=True)),
    # a teacher of the same width, its targets mixed half and half (softmax weighting)
    "teacher": lambda n: dict(teacher=_inputs(n, TARGET_D, seed=2), teacher_weight=0.5),
}
MEMORY_N, MEMORY_D = 32768, 128
TARGET_VS_NAIVE, TARGET_VS_FLOOR, TARGET_MEM = 0.85, 1.25, 1 * GiB


def log(*args):
    print(*args, flush=True)


# ---------------------------------------------------------------- in the worker

def _inputs(n, d, seed=0):
    return _make_inputs(n, d, seed)


def step_fn(method, n, d):
    """A function (q, k) -> None doing one forward + backward of `method`."""
    if method == "gemm":
        rows = max(1, min(n, GEMM_BLOCK_BYTES // (4 * n)))
        buf = torch.zeros(rows, n)  # allocated (and touched) once, reused

        def step(q, k):
            with torch.no_grad():
                for i in range(0, n, rows):
                    r = min(rows, n - i)
                    torch.mm(q[i:i + r], k.T, out=buf[:r])
        return step
    if method == "naive":
        def step(q, k):
            naive_loss(q, k).backward()
        return step
    if method == "siglip-naive":
        def step(q, k):
            naive_siglip(q, k).backward()
        return step

    import contrastive_kernels as ck
    if method.startswith("siglip-"):
        backend = method[len("siglip-"):]
        passes = 4 if backend.endswith("-4p") else None
        backend = backend[:-3] if passes else backend

        def step(q, k):
            ck.siglip_loss(q, k, logit_scale=SIGLIP_SCALE, logit_bias=SIGLIP_BIAS,
                           backend=backend, passes=passes).backward()
        return step

    if ":" in method:           # a variant on a backend
        backend, variant = method.split(":")
        kw = VARIANTS[variant](n)
        if "temperature" not in kw:
            kw["logit_scale"] = SCALE

        def step(q, k):
            ck.info_nce(q, k, symmetric=True, backend=backend, **kw).backward()
        return step

    def step(q, k):
        ck.info_nce(q, k, logit_scale=SCALE, symmetric=True, backend=method).backward()
    return step


def _measure_here(spec):
    """Runs one case in this (fresh) process; returns a result dict."""
    method, n, d, repeats = spec["method"], spec["n"], spec["d"], spec["repeats"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # Warm-up at a tiny size: loads kernels and starts the thread pool.
    small = min(n, 256)
    step_fn(method, small, d)(*_inputs(small, d, seed=1))
    if method == "auto":    # at a tiny size auto computes densely: load the kernel too
        for b in cpu_backends():
            step_fn(b, small, d)(*_inputs(small, d, seed=1))
    q, k = _inputs(n, d)
    rss_inputs, _ = status_bytes()
    exact = reset_peak()
    step = step_fn(method, n, d)
    times = []
    for _ in range(repeats):
        q.grad = k.grad = None
        t0 = time.perf_counter()
        step(q, k)
        times.append(time.perf_counter() - t0)
    _, peak = status_bytes()
    note = "" if exact else "peak RSS could not be reset: it includes set-up"
    return dict(status="ok", time_s=statistics.median(times), times_s=times,
                peak_rss=peak, rss_inputs=rss_inputs, above_inputs=peak - rss_inputs,
                threads=torch.get_num_threads(), note=note)


def _worker(conn, spec):
    try:
        res = _measure_here(spec)
    except BaseException as e:  # report it; the parent decides
        res = dict(status="failed", note=f"{type(e).__name__}: {e}"[:300])
    conn.send(res)
    conn.close()


def _demo_here(spec):
    """Loss (and gradients) of each backend against the naive loss on a small case,
    and the GEMM rate used for the first time estimates."""
    import contrastive_kernels as ck
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    n, d = spec["n"], spec["d"]
    q, k = _inputs(n, d)
    naive = naive_loss(q, k)
    naive.backward()
    ref = (naive.item(), q.grad.clone(), k.grad.clone())
    out = {"n": n, "d": d, "naive": ref[0], "backends": {}}
    for name in spec["backends"]:
        q.grad = k.grad = None
        try:
            loss = ck.info_nce(q, k, logit_scale=SCALE, symmetric=True, backend=name)
            loss.backward()
            gdiff = max(float((q.grad - ref[1]).abs().max()), float((k.grad - ref[2]).abs().max()))
            out["backends"][name] = dict(loss=loss.item(), loss_diff=abs(loss.item() - ref[0]),
                                         grad_diff=gdiff)
        except Exception as e:
            out["backends"][name] = dict(error=f"{type(e).__name__}: {e}"[:300])
    # GEMM rate (flop/s), best of 3, at N = 2048.
    a, b = torch.randn(2048, d), torch.randn(2048, d)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        torch.mm(a, b.T)
        best = min(best, time.perf_counter() - t0)
    out["gemm_flops"] = 2 * 2048 * 2048 * d / best
    out["threads"] = torch.get_num_threads()
    return out


def _demo_worker(conn, spec):
    try:
        res = _demo_here(spec)
    except BaseException as e:
        res = {"error": f"{type(e).__name__}: {e}"[:300]}
    conn.send(res)
    conn.close()


# ---------------------------------------------------------------- in the parent

_ctx = None


def _context():
    # A fork server that imported torch once: each case is a fresh forked process
    # without paying for `import torch` again.
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(["torch", "contrastive_kernels", "harness"])
    return _ctx


def in_fresh_process(target, spec, timeout):
    """Runs target(conn, spec) in a fresh process; its result, or a 'failed' dict."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(send, spec))
    p.start()
    send.close()
    try:
        if recv.poll(timeout):
            res = recv.recv()
        else:
            res = dict(status="failed", note=f"timed out after {timeout:.0f} s (killed)")
    except EOFError:
        p.join(5)
        res = dict(status="failed",
                   note=f"worker died (exit code {p.exitcode}; killed for memory?)")
    if p.is_alive():
        p.kill()
    p.join()
    recv.close()
    return res


def measure(method, n, d, repeats=3, threads=None, timeout=600):
    """Times `method` ("naive", "gemm" or a backend name) and its peak RSS in a fresh process.

    Returns a dict with status ("ok" or "failed"), time_s (median), times_s, peak_rss,
    rss_inputs and above_inputs (bytes), note.
    """
    spec = dict(method=method, n=n, d=d, repeats=repeats, threads=threads)
    return in_fresh_process(_worker, spec, timeout)


def mem_available():
    """Bytes this process may still use: MemAvailable, or the cgroup limit if lower."""
    avail = math.inf
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def need_bytes(method, n, d):
    """Conservative estimate of the memory one forward + backward needs beyond the inputs."""
    vectors = 4 * n * d * 4  # gradients and a few (N, D) temporaries
    if method in ("naive", "siglip-naive"):
        # logits, two log-softmax outputs, their gradients (~3-4 N^2 buffers): count 5
        # (SigLIP: logits, labels, their product, logsigmoid and its gradient)
        return 5 * n * n * 4 + vectors
    if method == "gemm":
        rows = max(1, min(n, GEMM_BLOCK_BYTES // (4 * n)))
        return rows * n * 4
    t = min(n, TILE)
    return 6 * t * t * 4 + vectors


def memory_skip(method, n, d, avail):
    """A 'skipped: would need X GiB' note, or None if the case fits in MEM_FRACTION of avail."""
    need, usable = need_bytes(method, n, d), MEM_FRACTION * avail
    if need <= usable:
        return None
    return (f"skipped: would need {need / GiB:.1f} GiB, {usable / GiB:.1f} GiB usable "
            f"({MEM_FRACTION:.0%} of {avail / GiB:.1f} GiB available)")


def estimate_time(method, n, d, results, gemm_flops):
    """Seconds for one forward + backward of `method`: t_gemm at (n, d) (measured, else
    scaled as N^2 from a smaller N, else from the GEMM rate), times the method's t / t_gemm
    at the nearest smaller N (or a prior)."""
    t_gemm = _find(results, "gemm", n, d, "time_s")
    if t_gemm is None:
        t_gemm = 2 * n * n * d / gemm_flops
        smaller = [r for r in results if r["method"] == "gemm" and r["d"] == d and r["n"] < n
                   and r.get("time_s")]
        if smaller:
            r = max(smaller, key=lambda r: r["n"])
            t_gemm = r["time_s"] * (n / r["n"]) ** 2
    if method == "gemm":
        return t_gemm
    ratio = PRIOR_GEMMS.get(method.split(":")[0], 14.0)    # a variant: its backend's
    done = [r for r in results if r["method"] == method and r["d"] == d and r["n"] < n
            and r["status"] == "ok" and r.get("ratio_gemm")]
    if done:
        ratio = max(done, key=lambda r: r["n"])["ratio_gemm"]
    return ratio * t_gemm


def _find(results, method, n, d, field):
    for r in results:
        if (r["method"], r["n"], r["d"]) == (method, n, d) and r["status"] == "ok":
            return r.get(field)
    return None


def plan_case(method, n, d, opts, results, gemm_flops, avail_fn):
    """A new row for one case: skipped (with the reason) if it would not fit in memory or
    would take longer than the budget, else with the number of rounds to run."""
    row = dict(method=method, n=n, d=d, status="skipped", note="", times_s=[])
    skip = memory_skip(method, n, d, avail_fn())
    est = estimate_time(method, n, d, results, gemm_flops)
    row["est_s"] = est
    if skip is None and est > opts.budget_s:
        skip = f"skipped: est. {est:.0f} s > budget {opts.budget_s:g} s"
    if skip:
        row["note"] = skip
        log(f"  N={n:6d} D={d} {method:6s} {skip}")
    else:
        row["status"] = "ok"
        row["rounds"] = max(1, min(opts.repeats, int(opts.budget_s // max(est, 1e-9))))
    return row


def run_once(row, opts):
    """One timed run of the row's case in a fresh process; folds it into the row."""
    method, n, d, est = row["method"], row["n"], row["d"], row["est_s"]
    k = len(row["times_s"]) + 1
    log(f"  N={n:6d} D={d} {method:6s} [{k}/{row['rounds']}] running (est. {est:.2f} s) ...")
    res = measure(method, n, d, repeats=1, threads=opts.threads, timeout=max(120.0, 4 * est + 60))
    if res["status"] != "ok":
        row.update(status="failed", note=res["note"])
        log(f"  N={n:6d} D={d} {method:6s} FAILED: {res['note']}")
        return
    row["times_s"].append(res["time_s"])
    row["time_s"] = statistics.median(row["times_s"])
    if res["above_inputs"] >= row.get("above_inputs", -1):  # keep the run with the top peak
        row.update({key: res[key] for key in ("peak_rss", "rss_inputs", "above_inputs")})
    row.update(threads=res["threads"], note=res["note"])
    lo, hi = min(row["times_s"]), max(row["times_s"])
    if hi > 1.25 * lo:  # flag a busy machine
        row["note"] = (res["note"] + "; " if res["note"] else "") + f"noisy: runs {lo:.3g}-{hi:.3g} s"
    log(f"  N={n:6d} D={d} {method:6s} [{k}/{row['rounds']}] {res['time_s']:.3f} s, "
        f"peak RSS {res['peak_rss'] / MiB:.0f} MiB, above inputs {res['above_inputs'] / MiB:.0f} MiB")


def run_sizes(sizes, methods, opts, gemm_flops, avail_fn, gemm=True):
    """Measures every method at each (n, d), side by side: in each round every method runs
    once, in its own fresh process, so that a change in the machine's load hits all of
    them; the time is the median over rounds. gemm goes first (the other estimates use it).
    Returns rows in table order: naive, backends, gemm."""
    results = []
    order = (["gemm"] if gemm and "gemm" in methods else []) + [m for m in methods if m != "gemm"]
    for n, d in sizes:
        log(f"N={n} D={d}")
        rows = []
        for r in range(opts.repeats):
            for m in order:
                if r == 0:  # planned once gemm's first round is known
                    rows.append(plan_case(m, n, d, opts, results, gemm_flops, avail_fn))
                    results.append(rows[-1])
                row = next(x for x in rows if x["method"] == m)
                if row["status"] == "ok" and r < row["rounds"]:
                    run_once(row, opts)
        t_gemm = _find(results, "gemm", n, d, "time_s")
        for row in rows:
            t_naive = _find(results, naive_of(row["method"]), n, d, "time_s")
            if row["status"] == "ok" and t_gemm:
                row["ratio_gemm"] = row["time_s"] / t_gemm
                row["ratio_floor"] = row["time_s"] / (4 * t_gemm)
            if row["status"] == "ok" and t_naive:
                row["ratio_naive"] = row["time_s"] / t_naive
    rank = {m: i for i, m in enumerate(methods)}
    return sorted(results, key=lambda r: (r["d"], r["n"], rank.get(r["method"], 99)))


def naive_of(method):
    """The materializing loss a method is compared with."""
    return "siglip-naive" if method.startswith("siglip-") else "naive"


def format_table(rows):
    head = (f"{'N':>6} {'D':>4}  {'method':<16}{'time (s)':>10}{'t/4gemm':>9}{'t/naive':>9}"
            f"{'peak RSS MiB':>14}{'above inputs MiB':>18}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        pre = f"{r['n']:>6} {r['d']:>4}  {r['method']:<16}"
        if r["status"] != "ok":
            lines.append(pre + " " + r["note"])
            continue
        ratios = "".join(f"{x:>9.2f}" if x is not None else f"{'-':>9}"
                         for x in (r.get("ratio_floor"), r.get("ratio_naive")))
        lines.append(pre + f"{r['time_s']:>10.4f}{ratios}{r['peak_rss'] / MiB:>14.0f}"
                     f"{r['above_inputs'] / MiB:>18.1f}  {r.get('note', '')}")
    return "\n".join(lines)


# GEMM passes of one symmetric forward + backward (N x N x D each): the teacher (width
# D_t = D here) adds 4 at D_t (its log-sum-exps, the rows' and the columns' weighted
# dots, backward) and 4 at D (the two products, backward's dq and dk); docs/DESIGN.md 9.
VARIANT_PASSES = {"cpu": 4, "cpu:margin": 4, "cpu:dcl": 4, "cpu:temp": 4, "cpu:teacher": 12}


def format_variants(rows):
    """The variants' table: time, against plain cpu, against its GEMM passes x t_gemm
    (t/floor), memory."""
    plain = next((r for r in rows if r["method"] == "cpu" and r["status"] == "ok"), None)
    gemm = next((r for r in rows if r["method"] == "gemm" and r["status"] == "ok"), None)
    head = (f"{'method':<14}{'time (s)':>10}{'t/plain':>9}{'passes':>8}{'t/floor':>9}"
            f"{'above inputs MiB':>18}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["method"] == "gemm":
            continue
        if r["status"] != "ok":
            lines.append(f"{r['method']:<14} {r['note']}")
            continue
        rel = f"{r['time_s'] / plain['time_s']:>9.2f}" if plain else f"{'-':>9}"
        passes = VARIANT_PASSES.get(r["method"], 4)
        floor = (f"{r['time_s'] / (passes * gemm['time_s']):>9.2f}" if gemm
                 else f"{'-':>9}")
        lines.append(f"{r['method']:<14}{r['time_s']:>10.4f}{rel}{passes:>8}{floor}"
                     f"{r['above_inputs'] / MiB:>18.1f}  {r.get('note', '')}")
    return "\n".join(lines)


def check_targets(rows, cpu_reason=None):
    """PASS/FAIL lines for the acceptance targets present in `rows`."""
    lines = []

    def get(method, n, d):
        for r in rows:
            if (r["method"], r["n"], r["d"]) == (method, n, d):
                return r
        return None

    for fused in ("cpu", "siglip-cpu"):
        lines += _time_targets(get, fused, cpu_reason)
    at_mem = [r for r in rows if (r["n"], r["d"]) == (MEMORY_N, MEMORY_D)]
    if at_mem:
        # "cpu" and "siglip-cpu" are the targets; other methods measured there get a line too
        names = ["cpu"] + (["siglip-cpu"] if any(r["method"].startswith("siglip-") for r in at_mem)
                           else [])
        names += [r["method"] for r in at_mem
                  if r["method"] not in names + ["naive", "gemm", "siglip-naive"]]
        for name in names:
            r = get(name, MEMORY_N, MEMORY_D)
            what = f"{name} peak RSS above inputs at N={MEMORY_N}, D={MEMORY_D} (fwd+bwd)"
            if not r or r["status"] != "ok":
                why = r["note"] if r else f"backend 'cpu' unavailable ({cpu_reason})"
                lines.append(f"FAIL  {what} <= {TARGET_MEM / GiB:g} GiB: {why}")
                continue
            a = r["above_inputs"]
            lines.append(f"{'PASS' if a <= TARGET_MEM else 'FAIL'}  {what} <= "
                         f"{TARGET_MEM / GiB:g} GiB: {a / MiB:.0f} MiB "
                         f"(one N x N fp32 matrix: {4 * MEMORY_N ** 2 / GiB:.0f} GiB)")
    return lines


def _time_targets(get, fused, cpu_reason):
    """The two time targets of one fused method (cpu, siglip-cpu) at TARGET_N, TARGET_D."""
    lines = []
    cpu, naive, gemm = (get(m, TARGET_N, TARGET_D) for m in (fused, naive_of(fused), "gemm"))
    if (naive and naive["method"] == naive_of(fused)) or cpu or (gemm and fused == "cpu"):
        what = f"{fused} time at N={TARGET_N}, D={TARGET_D}"
        if not cpu or cpu["status"] != "ok":
            why = cpu["note"] if cpu else f"backend 'cpu' unavailable ({cpu_reason})"
            lines += [f"FAIL  {what} <= {TARGET_VS_NAIVE} x naive: {why}",
                      f"FAIL  {what} <= {TARGET_VS_FLOOR} x 4 t_gemm: {why}"]
        else:
            t = cpu["time_s"]
            if naive and naive["status"] == "ok":
                ok = t <= TARGET_VS_NAIVE * naive["time_s"]
                lines.append(f"{'PASS' if ok else 'FAIL'}  {what} <= {TARGET_VS_NAIVE} x naive: "
                             f"{t:.3f} s vs {TARGET_VS_NAIVE} x {naive['time_s']:.3f} s "
                             f"(ratio {t / naive['time_s']:.2f})")
            else:
                lines.append(f"FAIL  {what} <= {TARGET_VS_NAIVE} x naive: naive not measured")
            if gemm and gemm["status"] == "ok":
                floor = 4 * gemm["time_s"]
                ok = t <= TARGET_VS_FLOOR * floor
                lines.append(f"{'PASS' if ok else 'FAIL'}  {what} <= {TARGET_VS_FLOOR} x 4 t_gemm: "
                             f"{t:.3f} s vs {TARGET_VS_FLOOR} x {floor:.3f} s (ratio {t / floor:.2f})")
            else:
                lines.append(f"FAIL  {what} <= {TARGET_VS_FLOOR} x 4 t_gemm: gemm not measured")
    return lines


def plot(rows, path):
    """Time and peak memory above inputs against N (log-log), one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        ok = sorted((r for r in rows if r["method"] == m and r["status"] == "ok"),
                    key=lambda r: r["n"])
        if not ok:
            continue
        ns = [r["n"] for r in ok]
        if m == "gemm":
            ax_t.plot(ns, [4 * r["time_s"] for r in ok], "k--", label="4 x gemm (floor)")
            continue
        ax_t.plot(ns, [r["time_s"] for r in ok], "o-", label=m)
        ax_m.plot(ns, [max(r["above_inputs"], MiB) / MiB for r in ok], "o-", label=m)
    all_n = sorted({r["n"] for r in rows})
    ax_m.plot(all_n, [4 * n * n / MiB for n in all_n], "k:", label="one N x N fp32 matrix")
    ax_t.set(xscale="log", yscale="log", xlabel="N (= M)", ylabel="forward + backward (s)",
             title="time")
    ax_m.set(xscale="log", yscale="log", xlabel="N (= M)", ylabel="peak RSS above inputs (MiB)",
             title="memory")
    for ax in (ax_t, ax_m):
        ax.set_xticks(all_n, [str(n) for n in all_n], rotation=45)
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    d = sorted({r["d"] for r in rows})
    fig.suptitle(f"symmetric CLIP loss, fp32, D={','.join(map(str, d))}, "
                 f"{rows[0].get('threads', torch.get_num_threads())} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info(threads):
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import contrastive_kernels as ck
    return dict(torch=torch.__version__, contrastive_kernels=ck.__version__,
                python=platform.python_version(), platform=platform.platform(),
                cpu_model=cpu, cpu_count=os.cpu_count(),
                threads=threads or torch.get_num_threads(),
                mem_available_gib=mem_available() / GiB, loadavg=list(os.getloadavg()))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m contrastive_kernels.bench",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["tour", "sweep", "memory", "targets", "variants"],
                   default="tour", help="tour (default): the first two minutes (bench/tour.py)")
    p.add_argument("--full", action="store_true", help="same as --case sweep: the full sweep")
    p.add_argument("--targets", action="store_true", help="same as --case targets")
    p.add_argument("--quick", action="store_true",
                   help="the sweep at N in {1024, 2048, 4096}, 3 repeats")
    p.add_argument("--min-n", type=int, default=None, help="smallest N (tour 256, sweep 1024)")
    p.add_argument("--max-n", type=int, default=None, help="largest N (tour 4096, sweep 65536)")
    p.add_argument("--budget-gib", type=float, default=2.0,
                   help="tour: the memory budget of the headline (GiB)")
    p.add_argument("--headline-s", type=float, default=30.0,
                   help="tour: the fused headline batch is halved while its estimated time "
                        "exceeds this")
    p.add_argument("--per-n-s", type=float, default=2.0,
                   help="tour: seconds of interleaved rounds per N in the speed table")
    p.add_argument("--min-rounds", type=int, default=5, help="tour: rounds per N, at least")
    p.add_argument("--no-train", action="store_true", help="tour: skip the training demo")
    p.add_argument("--train-args", default="--batch 8192 --chunk 2048 --steps 12 "
                   "--print-every 4 --naive-steps 3 --memory-budget 0.1",
                   help="tour: the arguments of examples/train_clip.py")
    p.add_argument("--d", type=int, default=256, help="embedding size for the sweep")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="skip a case whose one run is estimated to take longer; fewer repeats "
                        "are run when all of them would")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of naive,gemm,<backends>, siglip-*, and the "
                        "variants cpu:margin,cpu:dcl,cpu:temp,cpu:teacher (default: all)")
    p.add_argument("--out", default=os.path.join("bench", "results"))
    p.add_argument("--mem-available-gib", type=float, default=None,
                   help="pretend this much memory is available (for tests)")
    p.add_argument("--no-demo", action="store_true")
    opts = p.parse_args(argv)
    if opts.targets:
        opts.case = "targets"
    if opts.full or opts.quick:
        opts.case = "sweep" if opts.case == "tour" else opts.case
    tour = opts.case == "tour"
    opts.min_n = opts.min_n or (256 if tour else 1024)
    opts.max_n = opts.max_n or (4096 if tour else 65536)
    if opts.quick:
        opts.max_n = min(opts.max_n, 4096)
        opts.repeats = min(opts.repeats, 3)
    return opts


def cpu_backends():
    """The backends benchmarked on CPU: ck.available_backends("cpu") less "triton", which runs
    on CPU tensors only under the Triton interpreter (a test aid, far too slow to time)."""
    import contrastive_kernels as ck
    return [b for b in ck.available_backends("cpu") if b != "triton"]


def main(argv=None, avail_fn=None):
    """Runs the benchmark; returns 0, or 1 if a --targets check failed."""
    import contrastive_kernels as ck

    opts = parse_args(argv)
    if avail_fn is None:
        avail_fn = mem_available if opts.mem_available_gib is None else (
            lambda: opts.mem_available_gib * GiB)
    backends = cpu_backends()
    cpu_reason = ck.backends.get("cpu").unavailable_reason(torch.device("cpu"))
    methods = (["naive"] + backends + ["siglip-naive"] + [f"siglip-{b}" for b in backends]
               + [f"siglip-{b}-4p" for b in backends if b == "cpu"] + ["gemm"])
    if opts.methods:
        want = opts.methods.split(",")
        methods = [m for m in methods if m in want]
    info = machine_info(opts.threads)
    log(f"contrastive_kernels bench ({opts.case}): torch {info['torch']}, {info['threads']} threads, "
        f"{info['cpu_model']} ({info['cpu_count']} cores), "
        f"{info['mem_available_gib']:.1f} GiB available, load {info['loadavg'][0]:.1f}")
    log(f"CPU backends: {', '.join(backends)}"
        + ("" if cpu_reason is None else f"  (cpu unavailable: {cpu_reason})"))

    tour = opts.case == "tour"
    demo_spec = dict(n=1024, d=opts.d if opts.case in ("sweep", "tour") else TARGET_D,
                     backends=(["auto"] if tour else []) + backends, threads=opts.threads)
    demo = in_fresh_process(_demo_worker, demo_spec, timeout=300)
    if "gemm_flops" not in demo:
        log(f"demo failed: {demo.get('error') or demo.get('note')}")
        gemm_flops = 20e9
    else:
        gemm_flops = demo["gemm_flops"]
        if tour:
            log("")
            log(f"[1/4] the same loss: symmetric CLIP, N={demo['n']}, D={demo['d']}, fp32, "
                f"against the materialized loss (naive {demo['naive']:.6f})")
            for name, r in demo["backends"].items():
                label = "ck.info_nce (auto)" if name == "auto" else f"backend={name!r}"
                log(f"  {label:22s} ERROR {r['error']}" if "error" in r else
                    f"  {label:22s} {r['loss']:.6f}   |loss diff| {r['loss_diff']:.1e}   "
                    f"max |grad diff| {r['grad_diff']:.1e}")
        elif not opts.no_demo:
            parts = [f"naive {demo['naive']:.6f}"]
            for name, r in demo["backends"].items():
                parts.append(f"{name} ERROR {r['error']}" if "error" in r else
                             f"{name} {r['loss']:.6f} (|diff| {r['loss_diff']:.1e}, "
                             f"grads max |diff| {r['grad_diff']:.1e})")
            log(f"demo: symmetric CLIP loss, N={demo['n']}, D={demo['d']}, fp32: " + " | ".join(parts))
    if tour:
        import tour as tour_mod
        return tour_mod.main(opts, avail_fn, info, backends, demo)

    if opts.case == "sweep":
        sizes, n = [], opts.min_n
        while n <= opts.max_n:
            sizes.append((n, opts.d))
            n *= 2
    elif opts.case == "memory":
        sizes = [(MEMORY_N, MEMORY_D)]
    else:
        sizes = [(TARGET_N, TARGET_D), (MEMORY_N, MEMORY_D)]
        methods = [m for m in methods
                   if m in ("naive", "cpu", "siglip-naive", "siglip-cpu", "siglip-cpu-4p", "gemm")]
    # the variants at the target size (in a sweep: at most its largest N, at its D)
    vsize = (2048 if opts.quick else TARGET_N, TARGET_D)
    if opts.case == "sweep":
        vsize = (min(vsize[0], opts.max_n), opts.d)
    vmethods = ["cpu"] + [f"cpu:{v}" for v in VARIANTS] + ["gemm"]
    if opts.methods:
        vmethods = [m for m in vmethods if m in opts.methods.split(",")]
    if "cpu" not in backends or not any(":" in m for m in vmethods):
        vmethods = []
    t0 = time.perf_counter()
    if opts.case == "variants":
        rows = []
    elif opts.case == "targets":
        # the memory target needs no gemm row
        rows = run_sizes(sizes[:1], methods, opts, gemm_flops, avail_fn)
        rows += run_sizes(sizes[1:], methods, opts, gemm_flops, avail_fn, gemm=False)
    else:
        rows = run_sizes(sizes, methods, opts, gemm_flops, avail_fn)

    log("")
    log("symmetric CLIP loss and sigmoid loss (siglip-*), forward + backward, fp32, M = N; "
        "time = median; t/4gemm = t / (4 t_gemm), the fused loss's floor; t/naive against "
        "the same loss materialized")
    log(format_table(rows))
    variant_rows = []
    if opts.case in ("sweep", "variants") and vmethods:
        log("")
        log(f"InfoNCE variants on the cpu backend (symmetric CLIP, fwd + bwd, fp32), side by "
            f"side with plain cpu at N={vsize[0]}, D={vsize[1]}")
        variant_rows = run_sizes([vsize], vmethods, opts, gemm_flops, avail_fn)
        log(format_variants(variant_rows))
    elif opts.case == "variants":
        log(f"no variants: backend 'cpu' unavailable ({cpu_reason})")
    targets = check_targets(rows, cpu_reason) if opts.case == "targets" else []
    elapsed = time.perf_counter() - t0
    if targets:
        log("")
        log("acceptance targets:")
        for line in targets:
            log("  " + line)
    log(f"\n({elapsed:.0f} s)")

    os.makedirs(opts.out, exist_ok=True)
    json_path = os.path.join(opts.out, f"{opts.case}.json")
    with open(json_path, "w") as f:
        json.dump(dict(case=opts.case, machine=info, demo=demo, options=vars(opts),
                       backends=backends, cpu_unavailable=cpu_reason, results=rows,
                       variants=variant_rows,
                       targets=targets, elapsed_s=elapsed), f, indent=1)
    log(f"wrote {json_path}")
    if opts.case == "sweep" and len({r["n"] for r in rows}) > 1:
        png_path = os.path.join(opts.out, f"{opts.case}.png")
        plot(rows, png_path)
        log(f"wrote {png_path}")
    if opts.case == "targets" and any(t.startswith("FAIL") for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    # Import under the package name, so the fresh processes find the worker functions there.
    from contrastive_kernels.bench import main as _main
    sys.exit(_main())
