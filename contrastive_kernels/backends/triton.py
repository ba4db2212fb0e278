"""Triton backend: fused kernels in triton_kernels/lse.py (contrastive_kernels.triton_kernels).

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
set before triton is first imported; slow, for tests).

Dtypes: float16 and bfloat16 use tensor cores with float32 accumulation; float32 uses
tl.dot with input_precision "ieee" (or "tf32" with precision="tf32", faster, rounding
the inputs to 10 mantissa bits); float64 is computed in float64 throughout (DMMA on
sm80+). bfloat16 is not served on CPU (the interpreter's bf16 tl.dot is wrong).

The forward uses no atomics: a fixed number of programs share the row blocks in a
fixed order and write their column partials to a (programs x M) buffer
(forward_programs: PROGRAMS_PER_SM per SM on a GPU), reduced on the host. It gives the
same bits on every run with the same config; large problems autotune their config per
process unless deterministic.

Options (contrastive_kernels/options.py), per call:
  deterministic  False: one backward kernel computes dq for its rows and adds dk with
                 fp32 atomics (1 forward + 3 backward GEMM passes over N*M*D; dk's
                 summation order varies from run to run). True: two backward kernels,
                 dq over row blocks and dk over column blocks, no atomics, and the
                 fixed (not autotuned) config: bitwise reproducible (1 + 4 passes).
                 When only dq or only dk is wanted (frozen keys or queries), its one
                 kernel runs, without atomics, in either mode (1 + 2 passes).
  low_memory     backward through `input_grads` (lse_grad_kernel): the kernels write the
                 final gradients in the input dtype, with the target gradient folded into
                 dS, so no float32 N x D buffer is made; scratch is programs x BLOCK_M/2 x D
                 floats (fp16/bf16 with D above the one-chunk limit), else none. Two
                 launches (dq over row blocks, dk over column blocks; one under
                 self-contrast), no atomics, a fixed config: bitwise reproducible, 1 + 4
                 GEMM passes.
  algorithm      "blocked": for an embedding dim too large for one chunk (D above
                 MAX_ONE_D, 256 for fp16/bf16), where the fused kernels re-read q and k
                 chunks and accumulate dq through memory. Rows go in blocks of R (an fp32
                 R x M block of S and its dS in the input dtype fill the workspace: by
                 default 2 x the bytes of q and k, so R is about 4D/3 for N = M; the
                 option `workspace` sets its bytes); per block, cuBLAS computes
                 S = q_b k^T with fp32 output, a Triton kernel reads it once for the row
                 and column log-sum-exps (forward) or writes dS (backward), and cuBLAS
                 gives dq_b = dS k and dk += dS^T q_b (1 + 3 GEMM passes, no atomics,
                 deterministic). "auto": blocked for CUDA fp16/bf16 inputs with D above
                 MAX_ONE_D, where torch has mm(..., out_dtype=float32), unless low_memory
                 or torch's deterministic algorithms are on (cuBLAS would then need
                 CUBLAS_WORKSPACE_CONFIG); else "fused". "blocked" on CPU tensors runs
                 the GEMMs in torch in the accumulation dtype (tests); low_memory takes
                 the fused kernels whatever the algorithm. The sigmoid loss's tiles
                 (siglip_tiles) take it too: per block, block_siglip_kernel reads S once
                 for the row sums and writes dS, and cuBLAS gives dq_b and dk (3 GEMM
                 passes in the 3-pass schedule; 1 + 3 in the 4-pass one).
                 "epilogue": the blocked algorithm with S never stored: the same
                 kernels (FROM_QK) compute each tile of S_b from q_b and k (lse.PARAMS
                 GEMM tile) and use it at once; the workspace holds dS alone, so the
                 blocks are 3x taller (bf16). Never auto's choice until timed on a GPU.
  precision      "tf32" applies to float32 inputs only.

The triton import is lazy: `import contrastive_kernels` does not import triton.
"""
import importlib.util
import os
import sys

import torch

from .base import Backend, key_ids

# The blocked path's default workspace (an fp32 block of S and its dS): WORKSPACE_FACTOR
# x the bytes of q and k, at least WORKSPACE_MIN: it grows with (N + M) D, never with N M.
WORKSPACE_FACTOR = 2
WORKSPACE_MIN = 64 << 20

