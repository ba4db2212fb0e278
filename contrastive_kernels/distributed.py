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
The ring runs the same stages as the local loss (contrastive_kernels.engine): per key
block, the backend's log-sum-exps and the target statistics (A, P, B per row: the
positives' dot products, their count, and with label smoothing the valid dot products;
targets.Targets), which add up block by block, so positives held by other ranks (global
``positive_index``, SupCon classes across ranks) are counted while their blocks pass.
Forward: a key block (and its labels) travels one turn; with ``symmetric`` it carries
its partial column statistics and arrives home with them complete. Backward: the key
block travels again with its owner's column statistics and gradients; its dk
accumulator travels with it and arrives at the owner after one full turn (in the input
dtype with ``low_memory=True``, float32 otherwise). A rank holds its own shard plus at
most two remote key blocks (the current one and the next one in flight); ``RING_STATS``
records the peak.
"""
import dataclasses
from typing import Any, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import engine
from .backends import REGISTRY, Call
from .loss import (check_variant_options, info_nce, linear_teacher_dots, op_inputs,
                   positive_shift, siglip_loss, siglip_options, teacher_operands)
from .options import make_options
from .problem import (FLOAT_DTYPES, REDUCTIONS, SIGLIP_BIAS, SIGLIP_SCALE, check_inputs,
                      WEIGHTINGS, check_siglip, check_values, warn_once)
from .targets import Targets

__all__ = ["ring_info_nce", "gather_info_nce", "ring_siglip_loss", "gather_siglip_loss",
           "RING_STATS", "reset_ring_stats"]

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


def _process_group_size(group, what):
    """World size of `group`, or None (warned once) when torch.distributed is not
    initialized: the loss is then this process's local loss."""
    if not (dist.is_available() and dist.is_initialized()):
        warn_once("no process group", f"contrastive_kernels: {what} without an initialized "
                  f"torch.distributed process group computes the local loss of this "
                  f"process's batch (call torch.distributed.init_process_group first for "
                  f"the global batch)")
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
    any_grad: bool = False      # some rank needs a gradient (the sigmoid loss's schedule)

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
           logit_scale, logit_bias, symmetric, label_smoothing, reduction, margin=0.0,
           decoupled=False, teacher=None, teacher_logit_scale=None, teacher_weight=1.0,
           teacher_weighting="softmax", allow_self=True, options=None):
    def check():        # the options too: a bad one on any rank raises on every rank
        p = check_inputs(query, key, positive_index, labels, key_labels, temperature,
                         logit_scale, logit_bias, symmetric, label_smoothing, reduction,
                         global_index=True, margin=margin, decoupled=decoupled,
                         teacher=teacher, teacher_logit_scale=teacher_logit_scale,
                         teacher_weight=teacher_weight, teacher_weighting=teacher_weighting)
        if options is not None:
            check_variant_options(p, options)
        if p.teacher is not None and what.startswith("gather"):
            raise ValueError(f"{what}: a teacher is not supported in 'gather' mode; use "
                             f"ring_info_nce")
        if p.per_row and p.symmetric and (what.startswith("gather") or p.margin):
            # a column's target needs its positive rows' scales, held by other ranks
            raise ValueError(f"{what}: a per-query temperature with symmetric=True is not "
                             f"supported{' with a margin' if p.margin else ''} here; use "
                             f"{'ring_info_nce' if what.startswith('gather') else 'margin=0'}"
                             f" or symmetric=False")
        return p
    return _agree(what, query, group, world, check, allow_self)


def _bits(x):
    """A float as int64 bits (compared exactly across ranks)."""
    return torch.tensor([float(x)], dtype=torch.float64).view(torch.int64).item()


def _scalar_key(x):
    """(kind, value bits) of a scale or bias: a float, a 0-dim tensor (its value compared
    when on the CPU; on a GPU reading it would sync) or a per-row tensor."""
    if not torch.is_tensor(x):
        return 0, _bits(x)
    if x.dim() == 1:
        return 2, 0
    return 1, (_bits(x.detach()) if x.device.type == "cpu" else 0)


def _agree(what, query, group, world, check, allow_self=True, wants_grad=False):
    """Check the local shard (check() -> Problem), share sizes and settings with one
    all_gather, and raise on every rank if any rank's arguments are bad or disagree.
    wants_grad: this rank needs a gradient (shared as _Setup.any_grad)."""
    rank = dist.get_rank(group)
    # 1. check the local shard, without raising yet (the other ranks must hear of it).
    err, p, mode = None, None, 0
    try:
        p = check()
        mode = 2 if p.labels is not None else (1 if p.index_given else 0)
    except (TypeError, ValueError) as e:
        err, p = e, None
    cdev = _comm_device(group, query.device if torch.is_tensor(query) else torch.device("cpu"))
    if p is None:
        row = [0] * 21
    else:
        n, d = p.query.shape
        keys = p.query if p.self_contrast else p.key
        row = [1, n, p.n_keys, d, FLOAT_DTYPES.index(p.query.dtype), int(p.self_contrast),
               mode, int(p.symmetric), REDUCTIONS.index(p.reduction), int(keys.requires_grad),
               int(wants_grad), _bits(p.margin), int(p.decoupled), _bits(p.label_smoothing),
               *_scalar_key(p.scale), *_scalar_key(p.bias), int(p.teacher is not None),
               _bits(p.teacher_weight), WEIGHTINGS.index(p.teacher_weighting)]
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
             7: "symmetric", 8: "reduction", 11: "margin", 12: "decoupled",
             13: "label_smoothing", 14: "the kind of scale (float / tensor / per-row)",
             15: "the logit scale (1 / temperature)", 16: "the kind of logit_bias",
             17: "logit_bias", 18: "teacher (given or not)", 19: "teacher_weight",
             20: "teacher_weighting"}
    floats = (11, 13, 15, 17, 19)
    for col, name in names.items():
        vals = [t[col] for t in table]
        if len(set(vals)) > 1:
            if col == 4:
                vals = [FLOAT_DTYPES[v] for v in vals]
            if col in floats:
                vals = torch.tensor(vals, dtype=torch.int64).view(torch.float64).tolist()
            if col in (14, 16):
                vals = [("float", "tensor", "per-row tensor")[v] for v in vals]
            if col == 20:
                vals = [WEIGHTINGS[v] for v in vals]
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
    # 3. the positive_index in global terms, and the checks that read data.
    if mode == 0 and p.labels is None:
        off = offs_n[rank] if p.self_contrast else offs_m[rank]
        p = dataclasses.replace(p, positive_index=p.positive_index + off)
    err = None
    try:
        check_values(p.positive_index if mode == 1 else None, sum(sizes_m), offs_n[rank],
                     p.self_contrast, p.scale, p.bias, p.scale_name,
                     where=" (global indices into the keys of all ranks)")
    except ValueError as e:
        err = e
    _raise_together(err, group, world, cdev, what)
    # A key block's dk gathers every rank's share on its way round the ring: if any rank
    # trains its keys, every rank takes part (and one whose keys are frozen drops its own).
    any_key_grad = any(t[9] for t in table)
    return _Setup(p, world, rank, sizes_n, sizes_m, offs_n, offs_m, group, cdev, any_key_grad,
                  any(t[10] for t in table))


