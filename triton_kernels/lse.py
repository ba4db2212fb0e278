"""Triton kernels for the fused log-sum-exp of S = scale * q k^T (issue 3).

Installed as `contrastive_kernels.triton_kernels.lse`; the backend that drives them
is `contrastive_kernels.backends.triton`. Import this module only after
TRITON_INTERPRET has its final value: `triton.jit` reads it at decoration time.

Kernels (every program loops over all key tiles of BLOCK_N columns, and inside a tile
over the embedding dim in BLOCK_D chunks):

  lse_fwd_kernel   a fixed number of programs P (the grid) share the blocks of BLOCK_M
                   rows: program p takes blocks p, p + P, ... For each: S tile = scale *
                   q k^T (fp32 accumulation, fp64 for fp64 inputs), self-mask, online
                   (max, sum) per row -> LSE_R (N,). With COLS, the same tile also gives
                   each column's log-sum-exp over the block's rows, merged into the
                   program's own row PART_C[p, :] of a (P, M) buffer that the host
                   reduces with a logsumexp over dim 0: O(P*M) scratch, no atomics, and
                   (for a given config) the same result on every run. Every entry of LSE_R and PART_C is
                   written.
  lse_bwd_kernel   recomputes S, forms dS = g_r exp(S - lse_r) + g_c exp(S - lse_c)
                   (SIGLIP: the sigmoid loss's dS = g_r g_c dz, dz = sigmoid(S + bias) -
                   [positive] from the ids (SHIFT=3), and with SUMS each row's losses and
                   sums of dz, the 3-pass forward)
                   (either term optional: HAS_R, HAS_C), and accumulates DQ = dS @ k
                   for its own rows (no atomics). With ATOMIC_DK it also adds
                   dS^T @ q into DK with tl.atomic_add (DK must be zeroed): 3 backward GEMM
                   passes (recompute, dS k, dS^T q), 4 with the forward.
                   Without it the host launches the kernel a second time with q <-> k
                   and the row/column statistics swapped, which writes DK the same way
                   as DQ: deterministic, one recompute more (4 backward passes, 5 in all).
  lse_grad_kernel  the low-memory backward: like the dq launch of lse_bwd_kernel, but it
                   writes the final gradient in the input dtype. dS also carries the
                   target weights W (tile by tile from O(N + M) vectors) and the scale:
                   dQ = (s dS_lse + W) k as one GEMM, so no float32 N x D buffer
                   exists. A fixed number of programs share the row blocks; without
                   ONE_D a block's float32 accumulator lives in its own output rows plus,
                   for fp16/bf16 outputs (HALF_OUT, half the bytes), a half block of
                   scratch per program (SPARE: programs x BLOCK_M/2 x D), and is
                   converted in place at the end. SYM (self-contrast) adds the entry
                   (j, i) terms, so one launch gives the whole gradient. DS_ON writes
                   each program's sum of dS_lse * q k^T (for the scale gradient) to DSC.

SHIFT (lse_fwd_kernel, lse_bwd_kernel; the margin and decoupled variants): every tile
adds DELTA[i] to its positives, RID[i] == CID[j] (int32 ids; DELTA = -inf leaves them
out), by row, or (2) by column for the launch on S^T; DSHIFT_ON writes each row's
sum of dS over its positives (the shift's gradient) to DSHIFT.

The blocked algorithm (backends.triton.BLOCKED) leaves the GEMMs to cuBLAS and keeps two
memory-bound kernels on an fp32 row block of S = q_b k^T (R x M, rows stride_s apart):

  block_stats_kernel  per (BLOCK_R, BLOCK_C) tile: each row's log-sum-exp over the tile's
                      columns and (COLS) each column's over its rows, as partials that
                      the host reduces (R x column tiles, row tiles x M).
  block_ds_kernel     per tile: dS / max|g| in the input dtype, for dq_b = dS k and
                      dk += dS^T q_b.

N, M and SIZE_KEY (the autotuning size class) are not specialized on (fewer compiles
across batch sizes); D and the row strides are, for aligned vector loads.

ONE_D (D <= BLOCK_D): the q tile is loaded once per program and DQ is accumulated in
registers. Otherwise DQ is accumulated in place in global memory per D chunk (the first
key tile stores, the others read-add-write; the rows belong to one program only).

Row/column offsets are int64, so N*D and P*M may exceed 2**31.
dS is normalised by 1/max|g| (GNORM) before it is cast to the input dtype for the
tensor-core GEMMs, so fp16 does not underflow on small upstream gradients; the host
multiplies DQ/DK back by max|g|.
"""
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Per input-dtype class ("half" = fp16/bf16, "fp32", "fp64") launch parameters:
#   FWD_BLOCK_M  rows per forward row block: not autotuned, so that the host knows how
#                many row blocks there are to share among the programs (the host halves
#                it where the blocks would not fill the SMs: forward_block_m);
#   MAX_ONE_D    embedding dims up to this are held in one chunk (q tile kept, DQ in
#                registers); larger D is looped over in CHUNK_D chunks;
#   GRAD/GRAD_D  the config of lse_grad_kernel (low-memory backward; never autotuned)
#                with D in one chunk / in chunks. Chosen without a GPU, by ptxas -v on
#                sm_90a: no spills for fp16/bf16 at D = 768 (the wider key tile halves
#                the accumulator's read-back per GEMM flop); with D in one chunk
#                (up to 256) the key tile is 32 wide: under 100 B of spills per thread
#                at D = 256 (64-wide: up to 596 B);
#   GEMM         the tile of the blocked kernels' FROM_QK mode (algorithm="epilogue"): a
#                GEMM over D in chunks of BLOCK_K with the loss in its epilogue; the
#                programs go in groups of GROUP_R row tiles (see _block_tile). Chosen
#                without a GPU, by ptxas -v on sm_90a: fp16/bf16 128 x 128 with 8 warps
#                and 4 stages (two warpgroups, 128 KiB of shared memory, at most 255
#                registers, no spills: one program per SM) moves 64 flops per byte from
#                L2, against 43 for 128 x 64 with one warpgroup (which fits two programs
#                per SM, so one's epilogue can overlap the other's GEMM; bench_gpu's
#                triton-epi64 row times it); 128 x 256 spills 2.9 KB. fp32 "ieee" dots
#                kept at 64 x 32 as below. To be timed on a GPU;
#   FWD/BWD      the config used in the interpreter, for problems too small to be worth
#                tuning, and (fp64) always. Each fits sm90 shared memory (see
#                tests/test_triton_aot.py); "tune" says whether large problems autotune.
if INTERPRET:
    _I = dict(FWD_BLOCK_M=32, MAX_ONE_D=128, CHUNK_D=32, tune=False,
              FWD=dict(BLOCK_N=32, num_warps=4, num_stages=1),
              BWD=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
              GRAD=dict(BLOCK_M=32, BLOCK_N=32, FIN_ROWS=8, num_warps=4, num_stages=1))
    _I["GRAD_D"] = _I["GRAD"]
    _I["GEMM"] = dict(BLOCK_R=16, BLOCK_C=32, BLOCK_K=16, GROUP_R=2, num_warps=4, num_stages=1)
    BLOCKED_TILE = dict(BLOCK_R=16, BLOCK_C=32, num_warps=4)
    PARAMS = {"half": _I, "fp32": _I, "fp64": _I}
