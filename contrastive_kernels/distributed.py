"""Contrastive losses over the GLOBAL batch of a data-parallel job (torch.distributed).

Two modes, same values, same gradients:

``ring_info_nce(query, key, *, group=None, **info_nce_kwargs)``
    Every rank keeps only its own shard. Key blocks (with their key labels) travel
    around the ring by point-to-point messages (``dist.batch_isend_irecv``); the
    transfer of the next block overlaps the compute on the current one. Per-block
    row statistics from the backend merge by an online log-sum-exp.
``gather_info_nce(query, key, *, group=None, **info_nce_kwargs)``
    All-gather with gradient, local queries against all keys (open_clip's
    ``local_loss=True, gather_with_grad=True``), on any backend. Holds all keys.

Without an initialized process group, or with world size 1, both compute the plain
local loss ``contrastive_kernels.info_nce``.

Semantics (the global batch)
----------------------------
The global batch is the concatenation over ranks (in rank order) of the local
queries, and of the local keys. The loss equals ``info_nce`` on that global batch:

* positives: by default the diagonal *within each rank* (query i of rank r <-> key i
  of rank r; with ``key=None`` the two views are stacked within each rank, query i
  <-> query (i + N_r/2) mod N_r of the same rank); ``positive_index`` may be given
  as GLOBAL indices into the concatenated keys (queries for ``key=None``);
  SupCon ``labels``/``key_labels`` are compared across ranks.
* ``key=None`` (NT-Xent / SupCon over the global batch) is supported by the ring
  (the global diagonal is masked); "gather" mode raises a ValueError for it.
* local sizes may differ between ranks (sizes are exchanged first by a small
  all_gather; so are argument errors: if the arguments are invalid on any rank,
  every rank raises instead of waiting forever).

Gradient contract (what makes DDP work)
---------------------------------------
Let ``L`` be the loss over the global batch and ``P`` the world size. Rank r returns

* ``reduction="mean"``: ``L_r = P * (sum of rank r's row losses) / (global number of
  rows with a positive)``; with ``symmetric=True`` the column half is over the
  columns *owned by rank r* (its local keys):
  ``L_r = P * (0.5 * rows_r / R + 0.5 * cols_r / C)``. So ``mean_r L_r == L``, and with
  equal shards (and every row having a positive) ``L_r`` is simply the mean of the
  local losses.
* ``reduction="sum"``: rank r's share of the global sum (``sum_r L_r`` = global sum).
* ``reduction="none"``: rank r's rows (and, if symmetric, its columns), each
  weighted 1/2 when symmetric, as ``info_nce`` does.

Backward is *collective* (every rank must call it): the gradient reaching each
rank's query and key is the gradient of ``sum_r L_r`` (all ranks' losses) with
respect to that rank's embeddings. A replicated tensor (a learnable
``logit_scale``/``logit_bias``) gets on each rank a share, and the shares sum to the
gradient of ``sum_r L_r``: nothing is multiplied by P or counted twice. So under DDP,
which averages gradients over the P ranks, a training step equals a
single-process step on the concatenated batch with the global mean loss ``L``.

What travels (ring)
-------------------
The loss splits as in ``contrastive_kernels.loss``: row LSEs, and terms linear in
S = s q k^T. The linear part is written with raw dot products of the local rows

    A_i = sum_j pos_ij <q_i, k_j>,  P_i = #positives,  B_i = sum_j valid_ij <q_i, k_j>

(A for the positives, B for label smoothing) and the same for the columns. All of
them add up block by block, so positives held by other ranks (global
``positive_index``, SupCon classes across ranks) are handled while their blocks
pass: a block contributes via an index gather (positive_index) or per-class sums
of its keys, O((N + M) D). Forward: a key block (and its labels) travels one turn;
with ``symmetric`` it carries its partial column statistics (LSE, A, B, P) and
arrives home with them complete. Backward: the key block travels again with its
owner's column statistics and column gradients; its dk accumulator (LSE part and
linear part) travels with it and arrives at the owner after one full turn. A rank
holds its own shard plus at most two remote key blocks (the current one and the
next one in flight); ``RING_STATS`` records the peak.
"""
import dataclasses