# ----------------------------------------------------------------------------- ring

def _pack(cols, rows, acc, device):
    """(lse, A, P, B) of `rows` keys as one (rows, 4) tensor (absent parts: -inf / 0)."""
    out = torch.zeros(rows, 4, dtype=acc, device=device)
    out[:, 0] = float("-inf")
    for i, x in enumerate(cols):
        if x is not None:
            out[:, i] = x
    return out


def _unpack(packed, present):
    return tuple(packed[:, i].contiguous() if ok else None for i, ok in enumerate(present))


def _merge_packed(x, y):
    out = x + y
    out[:, 0] = torch.logaddexp(x[:, 0], y[:, 0])
    return out


class RingBlocks:
    """The ring's key blocks for engine.forward / engine.backward: block t is the one of
    rank (rank - t) mod P; the next one is received while this one is computed."""

    def __init__(self, st, spec, targets, key_labels, overlap, d, dtype, d_grad=None):
        self.st, self.spec, self.targets, self.key_labels = st, spec, targets, key_labels
        self.overlap, self.d, self.dtype = overlap, d, dtype
        # the width of the dk accumulators (the blocks' own width unless a block carries
        # more than the keys: the teacher's passes send [k | tk])
        self.d_grad = d if d_grad is None else d_grad
        self.acc = engine.acc_dtype(dtype)
        # what the column packs hold: lse (from the backend), A, P, B (with smoothing)
        self.present = (spec.cols, True, True, bool(targets.eps))
        self.cols_home = self.dk_home = None

    @property
    def next(self):
        return _global_rank(self.st.group, (self.st.rank + 1) % self.st.world)

    @property
    def prev(self):
        return _global_rank(self.st.group, (self.st.rank - 1) % self.st.world)

    def _exchange(self, sends, recvs):
        """Start sends to the next rank and receives from the previous one (same order on
        both sides); returns the requests."""
        g = self.st.group
        ops = [dist.P2POp(dist.isend, t, self.next, g) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, self.prev, g) for t in recvs]
        # interleave as send, recv pairs so both ends post in the same order
        ops = [op for pair in zip(ops[:len(sends)], ops[len(sends):]) for op in pair]
        reqs = dist.batch_isend_irecv(ops) if ops else []
        if not self.overlap:
            _wait(reqs)
            return []
        return reqs

    def _block(self, t, kb, lab):
        owner = (self.st.rank - t) % self.st.world
        return self.targets.block(kb.shape[0], self.spec.self_mask and t == 0, lab,
                                  self.st.offs_m[owner])

    def _next_block(self, t, cur_k, cur_lab, sends, recvs, counter):
        """Post the transfer of the next key block (and its labels); returns them."""
        if t == self.st.world - 1:
            return None, None
        rows = self.st.sizes_m[(self.st.rank - t - 1) % self.st.world]
        nk = cur_k.new_empty(rows, self.d)
        counter.acquire()
        sends.append(cur_k)
        recvs.append(nk)
        nl = None
        if self.key_labels is not None:
            nl = torch.empty(rows, dtype=torch.int64, device=cur_k.device)
            sends.append(cur_lab)
            recvs.append(nl)
        return nk, nl

    def forward(self, k):
        st, world = self.st, self.st.world
        symmetric = self.targets.cols
        blocks = _Counter("remote_key_blocks")
        cur_k, cur_lab, col_prev = k, self.key_labels, None
        for t in range(world):
            sends, recvs = [], []
            nk, nl = self._next_block(t, cur_k, cur_lab, sends, recvs, blocks)
            col_in = None
            if symmetric and t > 0:
                # the partial column stats of the block held now, sent by the previous rank
                # after its compute on that block
                owner = (st.rank - t) % world
                col_in = torch.empty(st.sizes_m[owner], 4, dtype=self.acc, device=k.device)
                sends.append(col_prev)
                recvs.append(col_in)
            reqs = self._exchange(sends, recvs)
            blk = self._block(t, cur_k, cur_lab)
            yield blk, cur_k
            _wait(reqs)
            if symmetric:
                col = _pack(blk.cols, cur_k.shape[0], self.acc, k.device)
                col_prev = col if col_in is None else _merge_packed(col_in, col)
            if t > 0:
                blocks.release()
            cur_k, cur_lab = nk, nl
        if symmetric:
            # the block held last belongs to the next rank: send its stats home
            col_own = torch.empty(k.shape[0], 4, dtype=self.acc, device=k.device)
            _wait(self._exchange([col_prev], [col_own]))
            self.cols_home = _unpack(col_own, self.present)
        RING_STATS["passes"] += 1

    def backward(self, k, col_pack, need_dk):
        st, world = self.st, self.st.world
        # dk accumulators: the input dtype with low_memory (the kernels' final gradients)
        dk_dtype = self.dtype if self.spec.options.low_memory else self.acc
        blocks, bufs = _Counter("remote_key_blocks"), _Counter("dk_buffers")
        cur_k, cur_lab = k, self.key_labels
        cur_pack = None
        if col_pack is not None:
            cur_pack = _pack(col_pack, k.shape[0], self.acc, k.device)
            present = tuple(x is not None for x in col_pack)
        dk_prev = None
        for t in range(world):
            owner = (st.rank - t) % world
            sends, recvs = [], []
            nk, nl = self._next_block(t, cur_k, cur_lab, sends, recvs, blocks)
            npack = None
            if cur_pack is not None and t < world - 1:
                npack = torch.empty(nk.shape[0], 4, dtype=self.acc, device=k.device)
                sends.append(cur_pack)
                recvs.append(npack)
            dk_in = None
            if t > 0 and need_dk:
                # the dk accumulator of the block held now, from the previous rank
                dk_in = torch.empty(st.sizes_m[owner], self.d_grad, dtype=dk_dtype,
                                    device=k.device)
                bufs.acquire()
                sends.append(dk_prev)
                recvs.append(dk_in)
            reqs = self._exchange(sends, recvs)
            blk = self._block(t, cur_k, cur_lab)
            blk.col_pack = None if cur_pack is None else _unpack(cur_pack, present)
            blk.dk = None
            yield blk, cur_k
            dk_b = blk.dk
            if need_dk:
                if dk_b is None:       # folded into dq already (the self-masked block)
                    dk_b = torch.zeros(cur_k.shape[0], self.d_grad, dtype=dk_dtype,
                                       device=k.device)
                bufs.acquire()
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
            cur_k, cur_lab, cur_pack = nk, nl, npack
        if not need_dk:
            return
        # the accumulator held last belongs to the next rank: one more hop brings it home
        dk = torch.empty(k.shape[0], self.d_grad, dtype=dk_dtype, device=k.device)
        _wait(self._exchange([dk_prev], [dk]))
        self.dk_home = dk


