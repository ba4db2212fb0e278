"""Ahead-of-time compilation of every kernel variant for a GPU target, without a GPU.

    python -m contrastive_kernels.triton_kernels.aot [--arch 90] [--json]

Compiles lse_fwd_kernel, lse_bwd_kernel (its SIGLIP mode too) and lse_grad_kernel (and
the blocked algorithm's block_stats_kernel, block_ds_kernel and block_siglip_kernel, with
S read or, FROM_QK, computed) for
each dtype and the flags
the backend launches (self-mask, column statistics, the dq/dk kernels of the
deterministic mode, the atomic kernel, the low-memory launches, ONE_D on/off; see
`variants`) with the default config of each dtype
(lse.PARAMS), through
triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)), and reports per
variant whether the PTX has tensor-core instructions, how much shared memory it needs, and
the registers and spill bytes per thread that `ptxas -v` reports.
Must run with TRITON_INTERPRET unset (triton.jit then returns interpreter functions
that cannot be compiled); tests/test_triton_aot.py runs it in a subprocess.
"""
import argparse
import json
import os
import re
import sys
import time

# "tf32": float32 inputs with input_precision="tf32" (backends.triton.PRECISION).
DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32", "tf32": "fp32", "fp64": "fp64"}
# Shared memory per block on sm90 (227 KiB).
SMEM_LIMIT = {90: 232448, 80: 166912}


_RCA = [(1, 0, 1), (1, 1, 1), (1, 0, 0), (1, 1, 0), (0, 1, 0)]
# lse_grad_kernel launches (SELF_MASK = SYM, HAS_R, HAS_C, HAS_EPS, DS_ON): the dq launch
# with and without column statistics, the dk launch, and the self-contrast launch.
_GRAD = [(0, 1, 1, 0, 1), (0, 1, 0, 1, 0), (0, 0, 1, 1, 1), (1, 1, 1, 1, 1)]


# SIGLIP launches of lse_bwd_kernel: (HAS_R, HAS_C, ATOMIC_DK, SUMS, GRAD).
_SIGLIP = [(0, 0, 1, 1, 1), (1, 0, 1, 0, 1), (0, 0, 0, 1, 0), (0, 1, 0, 0, 1)]


