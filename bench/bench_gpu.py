"""GPU benchmark: symmetric CLIP loss (or --loss siglip), forward + backward, bf16, D = 768.

    python bench/bench_gpu.py [--quick] [--sizes 8192,16384] [--dim 768] [--json out.json]
                              [--methods naive,triton,...] [--loss clip|siglip]

--loss siglip: the sigmoid loss (s = 10, b = -10): rows naive (open_clip's SigLipLoss
math), every backend that declares "siglip" ("triton": the 3-pass schedule, by default
the blocked algorithm at D = 768; "triton-1g": with a 1 GiB workspace; "triton-epi":
algorithm="epilogue", S computed in the blocked kernels ("triton-epi64": with 128 x 64
tiles); "triton-fused":
the fused kernels; "triton-4p": passes=4; "cuda": measured although it is declared to
lag, Backend.lags), and siglip-kernel's fused_siglip_loss when the
`siglip_kernel` package imports; TFLOP/s counted as 6 N^2 D (its 3 GEMM passes), and the targets at the largest N
are >= 60% of the matmul rate and >= 1.3x siglip-kernel.

Rows: naive (cuBLAS logits + F.cross_entropy in both directions), every backend of
contrastive_kernels available on CUDA (Triton four times: "triton" as `auto` runs it, the
blocked algorithm at D = 768 (cuBLAS GEMMs on row blocks, Triton for the statistics and
dS); "triton-1g" the same with workspace=1 GiB; "triton-epi" with algorithm="epilogue" (the
same row blocks, each tile of S computed in the Triton kernel that uses it, never
stored; "triton-epi64" the same with 128 x 64 tiles); "triton-fused" with algorithm="fused"
(the fused kernels, atomic dk); "triton-low" with low_memory=True), and Inf-CL when the
`inf_cl` package imports.
Columns: median time of a step (triton.testing.do_bench), peak memory (the inputs plus
the most torch.cuda.max_memory_allocated rose during one step above what was allocated
before it, so that what other rows left, such as cuBLAS workspaces, is not counted),
TFLOP/s counted as 8 N^2 D (forward GEMM + the backward's two GEMMs and one recompute:
4 GEMM passes of 2 N^2 D), and that rate over the bf16 N x N x D matmul
rate measured in the same run, and the peak over the ideal: inputs + gradients (4 N D
bf16 values; the O(N) statistics are negligible), then the forward alone (no_grad): its
median time and its rate (2 N^2 D) over the matmul rate, which shows how a step's time
splits between forward and backward. A row that would not fit in memory is
skipped. At the end, `targets` checks the acceptance targets at the largest N (>= 60% of
the matmul rate, >= 1.5x faster than naive and Inf-CL, peak within 5% of the ideal) and
names the faster GPU backend.
First, at the smallest N, every method's loss, dq and dk are compared with the float32
naive loss on the same bf16 inputs (a method off by more than CHECK_TOL is marked WRONG,
and the exit status is 1); at every N each loss is compared with naive's. Rows run
method by method, the torch fallback (up to N = TORCH_MAX_N) and then the CUDA C++
backend last, and the JSON is rewritten after every row, so a crash or a timeout keeps
what was measured.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

from harness import (SCALE, SIGLIP_BIAS, SIGLIP_SCALE, inputs, median_time, naive_loss,
                     naive_siglip)

# "cuda"; "cpu" (--device cpu) only smoke-tests this script (tests/test_bench.py).
DEVICE = "cuda"
LOSS = "clip"          # or "siglip" (--loss)


def _bench(fn, quick):
    """Median milliseconds of fn."""
    if DEVICE != "cuda":
        return 1e3 * median_time(fn, repeats=3)
    from triton.testing import do_bench
    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def _peak(fn):
    """The most memory allocated during fn() above what was allocated before it (buffers
    other rows left behind, such as cuBLAS workspaces, are not counted)."""
    if DEVICE != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _loss_or_grads(loss_fn, q, k, backward):
    """The gradients of loss_fn(q, k) w.r.t. q and k, or (backward=False) the loss alone,
    computed under no_grad (the forward's time)."""
    if not backward:
        with torch.no_grad():
            return loss_fn(q, k)
    return torch.autograd.grad(loss_fn(q, k), (q, k))


def naive_step(q, k, backward=True):
    return _loss_or_grads(naive_siglip if LOSS == "siglip" else naive_loss, q, k, backward)


def ck_step(backend, tile=None, **options):
    """One step of `backend` with kernel options (e.g. low_memory=True); `tile`: see
    gemm_tile."""
    import contrastive_kernels as ck

    def loss(q, k):
        if LOSS == "siglip":
            return ck.siglip_loss(q, k, logit_scale=SIGLIP_SCALE, logit_bias=SIGLIP_BIAS,
                                  backend=backend, **options)
        return ck.info_nce(q, k, temperature=0.07, symmetric=True, backend=backend, **options)

    def step(q, k, backward=True):
        # a backend declared to lag (Backend.lags: cuda's sigmoid loss) is measured all
        # the same (forward and backward inside: a 4-pass backward selects again)
        with ck.backends.base.measuring(ck.backends.get(backend)), gemm_tile(tile):
            return _loss_or_grads(loss, q, k, backward)
    return step


# The other tile for "epilogue" (the default is 128 x 128 with 8 warps, one program per
# SM): 128 x 64 with one warpgroup, two programs per SM (lse.PARAMS comment).
EPI_TILE_64 = dict(BLOCK_R=128, BLOCK_C=64, BLOCK_K=64, GROUP_R=16, num_warps=4, num_stages=4)


@contextlib.contextmanager
def gemm_tile(tile):
    """The half types' tile of algorithm="epilogue" (lse.PARAMS GEMM) replaced by `tile`
    (a dict; None: unchanged) while a step runs: rows that time another tile."""
    if tile is None:
        yield
        return
    from contrastive_kernels.triton_kernels import lse
    before = lse.PARAMS["half"]["GEMM"]
    lse.PARAMS["half"]["GEMM"] = dict(tile)
    try:
        yield
    finally:
        lse.PARAMS["half"]["GEMM"] = before


def siglip_kernel_step():
    from siglip_kernel import fused_siglip_loss  # siglip-kernel, optional

    def loss(q, k):
        t = torch.tensor(math.log(SIGLIP_SCALE), device=q.device)
        b = torch.tensor(SIGLIP_BIAS, device=q.device)
        return fused_siglip_loss(q, k, t, b)

    def step(q, k, backward=True):
        return _loss_or_grads(loss, q, k, backward)
    return step


def infcl_step():
    import inspect

    from inf_cl import cal_inf_loss  # Inf-CL, optional
    params = inspect.signature(cal_inf_loss).parameters

    def one_way(a, b):
        labels = torch.arange(a.shape[0], device=a.device)
        out = cal_inf_loss(a, b, labels, scale=SCALE) if "labels" in params else \
            cal_inf_loss(a, b, scale=SCALE)
        return out.mean()

    def step(q, k, backward=True):
        return _loss_or_grads(lambda q, k: (one_way(q, k) + one_way(k, q)) / 2, q, k, backward)
    return step


def matmul_rate(n, d, dtype, quick):
    """TFLOP/s of the N x D by D x N matmul (N x N output), or None if it does not fit."""
    if 2 * n * n * 2 > 0.8 * _free_memory():
        return None
    a = torch.randn(n, d, device=DEVICE, dtype=dtype)
    b = torch.randn(n, d, device=DEVICE, dtype=dtype)
    ms = _bench(lambda: a @ b.T, quick)
    del a, b
    _free_memory()
    return 2 * n * n * d / (ms * 1e-3) / 1e12


def methods():
    import contrastive_kernels as ck
    out = [("naive", naive_step, lambda n: 22 * n * n)]   # bf16 + fp32 logits, softmax, grads
    if LOSS == "siglip":
        for b in ck.available_backends(DEVICE):
            if "siglip" in ck.backends.get(b).features:
                out.append((b, ck_step(b), lambda n: 0))
                if b == "triton":
                    # auto (blocked at D = 768: cuBLAS S blocks, 3 GEMM passes), the same
                    # with a 1 GiB workspace, the fused kernels, and passes=4
                    out.append(("triton-1g", ck_step(b, workspace=1 << 30), lambda n: 0))
                    out.append(("triton-epi", ck_step(b, algorithm="epilogue"), lambda n: 0))
                    out.append(("triton-epi64", ck_step(b, EPI_TILE_64, algorithm="epilogue"),
                                lambda n: 0))
                    out.append(("triton-fused", ck_step(b, algorithm="fused"), lambda n: 0))
                    out.append(("triton-4p", ck_step(b, passes=4), lambda n: 0))
        try:
            out.append(("siglip_kernel", siglip_kernel_step(), lambda n: 0))
        except Exception as e:  # not installed / does not import
            print(f"# siglip-kernel skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return out
    for b in ck.available_backends(DEVICE):
        if b == "triton":
            # auto (blocked at large D: 4 GEMM passes), the fused kernels with fp32
            # atomics for dk (4 passes), and the low-memory fused kernels that write
            # bf16 gradients (5 passes, no atomics)
            out.append(("triton", ck_step(b), lambda n: 0))
            # the blocked algorithm with a 1 GiB workspace (fewer, larger row blocks)
            out.append(("triton-1g", ck_step(b, workspace=1 << 30), lambda n: 0))
            # the same row blocks, S computed in the Triton kernels and never stored
            out.append(("triton-epi", ck_step(b, algorithm="epilogue"), lambda n: 0))
            out.append(("triton-epi64", ck_step(b, EPI_TILE_64, algorithm="epilogue"),
                        lambda n: 0))
            out.append(("triton-fused", ck_step(b, algorithm="fused"), lambda n: 0))
            out.append(("triton-low", ck_step(b, low_memory=True), lambda n: 0))
        else:
            out.append((b, ck_step(b), lambda n: 0))
    try:
        out.append(("inf_cl", infcl_step(), lambda n: 0))
    except Exception as e:  # not installed / does not import
        print(f"# Inf-CL skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def ideal_bytes(n, d, itemsize=2):
    """Inputs q, k and their gradients, in the input dtype."""
    return 4 * n * d * itemsize


def targets(rows):
    """Lines checking the GPU acceptance targets at the largest N that has results."""
    done = [r for r in rows if r.get("ms")]
    if not done:
        return ["targets: no results"]
    n = max(r["N"] for r in done)
    at = {r["method"]: r for r in done if r["N"] == n}
    peers = ("naive", "inf_cl", "siglip_kernel")
    ours = [m for m in at if m not in peers]
    siglip = any(r.get("loss_kind") == "siglip" for r in done)
    out = [f"targets at N={n}, D={at[next(iter(at))]['D']}:"]
    for m in ours:
        r = at[m]
        checks = []
        if r.get("frac_matmul") is not None:
            checks.append(("matmul rate >= 60%", r["frac_matmul"] >= 0.6,
                           f"{100 * r['frac_matmul']:.0f}%"))
        for ref, want in ((("siglip_kernel", 1.3),) if siglip else
                          (("naive", 1.5), ("inf_cl", 1.5))):
            if ref in at:
                x = at[ref]["ms"] / r["ms"]
                checks.append((f">= {want}x {ref}", x >= want, f"{x:.2f}x"))
            else:
                checks.append((f">= {want}x {ref}", None, "not measured"))
        if siglip:
            pass
        elif r.get("peak_bytes") is None:
            checks.append(("peak <= 1.05 ideal", None, "not measured"))
        else:
            ratio = r["peak_bytes"] / ideal_bytes(n, r["D"])
            checks.append(("peak <= 1.05 ideal", ratio <= 1.05, f"{ratio:.2f}x"))
        for name, ok, val in checks:
            verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
            out.append(f"  {m:>12}  {name:<20} {val:>13}  {verdict}")
    if not siglip:
        out.append("  (the peak target is for triton-low: the other modes keep float32 dq and "
                   "dk, about 1.75x by design; docs/DESIGN.md section 3)")
    gpu = [m for m in ("triton", "cuda") if m in at]
    if gpu:
        best = min(gpu, key=lambda m: at[m]["ms"])
        out.append(f"  faster GPU backend (for 'auto'): {best} "
                   + ", ".join(f"{m} {at[m]['ms']:.1f} ms" for m in gpu))
    forms = [m for m in ("triton", "triton-epi", "triton-epi64") if m in at]
    if "triton" in forms and len(forms) > 1:
        # auto's blocked algorithm reads cuBLAS blocks of S; "epilogue" computes them
        best = min(forms, key=lambda m: at[m]["ms"])
        out.append(f"  faster form of the blocked algorithm: "
                   f"{'blocked' if best == 'triton' else 'epilogue (' + best + ')'} ("
                   + ", ".join(f"{m} {at[m]['ms']:.1f} ms" for m in forms) + ")")
    return out


def check_errors(step, q, k, want):
    """Relative errors (loss, dq, dk) of one step against `want` = (loss, dq, dk): max |a - e|
    over max |e|."""
    loss = float(step(q, k, backward=False))
    dq, dk = step(q, k)
    rel = lambda a, e: float((a.float() - e).abs().max() / e.abs().max().clamp_min(1e-30))
    return abs(loss - want[0]) / max(abs(want[0]), 1e-30), rel(dq, want[1]), rel(dk, want[2])


# The tiled pure-PyTorch backend is the slow fallback: timed at small N only.
TORCH_MAX_N = 16384
# A step whose loss or gradients are further than this from the float32 loss is wrong
# (bf16 inputs and gradients: about 1e-2 is rounding).
CHECK_TOL = dict(loss=1e-2, grad=5e-2)


def check_ok(errors):
    """Whether (loss, dq, dk) errors are within CHECK_TOL (a NaN error is not)."""
    return errors[0] <= CHECK_TOL["loss"] and errors[1] <= CHECK_TOL["grad"] and \
        errors[2] <= CHECK_TOL["grad"]


def _inputs(n, d, dtype):
    return inputs(n, d, seed=n, dtype=dtype, device=DEVICE)


def _free_memory():
    if DEVICE != "cuda":
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]
    except Exception:      # a kernel left the context broken
        return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N in {4096, 8192}, short timing")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 8192..65536)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--methods", default=None,
                    help="comma-separated rows to run (default: all available)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results_gpu.json"))
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)    # cpu: smoke test
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    ap.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    a = ap.parse_args(argv)
    global DEVICE, LOSS
    DEVICE, LOSS = a.device, a.loss
    # GEMM passes counted in TFLOP/s: CLIP 4 (forward, recompute, dq, dk), SigLIP 3
    flops = (6 if LOSS == "siglip" else 8)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else \
        ([4096, 8192] if a.quick else [8192, 16384, 32768, 65536])
    dtype, d = getattr(torch, a.dtype), a.dim
    rows, checks = [], {}
    meths = methods()
    if a.methods:
        keep = a.methods.split(",")
        meths = [m for m in meths if m[0] in keep]
    # The tiled torch fallback (not a contender) and then the CUDA C++ kernels last:
    # should one of them break the CUDA context or time run out, the rest is measured.
    meths = sorted(meths, key=lambda m: {"torch": 1, "cuda": 2}.get(m[0], 0))
    dev_name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)

    def save():
        with open(a.json, "w") as fh:
            json.dump(dict(device=dev_name, torch=torch.__version__, dtype=a.dtype, D=d,
                           loss=LOSS, flops_per_step=f"{flops}*N^2*D", rows=rows,
                           checks=checks), fh, indent=1)

    # Correctness first, at the smallest N: every method against the float32 loss.
    n0 = sizes[0]
    print(f"# check at N={n0}: relative error of loss, dq, dk against the float32 loss "
          f"(tolerance {CHECK_TOL['loss']:g} / {CHECK_TOL['grad']:g})")
    q, k = _inputs(n0, d, dtype)
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    want = (float(naive_step(q32, k32, backward=False)), *naive_step(q32, k32))
    del q32, k32
    for name, step, _ in meths:
        try:
            e = check_errors(step, q, k, want)
            ok = check_ok(e)
            checks[name] = dict(loss=e[0], dq=e[1], dk=e[2], ok=ok)
            print(f"#   {name:>12}  {e[0]:.1e} {e[1]:.1e} {e[2]:.1e}  {'ok' if ok else 'WRONG'}",
                  flush=True)
        except Exception as ex:
            checks[name] = dict(ok=False, error=f"{type(ex).__name__}: {str(ex)[:200]}")
            print(f"#   {name:>12}  error: {checks[name]['error']}", flush=True)
    q = k = want = None
    save()

    mm = {}
    for n in sizes:
        try:
            mm[n] = matmul_rate(n, d, dtype, a.quick)
        except Exception as ex:
            mm[n] = None
            print(f"# matmul rate at N={n}: {type(ex).__name__}: {ex}", flush=True)
    print(f"# {dev_name}, {a.dtype}, D={d}, "
          f"{'sigmoid loss' if LOSS == 'siglip' else 'symmetric CLIP loss'}, forward + backward")
    print(f"matmul TFLOP/s ({a.dtype} N x D @ D x N): " +
          ", ".join(f"N={n}: " + (f"{v:.0f}" if v else "-") for n, v in mm.items()))
    hdr = (f"{'method':>12} {'N':>6} {'ms':>9} {'peak GiB':>9} {'/ideal':>7} {'TFLOP/s':>8} "
           f"{'% matmul':>9} {'fwd ms':>8} {'fwd %mm':>8}  note")
    print(hdr)
    print("-" * len(hdr), flush=True)
    for name, step, extra in meths:
        for n in sizes:
            row = dict(method=name, N=n, D=d, dtype=a.dtype, loss_kind=LOSS, ms=None,
                       peak_bytes=None,
                       tflops=None, matmul_tflops=mm[n], frac_matmul=None, fwd_ms=None,
                       fwd_frac_matmul=None, note="")
            free = _free_memory()
            if name == "torch" and n > TORCH_MAX_N:
                row["note"] = f"skipped: the torch fallback is timed up to N={TORCH_MAX_N}"
            elif extra(n) > 0.9 * free:
                row["note"] = f"skipped: needs ~{extra(n) / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
            else:
                try:
                    q, k = _inputs(n, d, dtype)
                    t0 = time.time()
                    step(q, k)                       # compile / autotune outside the timing
                    warm_s = time.time() - t0
                    # the inputs (allocated before the step) plus the step's own peak
                    peak = _peak(lambda: step(q, k))
                    peak = None if peak is None else peak + q.nbytes + k.nbytes
                    ms = _bench(lambda: step(q, k), a.quick)
                    tf = flops * n * n * d / (ms * 1e-3) / 1e12
                    # the forward alone: one GEMM pass, 2 N^2 D
                    fwd = _bench(lambda: step(q, k, backward=False), a.quick)
                    ftf = 2 * n * n * d / (fwd * 1e-3) / 1e12
                    row.update(ms=ms, peak_bytes=peak, tflops=tf,
                               frac_matmul=(tf / mm[n] if mm[n] else None), fwd_ms=fwd,
                               fwd_frac_matmul=(ftf / mm[n] if mm[n] else None),
                               loss=float(step(q, k, backward=False)),
                               note=f"first call {warm_s:.1f}s")
                    # The loss at every N against naive's (run first): a forward that
                    # merged its partials wrongly at large N shows here.
                    base = next((r.get("loss") for r in rows
                                 if r["method"] == "naive" and r["N"] == n), None)
                    if base is not None and name != "naive" and \
                            not abs(row["loss"] - base) <= CHECK_TOL["loss"] * abs(base):
                        row["note"] += f"; LOSS {row['loss']:.5g} vs naive {base:.5g}"
                        checks.setdefault(f"{name}@{n}", dict(ok=False, loss=row["loss"], naive=base))
                except torch.cuda.OutOfMemoryError:
                    row["note"] = "skipped: out of memory"
                except Exception as e:
                    row["note"] = f"error: {type(e).__name__}: {str(e)[:120]}"
                finally:
                    q = k = None
            if not checks.get(name, {}).get("ok", True):
                row["note"] += " (results WRONG, see the check)"
            rows.append(row)
            save()
            f = lambda v, fmt: (fmt % v) if v is not None else "-"
            print(f"{name:>12} {n:>6} {f(row['ms'], '%9.2f'):>9} "
                  f"{f(row['peak_bytes'] and row['peak_bytes'] / 2**30, '%9.2f'):>9} "
                  f"{f(row['peak_bytes'] and row['peak_bytes'] / ideal_bytes(n, d), '%7.2f'):>7} "
                  f"{f(row['tflops'], '%8.1f'):>8} "
                  f"{f(row['frac_matmul'] and 100 * row['frac_matmul'], '%8.1f%%'):>9} "
                  f"{f(row['fwd_ms'], '%8.2f'):>8} "
                  f"{f(row['fwd_frac_matmul'] and 100 * row['fwd_frac_matmul'], '%7.1f%%'):>8}  "
                  f"{row['note']}",
                  flush=True)
    print("\n".join(targets(rows)))
    save()
    print(f"# wrote {a.json}")
    return 0 if all(c.get("ok") for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