def _wait(reqs):
    for r in reqs:
        r.wait()


class _RingStats(torch.autograd.Function):
    """(q, k, scale) -> row statistics (lse, A, P, B) of the local queries against ALL keys,
    and column statistics of the local keys against ALL queries (empty unless symmetric)."""

    @staticmethod
    def forward(ctx, q, k, scale, shift, run):
        spec, targets = run["spec"], run["targets"]
        blocks = run["blocks"]
        sc = scale.detach().to(engine.acc_dtype(q.dtype)).reshape(())
        delta = None if shift is None else shift.detach().to(sc.dtype).contiguous()
        rows, col = engine.forward(spec, q.detach(), k.detach(), sc, targets, blocks, delta)
        acc = rows[0].dtype
        zeros = lambda n: torch.zeros(n, dtype=acc, device=q.device)
        lse, a, p, b = rows
        out = [lse, a, p, zeros(q.shape[0]) if b is None else b]
        if col is None:
            out += [rows[0].new_empty(0) for _ in range(4)]
        else:
            out += [rows[0].new_empty(0) if col[0] is None else col[0], col[1], col[2],
                    zeros(k.shape[0]) if col[3] is None else col[3]]
        ctx.save_for_backward(q, k, scale, shift, out[0], out[4], out[5])
        ctx.run = run
        ctx.mark_non_differentiable(out[2], out[6])
        return tuple(out)

    @staticmethod
    @engine.first_order
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_r, g_a, _g_p, g_b, g_c, g_ac, _g_pc, g_bc):
        q, k, scale, shift, lse_r, lse_c, a_c = ctx.saved_tensors
        run = ctx.run
        spec, targets, st = run["spec"], run["targets"], run["st"]

        def z(g, like):
            return torch.zeros_like(like) if g is None else g.to(like.dtype).contiguous()

        g_r, g_a, g_b = z(g_r, lse_r), z(g_a, lse_r), z(g_b, lse_r)
        col_pack = None
        if targets.cols:
            col_pack = (lse_c if spec.cols else None, z(g_c, lse_c) if spec.cols else None,
                        z(g_ac, a_c), z(g_bc, a_c) if targets.eps else None)
        # Frozen keys (a locked tower, a memory bank) skip dk and its ring traffic when they
        # are frozen on every rank; the scale's gradient is read off dq. (Under
        # self-contrast k is q: both wanted.)
        need_dk = st.any_key_grad
        need_s = ctx.needs_input_grad[2]
        need_dq = ctx.needs_input_grad[0] or need_s
        sc = scale.detach().to(lse_r.dtype).reshape(())
        blocks = run["blocks"]
        need_sh = ctx.needs_input_grad[3]
        delta = None if shift is None else shift.detach().to(sc.dtype).contiguous()
        dq, dk, ds, dsh = engine.backward(spec, q.detach(), k.detach(), sc, targets, blocks,
                                          lse_r, g_r, g_a, g_b if targets.eps else None,
                                          col_pack, need_dq, need_dk, need_s, delta, need_sh)
        dq = dq.to(q.dtype) if (ctx.needs_input_grad[0] and dq is not None) else None
        dk = dk.to(k.dtype) if (ctx.needs_input_grad[1] and dk is not None) else None
        ds = ds.to(scale.dtype).reshape(scale.shape) if (need_s and ds is not None) else None
        dsh = dsh.to(shift.dtype) if (need_sh and dsh is not None) else None
        return dq, dk, ds, dsh, None