_KERNEL_MODULE = "contrastive_kernels.triton_kernels.lse"
# Problems with fewer multiply-adds than this use one fixed config instead of autotuning.
AUTOTUNE_MIN_MACS = 1 << 30
# Forward programs per SM: the column partials take (programs x M) floats. The
# interpreter uses INTERPRET_PROGRAMS, so that the tests merge several row blocks
# in one program.
PROGRAMS_PER_SM = 2
INTERPRET_PROGRAMS = 2
# Low-memory backward programs per SM (each holds BLOCK_M/2 x D floats of scratch when
# D is chunked: 13 MB on 132 SMs at D = 768).
GRAD_PROGRAMS_PER_SM = 1
HALF = (torch.float16, torch.bfloat16)


def _interpret_env():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device):
    if device.type not in ("cuda", "cpu"):
        return "Triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1) only"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    loaded = sys.modules.get(_KERNEL_MODULE)
    if loaded is not None and not loaded.INTERPRET:
        return ("Triton needs CUDA tensors; its kernels were loaded without TRITON_INTERPRET=1, "
                "so they cannot run on CPU in this process; use backend 'cpu' or 'torch'")
    if not _interpret_env() and loaded is None:
        return ("Triton needs CUDA tensors; on CPU set TRITON_INTERPRET=1 (slow) or use one of "
                "'cpu', 'torch'")
    return None


def call_reasons(call, options):
    """Why Triton cannot serve this call beyond availability (backend contract)."""
    if call.dtype == torch.bfloat16:
        if call.device.type == "cpu":
            return ["does not support bfloat16 on CPU (the Triton interpreter's bfloat16 "
                    "tl.dot is wrong)"]
    return []


def _kernels():
    import importlib
    return importlib.import_module(_KERNEL_MODULE)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x):
    """Rows with unit element stride (what the kernels index)."""
    return x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()