else:
    PARAMS = {
        "half": dict(FWD_BLOCK_M=128, MAX_ONE_D=256, CHUNK_D=64, tune=True,
                     FWD=dict(BLOCK_N=64, num_warps=8, num_stages=3),
                     BWD=dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
                     GRAD=dict(BLOCK_M=64, BLOCK_N=32, FIN_ROWS=16, num_warps=8, num_stages=2),
                     GRAD_D=dict(BLOCK_M=64, BLOCK_N=128, FIN_ROWS=16, num_warps=8, num_stages=2),
                     GEMM=dict(BLOCK_R=128, BLOCK_C=128, BLOCK_K=64, GROUP_R=16, num_warps=8,
                               num_stages=4)),
        # fp32 "ieee" dots are FMA loops that keep both operands in registers: a D chunk
        # above 32 spills heavily (seen in sm_90 ptxas -v), so fp32 always works in chunks
        # of 32, and the backward's key tile is 32 wide (64: 164 B of spills).
        "fp32": dict(FWD_BLOCK_M=128, MAX_ONE_D=32, CHUNK_D=32, tune=True,
                     FWD=dict(BLOCK_N=64, num_warps=8, num_stages=2),
                     BWD=dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
                     GRAD=dict(BLOCK_M=64, BLOCK_N=64, FIN_ROWS=16, num_warps=8, num_stages=2),
                     GRAD_D=dict(BLOCK_M=64, BLOCK_N=64, FIN_ROWS=16, num_warps=8, num_stages=2),
                     GEMM=dict(BLOCK_R=64, BLOCK_C=32, BLOCK_K=32, GROUP_R=16, num_warps=8,
                               num_stages=2)),
        "fp64": dict(FWD_BLOCK_M=64, MAX_ONE_D=64, CHUNK_D=32, tune=False,
                     FWD=dict(BLOCK_N=32, num_warps=4, num_stages=2),
                     BWD=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
                     GRAD=dict(BLOCK_M=32, BLOCK_N=32, FIN_ROWS=16, num_warps=4, num_stages=2),
                     GRAD_D=dict(BLOCK_M=32, BLOCK_N=32, FIN_ROWS=16, num_warps=4, num_stages=2),
                     GEMM=dict(BLOCK_R=32, BLOCK_C=32, BLOCK_K=32, GROUP_R=16, num_warps=4,
                               num_stages=2)),
    }
    # The blocked path's elementwise kernels (block_stats_kernel, block_ds_kernel):
    # memory-bound, 32 x 256 fp32 tiles (32 KB read per program).
    BLOCKED_TILE = dict(BLOCK_R=32, BLOCK_C=256, num_warps=8)


def dtype_class(name):
    """'half', 'fp32' or 'fp64' for a dtype name such as 'float16' / 'fp16'."""
    name = str(name).replace("torch.", "")
    if name in ("float64", "fp64"):
        return "fp64"
    if name in ("float32", "fp32"):
        return "fp32"
    return "half"


def _fwd_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in [(64, 4, 3), (64, 8, 3), (128, 8, 3), (128, 8, 4), (64, 8, 4),
                             (32, 4, 4)]]