class _RingTeacher(torch.autograd.Function):
    """(q, k) -> (X (N,), X^c (M,) or empty): the teacher-weighted dots of the softmax
    weighting over the global batch (engine.teacher_forward, docs/DESIGN.md section 9).
    Key blocks travel as [k | tk]: one turn for the teacher's log-sum-exps (the column
    ones come home with the block), one for X (the rows: Y = w^T k), one for X^c (the
    block's sum of w^Tc q comes home like dk); backward is one turn with
    dS = c w^T + c^c w^Tc, dk coming home."""

    @staticmethod
    def forward(ctx, q, k, run):
        spec, st, be, opt = run["spec"], run["st"], run["spec"].backend, run["spec"].options
        tq, tk, ts, cols = run["tq"], run["tk"], run["ts"], run["cols"]
        d, acc = q.shape[1], engine.acc_dtype(q.dtype)
        q, k = q.detach(), k.detach()
        kcat = torch.cat([k, tk], 1)
        blocks = run["blocks"]
        rowdots = run["targets"].rowdots
        lse_t = torch.full((q.shape[0],), float("-inf"), dtype=acc, device=q.device)
        for blk, kb in blocks.forward(kcat):
            lr, lc = be.lse_forward(tq, kb[:, d:], ts, blk.self_mask, cols, options=opt)
            torch.logaddexp(lse_t, lr, out=lse_t)
            blk.cols = (lc, None, None, None) if cols else None
        lse_tc = blocks.cols_home[0] if cols else None
        y = torch.zeros(q.shape[0], d, dtype=acc, device=q.device)
        ones = torch.ones_like(lse_t)
        for blk, kb in blocks.backward(kcat, None, False):
            y_b, _ = be.lse_backward(tq, kb[:, d:], ts, blk.self_mask, lse_t, None, ones, None,
                                     need_dq=True, need_dk=False, options=opt,
                                     prod=(q, kb[:, :d]))
            y += y_b
        x_r = rowdots(q, y, acc)
        del y
        x_c = x_r.new_empty(0)
        if cols:
            zeros = torch.zeros_like(lse_t)
            for blk, kb in blocks.backward(kcat, (lse_tc, None, None, None), True):
                lc = blk.col_pack[0]
                _, blk.dk = be.lse_backward(tq, kb[:, d:], ts, blk.self_mask, lse_t, lc, zeros,
                                            torch.ones_like(lc), need_dq=False, need_dk=True,
                                            options=opt, prod=(q, kb[:, :d]))
            x_c = rowdots(k, blocks.dk_home, acc)
            blocks.dk_home = None
        ctx.save_for_backward(q, k, lse_t, lse_t if lse_tc is None else lse_tc)
        ctx.run = run
        return x_r, x_c

    @staticmethod
    @engine.first_order
    @torch.autograd.function.once_differentiable
    def backward(ctx, c_r, c_c):
        q, k, lse_t, lse_tc = ctx.saved_tensors
        run = ctx.run
        spec, st, be, opt = run["spec"], run["st"], run["spec"].backend, run["spec"].options
        tq, tk, ts, cols = run["tq"], run["tk"], run["ts"], run["cols"]
        d = q.shape[1]
        c_r = torch.zeros_like(lse_t) if c_r is None else c_r.to(lse_t.dtype).contiguous()
        pack = None
        if cols:
            c_c = torch.zeros_like(lse_tc) if c_c is None else c_c.to(lse_tc.dtype).contiguous()
            pack = (lse_tc, c_c, None, None)     # the block's column lse and coefficients
        need_dk = st.any_key_grad or spec.self_contrast
        blocks = run["blocks"]
        dq = None
        for blk, kb in blocks.backward(torch.cat([k, tk], 1), pack, need_dk):
            lc, cc = (blk.col_pack[0], blk.col_pack[1]) if cols else (None, None)
            dq_b, blk.dk = be.lse_backward(tq, kb[:, d:], ts, blk.self_mask, lse_t, lc, c_r,
                                           cc, need_dq=True, need_dk=need_dk, options=opt,
                                           prod=(q, kb[:, :d]))
            dq = dq_b if dq is None else dq.add_(dq_b)
        dk = blocks.dk_home
        if spec.self_contrast:          # k is q: its gradient as keys belongs to q
            dq, dk = dq.add_(dk), None
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (dq.to(q.dtype) if need_q else None,
                dk.to(k.dtype) if (need_k and dk is not None) else None, None)


def _ring_teacher_dots(st, p, q, k, self_c, masked, be, opts, overlap):
    """(X, X^c or None) of the teacher over the global batch: the softmax weighting by
    _RingTeacher, the linear one by all-reduced sums (loss.linear_teacher_dots)."""
    if p.teacher is None or p.teacher_weight == 0:
        return None, None
    tq, tk, ts = teacher_operands(p)
    if p.teacher_weighting == "linear":
        from torch.distributed.nn.functional import all_reduce

        def total(xs):      # summed over the ranks, with gradient (each rank gets the sum)
            flat = torch.cat([x.reshape(-1) for x in xs])
            flat = all_reduce(flat.to(st.dev), group=st.group).to(q.device)
            out, i = [], 0
            for x in xs:
                out.append(flat[i:i + x.numel()].reshape(x.shape))
                i += x.numel()
            return out
        return linear_teacher_dots(q, k, p.teacher[0], tk, p.self_contrast, p.symmetric,
                                   total)
    n, d = q.shape
    spec = engine.Spec(be, opts, self_c, p.symmetric, masked)
    targets = Targets(n, d + tq.shape[1], st.m_global, cols=p.symmetric)
    blocks = RingBlocks(st, spec, targets, None, overlap, d + tq.shape[1], q.dtype, d_grad=d)
    run = dict(spec=spec, st=st, tq=tq.contiguous(), tk=tk.contiguous(),
               ts=ts.to(engine.acc_dtype(q.dtype)).reshape(()), cols=p.symmetric,
               blocks=blocks, targets=targets)
    x_r, x_c = _RingTeacher.apply(q, k, run)
    return x_r, (x_c if p.symmetric else None)