import torch
import torch.distributed as dist

from . import backends
from ._validate import FLOAT_DTYPES, REDUCTIONS, _check_int_vector, check_inputs
from .loss import info_nce, not_traced

__all__ = ["ring_info_nce", "gather_info_nce", "RING_STATS", "reset_ring_stats"]

# Peaks over every ring pass since the last reset_ring_stats():
#   remote_key_blocks: remote key blocks held at once (the bound is 2);
#   dk_buffers: remote-block-sized gradient accumulators held at once in backward
#               (incoming, outgoing and this rank's contribution: at most 3).
RING_STATS = {"remote_key_blocks": 0, "dk_buffers": 0, "passes": 0}


def reset_ring_stats():
    for name in RING_STATS:
        RING_STATS[name] = 0


class _Counter:
    def __init__(self, name):
        self.name, self.live = name, 0

    def acquire(self):
        self.live += 1
        RING_STATS[self.name] = max(RING_STATS[self.name], self.live)

    def release(self, n=1):
        self.live -= n


def _process_group_size(group):
    """World size of `group`, or None when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_world_size(group)


def _comm_device(group, dev):
    if dist.get_backend(group) == "nccl":
        return dev if dev.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _global_rank(group, r):
    return r if group is None else dist.get_global_rank(group, r)


# ----------------------------------------------------------------------------- set-up

@dataclasses.dataclass
class _Setup:
    p: object              # Problem: the local shard, with a GLOBAL positive_index
    world: int
    rank: int
    sizes_n: list          # local query rows per rank
    sizes_m: list          # local key rows per rank (= sizes_n for key=None)
    offs_n: list
    offs_m: list
    group: object
    dev: torch.device
    any_key_grad: bool = True   # some rank's keys need a gradient (the dk ring must run)

    @property
    def n_global(self):
        return sum(self.sizes_n)

    @property
    def m_global(self):
        return sum(self.sizes_m)


def _raise_together(err, group, world, cdev, what):
    """Every rank raises if `err` is set on any rank (its own error where it has one)."""
    flag = torch.tensor([0 if err is None else 1], dtype=torch.int64, device=cdev)
    flags = [torch.empty_like(flag) for _ in range(world)]
    dist.all_gather(flags, flag, group=group)
    bad = [r for r, f in enumerate(flags) if int(f)]
    if err is not None:
        raise err
    if bad:
        raise ValueError(f"{what}: invalid arguments on rank(s) {bad} (see the error raised "
                         f"there); every rank raises so that none waits forever")


def _setup(what, query, key, group, world, positive_index, labels, key_labels, temperature,
           logit_scale, logit_bias, symmetric, label_smoothing, reduction, allow_self=True):
    rank = dist.get_rank(group)
    # 1. check the local shard, without raising yet (the other ranks must hear of it).
    err, p, mode = None, None, 0
    try:
        if positive_index is not None and labels is None and _is_matrix(query):
            # A global positive_index: let check_inputs check everything else (dummy
            # labels skip its local range check); the index is checked below.
            mode = 1
            z = torch.zeros(query.shape[0], dtype=torch.int64, device=query.device)
            zk = (torch.zeros(key.shape[0], dtype=torch.int64, device=query.device)
                  if _is_matrix(key) else None)
            p = check_inputs(query, key, None, z, zk, temperature, logit_scale, logit_bias,
                             symmetric, label_smoothing, reduction)
            pi = _check_int_vector("positive_index", positive_index, query.shape[0],
                                   "query rows", query.device)
            p = dataclasses.replace(p, positive_index=pi, labels=None, key_labels=None)
        else:
            p = check_inputs(query, key, positive_index, labels, key_labels, temperature,
                             logit_scale, logit_bias, symmetric, label_smoothing, reduction)
            mode = 2 if p.labels is not None else 0
    except (TypeError, ValueError) as e:
        err, p = e, None
    cdev = _comm_device(group, query.device if torch.is_tensor(query) else torch.device("cpu"))
    if p is None:
        row = [0] * 10
    else:
        n, d = p.query.shape
        m = n if p.self_contrast else p.key.shape[0]
        keys = p.query if p.self_contrast else p.key
        row = [1, n, m, d, FLOAT_DTYPES.index(p.query.dtype), int(p.self_contrast), mode,
               int(p.symmetric), REDUCTIONS.index(p.reduction), int(keys.requires_grad)]
    mine = torch.tensor(row, dtype=torch.int64, device=cdev)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    table = [t.tolist() for t in table]
    bad = [r for r, t in enumerate(table) if not t[0]]
    if err is not None:
        raise err
    if bad:
        raise ValueError(f"{what}: invalid arguments on rank(s) {bad} (see the error raised "
                         f"there); every rank raises so that none waits forever")
    # 2. global checks: every rank sees the same table and raises the same error.
    names = {3: "embedding dim", 4: "dtype", 5: "key=None (self-contrast)",
             6: "the kind of positives (default / positive_index / labels)",
             7: "symmetric", 8: "reduction"}
    for col, name in names.items():
        vals = [t[col] for t in table]
        if len(set(vals)) > 1:
            if col == 4:
                vals = [FLOAT_DTYPES[v] for v in vals]
            raise ValueError(f"{what}: {name} must be the same on every rank, got {vals} "
                             f"(by rank)")
    sizes_n = [t[1] for t in table]
    sizes_m = [t[2] for t in table]
    if p.self_contrast and not allow_self:
        raise ValueError(f"{what}: key=None (self-contrast) is not supported in 'gather' "
                         f"mode; use distributed='ring'")
    if p.symmetric and mode == 1 and sum(sizes_n) != sum(sizes_m):
        raise ValueError(f"{what}: symmetric=True with positive_index needs as many keys as "
                         f"queries in the global batch, got {sum(sizes_n)} queries and "
                         f"{sum(sizes_m)} keys")
    offs_n = [sum(sizes_n[:r]) for r in range(world)]
    offs_m = [sum(sizes_m[:r]) for r in range(world)]
    # 3. the positive_index in global terms.
    err = None
    n, m_glob = sizes_n[rank], sum(sizes_m)
    if mode == 0 and p.labels is None:
        off = offs_n[rank] if p.self_contrast else offs_m[rank]
        p = dataclasses.replace(p, positive_index=p.positive_index + off)
    elif mode == 1:
        pi = p.positive_index
        lo, hi = int(pi.min()), int(pi.max())
        if lo < 0 or hi >= m_glob:
            err = ValueError(f"positive_index values must be in [0, {m_glob}) (global indices "
                             f"into the keys of all ranks), got range [{lo}, {hi}]")
        elif p.self_contrast and bool((pi == torch.arange(n, device=pi.device)
                                       + offs_n[rank]).any()):
            err = ValueError("positive_index must not point a query at itself when key is None "
                             "(global indices)")
        _raise_together(err, group, world, cdev, what)
    # A key block's dk gathers every rank's share on its way round the ring: if any rank
    # trains its keys, every rank takes part (and one whose keys are frozen drops its own).
    any_key_grad = any(t[9] for t in table)
    return _Setup(p, world, rank, sizes_n, sizes_m, offs_n, offs_m, group, cdev, any_key_grad)


def _is_matrix(x):
    return torch.is_tensor(x) and x.dim() == 2


def _finish(st, row, row_ok, col, col_ok):
    """The per-rank loss of the contract from the local row (and column) losses."""
    p = st.p
    if p.reduction == "none":
        return row if col is None else torch.cat([0.5 * row, 0.5 * col])
    if p.reduction == "sum":
        return row.sum() if col is None else 0.5 * row.sum() + 0.5 * col.sum()
    cnt = torch.stack([row_ok.sum(), row_ok.sum() if col_ok is None else col_ok.sum()])
    cnt = cnt.to(st.dev)
    dist.all_reduce(cnt, group=st.group)
    cnt = cnt.to(row.device).clamp_min(1).to(row.dtype)
    loss = row.sum() / cnt[0]
    if col is not None:
        loss = 0.5 * loss + 0.5 * col.sum() / cnt[1]
    return st.world * loss


# ----------------------------------------------------------------------------- ring

@dataclasses.dataclass
class _Plan:
    st: _Setup
    backend: object
    cols: bool             # column statistics (symmetric)
    overlap: bool
    s: float = 0.0

    @property
    def next(self):
        return _global_rank(self.st.group, (self.st.rank + 1) % self.st.world)

    @property
    def prev(self):
        return _global_rank(self.st.group, (self.st.rank - 1) % self.st.world)


def _exchange(plan, sends, recvs):
    """Start sends to the next rank and receives from the previous one (same order on
    both sides); returns the requests."""
    ops = [dist.P2POp(dist.isend, t, plan.next, plan.st.group) for t in sends]
    ops += [dist.P2POp(dist.irecv, t, plan.prev, plan.st.group) for t in recvs]
    # interleave as send, recv pairs so both ends post in the same order
    ops = [op for pair in zip(ops[:len(sends)], ops[len(sends):]) for op in pair]
    reqs = dist.batch_isend_irecv(ops) if ops else []
    if not plan.overlap:
        _wait(reqs)
        return []
    return reqs


def _wait(reqs):
    for r in reqs:
        r.wait()


def _classes(lab_q, lab_k):
    ids, inv = torch.unique(torch.cat([lab_q, lab_k]), return_inverse=True)
    return ids.numel(), inv[:lab_q.numel()], inv[lab_q.numel():]


def _class_sum(x, idx, c):
    return torch.zeros(c, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, idx, x)


def _pi_pairs(pi, off, mb):
    """(local rows i, block rows j) of the positives that lie in the block [off, off+mb)."""
    i = torch.nonzero((pi >= off) & (pi < off + mb)).flatten()
    return i, pi[i] - off


def _block_forward(plan, q, kb, lab_b, owner, self_mask):
    """Row stats (lse, A, B, P) of the local queries against block kb, and the block's
    column stats (M_b, 4) over the local queries (if plan.cols)."""
    p, acc = plan.st.p, q.dtype if q.dtype == torch.float64 else torch.float32
    lse_r, lse_c = plan.backend.lse_forward(q, kb, plan.s, self_mask, plan.cols)
    qf, kf = q.to(acc), kb.to(acc)
    b_r = qf @ kf.sum(0)
    b_c = kf @ qf.sum(0) if plan.cols else None
    diag = (qf * kf).sum(1) if self_mask else None
    if p.labels is not None:
        c, rid, cid = _classes(p.labels, lab_b)
        a_r = (qf * _class_sum(kf, cid, c)[rid]).sum(1)
        n_r = torch.bincount(cid, minlength=c)[rid].to(acc)
        if plan.cols:
            a_c = (kf * _class_sum(qf, rid, c)[cid]).sum(1)
            n_c = torch.bincount(rid, minlength=c)[cid].to(acc)
        if self_mask:  # a row's own label always matches: drop the diagonal
            a_r, n_r = a_r - diag, n_r - 1
            if plan.cols:
                a_c, n_c = a_c - diag, n_c - 1
    else:
        i, j = _pi_pairs(p.positive_index, plan.st.offs_m[owner], kb.shape[0])
        dots = (qf[i] * kf[j]).sum(1)
        a_r = torch.zeros_like(b_r).index_put_((i,), dots)
        n_r = torch.zeros_like(b_r).index_put_((i,), torch.ones_like(dots))
        if plan.cols:
            a_c = torch.zeros(kb.shape[0], dtype=acc, device=q.device).index_add_(0, j, dots)
            n_c = torch.zeros_like(a_c).index_add_(0, j, torch.ones_like(dots))
    if self_mask:
        b_r = b_r - diag
        if plan.cols:
            b_c = b_c - diag
    col = torch.stack([lse_c, a_c, b_c, n_c], 1) if plan.cols else None
    return (lse_r, a_r, b_r, n_r), col


def _merge_cols(x, y):
    out = x + y
    out[:, 0] = torch.logaddexp(x[:, 0], y[:, 0])
    return out


def _ring_forward(plan, q, k, key_labels):
    st, p = plan.st, plan.st.p
    world, rank = st.world, st.rank
    acc = q.dtype if q.dtype == torch.float64 else torch.float32
    n = q.shape[0]
    lse = torch.full((n,), float("-inf"), dtype=acc, device=q.device)
    a, b, cnt = (torch.zeros(n, dtype=acc, device=q.device) for _ in range(3))
    blocks = _Counter("remote_key_blocks")
    cur_k, cur_lab, col_prev = k, key_labels, None
    for t in range(world):
        owner, nxt = (rank - t) % world, (rank - t - 1) % world
        sends, recvs = [], []
        if t < world - 1:
            nk = q.new_empty(st.sizes_m[nxt], q.shape[1], dtype=k.dtype)
            blocks.acquire()
            sends.append(cur_k)
            recvs.append(nk)
            if p.labels is not None:
                nl = torch.empty(st.sizes_m[nxt], dtype=torch.int64, device=q.device)
                sends.append(cur_lab)
                recvs.append(nl)
        col_in = None
        if plan.cols and t > 0:
            # the partial column stats of the block held now, sent by the previous rank
            # after its compute on that block
            col_in = torch.empty(st.sizes_m[owner], 4, dtype=acc, device=q.device)
            sends.append(col_prev)
            recvs.append(col_in)
        reqs = _exchange(plan, sends, recvs)
        (l_b, a_b, b_b, n_b), col = _block_forward(plan, q, cur_k, cur_lab, owner,
                                                   p.self_contrast and t == 0)
        torch.logaddexp(lse, l_b, out=lse)
        a += a_b
        b += b_b
        cnt += n_b
        _wait(reqs)
        if plan.cols:
            col_prev = col if col_in is None else _merge_cols(col_in, col)
        if t > 0:
            blocks.release()
        if t < world - 1:
            cur_k = nk
            cur_lab = nl if p.labels is not None else None
    col_own = None
    if plan.cols:
        # the block held last belongs to the next rank: send its stats home
        col_own = torch.empty(k.shape[0], 4, dtype=acc, device=q.device)
        _wait(_exchange(plan, [col_prev], [col_own]))
    RING_STATS["passes"] += 1
    return (lse, a, b, cnt), col_own


def _block_backward(plan, q, kb, lab_b, owner, self_mask, lse_r, g_r, g_a, g_b, colpack,
                    need_dq=True, need_dk=True):
    """This rank's contribution to dq (LSE part raw, linear part) and to the block's dk;
    a gradient not needed is None (frozen keys: no dk GEMM, no dk buffer)."""
    p, acc = plan.st.p, lse_r.dtype
    if plan.cols:
        lse_c, g_c, g_ac, g_bc = (x.contiguous() for x in colpack.unbind(1))
    dq_raw, dk_raw = plan.backend.lse_backward(q, kb, plan.s, self_mask, lse_r,
                                               lse_c if plan.cols else None, g_r,
                                               g_c if plan.cols else None,
                                               need_dq=need_dq, need_dk=need_dk)
    qf, kf = q.to(acc), kb.to(acc)
    dq = dk = None
    # valid pairs (label smoothing): d/dq_i sum_j (gB_i + gBc_j) <q_i, k_j>
    if need_dq:
        dq = g_b[:, None] * kf.sum(0)
        if plan.cols:
            dq += g_bc @ kf
    if need_dk:
        dk = (g_b @ qf).expand(kb.shape[0], -1).clone()
        if plan.cols:
            dk += g_bc[:, None] * qf.sum(0)
    # the global diagonal (own block under self-contrast) is neither valid nor positive
    diag_c = None
    if self_mask:
        diag_c = g_b + (g_bc if plan.cols else 0)
        if p.labels is not None:  # a row's own label always matches
            diag_c = diag_c + g_a + (g_ac if plan.cols else 0)
    if p.labels is not None:
        c, rid, cid = _classes(p.labels, lab_b)
        if need_dq:
            dq += g_a[:, None] * _class_sum(kf, cid, c)[rid]
            if plan.cols:
                dq += _class_sum(g_ac[:, None] * kf, cid, c)[rid]
        if need_dk:
            dk += _class_sum(g_a[:, None] * qf, rid, c)[cid]
            if plan.cols:
                dk += g_ac[:, None] * _class_sum(qf, rid, c)[cid]
    else:
        i, j = _pi_pairs(p.positive_index, plan.st.offs_m[owner], kb.shape[0])
        w = g_a[i] + (g_ac[j] if plan.cols else 0)
        if need_dq:
            dq.index_add_(0, i, w[:, None] * kf[j])
        if need_dk:
            dk.index_add_(0, j, w[:, None] * qf[i])
    if self_mask:
        if need_dq:
            dq -= diag_c[:, None] * kf
        if need_dk:
            dk -= diag_c[:, None] * qf
    return dq_raw, dq, (dk_raw * plan.s + dk) if need_dk else None


def _ring_backward(plan, q, k, key_labels, lse_r, lse_c, g_r, g_a, g_b, g_c, g_ac, g_bc,
                   need_dq=True, need_dk=True):
    """(dq_raw, dq_lin, dk) of this rank; without need_dk (frozen keys) no dk accumulator
    is made or sent, without need_dq no dq."""
    st, p = plan.st, plan.st.p
    world, rank = st.world, st.rank
    acc = lse_r.dtype
    dq_raw = dq_lin = None
    if need_dq:
        dq_raw = torch.zeros(q.shape[0], q.shape[1], dtype=acc, device=q.device)
        dq_lin = torch.zeros_like(dq_raw)
    blocks, bufs = _Counter("remote_key_blocks"), _Counter("dk_buffers")
    cur_k, cur_lab = k, key_labels
    cur_pack = torch.stack([lse_c, g_c, g_ac, g_bc], 1) if plan.cols else None
    dk_prev = None
    for t in range(world):
        owner, nxt = (rank - t) % world, (rank - t - 1) % world
        sends, recvs = [], []
        if t < world - 1:
            mn = st.sizes_m[nxt]
            nk = q.new_empty(mn, q.shape[1], dtype=k.dtype)
            blocks.acquire()
            sends.append(cur_k)
            recvs.append(nk)
            if p.labels is not None:
                nl = torch.empty(mn, dtype=torch.int64, device=q.device)
                sends.append(cur_lab)
                recvs.append(nl)
            if plan.cols:
                npack = torch.empty(mn, 4, dtype=acc, device=q.device)
                sends.append(cur_pack)
                recvs.append(npack)
        dk_in = None
        if t > 0 and need_dk:
            # the dk accumulator of the block held now, from the previous rank
            dk_in = torch.empty(st.sizes_m[owner], q.shape[1], dtype=acc, device=q.device)
            bufs.acquire()
            sends.append(dk_prev)
            recvs.append(dk_in)
        reqs = _exchange(plan, sends, recvs)
        dq_b, dql_b, dk_b = _block_backward(plan, q, cur_k, cur_lab, owner,
                                            p.self_contrast and t == 0,
                                            lse_r, g_r, g_a, g_b, cur_pack, need_dq, need_dk)
        if need_dk:
            bufs.acquire()
        if need_dq:
            dq_raw += dq_b
            dq_lin += dql_b
        _wait(reqs)
        if dk_prev is not None:
            bufs.release()  # sent
        if dk_in is not None:
            dk_b += dk_in
            bufs.release()
            del dk_in
        dk_prev = dk_b
        if t > 0:
            blocks.release()
        if t < world - 1:
            cur_k = nk
            cur_lab = nl if p.labels is not None else None
            cur_pack = npack if plan.cols else None
    if not need_dk:
        return dq_raw, dq_lin, None
    # the accumulator held last belongs to the next rank: one more hop brings it home
    dk = torch.empty(k.shape[0], k.shape[1], dtype=acc, device=q.device)
    _wait(_exchange(plan, [dk_prev], [dk]))
    return dq_raw, dq_lin, dk


class _RingStats(torch.autograd.Function):
    """(q, k, scale) -> row stats (lse, A, B, P) of the local queries against ALL keys, and
    column stats of the local keys against ALL queries (empty unless symmetric)."""

    @staticmethod
    def forward(ctx, q, k, scale, plan, key_labels):
        plan.s = float(scale)
        (lse, a, b, cnt), col = _ring_forward(plan, q, k, key_labels)
        if col is None:
            col = lse.new_zeros(0, 4)
        lse_c, a_c, b_c, n_c = (x.contiguous() for x in col.unbind(1))
        ctx.save_for_backward(q, k, scale, lse, lse_c)
        ctx.plan, ctx.key_labels = plan, key_labels
        ctx.mark_non_differentiable(cnt, n_c)
        return lse, a, b, cnt, lse_c, a_c, b_c, n_c

    @staticmethod
    def backward(ctx, g_r, g_a, g_b, _g_n, g_c, g_ac, g_bc, _g_nc):
        q, k, scale, lse, lse_c = ctx.saved_tensors
        plan = ctx.plan

        def z(g, like):
            return torch.zeros_like(like) if g is None else g.to(like.dtype).contiguous()

        g_r, g_a, g_b = z(g_r, lse), z(g_a, lse), z(g_b, lse)
        g_c, g_ac, g_bc = z(g_c, lse_c), z(g_ac, lse_c), z(g_bc, lse_c)
        # Frozen keys (a locked tower, a memory bank) skip dk and its ring traffic when they
        # are frozen on every rank; the scale's gradient is read off dq_raw. (Under
        # self-contrast k is q: both wanted.)
        need_dk = plan.st.any_key_grad
        need_dq = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        dq_raw, dq_lin, dk = _ring_backward(plan, q, k, ctx.key_labels, lse, lse_c,
                                            g_r, g_a, g_b, g_c, g_ac, g_bc, need_dq, need_dk)
        # this rank's share of dL/ds = sum_ij dS_ij <q_i, k_j>: its rows
        ds = (q.to(lse.dtype) * dq_raw).sum().to(scale.dtype) if ctx.needs_input_grad[2] else None
        dq = (dq_raw * plan.s + dq_lin).to(q.dtype) if ctx.needs_input_grad[0] else None
        dk = dk.to(k.dtype) if ctx.needs_input_grad[1] else None
        return dq, dk, ds, None, None


@not_traced
def ring_info_nce(query, key=None, *, group=None, positive_index=None, labels=None,
                  key_labels=None, temperature=None, logit_scale=None, logit_bias=None,
                  symmetric=False, label_smoothing=0.0, reduction="mean", backend="auto",
                  overlap=True):
    """`info_nce` over the global batch by a ring of point-to-point transfers.

    Same keyword arguments as `contrastive_kernels.info_nce`, plus `group` (default:
    the default process group) and `overlap` (False: wait for each transfer before
    computing; for benchmarks). See the module docstring for the semantics and the
    gradient contract. Collective: every rank of `group` must call it (and backward).
    """
    kwargs = dict(positive_index=positive_index, labels=labels, key_labels=key_labels,
                  temperature=temperature, logit_scale=logit_scale, logit_bias=logit_bias,
                  symmetric=symmetric, label_smoothing=label_smoothing, reduction=reduction,
                  backend=backend)
    world = _process_group_size(group)
    if world is None or world == 1:
        return info_nce(query, key, **kwargs)
    kwargs.pop("backend")
    st = _setup("ring_info_nce", query, key, group, world, **kwargs)
    p = st.p
    be = backends.get_backend(backend, p.query.device)
    q = p.query.contiguous()
    k = q if p.self_contrast else p.key.contiguous()
    kl = None
    if p.labels is not None:
        kl = (p.labels if p.self_contrast else p.key_labels).contiguous()
    acc = p.out_dtype
    scale_t = p.scale if torch.is_tensor(p.scale) else torch.tensor(p.scale, dtype=acc,
                                                                    device=q.device)
    plan = _Plan(st, be, cols=p.symmetric, overlap=overlap)
    lse, a, b, cnt, lse_c, a_c, b_c, n_c = _RingStats.apply(q, k, scale_t, plan, kl)
    s, bias, eps = p.scale, p.bias, p.label_smoothing
    sub = 1 if p.self_contrast else 0
    zero = lse.new_zeros(())

    def side(l, a_, b_, n_, nvalid):
        ok = n_ > 0
        tgt = (1 - eps) * a_ / n_.clamp_min(1)
        if eps:
            tgt = tgt + eps * b_ / max(nvalid - sub, 1)
        # the bias cancels but keeps its (zero) gradient, as in info_nce
        return torch.where(ok, (l + bias) - (s * tgt + bias), zero), ok

    row, row_ok = side(lse, a, b, cnt, st.m_global)
    col = col_ok = None
    if p.symmetric:
        col, col_ok = side(lse_c, a_c, b_c, n_c, st.n_global)
    return _finish(st, row, row_ok, col, col_ok)


# ----------------------------------------------------------------------------- gather

class _AllGather(torch.autograd.Function):
    """Concatenation over ranks of x (rows may differ); backward sums the gradients of
    every rank's copy (all_reduce) and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, st, sizes):
        ctx.st, ctx.sizes, ctx.device_ = st, sizes, x.device
        return _gather_rows(x, st, sizes)

    @staticmethod
    def backward(ctx, g):
        st, sizes = ctx.st, ctx.sizes
        g = g.contiguous().to(st.dev)
        dist.all_reduce(g, group=st.group)
        off = sum(sizes[:st.rank])
        return g[off:off + sizes[st.rank]].to(ctx.device_), None, None