def _bwd_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # TILE_BARRIER (D in chunks only): one barrier per key tile instead of one per D chunk,
    # which lets the chunks' loads pipeline (sm_90 PTX: 8 async copies instead of 4) at the
    # cost of registers (156 instead of 122) and shared memory; for the GPU's timing to pick.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TILE_BARRIER": tb}, num_warps=w,
                          num_stages=s)
            for bm, bn, w, s, tb in [(64, 64, 4, 2, False), (64, 64, 4, 3, False),
                                     (64, 64, 8, 2, False), (64, 64, 8, 3, False),
                                     (128, 64, 8, 2, False), (128, 64, 8, 3, False),
                                     (64, 128, 8, 2, False), (128, 128, 8, 2, False),
                                     (64, 32, 4, 3, False), (64, 32, 8, 2, False),
                                     (64, 64, 8, 2, True), (64, 128, 8, 2, True),
                                     (128, 64, 8, 2, True)]]


def _prune_bwd(configs, named_args, **kwargs):
    arg = lambda name: kwargs.get(name, named_args.get(name))
    # With D in one chunk there is no chunk loop: TILE_BARRIER would only repeat a config.
    if arg("ONE_D"):
        configs = [c for c in configs if not c.kwargs.get("TILE_BARRIER")]
    # A program holding a (BLOCK_M, BLOCK_D) fp32 dq accumulator, the q and k tiles and
    # (atomic) the dk product in registers with BLOCK_D > 128 spills badly unless it has
    # 64 rows and 8 warps (ptxas -v, sm_90a: 3.4 KB per thread with 4 warps, none with 8).
    if arg("ONE_D") and arg("BLOCK_D") is not None and arg("BLOCK_D") > 128:
        small = [c for c in configs if c.kwargs["BLOCK_M"] <= 64 and c.num_warps >= 8]
        return small or configs
    # fp32 "ieee" dots (FMA loops) spill with tiles above 64 x 32 or with 4 warps (ptxas -v:
    # 64 x 64 164 B, 128 x 64 1.3 KB, 64 x 128 up to 9.9 KB, 64 x 64 with 4 warps 340 B);
    # 128 x 128 tiles also take ~80 s to compile.
    if arg("PREC") == "ieee" and str(getattr(arg("Q"), "dtype", "")).endswith("float32"):
        small = [c for c in configs
                 if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 and c.num_warps >= 8]
        return small or configs
    return configs


@triton.jit
def _rows(X, offs, ok, dd, D, stride):
    """X[offs, dd] of a row-major matrix with D columns; 0 outside `ok` and D."""
    return tl.load(X + offs[:, None] * stride + dd[None, :],
                   mask=ok[:, None] & (dd < D)[None, :], other=0.0)