def ring_info_nce(query: torch.Tensor, key: Optional[torch.Tensor] = None, *,
                  group: Optional[Any] = None, positive_index: Optional[torch.Tensor] = None,
                  labels: Optional[torch.Tensor] = None,
                  key_labels: Optional[torch.Tensor] = None,
                  temperature: Optional[Union[float, torch.Tensor]] = None,
                  logit_scale: Optional[Union[float, torch.Tensor]] = None,
                  logit_bias: Optional[Union[float, torch.Tensor]] = None,
                  symmetric: bool = False, label_smoothing: float = 0.0,
                  reduction: str = "mean", margin: float = 0.0, decoupled: bool = False,
                  teacher: Optional[Union[torch.Tensor,
                                          Tuple[torch.Tensor, torch.Tensor]]] = None,
                  teacher_logit_scale: Optional[Union[float, torch.Tensor]] = None,
                  teacher_weight: float = 1.0, teacher_weighting: str = "softmax",
                  backend: str = "auto", overlap: bool = True,
                  **options: Any) -> torch.Tensor:
    """`info_nce` over the global batch of a data-parallel job, by a ring of transfers.

    Each rank passes its own shard; key blocks travel around the ring by point-to-point
    messages, so a rank never holds the global keys (its shard plus at most two remote
    blocks). The loss is `info_nce` on the ranks' shards concatenated in rank order;
    see the module docstring (contrastive_kernels.distributed) for the semantics and
    the gradient contract. Collective: every rank of `group` must call it, and call
    backward. Without an initialized process group it warns once (UserWarning) and
    returns the local `info_nce`; with world size 1 it returns the local loss.

    Args:
        query: (N_r, D) float tensor, this rank's queries (sizes may differ by rank).
        key: (M_r, D) tensor, this rank's keys, or None for self-contrast over the
            global batch (NT-Xent / SupCon; the global diagonal is masked).
        group: the process group (None: the default group).
        positive_index: integer tensor (N_r,): GLOBAL indices into the keys of all
            ranks concatenated in rank order (the queries for key=None). Default: the
            diagonal within each rank.
        labels: integer tensor (N_r,): same-label keys are positives, compared across
            ranks (SupCon over the global batch).
        key_labels: integer tensor (M_r,); default `labels`.
        temperature, logit_scale, logit_bias, symmetric, label_smoothing, reduction,
            margin, decoupled: as for `contrastive_kernels.info_nce` (default
            symmetric=False, temperature 0.07); the same on every rank.
        teacher, teacher_logit_scale, teacher_weight, teacher_weighting: this rank's
            teacher embeddings and the teacher settings, as for `info_nce`.
        backend: "auto" or a backend name, for the per-block kernels.
        overlap: True overlaps each transfer with the compute on the current block;
            False waits for it (for benchmarks).
        **options: kernel options, as for `info_nce`.

    Returns:
        This rank's share L_r of the global loss L, float32 (float64 for float64
        inputs). "mean": L_r = P * (this rank's row losses summed) / (global rows with a
        positive), averaged with the columns this rank owns when symmetric, so that the
        mean of L_r over the P ranks is L (DDP's gradient average then equals a
        single-process step on the global batch). "sum": this rank's share of the global
        sum. "none": this rank's rows (then its columns when symmetric, each weighted
        1/2).

    Raises:
        TypeError: an argument of the wrong type (as `info_nce`).
        ValueError: an invalid argument on any rank (every rank raises, none waits),
            settings that differ between ranks, or a per-query temperature with
            symmetric=True and a margin.
        RuntimeError: in backward with create_graph=True (double backward is not
            supported).

    Example:
        Run on every rank after torch.distributed.init_process_group (for instance
        under torchrun); image_emb and text_emb are this rank's shards:

            loss = ck.ring_info_nce(image_emb, text_emb, symmetric=True,
                                    logit_scale=logit_scale.exp())
            loss.backward()     # collective as well
    """
    kwargs = dict(positive_index=positive_index, labels=labels, key_labels=key_labels,
                  temperature=temperature, logit_scale=logit_scale, logit_bias=logit_bias,
                  symmetric=symmetric, label_smoothing=label_smoothing, reduction=reduction,
                  margin=margin, decoupled=decoupled, teacher=teacher,
                  teacher_logit_scale=teacher_logit_scale, teacher_weight=teacher_weight,
                  teacher_weighting=teacher_weighting)
    world = _process_group_size(group, "ring_info_nce")
    if world is None or world == 1:
        return info_nce(query, key, backend=backend, **kwargs, **options)
    opts = make_options(**options)
    st = _setup("ring_info_nce", query, key, group, world, **kwargs, options=opts)
    p = st.p
    # a per-query scale is folded into the queries (loss.op_inputs); under key=None the
    # keys are then the unscaled queries, the own block's diagonal masked
    q, k, scale_t, side_scale = op_inputs(p)
    q = q.contiguous()
    k = q if k is None else k.contiguous()
    masked = p.per_row and p.self_contrast
    self_c = p.self_contrast and not masked
    n, d = q.shape
    extra = (("shift",) if p.shifted else ()) + (
        ("teacher",) if (p.teacher is not None and p.teacher_weighting == "softmax"
                         and p.teacher_weight > 0) else ())
    be = REGISTRY.select(backend, Call(q.device, q.dtype, n, k.shape[0], d, self_c,
                                       p.symmetric, extra=extra), opts)
    kl = None
    if p.labels is not None:
        kl = (p.labels if p.self_contrast else p.key_labels).contiguous()
    spec = engine.Spec(be, opts, self_c, p.symmetric and not self_c, masked)
    targets = Targets(n, d, st.m_global, p.labels,
                      p.positive_index if p.labels is None else None, p.label_smoothing,
                      p.symmetric)
    blocks = RingBlocks(st, spec, targets, kl, overlap, d, q.dtype)
    run = dict(spec=spec, targets=targets, blocks=blocks, st=st)
    margin_t, shift = positive_shift(p, p.scale if p.per_row else scale_t)
    stats = _RingStats.apply(q, k, scale_t, shift, run)
    x_r, x_c = _ring_teacher_dots(st, p, q, k, self_c, masked, be, opts, overlap)
    alpha = p.teacher_weight
    eps, sub = p.label_smoothing, (1 if p.self_contrast else 0)
    var = dict(margin=margin_t, decoupled=p.decoupled)
    rows = engine.side_losses(*stats[:4], side_scale, p.bias, eps, st.m_global - sub, **var,
                              teacher=None if x_r is None else (x_r, alpha))
    col = None
    if p.symmetric:
        lse_c = stats[0] if self_c else stats[4]
        col = engine.side_losses(lse_c, *stats[5:], side_scale, p.bias, eps,
                                 st.n_global - sub, **var,
                                 teacher=None if x_c is None else (x_c, alpha))
    return _finish(st, rows, col, p.reduction)


def _finish(st, rows, col, reduction):
    """The per-rank loss of the contract (module docstring) from the local row (and
    column) losses."""
    def counts(cnt):
        cnt = cnt.to(st.dev)
        dist.all_reduce(cnt, group=st.group)
        return cnt.to(rows[0].device)

    loss = engine.reduce(rows, col, reduction, counts=counts)
    return st.world * loss if reduction == "mean" else loss