def _out(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _setup(q, k, scale, options):
    """Row-strided q and k, and what the launches need, as a namespace."""
    import types

    import triton
    import triton.language as tl
    K = _kernels()
    q, k = _rows(q), _rows(k)
    n, d = q.shape
    m = k.shape[0]
    P = K.PARAMS[K.dtype_class(q.dtype)]
    one_d = d <= P["MAX_ONE_D"]
    acc = _acc(q.dtype)
    return types.SimpleNamespace(
        K=K, triton=triton, q=q, k=k, n=n, m=m, d=d, P=P, one_d=one_d, acc=acc, dev=q.device,
        block_d=max(16, triton.next_power_of_2(d)) if one_d else P["CHUNK_D"],
        prec=options.precision if q.dtype == torch.float32 else "ieee",
        acc_tl=tl.float64 if q.dtype == torch.float64 else tl.float32,
        # Autotuning picks tile sizes by timing, which can differ between processes and
        # change the summation order: off when determinism is asked for.
        tuned=P["tune"] and (not K.INTERPRET) and n * m * d >= AUTOTUNE_MIN_MACS
        and not options.deterministic,
        options=options,
        # The kernels load the scale from memory: no host read, no sync.
        scale_t=scale.detach().reshape(1).to(acc))


def _sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward_programs(n_blocks, device):
    """How many programs share the forward's row blocks (the rows of the column partials)."""
    if device.type == "cuda":
        return max(1, min(n_blocks, PROGRAMS_PER_SM * _sms(device)))
    return max(1, min(n_blocks, INTERPRET_PROGRAMS))


def forward_block_m(n, P, device):
    """Rows per forward row block: FWD_BLOCK_M, halved (down to 64, the smallest
    warpgroup MMA) on a GPU where it would leave SMs idle (N = 8192: 64 blocks of 128
    rows on 132 SMs)."""
    bm = P["FWD_BLOCK_M"]
    if device.type == "cuda" and bm > 64 and -(-n // bm) < _sms(device):
        bm //= 2
    return bm


def _size_key(n, m):
    # Autotuning is keyed on the size class (powers of two), not every exact size.
    return (int(n).bit_length() << 8) | int(m).bit_length()


_MM_OUT_DTYPE = {}


def _mm_out_dtype(device, dtype):
    """Whether torch's mm/addmm take an out_dtype (fp16/bf16 inputs, fp32 output) on this
    device: tried once per (device, dtype) on a small product."""
    key = (str(device), dtype)
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(16, 16, device=device, dtype=dtype)
            out = torch.empty(16, 16, device=device, dtype=torch.float32)
            torch.ops.aten.mm.dtype_out(a, a, torch.float32, out=out)
            torch.ops.aten.addmm.dtype_out(out, a, a, torch.float32, out=out)
            _MM_OUT_DTYPE[key] = bool((out == 32).all())
        except (AttributeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


def _blocked(L):
    """Whether this call takes the blocked algorithm (`algorithm`, module docstring):
    "blocked" or "epilogue"."""
    algo = L.options.algorithm
    if algo == "fused" or L.options.low_memory:
        return False
    if algo in ("blocked", "epilogue"):
        return True
    return (L.dev.type == "cuda" and L.q.dtype in (torch.float16, torch.bfloat16)
            and not L.one_d and not torch.are_deterministic_algorithms_enabled()
            and _mm_out_dtype(L.dev, L.q.dtype))


def _gemm(a, b, out, accumulate=False):
    """out = a @ b (accumulate: out += a @ b) in out's dtype; half inputs accumulate in
    fp32 (cuBLAS with out_dtype; on CPU, upcast first)."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif a.is_cuda:
        if accumulate:
            torch.ops.aten.addmm.dtype_out(out, a, b, out.dtype, out=out)
        else:
            torch.ops.aten.mm.dtype_out(a, b, out.dtype, out=out)
    else:
        prod = a.to(out.dtype) @ b.to(out.dtype)
        out.add_(prod) if accumulate else out.copy_(prod)


def _block_plan(L):
    """(rows per block, padded row stride of the workspace, tile config). With
    algorithm="epilogue" the workspace holds dS alone (S never leaves the kernel), so the
    blocks are larger."""
    mpad = -(-L.m // 64) * 64
    epi = L.options.algorithm == "epilogue"
    T = dict(L.P["GEMM"], FROM_QK=True) if epi else dict(L.K.BLOCKED_TILE, FROM_QK=False)
    per_row = mpad * (L.q.element_size() + (0 if epi else _acc(L.q.dtype).itemsize))
    ws = L.options.workspace
    if ws:
        rows = max(1, ws // per_row)           # as asked (tests use a few rows)
    else:
        ws = max(WORKSPACE_MIN, WORKSPACE_FACTOR * (L.n + L.m) * L.d * L.q.element_size())
        fit = ws // per_row
        step = T["BLOCK_R"] if fit >= T["BLOCK_R"] else 16   # whole row tiles if one fits
        rows = max(16, fit // step * step)
    # reading S, the row tiles are the launch grid's second dimension: at most 65535 on
    # CUDA (computing it, the grid is 1-D: row tiles x column tiles < 2^31)
    rows = min(rows, 65535 * T["BLOCK_R"])
    return min(L.n, rows), mpad, T


def _launch_block(L, kernel, T, sbuf, mpad, i0, r, args, meta):
    """One launch of a blocked kernel on the rows i0:i0 + r: with FROM_QK the kernel
    computes S from q_b and k, else cuBLAS first writes it into `sbuf` (rows mpad apart,
    as dS). `args` are the kernel's arguments between the S, Q, K pointers and row0,
    `meta` its flags."""
    cdiv, m = L.triton.cdiv, L.m
    br, bc = T["BLOCK_R"], T["BLOCK_C"]
    qb = L.q[i0:i0 + r]
    if T["FROM_QK"]:
        s, grid = L.scale_t, (cdiv(r, br) * cdiv(m, bc),)      # S is not read
    else:
        s, grid = sbuf[:r, :m], (cdiv(m, bc), cdiv(r, br))
        _gemm(qb, L.k.T, s)
    kernel[grid](s, qb, L.k, *args, i0, r, m, L.d, mpad, qb.stride(0), L.k.stride(0),
                 **meta, FROM_QK=T["FROM_QK"], PREC=L.prec, BLOCK_R=br, BLOCK_C=bc,
                 BLOCK_K=T.get("BLOCK_K", 16), GROUP_R=T.get("GROUP_R", 1),
                 num_warps=T["num_warps"],
                 **({"num_stages": T["num_stages"]} if "num_stages" in T else {}))


def _blocked_forward(L, self_mask, cols):
    n, m, acc, dev, cdiv = L.n, L.m, L.acc, L.dev, L.triton.cdiv
    rows, mpad, T = _block_plan(L)
    br, bc = T["BLOCK_R"], T["BLOCK_C"]
    sbuf = None if T["FROM_QK"] else _out((rows, mpad), acc, dev)
    row_part = _out((rows, cdiv(m, bc)), acc, dev)
    col_part = _out((cdiv(rows, br), m), acc, dev) if cols else row_part
    lse_r = _out((n,), acc, dev)
    lse_c = torch.full((m,), float("-inf"), dtype=acc, device=dev) if cols else None
    for i0 in range(0, n, rows):
        r = min(rows, n - i0)
        _launch_block(L, L.K.block_stats_kernel, T, sbuf, mpad, i0, r,
                      (L.scale_t, row_part, col_part),
                      dict(SELF_MASK=bool(self_mask), COLS=bool(cols)))
        torch.logsumexp(row_part[:r], 1, out=lse_r[i0:i0 + r])
        if cols:
            torch.logaddexp(lse_c, torch.logsumexp(col_part[:cdiv(r, br)], 0), out=lse_c)
    return lse_r, lse_c


def _blocked_backward(L, self_mask, lse_r, lse_c, g_r, g_c, has_c, gnorm, need_dq, need_dk,
                      prod=None):
    """The blocked backward; with prod = (pq, pk) (the teacher's passes) dq = dS pk and
    dk = dS^T pq, the logits still from q and k."""
    n, m, acc, dev = L.n, L.m, L.acc, L.dev
    rows, mpad, T = _block_plan(L)
    sbuf = None if T["FROM_QK"] else _out((rows, mpad), acc, dev)
    dsbuf = _out((rows, mpad), L.q.dtype, dev)
    pq, pk = (L.q, L.k) if prod is None else (_rows(prod[0]), _rows(prod[1]))
    dq = _out((n, pq.shape[1]), acc, dev) if need_dq else None
    dk = _out((m, pq.shape[1]), acc, dev) if need_dk else None
    for i0 in range(0, n, rows):
        r = min(rows, n - i0)
        ds = dsbuf[:r, :m]
        _launch_block(L, L.K.block_ds_kernel, T, sbuf, mpad, i0, r,
                      (ds, L.scale_t, gnorm, lse_r, g_r, lse_c if has_c else lse_r,
                       g_c if has_c else g_r),
                      dict(SELF_MASK=bool(self_mask), HAS_R=True, HAS_C=has_c))
        _block_grads(ds, i0, pq, pk, dq, dk)
    return dq, dk


def _block_grads(ds, i0, pq, pk, dq, dk):
    """One row block's dS_b into the gradients (None: not wanted): dq[i0:i0 + r] = dS_b pk
    and dk += dS_b^T pq[i0:i0 + r] (set by the first block)."""
    r = ds.shape[0]
    if dq is not None:
        _gemm(ds, pk, dq[i0:i0 + r])
    if dk is not None:
        _gemm(ds.T, pq[i0:i0 + r], dk, accumulate=i0 > 0)


def _blocked_siglip(L, bias_t, g_r, gnorm, sums, need_dq, need_dk, pos):
    """The sigmoid loss's tiles by the blocked algorithm: per row block, S = q_b k^T
    (cuBLAS, fp32; or with "epilogue" in the kernel), block_siglip_kernel gives the row
    sums and dS (divided by max|g|), and cuBLAS gives dq_b = dS k and dk += dS^T q_b."""
    n, m, acc, dev, cdiv = L.n, L.m, L.acc, L.dev, L.triton.cdiv
    rows, mpad, T = _block_plan(L)
    grad = need_dq or need_dk
    sbuf = None if T["FROM_QK"] else _out((rows, mpad), acc, dev)
    dsbuf = _out((rows, mpad), L.q.dtype, dev) if grad else None
    part = _out((2, rows, cdiv(m, T["BLOCK_C"])), acc, dev) if sums else None
    r = _out((n,), acc, dev) if sums else None
    t = _out((n,), acc, dev) if sums else None
    dq = _out((n, L.d), acc, dev) if need_dq else None
    dk = _out((m, L.d), acc, dev) if need_dk else None
    dummy = gnorm
    for i0 in range(0, n, rows):
        rr = min(rows, n - i0)
        ds = dsbuf[:rr, :m] if grad else dummy
        _launch_block(L, L.K.block_siglip_kernel, T, sbuf, mpad, i0, rr,
                      (ds, L.scale_t, bias_t, gnorm, dummy if g_r is None else g_r,
                       part[0] if sums else dummy, part[1] if sums else dummy, pos[0],
                       dummy if pos[1] is None else pos[1]),
                      dict(HAS_G=g_r is not None, SUMS=sums, GRAD=grad, KEY_IDS=pos[1] is not None))
        if sums:
            torch.sum(part[0, :rr], 1, out=r[i0:i0 + rr])
            torch.sum(part[1, :rr], 1, out=t[i0:i0 + rr])
        if grad:
            _block_grads(ds, i0, L.q, L.k, dq, dk)
    return r, t, dq, dk


def _shift_args(shift, dummy, swapped=False):
    """(RID, CID, DELTA) pointers and the SHIFT constexpr of a launch (swapped: the launch
    on S^T, whose rows are the keys)."""
    if shift is None:
        return (dummy, dummy, dummy), 0
    rid, cid, delta = shift
    delta = delta.to(dummy.dtype).contiguous()
    return ((cid, rid, delta), 2) if swapped else ((rid, cid, delta), 1)


def lse_forward(q, k, scale, self_mask, cols, options, shift=None):
    L = _setup(q, k, scale, options)
    if shift is None and _blocked(L):
        with torch.cuda.device(L.dev) if L.dev.type == "cuda" else _nullctx():
            return _blocked_forward(L, self_mask, cols)
    n, m, P, dev = L.n, L.m, L.P, L.dev
    lse_r = _out((n,), L.acc, dev)
    bm = forward_block_m(n, P, dev)
    progs = forward_programs(L.triton.cdiv(n, bm), dev)
    part = _out((progs, m), L.acc, dev) if cols else lse_r
    ptrs, shift_mode = _shift_args(shift, lse_r)
    args = (L.q, L.k, L.scale_t, lse_r, part, *ptrs, n, m, L.d, L.q.stride(0), L.k.stride(0),
            _size_key(n, m))
    meta = dict(SELF_MASK=bool(self_mask), COLS=bool(cols), ONE_D=L.one_d, PREC=L.prec,
                ACC=L.acc_tl, BLOCK_M=bm, BLOCK_D=L.block_d, SHIFT=shift_mode)
    with torch.cuda.device(dev) if dev.type == "cuda" else _nullctx():
        if L.tuned:
            L.K.lse_fwd_tuned[(progs,)](*args, **meta)
        else:
            L.K.lse_fwd_kernel[(progs,)](*args, **meta, **P["FWD"])
    lse_c = torch.logsumexp(part, 0) if cols else None
    return lse_r, lse_c


def lse_backward(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq, need_dk, options,
                 shift=None, need_dshift=False, prod=None):
    L = _setup(q, k, scale, options)
    if prod is not None and shift is not None:
        raise ValueError("the Triton backward takes a shift or product operands, not both")
    need_dshift = need_dshift and shift is not None
    want_dq = need_dq
    need_dq = need_dq or need_dshift        # the shift's gradient comes with the row launch
    dshift = _out((L.n,), L.acc, L.dev) if need_dshift else None
    acc, dev, triton = L.acc, L.dev, L.triton
    has_c = lse_c is not None and g_c is not None
    g_r = g_r.to(acc).contiguous()
    lse_r = lse_r.to(acc).contiguous()
    if has_c:
        g_c, lse_c = g_c.to(acc).contiguous(), lse_c.to(acc).contiguous()
    # dS is scaled by 1/max|g| before the cast to the input dtype (fp16 underflow), and the
    # raw gradients are scaled back at the end.
    gmax = g_r.abs().amax()
    if has_c:
        gmax = torch.maximum(gmax, g_c.abs().amax())
    gmax = torch.where(gmax == 0, torch.ones_like(gmax), gmax)
    gnorm = (1.0 / gmax).reshape(1)
    meta = dict(SELF_MASK=bool(self_mask), ONE_D=L.one_d, PREC=L.prec, ACC=L.acc_tl,
                BLOCK_D=L.block_d)

    def launch(a, b, lse_a, g_a, has_a, lse_b, g_b, has_b, da, db, atomic, swapped=False):
        na, nb_ = a.shape[0], b.shape[0]
        dummy = lse_r
        ptrs, shift_mode = _shift_args(shift, dummy, swapped)
        dsh = dshift if (dshift is not None and not swapped) else dummy
        args = (a, b, L.scale_t, gnorm, lse_a if has_a else dummy, g_a if has_a else dummy,
                lse_b if has_b else dummy, g_b if has_b else dummy, da, db if atomic else da,
                dummy, dummy, dummy, *ptrs, dsh, na, nb_, L.d, a.stride(0), b.stride(0),
                _size_key(na, nb_))
        kw = dict(meta, HAS_R=has_a, HAS_C=has_b, ATOMIC_DK=atomic, SHIFT=shift_mode,
                  DSHIFT_ON=dsh is not dummy)
        if L.tuned:
            L.K.lse_bwd_tuned[lambda c: (triton.cdiv(na, c["BLOCK_M"]),)](*args, **kw)
        else:
            cfg = L.P["BWD"]
            L.K.lse_bwd_kernel[(triton.cdiv(na, cfg["BLOCK_M"]),)](*args, **kw, **cfg)

    q, k = L.q, L.k
    dq = dk = None
    with torch.cuda.device(dev) if dev.type == "cuda" else _nullctx():
        if shift is None and (prod is not None or _blocked(L)):
            # (the teacher's passes, prod, always take the blocked kernels: cuBLAS for the
            # two GEMMs of different widths)
            dq, dk = _blocked_backward(L, self_mask, lse_r, lse_c, g_r, g_c, has_c, gnorm,
                                       need_dq, need_dk, prod)
        elif need_dq and need_dk and not options.deterministic:
            dq = _out((L.n, L.d), acc, dev)
            dk = torch.zeros((L.m, L.d), dtype=acc, device=dev)
            launch(q, k, lse_r, g_r, True, lse_c, g_c, has_c, dq, dk, True)
        else:
            # dq over row blocks, dk over column blocks (the same kernel on S^T): no atomics.
            if need_dq:
                dq = _out((L.n, L.d), acc, dev)
                launch(q, k, lse_r, g_r, True, lse_c, g_c, has_c, dq, None, False)
            if need_dk:
                dk = _out((L.m, L.d), acc, dev)
                launch(k, q, lse_c, g_c, has_c, lse_r, g_r, True, dk, None, False, swapped=True)
    out = tuple(None if g is None else g.mul_(gmax) for g in (dq if want_dq else None, dk))
    if shift is None:
        return out
    return out + (None if dshift is None else dshift.mul_(gmax),)


def siglip_tiles(q, k, scale, bias, g_r, sums, need_dq, need_dk, options, pos):
    """The sigmoid loss's tiles (contract: backends/base.py) by lse_bwd_kernel's SIGLIP
    mode (the positives' ids through SHIFT=3): the row sums and dq over row blocks, dk by
    atomics or (deterministic) by the same kernel on S^T with g as column weights."""
    L = _setup(q, k, scale, options)
    acc, dev, triton = L.acc, L.dev, L.triton
    bias_t = bias.detach().reshape(1).to(acc)
    ids = (pos[0], key_ids(pos, k))           # the fused kernels read both
    has_g = g_r is not None
    if has_g:
        g_r = g_r.to(acc).contiguous()
        gmax = g_r.abs().amax()
        gmax = torch.where(gmax == 0, torch.ones_like(gmax), gmax)
    else:
        gmax = torch.ones((), dtype=acc, device=dev)
    gnorm = (1.0 / gmax).reshape(1)
    meta = dict(SELF_MASK=False, ONE_D=L.one_d, PREC=L.prec, ACC=L.acc_tl, BLOCK_D=L.block_d,
                SIGLIP=True)
    r = _out((L.n,), acc, dev) if sums else None
    t = _out((L.n,), acc, dev) if sums else None

    def launch(a, b, g_a, g_b, da, db, atomic, with_sums, grad, swapped=False):
        na, nb_ = a.shape[0], b.shape[0]
        dummy = gnorm
        args = (a, b, L.scale_t, gnorm, dummy, dummy if g_a is None else g_a, dummy,
                dummy if g_b is None else g_b, dummy if da is None else da,
                (db if atomic else da) if da is not None else dummy, bias_t,
                r if with_sums else dummy, t if with_sums else dummy,
                *(ids[::-1] if swapped else ids), dummy,
                dummy, na, nb_, L.d, a.stride(0), b.stride(0), _size_key(na, nb_))
        kw = dict(meta, HAS_R=g_a is not None, HAS_C=g_b is not None, ATOMIC_DK=atomic,
                  SUMS=with_sums, GRAD=grad, SHIFT=3)
        if L.tuned:
            L.K.lse_bwd_tuned[lambda c: (triton.cdiv(na, c["BLOCK_M"]),)](*args, **kw)
        else:
            cfg = L.P["BWD"]
            L.K.lse_bwd_kernel[(triton.cdiv(na, cfg["BLOCK_M"]),)](*args, **kw, **cfg)

    q, k = L.q, L.k
    dq = dk = None
    g = g_r if has_g else None
    with torch.cuda.device(dev) if dev.type == "cuda" else _nullctx():
        if _blocked(L):
            r, t, dq, dk = _blocked_siglip(L, bias_t, g, gnorm, sums, need_dq, need_dk, pos)
        elif need_dq and need_dk and not options.deterministic:
            dq = _out((L.n, L.d), acc, dev)
            dk = torch.zeros((L.m, L.d), dtype=acc, device=dev)
            launch(q, k, g, None, dq, dk, True, sums, True)
        else:
            if need_dq or sums:
                dq = _out((L.n, L.d), acc, dev) if need_dq else None
                launch(q, k, g, None, dq, None, False, sums, need_dq)
            if need_dk:
                dk = _out((L.m, L.d), acc, dev)
                launch(k, q, None, g, dk, None, False, False, True, swapped=True)
    dq, dk = (None if x is None else x.mul_(gmax) for x in (dq, dk))
    return r, t, dq, dk


def grad_programs(n_blocks, device):
    """How many programs share the low-memory backward's row blocks (each holds a half
    block of scratch when D is chunked)."""
    if device.type == "cuda":
        return max(1, min(n_blocks, GRAD_PROGRAMS_PER_SM * _sms(device)))
    return max(1, min(n_blocks, INTERPRET_PROGRAMS))


def input_grads(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, w, need_dq, need_dk, need_ds,
                options):
    """The low-memory backward (option low_memory).

    Returns the final (dq, dk, ds): dq and dk in the input dtype, including the target
    gradient W (w() = (rid, cid, a, e, b, f) from targets.Targets.weights: W_ij =
    [rid_i == cid_j] (a_i + b_j) + e_i + f_j on valid entries; b, f may be None, e, f are
    None without smoothing), and ds = sum_ij dS_lse_ij <q_i, k_j> (None unless need_ds).
    Under self-contrast (self_mask; k is q) dq is the whole gradient of q and dk is None.
    """
    L = _setup(q, k, scale, options)
    acc, dev, triton = L.acc, L.dev, L.triton
    rid, cid, a, e, b, f = w()
    has_c = lse_c is not None and g_c is not None
    g_r, lse_r = g_r.to(acc).contiguous(), lse_r.to(acc).contiguous()
    if has_c:
        g_c, lse_c = g_c.to(acc).contiguous(), lse_c.to(acc).contiguous()
    vec = lambda x, n: torch.zeros(n, dtype=acc, device=dev) if x is None else x.to(acc).contiguous()
    a, b = vec(a, L.n), vec(b, L.m)
    has_eps = e is not None
    e, f = (vec(e, L.n), vec(f, L.m)) if has_eps else (a, b)
    # (int32 ids: fewer registers in the tile's comparison; N, M < 2**31.)
    rid, cid = rid.to(torch.int32).contiguous(), cid.to(torch.int32).contiguous()
    # |dS| <= |s| (max|g_r| + max|g_c|) + max|W|: dS / gmax is at most 1 in the input
    # dtype (no fp16 overflow, and small gradients keep their relative precision).
    sym = bool(self_mask)
    gmax = L.scale_t[0].abs() * (g_r.abs().amax() * (2 if sym else 1) +
                                 (g_c.abs().amax() if has_c else 0))
    wmax = a.abs().amax() + b.abs().amax()
    if has_eps:
        wmax = wmax + e.abs().amax() + f.abs().amax()
    gmax = gmax + wmax * (2 if sym else 1)
    gmax = torch.where(gmax > 0, gmax, torch.ones_like(gmax)).reshape(1).to(acc)
    cfg = dict(L.P["GRAD"] if L.one_d else L.P["GRAD_D"])
    bm = cfg["BLOCK_M"]
    half = q.dtype in (torch.float16, torch.bfloat16)
    # One scratch for both launches (they run one after the other): each program's half
    # block of accumulator rows when an fp32 row does not fit in its half-size output row.
    spare = gmax
    if half and not L.one_d:
        most = max(grad_programs(triton.cdiv(x, bm), dev) for x in (L.n, L.m))
        spare = _out((most * (bm // 2) * L.d,), acc, dev)

    def launch(x, y, lse_a, g_a, has_a, lse_b, g_b, has_b, side_r, side_c, ds_on):
        """(the gradient of x's rows, the scale's sum or None)."""
        nx, ny = x.shape[0], y.shape[0]
        progs = grad_programs(triton.cdiv(nx, bm), dev)
        out = _out((nx, L.d), q.dtype, dev)
        dsc = _out((progs,), acc, dev) if ds_on else gmax
        dummy = lse_r
        L.K.lse_grad_kernel[(progs,)](
            x, y, L.scale_t, gmax, lse_a if has_a else dummy, g_a if has_a else dummy,
            lse_b if has_b else dummy, g_b if has_b else dummy, *side_r, *side_c, out, spare,
            dsc, nx, ny, L.d, x.stride(0), y.stride(0), _size_key(nx, ny),
            SELF_MASK=sym, HAS_R=has_a, HAS_C=has_b, SYM=sym, HAS_EPS=has_eps, DS_ON=ds_on,
            ONE_D=L.one_d, HALF_OUT=half, PREC=L.prec, ACC=L.acc_tl, BLOCK_D=L.block_d, **cfg)
        return out, (dsc.sum() * (0.5 if sym else 1.0) if ds_on else None)

    rows, cols = (rid, a, e), (cid, b, f)
    q, k = L.q, L.k
    dq = dk = ds = None
    with torch.cuda.device(dev) if dev.type == "cuda" else _nullctx():
        if sym:
            # S is symmetric: entry (j, i) has row j's statistics, as column statistics.
            dq, ds = launch(q, q, lse_r, g_r, True, lse_r, g_r, True, rows, cols, need_ds)
        else:
            # The scale's sum comes from the first launch that runs.
            if need_dq or (need_ds and not need_dk):
                dq, ds = launch(q, k, lse_r, g_r, True, lse_c, g_c, has_c, rows, cols, need_ds)
            if need_dk:
                dk, ds_k = launch(k, q, lse_c, g_c, has_c, lse_r, g_r, True, cols, rows,
                                  need_ds and ds is None)
                ds = ds if ds is not None else ds_k
    return (dq if need_dq else None), dk, ds


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class TritonBackend(Backend):
    name = "triton"
    device_types = ("cuda", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    features = frozenset({"siglip", "shift", "teacher", "low_memory", "blocked", "tf32"})
    min_capability = {torch.bfloat16: (8, 0)}

    def unavailable_reason(self, device):
        return unavailable_reason(device)

    def call_reasons(self, call, options):
        return call_reasons(call, options)

    def lse_forward(self, q, k, scale, self_mask, cols, options, shift=None):
        return lse_forward(q, k, scale, self_mask, cols, options, shift)

    def lse_backward(self, q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq, need_dk,
                     options, shift=None, need_dshift=False, prod=None):
        return lse_backward(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq, need_dk,
                            options, shift, need_dshift, prod)

    def siglip_tiles(self, q, k, scale, bias, g_r, sums, need_dq, need_dk, options, pos):
        return siglip_tiles(q, k, scale, bias, g_r, sums, need_dq, need_dk, options, pos)

    def input_grads(self, q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, weights, need_dq,
                    need_dk, need_ds, options):
        return input_grads(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, weights, need_dq,
                           need_dk, need_ds, options)


BACKEND = TritonBackend()