def _gather_rows(x, st, sizes):
    mx = max(sizes)
    pad = x.new_zeros((mx,) + tuple(x.shape[1:])).to(st.dev)
    pad[:x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(st.world)]
    dist.all_gather(parts, pad, group=st.group)
    return torch.cat([t[:n] for t, n in zip(parts, sizes)]).to(x.device)


@not_traced
def gather_info_nce(query, key=None, *, group=None, positive_index=None, labels=None,
                    key_labels=None, temperature=None, logit_scale=None, logit_bias=None,
                    symmetric=False, label_smoothing=0.0, reduction="mean", backend="auto"):
    """`info_nce` over the global batch by an all-gather (with gradient) of the keys.

    Local queries against all keys (and, if symmetric, local keys against all queries),
    on any backend; memory O(global batch * D). key=None is not supported (ValueError
    on every rank). Same contract as `ring_info_nce`.
    """
    kwargs = dict(positive_index=positive_index, labels=labels, key_labels=key_labels,
                  temperature=temperature, logit_scale=logit_scale, logit_bias=logit_bias,
                  symmetric=symmetric, label_smoothing=label_smoothing, reduction=reduction)
    world = _process_group_size(group)
    if world is None or world == 1:
        return info_nce(query, key, backend=backend, **kwargs)
    st = _setup("gather_info_nce", query, key, group, world, allow_self=False, **kwargs)
    p = st.p
    common = dict(temperature=temperature, logit_scale=logit_scale, logit_bias=logit_bias,
                  symmetric=False, label_smoothing=label_smoothing, reduction="none",
                  backend=backend)
    k_all = _AllGather.apply(p.key, st, st.sizes_m)
    if p.labels is not None:
        kl_all = _gather_rows(p.key_labels, st, st.sizes_m)
        row = info_nce(p.query, k_all, labels=p.labels, key_labels=kl_all, **common)
        row_ok = torch.isin(p.labels, kl_all)
    else:
        row = info_nce(p.query, k_all, positive_index=p.positive_index, **common)
        row_ok = torch.ones_like(row, dtype=torch.bool)
    col = col_ok = None
    if p.symmetric:
        q_all = _AllGather.apply(p.query, st, st.sizes_n)
        if p.labels is not None:
            ql_all = _gather_rows(p.labels, st, st.sizes_n)
            col_lab, q_lab = p.key_labels, ql_all
        else:
            # column j's positives are the queries i with positive_index[i] == j: as labels
            dev = p.key.device
            col_lab = torch.arange(st.sizes_m[st.rank], device=dev) + st.offs_m[st.rank]
            q_lab = _gather_rows(p.positive_index, st, st.sizes_n)
        col = info_nce(p.key, q_all, labels=col_lab, key_labels=q_lab, **common)
        col_ok = torch.isin(col_lab, q_lab)
    return _finish(st, row, row_ok, col, col_ok)