# ----------------------------------------------------------------------------- sigmoid loss

class _RingSigLIPStats(torch.autograd.Function):
    """4-pass: (q, k, scale, bias) -> (R, T, A, P) of the local queries against ALL keys
    (engine.siglip_forward); backward sends the key blocks round again and brings dk home
    (engine.siglip_backward)."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, run):
        spec, targets, blocks = run["spec"], run["targets"], run["blocks"]
        acc = engine.acc_dtype(q.dtype)
        sc, bc = (x.detach().to(acc).reshape(()) for x in (scale, bias))
        (r, t, a, p), _ = engine.siglip_forward(spec, q.detach(), k.detach(), sc, bc, targets,
                                                blocks, False, False)
        ctx.save_for_backward(q, k, scale, bias, t)
        ctx.run = run
        ctx.mark_non_differentiable(t, p)
        return r, t, a, p

    @staticmethod
    @engine.first_order
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_r, _g_t, g_a, _g_p):
        q, k, scale, bias, t = ctx.saved_tensors
        run = ctx.run
        spec, targets, st = run["spec"], run["targets"], run["st"]
        g_r, g_a = (torch.zeros_like(t) if g is None else g.to(t.dtype).contiguous()
                    for g in (g_r, g_a))
        need_s = ctx.needs_input_grad[2]
        need_dq = ctx.needs_input_grad[0] or need_s
        sc, bc = (x.detach().to(t.dtype).reshape(()) for x in (scale, bias))
        dq, dk, ds = engine.siglip_backward(spec, q.detach(), k.detach(), sc, bc, targets,
                                            run["blocks"], g_r, g_a, need_dq, st.any_key_grad,
                                            need_s)
        db = (g_r * t).sum() if ctx.needs_input_grad[3] else None
        return (dq.to(q.dtype) if (ctx.needs_input_grad[0] and dq is not None) else None,
                dk.to(k.dtype) if (ctx.needs_input_grad[1] and dk is not None) else None,
                ds.to(scale.dtype).reshape(scale.shape) if (need_s and ds is not None) else None,
                db.to(bias.dtype).reshape(bias.shape) if db is not None else None, None)


class _RingSigLIPFused(torch.autograd.Function):
    """3-pass: (q, k, scale, bias) -> this rank's total loss (its rows against ALL keys),
    with its gradients computed in the same ring pass; each key block's dk goes home with
    the block. Backward only scales them by the upstream gradient, which must be the same
    on every rank (dk mixes every rank's rows): it checks that with one small all_gather."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, run):
        spec, targets, blocks, st = run["spec"], run["targets"], run["blocks"], run["st"]
        acc = engine.acc_dtype(q.dtype)
        sc, bc = (x.detach().to(acc).reshape(()) for x in (scale, bias))
        (r, t, a, p), (dq, dk, ds, db) = engine.siglip_forward(
            spec, q.detach(), k.detach(), sc, bc, targets, blocks, True, st.any_key_grad)
        ctx.save_for_backward(dq, dk, ds, db)
        ctx.like = (q, k, scale, bias)
        ctx.st = st
        return r.sum() - sc * a.sum() - bc * p.sum()

    @staticmethod
    @engine.first_order
    @torch.autograd.function.once_differentiable
    def backward(ctx, c):
        dq, dk, ds, db = ctx.saved_tensors
        q, k, scale, bias = ctx.like
        st = ctx.st
        cs = c.detach().reshape(1).to(st.dev, torch.float64)
        every = [torch.empty_like(cs) for _ in range(st.world)]
        dist.all_gather(every, cs, group=st.group)
        if len({float(x) for x in every}) > 1:
            raise RuntimeError(
                "ring_siglip_loss(passes=3): the upstream gradient of the loss differs between "
                f"ranks ({[float(x) for x in every]}); the 3-pass schedule computes the keys' "
                "gradient in the forward, for one common upstream gradient. Use passes=4 to "
                "weight the ranks' losses differently")
        c = c.reshape(())
        need = ctx.needs_input_grad
        return ((dq * c).to(q.dtype) if need[0] else None,
                (dk * c).to(k.dtype) if (need[1] and dk is not None) else None,
                (ds * c).to(scale.dtype).reshape(scale.shape) if need[2] else None,
                (db * c).to(bias.dtype).reshape(bias.shape) if need[3] else None, None)


def ring_siglip_loss(query: torch.Tensor, key: torch.Tensor, *, group: Optional[Any] = None,
                     logit_scale: Union[float, torch.Tensor] = SIGLIP_SCALE,
                     logit_bias: Union[float, torch.Tensor] = SIGLIP_BIAS,
                     positive_index: Optional[torch.Tensor] = None,
                     labels: Optional[torch.Tensor] = None,
                     key_labels: Optional[torch.Tensor] = None, reduction: str = "mean",
                     backend: str = "auto", passes: Optional[int] = None,
                     overlap: bool = True, **options: Any) -> torch.Tensor:
    """`siglip_loss` over the global batch (the ranks' shards concatenated), by a ring of
    point-to-point transfers.

    No row statistic is merged: the key blocks' partial sums add. With the 3-pass
    schedule (passes=None or 3, for "mean"/"sum" with a gradient) each block's dk travels
    home with it during forward and backward sends one scalar; with passes=4 the blocks
    go round again in backward. Collective: every rank of `group` must call it, and call
    backward. Without an initialized process group it warns once (UserWarning) and
    returns the local `siglip_loss`; with world size 1 it returns the local loss.

    Args:
        query: (N_r, D) float tensor, this rank's first-tower embeddings.
        key: (M_r, D) tensor, this rank's second-tower embeddings. Required.
        group: the process group (None: the default group).
        logit_scale: the exponentiated scale, float > 0 or 0-dim tensor (replicated:
            each rank's gradient is a share). Default 10.0.
        logit_bias: float or 0-dim tensor. Default -10.0.
        positive_index: integer tensor (N_r,) of GLOBAL key indices. Default: the
            diagonal within each rank.
        labels: integer tensor (N_r,): same-label pairs are positives, across ranks.
        key_labels: integer tensor (M_r,); default `labels`.
        reduction: "mean", "sum" or "none", as for `siglip_loss`.
        backend: "auto" or a backend name.
        passes: None, 3 or 4, as for `siglip_loss`.
        overlap: False waits for each transfer before computing (for benchmarks).
        **options: kernel options deterministic and precision.

    Returns:
        This rank's share, float32 (float64 for float64 inputs): for "mean",
        P * (this rank's row sums) / N_global, so that the mean over ranks is the global
        loss; for "sum" its share of the sum; for "none" its rows (N_r,). Under DDP a
        step equals a single-process step on the global batch, scale and bias included.

    Raises:
        TypeError: `key` None or an argument of the wrong type (as `siglip_loss`).
        ValueError: an invalid argument on any rank (every rank raises), or settings
            that differ between ranks.
        RuntimeError: in backward with create_graph=True (double backward is not
            supported).

    Example:
        Run on every rank after torch.distributed.init_process_group:

            loss = ck.ring_siglip_loss(image_emb, text_emb, logit_scale=t.exp(),
                                       logit_bias=b)
            loss.backward()     # collective as well
    """
    world = _process_group_size(group, "ring_siglip_loss")
    kw = dict(logit_scale=logit_scale, logit_bias=logit_bias, positive_index=positive_index,
              labels=labels, key_labels=key_labels, reduction=reduction)
    if world is None or world == 1:
        return siglip_loss(query, key, backend=backend, passes=passes, **kw, **options)
    grad = torch.is_grad_enabled()
    wants = grad and any(torch.is_tensor(x) and x.requires_grad
                         for x in (query, key, logit_scale, logit_bias))
    opts = []

    def check():        # the options too: a bad one on any rank raises on every rank
        opts.append(siglip_options(backend, passes, options))
        return check_siglip(query, key, positive_index, labels, key_labels, logit_scale,
                            logit_bias, reduction, global_index=True)
    st = _agree("ring_siglip_loss", query, group, world, check, allow_self=False,
                wants_grad=wants)
    p, opts = st.p, opts[0]
    q, k = p.query.contiguous(), p.key.contiguous()
    n, d = q.shape
    be = REGISTRY.select(backend, Call(q.device, q.dtype, n, k.shape[0], d, loss="siglip"),
                         opts)
    acc = p.out_dtype
    as_tensor = lambda x: x if torch.is_tensor(x) else torch.tensor(x, dtype=acc,
                                                                    device=q.device)
    scale_t, bias_t = as_tensor(p.scale), as_tensor(p.bias)
    spec = engine.Spec(be, opts, False, False)
    targets = Targets(n, d, st.m_global, p.labels,
                      p.positive_index if p.labels is None else None)
    kl = p.key_labels.contiguous() if p.labels is not None else None
    blocks = RingBlocks(st, spec, targets, kl, overlap, d, q.dtype)
    run = dict(spec=spec, targets=targets, blocks=blocks, st=st)
    # every rank takes the same schedule (reduction and any_grad are agreed)
    if (passes or 3) == 3 and p.reduction != "none" and st.any_grad:
        total = _RingSigLIPFused.apply(q, k, scale_t, bias_t, run)
    else:
        r, _, a, npos = _RingSigLIPStats.apply(q, k, scale_t, bias_t, run)
        rows = r - p.scale * a - p.bias * npos
        if p.reduction == "none":
            return rows
        total = rows.sum()
    return total if p.reduction == "sum" else total * (world / st.n_global)


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


def gather_info_nce(query: torch.Tensor, key: Optional[torch.Tensor] = None, *,
                    group: Optional[Any] = None,
                    positive_index: Optional[torch.Tensor] = None,
                    labels: Optional[torch.Tensor] = None,
                    key_labels: Optional[torch.Tensor] = None,
                    temperature: Optional[Union[float, torch.Tensor]] = None,
                    logit_scale: Optional[Union[float, torch.Tensor]] = None,
                    logit_bias: Optional[Union[float, torch.Tensor]] = None,
                    symmetric: bool = False, label_smoothing: float = 0.0,
                    reduction: str = "mean", margin: float = 0.0, decoupled: bool = False,
                    teacher: Optional[Union[torch.Tensor,
                                            Tuple[torch.Tensor, torch.Tensor]]] = None,
                    teacher_logit_scale: Optional[Union[float, torch.Tensor]] = None,
                    teacher_weight: float = 1.0, teacher_weighting: str = "softmax",
                    backend: str = "auto", **options: Any) -> torch.Tensor:
    """`info_nce` over the global batch by an all-gather (with gradient) of the keys.

    Local queries against all keys (and, if symmetric, local keys against all queries),
    as open_clip's local_loss=True, gather_with_grad=True; memory O(global batch * D).
    Same values and gradient contract as `ring_info_nce`. Collective: every rank of
    `group` must call it, and call backward. Without an initialized process group it
    warns once (UserWarning) and returns the local `info_nce`; with world size 1 it
    returns the local loss.

    Args:
        query: (N_r, D) float tensor, this rank's queries.
        key: (M_r, D) tensor, this rank's keys. Required with more than one rank.
        group: the process group (None: the default group).
        positive_index: integer tensor (N_r,): GLOBAL indices into the keys of all
            ranks concatenated in rank order (the queries for key=None). Default: the
            diagonal within each rank.
        labels: integer tensor (N_r,): same-label keys are positives, compared across
            ranks (SupCon over the global batch).
        key_labels: integer tensor (M_r,); default `labels`.
        temperature, logit_scale, logit_bias, symmetric, label_smoothing, reduction,
            margin, decoupled: as for `contrastive_kernels.info_nce` (default
            symmetric=False, temperature 0.07); the same on every rank.
        teacher, teacher_logit_scale, teacher_weight, teacher_weighting: accepted for
            the local loss only; a teacher with more than one rank raises (use
            `ring_info_nce`).
        backend: "auto" or a backend name, for every local call.
        **options: kernel options, for every local call.

    Returns:
        This rank's share of the global loss, as `ring_info_nce` returns it.

    Raises:
        TypeError: an argument of the wrong type (as `info_nce`).
        ValueError: an invalid argument on any rank (every rank raises), settings that
            differ between ranks, and with more than one rank: key=None, a teacher, or
            a per-query temperature with symmetric=True.
        RuntimeError: in backward with create_graph=True (double backward is not
            supported).

    Example:
        Run on every rank after torch.distributed.init_process_group:

            loss = ck.gather_info_nce(image_emb, text_emb, symmetric=True,
                                      temperature=0.07)
            loss.backward()     # collective as well
    """
    kwargs = dict(positive_index=positive_index, labels=labels, key_labels=key_labels,
                  temperature=temperature, logit_scale=logit_scale, logit_bias=logit_bias,
                  symmetric=symmetric, label_smoothing=label_smoothing, reduction=reduction,
                  margin=margin, decoupled=decoupled, teacher=teacher,
                  teacher_logit_scale=teacher_logit_scale, teacher_weight=teacher_weight,
                  teacher_weighting=teacher_weighting)
    world = _process_group_size(group, "gather_info_nce")
    if world is None or world == 1:
        return info_nce(query, key, backend=backend, **kwargs, **options)
    opts = make_options(**options)
    st = _setup("gather_info_nce", query, key, group, world, allow_self=False, **kwargs,
                options=opts)
    p = st.p
    common = dict(temperature=temperature, logit_scale=logit_scale, logit_bias=logit_bias,
                  symmetric=False, label_smoothing=label_smoothing, reduction="none",
                  margin=margin, decoupled=decoupled, backend=backend, **options)
    k_all = _AllGather.apply(p.key, st, st.sizes_m)
    if p.labels is not None:
        kl_all = _gather_rows(p.key_labels, st, st.sizes_m)
        row = info_nce(p.query, k_all, labels=p.labels, key_labels=kl_all, **common)
        row_ok = _has_loss(p.labels, kl_all, decoupled)
    else:
        row = info_nce(p.query, k_all, positive_index=p.positive_index, **common)
        row_ok = torch.full_like(row, not decoupled or st.m_global > 1, dtype=torch.bool)
    col = None
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
        col = (info_nce(p.key, q_all, labels=col_lab, key_labels=q_lab, **common),
               _has_loss(col_lab, q_lab, decoupled))
    return _finish(st, (row, row_ok), col, p.reduction)


def _has_loss(labels, other, decoupled):
    """Rows (by label) with a positive among `other`, and (decoupled) a negative too."""
    vals, counts = torch.unique(other, return_counts=True)
    at = torch.searchsorted(vals, labels).clamp_max(vals.numel() - 1)
    same = torch.where(vals[at] == labels, counts[at], torch.zeros_like(counts[at]))
    ok = same > 0
    return ok & (same < other.numel()) if decoupled else ok


def gather_siglip_loss(query: torch.Tensor, key: torch.Tensor, *,
                       group: Optional[Any] = None,
                       logit_scale: Union[float, torch.Tensor] = SIGLIP_SCALE,
                       logit_bias: Union[float, torch.Tensor] = SIGLIP_BIAS,
                       positive_index: Optional[torch.Tensor] = None,
                       labels: Optional[torch.Tensor] = None,
                       key_labels: Optional[torch.Tensor] = None, reduction: str = "mean",
                       backend: str = "auto", passes: Optional[int] = None,
                       **options: Any) -> torch.Tensor:
    """`siglip_loss` over the global batch by an all-gather (with gradient) of the keys.

    Local queries against all keys, memory O(global batch * D); the values and gradient
    contract of `ring_siglip_loss`, for comparison with it. Collective: every rank of
    `group` must call it, and call backward. Without an initialized process group it
    warns once (UserWarning) and returns the local `siglip_loss`; with world size 1 it
    returns the local loss.

    Args:
        query: (N_r, D) float tensor, this rank's first-tower embeddings.
        key: (M_r, D) tensor, this rank's second-tower embeddings. Required.
        group: the process group (None: the default group).
        logit_scale, logit_bias, reduction, passes: as for `siglip_loss` (defaults
            10.0, -10.0, "mean", None).
        positive_index: integer tensor (N_r,) of GLOBAL key indices. Default: the
            diagonal within each rank.
        labels: integer tensor (N_r,): same-label pairs are positives, across ranks.
        key_labels: integer tensor (M_r,); default `labels`.
        backend: "auto" or a backend name, for every local call.
        **options: kernel options deterministic and precision.

    Returns:
        This rank's share of the global loss, as `ring_siglip_loss` returns it.

    Raises:
        TypeError: `key` None or an argument of the wrong type (as `siglip_loss`).
        ValueError: an invalid argument on any rank (every rank raises), or settings
            that differ between ranks.
        RuntimeError: in backward with create_graph=True (double backward is not
            supported).

    Example:
        Run on every rank after torch.distributed.init_process_group:

            loss = ck.gather_siglip_loss(image_emb, text_emb, logit_scale=10.0,
                                         logit_bias=-10.0)
            loss.backward()     # collective as well
    """
    world = _process_group_size(group, "gather_siglip_loss")
    kw = dict(logit_scale=logit_scale, logit_bias=logit_bias, backend=backend, passes=passes)
    if world is None or world == 1:
        return siglip_loss(query, key, positive_index=positive_index, labels=labels,
                           key_labels=key_labels, reduction=reduction, **kw, **options)

    def check():
        siglip_options(backend, passes, options)
        return check_siglip(query, key, positive_index, labels, key_labels, logit_scale,
                            logit_bias, reduction, global_index=True)
    st = _agree("gather_siglip_loss", query, group, world, check, allow_self=False)
    p = st.p
    k_all = _AllGather.apply(p.key, st, st.sizes_m)
    local = "none" if p.reduction == "none" else "sum"
    if p.labels is not None:
        out = siglip_loss(p.query, k_all, labels=p.labels,
                          key_labels=_gather_rows(p.key_labels, st, st.sizes_m),
                          reduction=local, **kw, **options)
    else:
        out = siglip_loss(p.query, k_all, positive_index=p.positive_index, reduction=local,
                          **kw, **options)
    return out * (world / st.n_global) if p.reduction == "mean" else out