@triton.jit
def _s_tile(Q, K, offs_m, offs_n, row_ok, col_ok, N, M, D, stride_q, stride_k,
            q_one, scale, RID, CID, DELTA, SELF_MASK: tl.constexpr, ONE_D: tl.constexpr,
            PREC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SHIFT: tl.constexpr = 0):
    """scale * q[offs_m] k[offs_n]^T with invalid entries (out of range, diagonal) -inf,
    (with ONE_D) the k tile it loaded, the unscaled, unmasked q k^T, and the positives
    (RID[i] == CID[j]; with SHIFT only). SHIFT (margin, decoupled) adds DELTA to the
    positives, by row (1) or, for the launch on S^T, by column (2); 3 finds the positives
    only (the sigmoid loss)."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    kt = tl.zeros((BLOCK_N, BLOCK_D), dtype=K.dtype.element_ty)
    if ONE_D:
        kt = _rows(K, offs_n, col_ok, offs_d, D, stride_k)
        acc = tl.dot(q_one, tl.trans(kt), acc, input_precision=PREC, out_dtype=ACC)
    else:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            qt = _rows(Q, offs_m, row_ok, dd, D, stride_q)
            kc = _rows(K, offs_n, col_ok, dd, D, stride_k)
            acc = tl.dot(qt, tl.trans(kc), acc, input_precision=PREC, out_dtype=ACC)
    s = acc * scale
    valid = row_ok[:, None] & col_ok[None, :]
    if SELF_MASK:
        valid = valid & (offs_m[:, None] != offs_n[None, :])
    pos = valid
    if SHIFT != 0:
        rid = tl.load(RID + offs_m, mask=row_ok, other=-3)    # -3, -2: no id matches
        cid = tl.load(CID + offs_n, mask=col_ok, other=-2)
        pos = rid[:, None] == cid[None, :]
        if SHIFT == 1:
            s = tl.where(pos, s + tl.load(DELTA + offs_m, mask=row_ok, other=0.0)[:, None], s)
        elif SHIFT == 2:
            s = tl.where(pos, s + tl.load(DELTA + offs_n, mask=col_ok, other=0.0)[None, :], s)
    return tl.where(valid, s, float("-inf")), kt, acc, pos


@triton.jit
def _stats(LSE, G, offs, ok):
    """(lse, g) at offs; an lse of -inf (no valid entry) reads +inf, so that its
    probabilities exp(S - lse) are 0, not NaN."""
    lse = tl.load(LSE + offs, mask=ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse), tl.load(G + offs, mask=ok, other=0.0)


@triton.jit
def _ds_cols(s, LSE_C, G_C, offs_n, col_ok, gmul):
    """The column term of dS: gmul * g_c[j] exp(S_ij - lse_c[j])."""
    lc, gc = _stats(LSE_C, G_C, offs_n, col_ok)
    return (gc * gmul)[None, :] * tl.exp(s - lc[None, :])


@triton.jit
def _finish(m, l):
    """m + log(l) of a (shift, sum) pair; -inf for an empty one (l = 0), NaN for l = NaN
    (a NaN logit, which the max may have dropped)."""
    return tl.where(l == 0, float("-inf"), m + tl.log(tl.where(l == 0, 1.0, l)))


@triton.jit
def _logaddexp(a, b):
    """log(exp a + exp b), -inf when both are -inf."""
    mx = tl.maximum(a, b)
    mx_sh = tl.where(mx == float("-inf"), 0.0, mx)
    return _finish(mx_sh, tl.exp(a - mx_sh) + tl.exp(b - mx_sh))


@triton.jit(do_not_specialize=["N", "M", "SIZE_KEY"])
def lse_fwd_kernel(Q, K, SCALE, LSE_R, PART_C, RID, CID, DELTA, N, M, D, stride_q, stride_k,
                   SIZE_KEY, SELF_MASK: tl.constexpr, COLS: tl.constexpr, ONE_D: tl.constexpr,
                   PREC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SHIFT: tl.constexpr = 0):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scale = tl.load(SCALE)
    part_row = PART_C + pid.to(tl.int64) * M
    # Row blocks pid, pid + nprog, ...: a fixed partition, so the result is deterministic.
    for rb in range(pid, tl.cdiv(N, BLOCK_M), nprog):
        offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = offs_m < N
        q_one = tl.zeros((BLOCK_M, BLOCK_D), dtype=Q.dtype.element_ty)
        if ONE_D:
            offs_d = tl.arange(0, BLOCK_D)
            q_one = _rows(Q, offs_m, row_ok, offs_d, D, stride_q)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
        l_i = tl.zeros((BLOCK_M,), dtype=ACC)
        for n0 in range(0, M, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            col_ok = offs_n < M
            s, k_one, _, _ = _s_tile(Q, K, offs_m, offs_n, row_ok, col_ok, N, M, D, stride_q,
                                     stride_k, q_one, scale, RID, CID, DELTA, SELF_MASK, ONE_D,
                                     PREC, ACC, BLOCK_M, BLOCK_N, BLOCK_D, SHIFT)
            # Online (max, sum) per row; a max of -inf (nothing valid yet) is shifted by 0.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sh = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_sh) + tl.sum(tl.exp(s - m_sh[:, None]), 1)
            m_i = m_new
            if COLS:
                # The tile's column log-sum-exp, merged into this program's partial row
                # (the first row block stores, the later ones read, merge and store).
                cm = tl.max(s, 0)
                cm_sh = tl.where(cm == float("-inf"), 0.0, cm)
                cs = tl.sum(tl.exp(s - cm_sh[None, :]), 0)
                part = _finish(cm_sh, cs)
                # (A mask of offs_n < limit: `col_ok & (rb > pid)` is int32 in the interpreter.)
                merged_cols = tl.where(rb > pid, M, 0)
                old = tl.load(part_row + offs_n, mask=offs_n < merged_cols, other=float("-inf"))
                tl.store(part_row + offs_n, _logaddexp(old, part), mask=col_ok)
        lse = _finish(m_i, l_i)
        tl.store(LSE_R + offs_m, lse, mask=row_ok)
        if COLS:
            # The next row block reads what other threads of this program stored.
            tl.debug_barrier()


@triton.jit
def _softplus_sigmoid(z):
    """softplus(z) = max(z, 0) + log1p(exp(-|z|)) and sigmoid(z) from one exp of -|z|
    (no overflow at any z; 0 and 0 at z = -inf; NaN for NaN)."""
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    inv = 1.0 / u
    # log1p(e) = log(u) less the rounding of u (u - 1 - e, exact), to first order; fp32
    # log(1 + e) alone loses up to 2^-24 / e relative (5e-4 at z = -9.2)
    lp = tl.log(u) - ((u - 1.0) - e) * inv
    return tl.maximum(z, 0.0) + lp, tl.where(z >= 0, inv, e * inv)


@triton.jit
def _siglip_term(z, pos):
    """Each entry's loss softplus(-y z) with its target (y = +1 where pos, else -1; a
    positive's never formed as softplus(z) - z, which cancels) and dz = sigmoid(z) - [pos]
    (ck::siglip_term's twin)."""
    sp, sg = _softplus_sigmoid(tl.where(pos, -z, z))
    return sp, tl.where(pos, -sg, sg)


@triton.jit(do_not_specialize=["N", "M", "SIZE_KEY"])
def lse_bwd_kernel(Q, K, SCALE, GNORM, LSE_R, G_R, LSE_C, G_C, DQ, DK, BIAS, R_OUT, T_OUT,
                   RID, CID, DELTA, DSHIFT, N, M, D, stride_q, stride_k, SIZE_KEY,
                   SELF_MASK: tl.constexpr, HAS_R: tl.constexpr, HAS_C: tl.constexpr,
                   ATOMIC_DK: tl.constexpr, ONE_D: tl.constexpr, PREC: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, TILE_BARRIER: tl.constexpr = False,
                   SIGLIP: tl.constexpr = False, SUMS: tl.constexpr = False,
                   GRAD: tl.constexpr = True, SHIFT: tl.constexpr = 0,
                   DSHIFT_ON: tl.constexpr = False):
    # SIGLIP: the sigmoid loss's tiles, z = S + bias, positives where RID[i] == CID[j]
    # (SHIFT=3): dS = g_r[i] g_c[j] dz (each factor only if HAS_R / HAS_C; LSE_R and LSE_C
    # are not read) and, with SUMS, each row's sum of the losses and of dz into R_OUT and
    # T_OUT (_siglip_term). GRAD=False: the sums alone (no DQ, no DK).
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(SCALE)
    gnorm = tl.load(GNORM)
    in_ty = Q.dtype.element_ty
    if HAS_R:
        if SIGLIP:
            gr = tl.load(G_R + offs_m, mask=row_ok, other=0.0)
        else:
            lr, gr = _stats(LSE_R, G_R, offs_m, row_ok)
        gr = gr * gnorm
    bias = 0.0
    r_acc = tl.zeros((BLOCK_M,), dtype=ACC)
    t_acc = tl.zeros((BLOCK_M,), dtype=ACC)
    dsh_acc = tl.zeros((BLOCK_M,), dtype=ACC)
    if SIGLIP:
        bias = tl.load(BIAS)
    q_one = tl.zeros((BLOCK_M, BLOCK_D), dtype=in_ty)
    dq_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    if ONE_D:
        q_one = _rows(Q, offs_m, row_ok, offs_d, D, stride_q)
    # Each program starts at its own key tile, so that programs running at the same time
    # do not add into the same DK rows at once.
    tiles = tl.cdiv(M, BLOCK_N)
    first = pid % tl.maximum(tiles, 1)
    for t in range(0, tiles):
        nt = first + t
        n0 = tl.where(nt < tiles, nt, nt - tiles).to(tl.int64) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = offs_n < M
        s, k_one, _, pos = _s_tile(Q, K, offs_m, offs_n, row_ok, col_ok, N, M, D, stride_q,
                                   stride_k, q_one, scale, RID, CID, DELTA, SELF_MASK, ONE_D,
                                   PREC, ACC, BLOCK_M, BLOCK_N, BLOCK_D, SHIFT)
        ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        if SIGLIP:
            sp, dz = _siglip_term(s + bias, pos)
            if SUMS:
                r_acc += tl.sum(sp, 1)
                t_acc += tl.sum(dz, 1)
            ds = dz
            if HAS_R:
                ds = ds * gr[:, None]
            if HAS_C:
                ds = ds * (tl.load(G_C + offs_n, mask=col_ok, other=0.0) * gnorm)[None, :]
            if not HAS_R and not HAS_C:
                ds = ds * gnorm
        else:
            if HAS_R:
                ds += gr[:, None] * tl.exp(s - lr[:, None])
            if HAS_C:
                ds += _ds_cols(s, LSE_C, G_C, offs_n, col_ok, gnorm)
            if DSHIFT_ON:
                dsh_acc += tl.sum(tl.where(pos, ds, 0.0), 1)
        ds_in = ds.to(in_ty)
        if not GRAD:
            pass
        elif ONE_D:
            dm = offs_d < D
            dq_acc = tl.dot(ds_in, k_one, dq_acc, input_precision=PREC, out_dtype=ACC)
            if ATOMIC_DK:
                dk = tl.dot(tl.trans(ds_in), q_one, input_precision=PREC, out_dtype=ACC)
                tl.atomic_add(DK + offs_n[:, None] * D + offs_d[None, :], dk,
                              mask=col_ok[:, None] & dm[None, :], sem="relaxed")
        else:
            # The first key tile stores DQ; the later ones add to what it stored. The load
            # and the store may map elements to different threads: a barrier makes the
            # previous tile's stores visible to every thread of the program. The chunks of
            # one tile touch different columns, so one barrier per tile is enough
            # (TILE_BARRIER); by default it is taken before each chunk.
            if TILE_BARRIER:
                tl.debug_barrier()
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dm = dd < D
                kt = _rows(K, offs_n, col_ok, dd, D, stride_k)
                dq_part = tl.dot(ds_in, kt, input_precision=PREC, out_dtype=ACC)
                dq_ptrs = DQ + offs_m[:, None] * D + dd[None, :]
                io = row_ok[:, None] & dm[None, :]
                if not TILE_BARRIER:
                    tl.debug_barrier()
                old = tl.load(dq_ptrs, mask=io & (t > 0), other=0.0)
                tl.store(dq_ptrs, old + dq_part, mask=io)
                if ATOMIC_DK:
                    qt = _rows(Q, offs_m, row_ok, dd, D, stride_q)
                    dk = tl.dot(tl.trans(ds_in), qt, input_precision=PREC, out_dtype=ACC)
                    tl.atomic_add(DK + offs_n[:, None] * D + dd[None, :], dk,
                                  mask=col_ok[:, None] & dm[None, :], sem="relaxed")
    if ONE_D and GRAD:
        tl.store(DQ + offs_m[:, None] * D + offs_d[None, :], dq_acc,
                 mask=row_ok[:, None] & (offs_d < D)[None, :])
    if SUMS:
        tl.store(R_OUT + offs_m, r_acc, mask=row_ok)
        tl.store(T_OUT + offs_m, t_acc, mask=row_ok)
    if DSHIFT_ON:
        tl.store(DSHIFT + offs_m, dsh_acc, mask=row_ok)


@triton.jit
def _row_w(XR, AR, ER, offs_m, row_ok, HAS_EPS: tl.constexpr):
    """The row side (x, a, e) of the target weights, loaded once per row block."""
    x = tl.load(XR + offs_m, mask=row_ok, other=-1)
    a = tl.load(AR + offs_m, mask=row_ok, other=0.0)
    e = a
    if HAS_EPS:
        e = tl.load(ER + offs_m, mask=row_ok, other=0.0)
    return x, a, e


@triton.jit
def _target_w(x, a, e, YC, BC, FC, offs_n, col_ok, HAS_EPS: tl.constexpr):
    """The target weights of a tile, W_ij = [x_i == y_j] (a_i + b_j) + e_i + f_j
    (docs/DESIGN.md; loss.Targets.weights gives the vectors)."""
    y = tl.load(YC + offs_n, mask=col_ok, other=-2)
    b = tl.load(BC + offs_n, mask=col_ok, other=0.0)
    w = tl.where(x[:, None] == y[None, :], a[:, None] + b[None, :], 0.0)
    if HAS_EPS:
        f = tl.load(FC + offs_n, mask=col_ok, other=0.0)
        w += e[:, None] + f[None, :]
    return w


@triton.jit(do_not_specialize=["N", "M", "SIZE_KEY"])
def lse_grad_kernel(Q, K, SCALE, GMAX, LSE_R, G_R, LSE_C, G_C, XR, AR, ER, YC, BC, FC,
                    OUT, SPARE, DSC, N, M, D, stride_q, stride_k, SIZE_KEY,
                    SELF_MASK: tl.constexpr, HAS_R: tl.constexpr, HAS_C: tl.constexpr,
                    SYM: tl.constexpr, HAS_EPS: tl.constexpr, DS_ON: tl.constexpr,
                    ONE_D: tl.constexpr, HALF_OUT: tl.constexpr, PREC: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, FIN_ROWS: tl.constexpr):
    """The final gradient of the rows of Q, in Q's dtype (module docstring, "low memory")."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scale = tl.load(SCALE)
    gmax = tl.load(GMAX)
    gnorm = 1.0 / gmax
    in_ty = Q.dtype.element_ty
    out_ty = OUT.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    r_loc = tl.arange(0, BLOCK_M)
    # This program's half-block of accumulator rows (HALF_OUT, D chunked).
    B = SPARE + pid.to(tl.int64) * (BLOCK_M // 2) * D
    dsum = tl.zeros((BLOCK_M,), dtype=ACC)
    tiles = tl.cdiv(M, BLOCK_N)
    for rb in range(pid, tl.cdiv(N, BLOCK_M), nprog):
        offs_m = rb * BLOCK_M + r_loc.to(tl.int64)
        r0 = rb * BLOCK_M + tl.zeros((), dtype=tl.int64)
        row_ok = offs_m < N
        rows = tl.minimum(N - r0, BLOCK_M)
        # Without ONE_D the fp32 accumulator of the block lives in memory: its first
        # `a_rows` rows in the block's own output rows (an fp32 row takes two half rows),
        # the others in B.
        A = (OUT + r0 * D).to(tl.pointer_type(ACC))
        a_rows = rows // 2 if HALF_OUT else rows
        in_a = r_loc < a_rows
        if HAS_R:
            lr, gr = _stats(LSE_R, G_R, offs_m, row_ok)
        xr, ar, er = _row_w(XR, AR, ER, offs_m, row_ok, HAS_EPS)
        # Self-contrast: row i also gets the gradient of <q_j, q_i> as entry (j, i), whose
        # weight has the roles of the two sides swapped.
        xs, as_, es = xr, ar, er
        if SYM:
            xs, as_, es = _row_w(YC, BC, FC, offs_m, row_ok, HAS_EPS)
        q_one = tl.zeros((BLOCK_M, BLOCK_D), dtype=in_ty)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
        if ONE_D:
            q_one = _rows(Q, offs_m, row_ok, offs_d, D, stride_q)
        for t in range(0, tiles):
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
            col_ok = offs_n < M
            s, k_one, dot, _ = _s_tile(Q, K, offs_m, offs_n, row_ok, col_ok, N, M, D,
                                       stride_q, stride_k, q_one, scale, XR, YC, SCALE,
                                       SELF_MASK, ONE_D, PREC, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
            valid = s != float("-inf")        # NaN logits stay (and make dS NaN)
            ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            if HAS_R:
                ds += gr[:, None] * tl.exp(s - lr[:, None])
            if HAS_C:
                ds += _ds_cols(s, LSE_C, G_C, offs_n, col_ok, 1.0)
            if DS_ON:
                dsum += tl.sum(tl.where(valid, ds * dot, 0.0), 1)
            w = _target_w(xr, ar, er, YC, BC, FC, offs_n, col_ok, HAS_EPS)
            if SYM:
                w += _target_w(xs, as_, es, XR, AR, ER, offs_n, col_ok, HAS_EPS)
            ds_in = (tl.where(valid, ds * scale + w, 0.0) * gnorm).to(in_ty)
            if ONE_D:
                acc = tl.dot(ds_in, k_one, acc, input_precision=PREC, out_dtype=ACC)
            else:
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + offs_d
                    dm = dd < D
                    kt = _rows(K, offs_n, col_ok, dd, D, stride_k)
                    part = tl.dot(ds_in, kt, input_precision=PREC, out_dtype=ACC)
                    io = row_ok[:, None] & dm[None, :]
                    ma = io & in_a[:, None]
                    mb = io & (r_loc >= a_rows)[:, None]
                    pa = A + r_loc[:, None] * D + dd[None, :]
                    pb = B + (r_loc - a_rows)[:, None] * D + dd[None, :]
                    # The first key tile stores, the later ones add (see lse_bwd_kernel).
                    tl.debug_barrier()
                    old = tl.load(pa, mask=ma & (t > 0), other=0.0) + \
                        tl.load(pb, mask=mb & (t > 0), other=0.0)
                    tl.store(pa, old + part, mask=ma)
                    tl.store(pb, old + part, mask=mb)
        if ONE_D:
            tl.store(OUT + offs_m[:, None] * D + offs_d[None, :], (acc * gmax).to(out_ty),
                     mask=row_ok[:, None] & (offs_d < D)[None, :])
        else:
            # Convert the accumulator to the output dtype in place, rows in chunks [j0, j1)
            # with j1 <= 2 j0 (HALF_OUT): output row j overwrites accumulator row j // 2,
            # which an earlier chunk has already read (row 0: its own earlier D chunks).
            tl.debug_barrier()
            j0 = rows * 0
            while j0 < rows:
                j1 = j0 + FIN_ROWS
                if HALF_OUT:
                    j1 = tl.minimum(j1, tl.maximum(2 * j0, 1))
                j1 = tl.minimum(j1, rows)
                rr = j0 + tl.arange(0, FIN_ROWS)
                fa = (rr < j1) & (rr < a_rows)
                fb = (rr < j1) & (rr >= a_rows)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + offs_d
                    dm = dd < D
                    v = tl.load(A + rr[:, None] * D + dd[None, :], mask=fa[:, None] & dm[None, :],
                                other=0.0) + \
                        tl.load(B + (rr - a_rows)[:, None] * D + dd[None, :],
                                mask=fb[:, None] & dm[None, :], other=0.0)
                    tl.debug_barrier()
                    tl.store(OUT + (r0 + rr)[:, None] * D + dd[None, :], (v * gmax).to(out_ty),
                             mask=(rr < j1)[:, None] & dm[None, :])
                j0 = j1
            tl.debug_barrier()
    if DS_ON:
        tl.store(DSC + pid, tl.sum(dsum, 0))


@triton.jit
def _block_tile(S, Q, K, SCALE, row0, R, M, D, stride_s, stride_q, stride_k,
                SELF_MASK: tl.constexpr, FROM_QK: tl.constexpr, PREC: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_R: tl.constexpr = 1):
    """A tile of the block S = q[row0:row0 + R] k^T, scaled, with invalid entries -inf;
    its local row and global column offsets, its row and column tiles and the number of
    column tiles. FROM_QK=False: read from S (unscaled, rows stride_s apart), on the grid
    (column tiles, row tiles). FROM_QK=True: computed here from Q (the block's rows) and
    K over D in chunks of BLOCK_K, on a 1-D grid that takes the row tiles in groups of
    GROUP_R, each group across all column tiles with its row tiles fastest: the programs
    running together share a few key tiles and GROUP_R row tiles of q, from L2."""
    if FROM_QK:
        n_r = tl.cdiv(R, BLOCK_R)
        n_c = tl.cdiv(M, BLOCK_C)
        pid = tl.program_id(0)
        first = (pid // (GROUP_R * n_c)) * GROUP_R
        size = tl.minimum(n_r - first, GROUP_R)
        pid_r = first + (pid % (GROUP_R * n_c)) % size
        pid_c = (pid % (GROUP_R * n_c)) // size
    else:
        pid_r = tl.program_id(1)
        pid_c = tl.program_id(0)
        n_c = tl.num_programs(0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = offs_r < R
    c_ok = offs_c < M
    valid = r_ok[:, None] & c_ok[None, :]
    if SELF_MASK:
        valid = valid & ((row0 + offs_r)[:, None] != offs_c[None, :])
    scale = tl.load(SCALE)
    if FROM_QK:
        offs_k = tl.arange(0, BLOCK_K)
        qp = Q + offs_r[:, None].to(tl.int64) * stride_q + offs_k[None, :]
        kp = K + offs_c[:, None] * stride_k + offs_k[None, :]
        x = tl.zeros((BLOCK_R, BLOCK_C), dtype=SCALE.dtype.element_ty)
        for d0 in range(0, D, BLOCK_K):
            dm = (d0 + offs_k) < D
            a = tl.load(qp + d0, mask=r_ok[:, None] & dm[None, :], other=0.0)
            b = tl.load(kp + d0, mask=c_ok[:, None] & dm[None, :], other=0.0)
            x = tl.dot(a, tl.trans(b), x, input_precision=PREC, out_dtype=SCALE.dtype.element_ty)
    else:
        x = tl.load(S + offs_r[:, None].to(tl.int64) * stride_s + offs_c[None, :], mask=valid,
                    other=0.0)
    return tl.where(valid, x * scale, float("-inf")), offs_r, offs_c, pid_r, pid_c, n_c


@triton.jit(do_not_specialize=["row0", "R", "M"])
def block_stats_kernel(S, Q, K, SCALE, ROW_PART, COL_PART, row0, R, M, D, stride_s, stride_q,
                       stride_k, SELF_MASK: tl.constexpr, COLS: tl.constexpr,
                       FROM_QK: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_R: tl.constexpr = 1):
    """Blocked forward: one (BLOCK_R, BLOCK_C) tile of a row block's S (_block_tile) gives
    each row's log-sum-exp over the tile's columns (ROW_PART[r, tile], R x column tiles)
    and, with COLS, each column's over the tile's rows (COL_PART[row tile, c], row tiles
    x M)."""
    s, offs_r, offs_c, pid_r, pid_c, n_c = _block_tile(
        S, Q, K, SCALE, row0, R, M, D, stride_s, stride_q, stride_k, SELF_MASK, FROM_QK,
        PREC, BLOCK_R, BLOCK_C, BLOCK_K, GROUP_R)
    m = tl.max(s, 1)
    m_sh = tl.where(m == float("-inf"), 0.0, m)
    rl = _finish(m_sh, tl.sum(tl.exp(s - m_sh[:, None]), 1))
    tl.store(ROW_PART + offs_r.to(tl.int64) * n_c + pid_c, rl, mask=offs_r < R)
    if COLS:
        cm = tl.max(s, 0)
        cm_sh = tl.where(cm == float("-inf"), 0.0, cm)
        cl = _finish(cm_sh, tl.sum(tl.exp(s - cm_sh[None, :]), 0))
        tl.store(COL_PART + pid_r.to(tl.int64) * M + offs_c, cl, mask=offs_c < M)


@triton.jit(do_not_specialize=["row0", "R", "M"])
def block_ds_kernel(S, Q, K, DS, SCALE, GNORM, LSE_R, G_R, LSE_C, G_C, row0, R, M, D,
                    stride_s, stride_q, stride_k, SELF_MASK: tl.constexpr, HAS_R: tl.constexpr,
                    HAS_C: tl.constexpr, FROM_QK: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_R: tl.constexpr = 1):
    """Blocked backward: dS of one tile of a row block (_block_tile), divided by max|g|
    (GNORM) and cast to DS's dtype (rows stride_s apart) for the dq and dk GEMMs."""
    s, offs_r, offs_c, pid_r, pid_c, n_c = _block_tile(
        S, Q, K, SCALE, row0, R, M, D, stride_s, stride_q, stride_k, SELF_MASK, FROM_QK,
        PREC, BLOCK_R, BLOCK_C, BLOCK_K, GROUP_R)
    gnorm = tl.load(GNORM)
    r_ok = offs_r < R
    c_ok = offs_c < M
    ds = tl.zeros((BLOCK_R, BLOCK_C), dtype=SCALE.dtype.element_ty)
    if HAS_R:
        lr, gr = _stats(LSE_R, G_R, row0 + offs_r, r_ok)
        ds += (gr * gnorm)[:, None] * tl.exp(s - lr[:, None])
    if HAS_C:
        ds += _ds_cols(s, LSE_C, G_C, offs_c, c_ok, gnorm)
    tl.store(DS + offs_r[:, None].to(tl.int64) * stride_s + offs_c[None, :],
             ds.to(DS.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["row0", "R", "M"])
def block_siglip_kernel(S, Q, K, DS, SCALE, BIAS, GNORM, G_R, ROW_SP, ROW_SG, RID, CID, row0, R,
                        M, D, stride_s, stride_q, stride_k, HAS_G: tl.constexpr, SUMS: tl.constexpr,
                        GRAD: tl.constexpr, FROM_QK: tl.constexpr, KEY_IDS: tl.constexpr,
                        PREC: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_R: tl.constexpr = 1):
    """Blocked sigmoid loss: one tile of a row block's S (_block_tile), z = scale * S +
    bias, positives where RID[row0 + r] == CID[c] (KEY_IDS=False: == c, each key's id its
    index, and CID is not read: fewer registers). SUMS: each row's sums of the losses and
    of dz over the tile's columns (_siglip_term; ROW_SP and ROW_SG [r, tile], R x column
    tiles). GRAD: dS = g_r[i] dz (g absent: 1) divided by max|g| (GNORM), cast to DS's
    dtype (rows stride_s apart)."""
    s, offs_r, offs_c, pid_r, pid_c, n_c = _block_tile(
        S, Q, K, SCALE, row0, R, M, D, stride_s, stride_q, stride_k, False, FROM_QK, PREC,
        BLOCK_R, BLOCK_C, BLOCK_K, GROUP_R)
    r_ok = offs_r < R
    rid = tl.load(RID + row0 + offs_r, mask=r_ok, other=-3)
    if KEY_IDS:
        cid = tl.load(CID + offs_c, mask=offs_c < M, other=-2)
    else:
        cid = offs_c
    # entries past R or M are -inf and not positive: loss and dz 0 there
    sp, sg = _siglip_term(s + tl.load(BIAS), rid[:, None] == cid[None, :])
    if SUMS:
        part = offs_r.to(tl.int64) * n_c + pid_c
        tl.store(ROW_SP + part, tl.sum(sp, 1), mask=r_ok)
        tl.store(ROW_SG + part, tl.sum(sg, 1), mask=r_ok)
    if GRAD:
        g = tl.load(GNORM)
        if HAS_G:
            ds = (tl.load(G_R + row0 + offs_r, mask=r_ok, other=0.0) * g)[:, None] * sg
        else:
            ds = sg * g
        tl.store(DS + offs_r[:, None].to(tl.int64) * stride_s + offs_c[None, :],
                 ds.to(DS.dtype.element_ty), mask=r_ok[:, None] & (offs_c < M)[None, :])


_FWD_KEY = ["SIZE_KEY", "D", "SELF_MASK", "COLS", "ONE_D", "PREC", "BLOCK_M", "BLOCK_D", "SHIFT"]
_BWD_KEY = ["SIZE_KEY", "D", "SELF_MASK", "HAS_R", "HAS_C", "ATOMIC_DK", "ONE_D", "PREC", "BLOCK_D",
            "SIGLIP", "SUMS", "GRAD", "SHIFT", "DSHIFT_ON"]

lse_fwd_tuned = triton.autotune(configs=_fwd_configs(), key=_FWD_KEY)(lse_fwd_kernel)
lse_bwd_tuned = triton.autotune(configs=_bwd_configs(), key=_BWD_KEY, reset_to_zero=["DK"],
                                prune_configs_by={"early_config_prune": _prune_bwd})(lse_bwd_kernel)