def variants(dtypes, full=False):
    """(kernel, dtype, flags) for the launches the backend can make.

    full: every flag combination, each with ONE_D on and off. Otherwise a covering set:
    for fp16/bf16 every launch variant once (ONE_D alternating), for fp32/fp64 every
    value of every flag at least once (they take longest to compile).
    (HAS_R, HAS_C, ATOMIC_DK) in _RCA: the atomic kernel without/with column statistics,
    the deterministic dq kernel (rows) and its dk kernel (q <-> k swapped).
    """
    out = []
    for dt in dtypes:
        fwd = [(sm, c) for sm in (False, True) for c in (False, True)]
        bwd = [(sm, r, c, a) for (r, c, a) in _RCA for sm in (False, True)]
        if not full and dt in ("fp32", "tf32", "fp64"):
            fwd = [(False, True), (True, False)]
            bwd = [(i % 2 == 1, r, c, a) for i, (r, c, a) in enumerate(_RCA)]
        ones = (True, False)
        for i, (sm, c) in enumerate(fwd):
            for one_d in (ones if full else (i % 2 == 0,)):
                f = dict(SELF_MASK=sm, COLS=c, ONE_D=one_d)
                if dt in ("fp16", "bf16") and i >= 2:
                    f["BLOCK_M"] = 64      # the halved row block of small problems
                out.append(("fwd", dt, f))
        for i, (sm, r, c, a) in enumerate(bwd):
            for one_d in (ones if full else ((i // 2) % 2 == 0,) if dt in ("fp16", "bf16")
                          else (i % 3 != 1,)):
                f = dict(SELF_MASK=sm, HAS_R=bool(r), HAS_C=bool(c), ATOMIC_DK=bool(a),
                         ONE_D=one_d)
                if dt in ("fp16", "bf16") and not full and i == 3:
                    f["TILE_BARRIER"] = True   # an autotuning option (D in chunks)
                out.append(("bwd", dt, f))
        # The sigmoid loss's launches of lse_bwd_kernel (SIGLIP): the 3-pass forward
        # (sums, atomic dk), the 4-pass backward (g as row weights, atomic dk), the 4-pass
        # forward (sums only) and the deterministic dk launch (g as column weights).
        sig = _SIGLIP if full or dt in ("fp16", "bf16") else _SIGLIP[:2]
        for i, (r, c, a, sums, grad_) in enumerate(sig):
            out.append(("bwd", dt, dict(SELF_MASK=False, HAS_R=bool(r), HAS_C=bool(c),
                                        ATOMIC_DK=bool(a), ONE_D=i % 2 == 0, SIGLIP=True,
                                        SUMS=bool(sums), GRAD=bool(grad_), SHIFT=3)))
        # the positive shift (margin, decoupled): the forward, the atomic and the
        # deterministic dq launches with the shift's gradient, the dk launch on S^T
        shifted = [("fwd", dict(SELF_MASK=False, COLS=True, ONE_D=True, SHIFT=1)),
                   ("bwd", dict(SELF_MASK=False, HAS_R=True, HAS_C=True, ATOMIC_DK=True,
                                ONE_D=False, SHIFT=1, DSHIFT_ON=True)),
                   ("bwd", dict(SELF_MASK=True, HAS_R=True, HAS_C=False, ATOMIC_DK=False,
                                ONE_D=True, SHIFT=1, DSHIFT_ON=True)),
                   ("bwd", dict(SELF_MASK=False, HAS_R=True, HAS_C=True, ATOMIC_DK=False,
                                ONE_D=False, SHIFT=2))]
        out += [(kind, dt, f) for kind, f in
                (shifted if full or dt in ("fp16", "bf16") else shifted[:2])]
        grad = _GRAD if full or dt in ("fp16", "bf16") else _GRAD[2:]
        for i, (sm, r, c, e, ds) in enumerate(grad):
            for one_d in (ones if full or dt in ("fp16", "bf16") else (i % 2 == 0,)):
                out.append(("grad", dt, dict(SELF_MASK=bool(sm), SYM=bool(sm), HAS_R=bool(r),
                                             HAS_C=bool(c), HAS_EPS=bool(e), DS_ON=bool(ds),
                                             ONE_D=one_d)))
        # The blocked algorithm's kernels (S read in the accumulation dtype, or with
        # FROM_QK computed in the kernel; dS in the input dtype): (SELF_MASK, COLS) and
        # (SELF_MASK, HAS_C), each tile source once per flag set.
        for sm, c in ((False, True), (True, False)):
            for qk in (False, True):
                out.append(("stats", dt, dict(SELF_MASK=sm, COLS=c, FROM_QK=qk)))
                out.append(("ds", dt, dict(SELF_MASK=sm, HAS_R=True, HAS_C=c, FROM_QK=qk)))
        # the sigmoid loss's (HAS_G, SUMS, GRAD): the 3-pass forward, the 4-pass forward
        # and backward
        # (the positives: each key's id its index, or labels' class ids with KEY_IDS)
        for g, sums, grad_ in ((False, True, True), (False, True, False), (True, False, True)):
            for qk in (False, True):
                for ids in (False, True):
                    out.append(("sig", dt, dict(HAS_G=g, SUMS=sums, GRAD=grad_, FROM_QK=qk,
                                                KEY_IDS=ids)))
    return out


def compile_variant(kind, dt, flags, arch=90, config=None, block_d=None, prec=None):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from . import lse as L
    if dt == "tf32":
        dt, prec = "fp32", "tf32"
    acc_tl, acc_s = (tl.float64, "fp64") if dt == "fp64" else (tl.float32, "fp32")
    if prec is None:
        prec = "ieee"
    P = L.PARAMS[L.dtype_class(dt)]
    if block_d is None and "ONE_D" in flags:
        block_d = P["MAX_ONE_D"] if flags["ONE_D"] else P["CHUNK_D"]
    if kind in ("stats", "ds", "sig"):
        qk = flags.get("FROM_QK", False)
        cfg = dict(config or (P["GEMM"] if qk else L.BLOCKED_TILE))
        if kind == "sig":
            fn = L.block_siglip_kernel
            sig = {"S": f"*{acc_s}", "DS": f"*{dt}", "SCALE": f"*{acc_s}", "BIAS": f"*{acc_s}",
                   "GNORM": f"*{acc_s}", "G_R": f"*{acc_s}", "ROW_SP": f"*{acc_s}",
                   "ROW_SG": f"*{acc_s}", "RID": "*i32", "CID": "*i32"}
        elif kind == "stats":
            fn = L.block_stats_kernel
            sig = {"S": f"*{acc_s}", "SCALE": f"*{acc_s}", "ROW_PART": f"*{acc_s}",
                   "COL_PART": f"*{acc_s}"}
        else:
            fn = L.block_ds_kernel
            sig = {"S": f"*{acc_s}", "DS": f"*{dt}", "SCALE": f"*{acc_s}", "GNORM": f"*{acc_s}",
                   "LSE_R": f"*{acc_s}", "G_R": f"*{acc_s}", "LSE_C": f"*{acc_s}",
                   "G_C": f"*{acc_s}"}
        sig = dict(list(sig.items())[:1] + [("Q", f"*{dt}"), ("K", f"*{dt}")]
                   + list(sig.items())[1:])
        sig.update(row0="i32", R="i32", M="i32", D="i32", stride_s="i32", stride_q="i32",
                   stride_k="i32")
        const = dict(flags, FROM_QK=qk, PREC=prec, BLOCK_R=cfg["BLOCK_R"],
                     BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg.get("BLOCK_K", 16),
                     GROUP_R=cfg.get("GROUP_R", 1))
    elif kind == "fwd":
        fn = L.lse_fwd_kernel
        cfg = dict(config or P["FWD"])
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "SCALE": f"*{acc_s}", "LSE_R": f"*{acc_s}",
               "PART_C": f"*{acc_s}", "RID": "*i32", "CID": "*i32", "DELTA": f"*{acc_s}",
               "N": "i32", "M": "i32", "D": "i32", "stride_q": "i32",
               "stride_k": "i32", "SIZE_KEY": "i32"}
        const = dict(flags, PREC=prec, ACC=acc_tl, BLOCK_M=flags.get("BLOCK_M", P["FWD_BLOCK_M"]),
                     BLOCK_D=block_d, BLOCK_N=cfg["BLOCK_N"])
        const.setdefault("SHIFT", 0)
    elif kind == "grad":
        fn = L.lse_grad_kernel
        cfg = dict(config or P["GRAD" if flags["ONE_D"] else "GRAD_D"])
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "SCALE": f"*{acc_s}", "GMAX": f"*{acc_s}",
               "LSE_R": f"*{acc_s}", "G_R": f"*{acc_s}", "LSE_C": f"*{acc_s}", "G_C": f"*{acc_s}",
               "XR": "*i32", "AR": f"*{acc_s}", "ER": f"*{acc_s}", "YC": "*i32",
               "BC": f"*{acc_s}", "FC": f"*{acc_s}", "OUT": f"*{dt}", "SPARE": f"*{acc_s}",
               "DSC": f"*{acc_s}", "N": "i32", "M": "i32", "D": "i32", "stride_q": "i32",
               "stride_k": "i32", "SIZE_KEY": "i32"}
        const = dict(flags, HALF_OUT=dt in ("fp16", "bf16"), PREC=prec, ACC=acc_tl,
                     BLOCK_D=block_d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                     FIN_ROWS=cfg["FIN_ROWS"])
    else:
        fn = L.lse_bwd_kernel
        cfg = dict(config or P["BWD"])
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "SCALE": f"*{acc_s}", "GNORM": f"*{acc_s}",
               "LSE_R": f"*{acc_s}", "G_R": f"*{acc_s}", "LSE_C": f"*{acc_s}", "G_C": f"*{acc_s}",
               "DQ": f"*{acc_s}", "DK": f"*{acc_s}", "BIAS": f"*{acc_s}", "R_OUT": f"*{acc_s}",
               "T_OUT": f"*{acc_s}", "RID": "*i32", "CID": "*i32", "DELTA": f"*{acc_s}",
               "DSHIFT": f"*{acc_s}", "N": "i32", "M": "i32", "D": "i32",
               "stride_q": "i32", "stride_k": "i32", "SIZE_KEY": "i32"}
        const = dict(flags, PREC=prec, ACC=acc_tl, BLOCK_D=block_d, BLOCK_M=cfg["BLOCK_M"],
                     BLOCK_N=cfg["BLOCK_N"])
        for name, default in (("TILE_BARRIER", False), ("SIGLIP", False), ("SUMS", False),
                              ("GRAD", True), ("SHIFT", 0), ("DSHIFT_ON", False)):
            const.setdefault(name, default)    # ASTSource does not fill in defaults
    for name in const:
        sig[name] = "constexpr"
    # The hints the runtime JIT adds for aligned tensors and sizes (16-byte-aligned
    # pointers; D and row strides divisible by 16, as at D = 768): without them the
    # compiler emits other loads, layouts and pipelining than a real launch gets.
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
             for a, ty in sig.items()
             if ty.startswith("*") or a in ("D", "stride_q", "stride_k", "stride_s")}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    opts = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def ptxas_usage(ptx, arch):
    """(registers, spill store bytes) per thread from `ptxas -v` (the ptxas Triton uses for
    `arch`), or (None, None) if it cannot run."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            suffix = "a" if arch >= 90 else ""
            out = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", src,
                                  "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True, timeout=300).stderr
    except (OSError, subprocess.SubprocessError):
        return None, None
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def _one(job):
    kind, dt, flags, arch = job
    t0 = time.time()
    k = compile_variant(kind, dt, flags, arch)
    ptx = k.asm["ptx"]
    regs, spills = ptxas_usage(ptx, arch)
    return dict(kind=kind, dtype=dt, flags=flags, seconds=round(time.time() - t0, 2),
                wgmma="wgmma" in ptx, mma="mma" in ptx, atomic=bool(re.search(r"(?<![\w.])(red|atom)\.global", ptx)),
                shared=k.metadata.shared, smem_limit=SMEM_LIMIT.get(arch), regs=regs,
                spills=spills)


def run(dtypes=("fp16", "bf16", "fp32", "tf32", "fp64"), arch=90, full=False, jobs=1):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET to compile ahead of time")
    from . import lse as L
    if L.INTERPRET:
        raise RuntimeError("the kernels were loaded in interpreter mode")
    todo = [(kind, dt, flags, arch) for kind, dt, flags in variants(dtypes, full)]
    if jobs <= 1:
        return [_one(j) for j in todo]
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_one, todo, chunksize=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="fp16,bf16,fp32,tf32,fp64")
    ap.add_argument("--full", action="store_true", help="every flag combination (slow)")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    a = ap.parse_args(argv)
    res = run(tuple(a.dtypes.split(",")), a.arch, a.full, a.jobs)
    if a.json:
        print(json.dumps(res))
        return
    for r in res:
        print(f"{r['kind']} {r['dtype']:5s} {r['flags']} wgmma={r['wgmma']} mma={r['mma']} "
              f"smem={r['shared']} regs={r['regs']} spills={r['spills']} {r['seconds']}s")


if __name__ == "__main__":
    sys.exit(main())
