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
* local sizes may differ between ranks, and a rank may have no rows at all (N_r = 0,
  or keys but no queries): it still takes part (forwards the ring's blocks, gets
  empty or zero gradients). Sizes are exchanged first by a small all_gather; so are
  argument errors: if the arguments are invalid on any rank, every rank raises
  instead of waiting forever.
* ``symmetric=True`` with more keys than queries (hard negatives, the default pairing
  or a global ``positive_index``): the columns whose key is no query's positive are
  left out of the column mean, as in ``info_nce``.
* ``normalize=True`` L2-normalizes query and key (not a teacher) before anything, on
  every rank (the ranks must agree on it).

Faults and timeouts
-------------------
Every rank of the group must call the loss, and call its backward. A call first
checks in to the process group's store (one compare_set, one wait, one multi_get and
one delete per call, and the same per communicating backward node), then runs its
collectives, each waited with ``timeout`` on gloo (default: the group's own timeout).

* A rank that does not come (it raised before the call, skipped it, or skipped
  backward) is named, after ``timeout``, by a ``CollectiveFault`` (a RuntimeError) on
  every rank that waited; nothing was sent, so the process group stays usable (a rank
  that arrives late skips the abandoned check-in and joins the next call). Ranks at
  different calls (one in backward, another in the next forward) all raise at once.
* A rank that dies or fails inside the call: the ranks that wait on it raise a
  ``CollectiveFault`` within ``timeout`` (at once where gloo sees the connection
  close), after a short grace (``REPORT_GRACE_S``) in which every failing rank records
  in the store what it saw; the message names the ranks that recorded nothing (dead,
  hung, or stopped outside the call), the peers whose connections closed, and what a
  rank that raised inside the call raised. The process group may then be unusable
  (destroy it, or end the job). With NCCL only the check-in is timed here: inside the
  call, NCCL's own watchdog (the group's timeout) applies.

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

Backward is *collective* (every rank must call it, for the same tensors: with
``torch.autograd.grad`` or ``backward(inputs=...)``, a gather's keys left out on one
rank skip their collective there): the gradient reaching each
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
import datetime
import functools
from typing import Any, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import engine
from .backends import REGISTRY, Call
from .faults import REPORT_GRACE_S, CollectiveFault, Pending, Sync, check_timeout
from .loss import (call_options, check_variant_options, info_nce, linear_teacher_dots,
                   op_inputs, positive_shift, siglip_loss, siglip_options, teacher_operands,
                   variant_refuses)
from .problem import (FLOAT_DTYPES, REDUCTIONS, SIGLIP_BIAS, SIGLIP_SCALE, check_inputs,
                      WEIGHTINGS, check_siglip, check_values, warn_once)
from .targets import Targets

__all__ = ["ring_info_nce", "gather_info_nce", "ring_siglip_loss", "gather_siglip_loss",
           "RING_STATS", "reset_ring_stats", "CollectiveFault", "REPORT_GRACE_S"]

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
    any_grad: bool = False      # every rank needs a gradient (agreed: all or none)
    sync: Optional[Sync] = None     # check-in, timed waits, fault reports (faults.Sync)
    opts: object = None             # the kernel options (options.Options)

    @property
    def n_global(self):
        return sum(self.sizes_n)

    @property
    def m_global(self):
        return sum(self.sizes_m)


def _raise_together(err, sync, cdev):
    """Every rank raises if `err` is set on any rank (its own error where it has one)."""
    flag = torch.tensor([0 if err is None else 1], dtype=torch.int64, device=cdev)
    flags = [torch.empty_like(flag) for _ in range(sync.world)]
    sync.collective(dist.all_gather, "the set-up's value checks (all_gather)", flags, flag)
    _raise_if_bad(sync.what, err, [r for r, f in enumerate(flags) if int(f)])


def _raise_if_bad(what, err, bad):
    """Raise this rank's error `err`, else a ValueError if ranks `bad` had one."""
    if err is not None:
        raise err
    if bad:
        raise ValueError(f"{what}: invalid arguments on rank(s) {bad} (see the error raised "
                         f"there); every rank raises so that none waits forever")


def _local(fn, query, key, normalize, timeout, **kwargs):
    """The loss without a process group (or with one rank): `fn` on this rank's batch."""
    check_timeout(timeout)
    return fn(query, key, normalize=normalize, **kwargs)


def _info_nce_call(what, run, query, key, group, normalize, timeout, backend, options,
                   kwargs):
    """ring_info_nce / gather_info_nce (kwargs: info_nce's loss arguments): the local
    `info_nce` without a process group or with one rank; else the check-in and set-up
    on every rank (_agree), then run(st) guarded (an error inside the call is recorded
    for the other ranks)."""
    world = _process_group_size(group, what)
    if world is None or world == 1:
        return _local(info_nce, query, key, normalize, timeout, backend=backend, **kwargs,
                      **options)
    gather = what.startswith("gather")
    wants = _wants_grad(query, key, kwargs["temperature"], kwargs["logit_scale"],
                        kwargs["logit_bias"])

    def check():        # the options too: a bad one on any rank raises on every rank
        p = check_inputs(query, key, shard=True, normalize=normalize, **kwargs)
        opts = call_options(options, backend, p.query.device, variant_refuses(p))
        check_variant_options(p, opts)
        _check_backend_name(backend, p.query.device)
        REGISTRY.select(backend, _shard_call(p), opts)    # the backend, or why none
        if p.teacher is not None and gather:
            raise ValueError(f"{what}: a teacher is not supported in 'gather' mode; use "
                             f"ring_info_nce")
        if p.per_row and p.symmetric and (gather or p.margin):
            # a column's target needs its positive rows' scales, held by other ranks
            raise ValueError(f"{what}: a per-query temperature with symmetric=True is not "
                             f"supported{' with a margin' if p.margin else ''} here; use "
                             f"{'ring_info_nce' if gather else 'margin=0'}"
                             f" or symmetric=False")
        return p, opts
    st = _agree(what, query, group, world, check, allow_self=not gather, wants_grad=wants,
                normalize=normalize, timeout=timeout)
    with st.sync.guard():
        return run(st)


def _siglip_call(what, run, query, key, group, normalize, timeout, backend, passes,
                 options, kwargs):
    """ring_siglip_loss / gather_siglip_loss, as _info_nce_call (kwargs: siglip_loss's
    loss arguments)."""
    world = _process_group_size(group, what)
    if world is None or world == 1:
        return _local(siglip_loss, query, key, normalize, timeout, backend=backend,
                      passes=passes, **kwargs, **options)
    wants = _wants_grad(query, key, kwargs["logit_scale"], kwargs["logit_bias"])

    def check():        # the options too: a bad one on any rank raises on every rank
        p = check_siglip(query, key, shard=True, normalize=normalize, **kwargs)
        opts = siglip_options(backend, passes, options, p.query.device)
        REGISTRY.select(backend, _shard_call(p, "siglip"), opts)   # the backend, or why none
        return p, opts
    # the ring's schedule decides the collectives of backward: it must agree (3: the
    # gradients in forward, as _ring_siglip takes it; any invalid value fails check())
    sched = 3 if passes in (None, 3) and kwargs["reduction"] != "none" and wants else 4
    extra = () if what.startswith("gather") else (
        ("the pass schedule (passes, reduction='none', a gradient needed)", sched, {}),)
    st = _agree(what, query, group, world, check, allow_self=False, wants_grad=wants,
                normalize=normalize, timeout=timeout, extra=extra)
    with st.sync.guard():
        return run(st)


def _wants_grad(*inputs):
    """Whether this rank's call needs a gradient (agreed by _agree: all ranks or none)."""
    return torch.is_grad_enabled() and any(torch.is_tensor(x) and x.requires_grad
                                           for x in inputs)


def _check_backend_name(backend, device):
    """A backend name this rank can use (ValueError, raised on every rank by _agree)."""
    if backend != "auto" and backend not in REGISTRY.available(device):
        raise ValueError(f"backend must be 'auto' or one of {REGISTRY.available(device)} "
                         f"(available on {device}), got {backend!r}")


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


def _agree(what, query, group, world, check, allow_self=True, wants_grad=False,
           normalize=False, timeout=None, extra=()):
    """Check in (Sync.rendezvous), check the local shard (check() -> (Problem, kernel
    options)), share sizes and settings with one all_gather, and raise on every rank if
    any rank's arguments are bad or disagree. wants_grad: this rank needs a gradient
    (shared as _Setup.any_grad). timeout: the call's (checked here; an invalid one raises
    on every rank). extra: (name, int value, {value: shown}) settings that must agree too
    (a valid int on a rank whose check fails: it raises first)."""
    rank = dist.get_rank(group)
    cdev = _comm_device(group, query.device if torch.is_tensor(query) else torch.device("cpu"))
    t_err = None
    try:
        t = check_timeout(timeout)
    except (TypeError, ValueError) as e:    # raised with the other argument errors
        t, t_err = None, e
    sync = Sync(what, group, world, rank, t, cdev)
    # 0. every rank is in this call (else a CollectiveFault naming the absent ranks)
    sync.rendezvous(what)
    # 1. check the local shard, without raising yet (the other ranks must hear of it).
    err, p, opts, mode = None, None, None, 0
    try:
        if t_err is not None:
            raise t_err
        p, opts = check()
        mode = 2 if p.labels is not None else (1 if p.index_given else 0)
    except (TypeError, ValueError) as e:
        err, p = e, None
    if p is None:
        row = [0] * (23 + len(extra))
    else:
        n, d = p.query.shape
        keys = p.query if p.self_contrast else p.key
        row = [1, n, p.n_keys, d, FLOAT_DTYPES.index(p.query.dtype), int(p.self_contrast),
               mode, int(p.symmetric), REDUCTIONS.index(p.reduction), int(keys.requires_grad),
               int(wants_grad), _bits(p.margin), int(p.decoupled), _bits(p.label_smoothing),
               *_scalar_key(p.scale), *_scalar_key(p.bias), int(p.teacher is not None),
               _bits(p.teacher_weight), WEIGHTINGS.index(p.teacher_weighting),
               int(normalize), int(opts.low_memory)] + [int(v) for _, v, _ in extra]
    mine = torch.tensor(row, dtype=torch.int64, device=cdev)
    table = [torch.empty_like(mine) for _ in range(world)]
    sync.collective(dist.all_gather, "the set-up (all_gather of sizes and settings)",
                table, mine)
    table = [t.tolist() for t in table]
    _raise_if_bad(what, err, [r for r, t in enumerate(table) if not t[0]])
    # 2. global checks: every rank sees the same table and raises the same error.
    names = {3: "embedding dim", 4: "dtype", 5: "key=None (self-contrast)",
             6: "the kind of positives (default / positive_index / labels)",
             7: "symmetric", 8: "reduction", 11: "margin", 12: "decoupled",
             13: "label_smoothing", 14: "the kind of scale (float / tensor / per-row)",
             15: "logit_scale" if "siglip" in what else "the logit scale (1 / temperature)",
             16: "the kind of logit_bias",
             17: "logit_bias", 18: "teacher (given or not)", 19: "teacher_weight",
             20: "teacher_weighting", 21: "normalize",
             22: "low_memory (the dtype of the dk blocks that travel)"}
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
            if col in (5, 7, 12, 21, 22):
                vals = [bool(v) for v in vals]
            if col == 6:
                vals = [("default", "positive_index", "labels")[v] for v in vals]
            if col == 8:
                vals = [REDUCTIONS[v] for v in vals]
            raise ValueError(f"{what}: {name} must be the same on every rank, got {vals} "
                             f"(by rank)")
    wants = [bool(t[10]) for t in table]
    if any(wants) and not all(wants):
        raise ValueError(f"{what}: rank(s) {[r for r, w in enumerate(wants) if w]} need a "
                         f"gradient and rank(s) {[r for r, w in enumerate(wants) if not w]} "
                         f"do not (no input requires grad, or torch.no_grad()); backward is "
                         f"collective, so every rank must need one, or none")
    for i, (name, _, shown) in enumerate(extra):
        vals = [t[23 + i] for t in table]
        if len(set(vals)) > 1:
            raise ValueError(f"{what}: {name} must be the same on every rank, got "
                             f"{[shown.get(v, v) for v in vals]} (by rank)")
    sizes_n = [t[1] for t in table]
    sizes_m = [t[2] for t in table]
    if p.self_contrast and not allow_self:
        raise ValueError(f"{what}: key=None (self-contrast) is not supported in 'gather' "
                         f"mode; use distributed='ring'")
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
    _raise_together(err, sync, cdev)
    # A key block's dk gathers every rank's share on its way round the ring: if any rank
    # trains its keys, every rank takes part (and one whose keys are frozen drops its own).
    any_key_grad = any(t[9] for t in table)
    sync.agreed = True
    return _Setup(p, world, rank, sizes_n, sizes_m, offs_n, offs_m, group, cdev, any_key_grad,
                  any(t[10] for t in table), sync, opts)


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

    def _exchange(self, sends, recvs, step):
        """Start sends to the next rank and receives from the previous one (same order on
        both sides); returns the pending transfers (`Pending`, waited with the call's
        timeout; `step` names them in a fault)."""
        st = self.st
        g = st.group
        ops = [dist.P2POp(dist.isend, t, self.next, g) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, self.prev, g) for t in recvs]
        # interleave as send, recv pairs so both ends post in the same order
        ops = [op for pair in zip(ops[:len(sends)], ops[len(sends):]) for op in pair]
        nxt, prv = (st.rank + 1) % st.world, (st.rank - 1) % st.world
        peers = [nxt if op.op is dist.isend else prv for op in ops]
        reqs = st.sync.post(ops, step, peers)
        # the peer of each request (one request per op unless the backend coalesced them)
        peers = peers if len(reqs) == len(ops) else None
        pending = Pending(st.sync, reqs, step, peers)
        if not self.overlap:
            pending.wait()
        return pending

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
            reqs = self._exchange(sends, recvs, f"ring step {t + 1} of {world} (statistics pass)")
            blk = self._block(t, cur_k, cur_lab)
            yield blk, cur_k
            reqs.wait()
            if symmetric:
                col = _pack(blk.cols, cur_k.shape[0], self.acc, k.device)
                col_prev = col if col_in is None else _merge_packed(col_in, col)
            if t > 0:
                blocks.release()
            cur_k, cur_lab = nk, nl
        if symmetric:
            # the block held last belongs to the next rank: send its stats home
            col_own = torch.empty(k.shape[0], 4, dtype=self.acc, device=k.device)
            self._exchange([col_prev], [col_own], "the last hop of the statistics pass").wait()
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
            reqs = self._exchange(sends, recvs, f"ring step {t + 1} of {world} (gradient pass)")
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
            reqs.wait()
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
        self._exchange([dk_prev], [dk], "the last hop of the gradient pass").wait()
        self.dk_home = dk


def _collective_backward(backward):
    """A backward node that communicates: check in first (every rank must call backward;
    else a CollectiveFault naming the ranks that did not), then run it guarded."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        st = ctx.st if hasattr(ctx, "st") else ctx.run["st"]
        with st.sync.backward():
            return backward(ctx, *grads)
    return run


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
    @_collective_backward
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
    @_collective_backward
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


class _AllReduce(torch.autograd.Function):
    """The sum over ranks of x; backward sums the gradients the same way (as
    torch.distributed.nn.functional.all_reduce, with the call's check-in and timeouts)."""

    @staticmethod
    def forward(ctx, x, st):
        ctx.st = st
        x = x.clone().contiguous()
        st.sync.collective(dist.all_reduce, "the all_reduce of the linear teacher's sums", x)
        return x

    @staticmethod
    @_collective_backward
    def backward(ctx, g):
        g = g.clone().contiguous()
        ctx.st.sync.collective(dist.all_reduce, "the backward all_reduce of the linear "
                    "teacher's sums", g)
        return g, None


def _ring_teacher_dots(st, p, q, k, self_c, masked, be, opts, overlap):
    """(X, X^c or None) of the teacher over the global batch: the softmax weighting by
    _RingTeacher, the linear one by all-reduced sums (loss.linear_teacher_dots)."""
    if p.teacher is None or p.teacher_weight == 0:
        return None, None
    tq, tk, ts = teacher_operands(p)
    if p.teacher_weighting == "linear":
        def total(xs):      # summed over the ranks, with gradient (each rank gets the sum)
            flat = torch.cat([x.reshape(-1) for x in xs])
            flat = _AllReduce.apply(flat.to(st.dev), st).to(q.device)
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


# ----------------------------------------------------------------------------- public API

# Docstring parts shared by the four public functions (composed at import by _doc, so
# that help() shows each function's complete text and each part is written once).
_DOC_PARTS = {
    "INFO_NCE_ARGS": """\
        query: (N_r, D) float tensor, this rank's queries. Sizes may differ by rank; a
            rank may have none (N_r = 0).
        key: (M_r, D) tensor, this rank's keys (M_r may differ from N_r and may be 0),
            or None for self-contrast over the global batch (NT-Xent / SupCon; the
            global diagonal is masked; 'ring' mode only).
        group: the process group (None: the default group).
        positive_index: integer tensor (N_r,): GLOBAL indices into the keys of all
            ranks concatenated in rank order (the queries for key=None). Default: the
            pairing within each rank, query i <-> key i of the same rank (needs
            M_r >= N_r; the other keys are hard negatives).
        labels: integer tensor (N_r,): same-label keys are positives, compared across
            ranks (SupCon over the global batch).
        key_labels: integer tensor (M_r,); default `labels`.
        temperature, logit_scale, logit_bias, symmetric, label_smoothing, reduction,
            margin, decoupled: as for `contrastive_kernels.info_nce` (default
            symmetric=False, temperature 0.07); the same on every rank. With
            symmetric=True the columns whose key is no query's positive (hard
            negatives) are left out of the column mean.
""",
    "SIGLIP_ARGS": """\
        query: (N_r, D) float tensor, this rank's first-tower embeddings. Sizes may
            differ by rank; a rank may have none (N_r = 0).
        key: (M_r, D) tensor, this rank's second-tower embeddings. Required.
        group: the process group (None: the default group).
        logit_scale: the exponentiated scale, float > 0 or 0-dim tensor (replicated:
            each rank's gradient is a share). Default 10.0.
        logit_bias: float or 0-dim tensor. Default -10.0.
        positive_index: integer tensor (N_r,) of GLOBAL key indices. Default: the
            pairing within each rank (query i <-> key i of the same rank).
        labels: integer tensor (N_r,): same-label pairs are positives, across ranks.
        key_labels: integer tensor (M_r,); default `labels`.
        reduction: "mean", "sum" or "none", as for `siglip_loss`.
""",
    "FAULT_ARGS": """\
        normalize: True L2-normalizes `query` and `key` first,
            torch.nn.functional.normalize(x, dim=-1); the gradients flow through it (a
            teacher is not normalized). The same on every rank. Default False.
        timeout: seconds (float) or a datetime.timedelta: how long this rank waits for
            the others (at the check-in before the first collective, in backward, and on
            gloo for each collective and ring transfer) before it raises a RuntimeError
            naming the ranks that did not arrive or died. Default None: the process
            group's own timeout (init_process_group's `timeout`).
""",
    "FAULT_RAISES": """\
        RuntimeError (contrastive_kernels.distributed.CollectiveFault): on the ranks
            that waited, when a rank of `group` did not call this loss within
            `timeout` (or called another one), did not call backward, or died or failed
            during the call; the message names those ranks where torch.distributed can
            tell. After a check-in fault the process group is still usable; after a
            fault inside the call it may not be (destroy it, or end the job).
        RuntimeError: in backward with create_graph=True (double backward is not
            supported).
""",
}


def _doc(fn):
    """Fill fn's docstring's `[NAME]` lines with _DOC_PARTS[NAME] (None under -OO)."""
    if fn.__doc__:
        for name, text in _DOC_PARTS.items():
            fn.__doc__ = fn.__doc__.replace(f"        [{name}]\n", text)
    return fn


def _shard_call(p, loss="info_nce"):
    """The dispatch Call of this rank's shard: the ring selects its backend with it, and
    the set-up checks it on every rank (an option no backend can serve raises on all)."""
    n, d = p.query.shape
    m = n if p.key is None else p.key.shape[0]
    if loss == "siglip":
        return Call(p.query.device, p.query.dtype, n, m, d, loss="siglip")
    masked = p.per_row and p.self_contrast
    extra = (("shift",) if p.shifted else ()) + (("teacher",) if p.softmax_teacher else ())
    return Call(p.query.device, p.query.dtype, n, m, d, p.self_contrast and not masked,
                p.symmetric, extra=extra)


def _empty_safe(st, be):
    """The backend, behind _EmptySafe when some rank's shard has no rows."""
    return _EmptySafe(be) if (0 in st.sizes_n or 0 in st.sizes_m) else be


def _bind(names, args, kwargs):
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


class _EmptySafe:
    """A backend whose contract functions (backends/base.py) answer for an empty side
    (no query rows, or a key block without rows: a rank with an empty shard) without a
    kernel: log-sum-exps -inf, sums and gradients 0, of the contract's shapes."""

    _LSE_BACKWARD = ("q", "k", "scale", "self_mask", "lse_r", "lse_c", "g_r", "g_c",
                     "need_dq", "need_dk", "options", "shift", "need_dshift", "prod")
    _INPUT_GRADS = ("q", "k", "scale", "self_mask", "lse_r", "lse_c", "g_r", "g_c", "w",
                    "need_dq", "need_dk", "need_ds", "options")
    _SIGLIP = ("q", "k", "scale", "bias", "g_r", "sums", "need_dq", "need_dk", "options",
               "pos")

    def __init__(self, backend):
        self._be = backend

    def __getattr__(self, name):
        return getattr(self._be, name)

    @staticmethod
    def _empty(q, k):
        return q.shape[0] == 0 or k.shape[0] == 0

    def lse_forward(self, q, k, *args, **kwargs):
        if not self._empty(q, k):
            return self._be.lse_forward(q, k, *args, **kwargs)
        cols = _bind(("scale", "self_mask", "cols"), args, kwargs)["cols"]
        acc = engine.acc_dtype(q.dtype)
        inf = lambda n: torch.full((n,), float("-inf"), dtype=acc, device=q.device)
        return inf(q.shape[0]), (inf(k.shape[0]) if cols else None)

    def lse_backward(self, q, k, *args, **kwargs):
        if not self._empty(q, k):
            return self._be.lse_backward(q, k, *args, **kwargs)
        a = _bind(self._LSE_BACKWARD[2:], args, kwargs)
        acc = engine.acc_dtype(q.dtype)
        pq, pk = a.get("prod") or (q, k)
        dq = torch.zeros(q.shape[0], pk.shape[1], dtype=acc, device=q.device) \
            if a["need_dq"] else None
        dk = torch.zeros(k.shape[0], pq.shape[1], dtype=acc, device=q.device) \
            if a["need_dk"] else None
        if a.get("shift") is None:
            return dq, dk
        dsh = torch.zeros(q.shape[0], dtype=acc, device=q.device) \
            if a.get("need_dshift") else None
        return dq, dk, dsh

    def input_grads(self, q, k, *args, **kwargs):
        if not self._empty(q, k):
            return self._be.input_grads(q, k, *args, **kwargs)
        a = _bind(self._INPUT_GRADS[2:], args, kwargs)
        dq = torch.zeros_like(q) if a["need_dq"] else None
        dk = torch.zeros_like(k) if (a["need_dk"] and not a["self_mask"]) else None
        ds = torch.zeros((), dtype=engine.acc_dtype(q.dtype), device=q.device) \
            if a["need_ds"] else None
        return dq, dk, ds

    def siglip_tiles(self, q, k, *args, **kwargs):
        if not self._empty(q, k):
            return self._be.siglip_tiles(q, k, *args, **kwargs)
        a = _bind(self._SIGLIP[2:], args, kwargs)
        acc = engine.acc_dtype(q.dtype)
        z = lambda *shape: torch.zeros(*shape, dtype=acc, device=q.device)
        sums = z(q.shape[0]) if a["sums"] else None
        return (sums, None if sums is None else z(q.shape[0]),
                z(q.shape[0], q.shape[1]) if a["need_dq"] else None,
                z(k.shape[0], k.shape[1]) if a["need_dk"] else None)


@_doc
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
                  normalize: bool = False,
                  timeout: Optional[Union[float, datetime.timedelta]] = None,
                  backend: str = "auto", overlap: bool = True,
                  **options: Any) -> torch.Tensor:
    """`info_nce` over the global batch of a data-parallel job, by a ring of transfers.

    Each rank passes its own shard; key blocks travel around the ring by point-to-point
    messages, so a rank never holds the global keys (its shard plus at most two remote
    blocks). The loss is `info_nce` on the ranks' shards concatenated in rank order;
    see the module docstring (contrastive_kernels.distributed) for the semantics, the
    gradient contract and what happens when a rank fails. Collective: every rank of
    `group` must call it, and call backward. Without an initialized process group it
    warns once (UserWarning) and returns the local `info_nce`; with world size 1 it
    returns the local loss.

    Args:
        [INFO_NCE_ARGS]
        teacher, teacher_logit_scale, teacher_weight, teacher_weighting: this rank's
            teacher embeddings and the teacher settings, as for `info_nce`.
        [FAULT_ARGS]
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
        [FAULT_RAISES]

    Example:
        Run on every rank after torch.distributed.init_process_group (for instance
        under torchrun); image_emb and text_emb are this rank's shards:

            loss = ck.ring_info_nce(image_emb, text_emb, symmetric=True,
                                    logit_scale=logit_scale.exp(), timeout=600)
            loss.backward()     # collective as well
    """
    kwargs = dict(positive_index=positive_index, labels=labels, key_labels=key_labels,
                  temperature=temperature, logit_scale=logit_scale, logit_bias=logit_bias,
                  symmetric=symmetric, label_smoothing=label_smoothing, reduction=reduction,
                  margin=margin, decoupled=decoupled, teacher=teacher,
                  teacher_logit_scale=teacher_logit_scale, teacher_weight=teacher_weight,
                  teacher_weighting=teacher_weighting)
    return _info_nce_call("ring_info_nce", lambda st: _ring_info_nce(st, backend, overlap),
                          query, key, group, normalize, timeout, backend, options, kwargs)


def _ring_info_nce(st, backend, overlap):
    p, opts = st.p, st.opts
    # a per-query scale is folded into the queries (loss.op_inputs); under key=None the
    # keys are then the unscaled queries, the own block's diagonal masked
    q, k, scale_t, side_scale = op_inputs(p)
    q = q.contiguous()
    k = q if k is None else k.contiguous()
    masked = p.per_row and p.self_contrast
    self_c = p.self_contrast and not masked
    n, d = q.shape
    be = _empty_safe(st, REGISTRY.select(backend, _shard_call(p), opts))
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
        st.sync.collective(dist.all_reduce, "the all_reduce of the global counts", cnt)
        return cnt.to(rows[0].device)

    loss = engine.reduce(rows, col, reduction, counts=counts)
    return st.world * loss if reduction == "mean" else loss


# ----------------------------------------------------------------------------- sigmoid loss

class _RingSigLIPStats(torch.autograd.Function):
    """4-pass: (q, k, scale, bias) -> (R, T) of the local queries against ALL keys
    (engine.siglip_forward); backward sends the key blocks round again and brings dk home
    (engine.siglip_backward)."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, run):
        spec, targets, blocks = run["spec"], run["targets"], run["blocks"]
        acc = engine.acc_dtype(q.dtype)
        sc, bc = (x.detach().to(acc).reshape(()) for x in (scale, bias))
        (r, t), _ = engine.siglip_forward(spec, q.detach(), k.detach(), sc, bc, targets,
                                          blocks, False, False)
        ctx.save_for_backward(q, k, scale, bias, t)
        ctx.run = run
        ctx.mark_non_differentiable(t)
        return r, t

    @staticmethod
    @engine.first_order
    @torch.autograd.function.once_differentiable
    @_collective_backward
    def backward(ctx, g_r, _g_t):
        q, k, scale, bias, t = ctx.saved_tensors
        run = ctx.run
        spec, targets, st = run["spec"], run["targets"], run["st"]
        g_r = torch.zeros_like(t) if g_r is None else g_r.to(t.dtype).contiguous()
        need_s = ctx.needs_input_grad[2]
        need_dq = ctx.needs_input_grad[0] or need_s
        sc, bc = (x.detach().to(t.dtype).reshape(()) for x in (scale, bias))
        dq, dk, ds = engine.siglip_backward(spec, q.detach(), k.detach(), sc, bc, targets,
                                            run["blocks"], g_r, need_dq, st.any_key_grad,
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
        (r, _), (dq, dk, ds, db) = engine.siglip_forward(
            spec, q.detach(), k.detach(), sc, bc, targets, blocks, True, st.any_key_grad)
        ctx.save_for_backward(dq, dk, ds, db)
        ctx.like = (q, k, scale, bias)
        ctx.st = st
        return r.sum()

    @staticmethod
    @engine.first_order
    @torch.autograd.function.once_differentiable
    @_collective_backward
    def backward(ctx, c):
        dq, dk, ds, db = ctx.saved_tensors
        q, k, scale, bias = ctx.like
        st = ctx.st
        cs = c.detach().reshape(1).to(st.dev, torch.float64)
        every = [torch.empty_like(cs) for _ in range(st.world)]
        st.sync.collective(dist.all_gather, "the backward all_gather of the upstream "
                    "gradients", every, cs)
        if len({float(x) if x == x else "nan" for x in every}) > 1:   # NaN == NaN here
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


@_doc
def ring_siglip_loss(query: torch.Tensor, key: torch.Tensor, *, group: Optional[Any] = None,
                     logit_scale: Union[float, torch.Tensor] = SIGLIP_SCALE,
                     logit_bias: Union[float, torch.Tensor] = SIGLIP_BIAS,
                     positive_index: Optional[torch.Tensor] = None,
                     labels: Optional[torch.Tensor] = None,
                     key_labels: Optional[torch.Tensor] = None, reduction: str = "mean",
                     normalize: bool = False,
                     timeout: Optional[Union[float, datetime.timedelta]] = None,
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
        [SIGLIP_ARGS]
        [FAULT_ARGS]
        backend: "auto" or a backend name.
        passes: None, 3 or 4, as for `siglip_loss`.
        overlap: False waits for each transfer before computing (for benchmarks).
        **options: kernel options deterministic and precision.

    Returns:
        This rank's share, float32 (float64 for float64 inputs): for "mean",
        P * (this rank's row sums) / N_global, so that the mean over ranks is the global
        loss and, under DDP (which averages gradients), a step equals a single-process
        step on the global batch, scale and bias included; for "sum" its share of the
        sum (the sum over ranks is the global sum: DDP's average is then 1/P of it);
        for "none" its rows (N_r,).

    Raises:
        TypeError: `key` None or an argument of the wrong type (as `siglip_loss`).
        ValueError: an invalid argument on any rank (every rank raises), or settings
            that differ between ranks.
        [FAULT_RAISES]

    Example:
        Run on every rank after torch.distributed.init_process_group:

            loss = ck.ring_siglip_loss(image_emb, text_emb, logit_scale=t.exp(),
                                       logit_bias=b)
            loss.backward()     # collective as well
    """
    kwargs = dict(logit_scale=logit_scale, logit_bias=logit_bias,
                  positive_index=positive_index, labels=labels, key_labels=key_labels,
                  reduction=reduction)
    return _siglip_call("ring_siglip_loss",
                        lambda st: _ring_siglip(st, backend, passes, overlap), query, key,
                        group, normalize, timeout, backend, passes, options, kwargs)


def _ring_siglip(st, backend, passes, overlap):
    p, world, opts = st.p, st.world, st.opts
    q, k = p.query.contiguous(), p.key.contiguous()
    n, d = q.shape
    be = _empty_safe(st, REGISTRY.select(backend, _shard_call(p, "siglip"), opts))
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
        rows, _ = _RingSigLIPStats.apply(q, k, scale_t, bias_t, run)
        if p.reduction == "none":
            return rows
        total = rows.sum()
    return total if p.reduction == "sum" else total * (world / max(st.n_global, 1))


# ----------------------------------------------------------------------------- gather

class _AllGather(torch.autograd.Function):
    """Concatenation over ranks of x (rows may differ); backward sums the gradients of
    every rank's copy (all_reduce) and keeps this rank's rows. `tie`: a stand-in leaf
    that puts the gather in this rank's graph when x is frozen here (_gather)."""

    @staticmethod
    def forward(ctx, x, st, sizes, tie=None):
        ctx.st, ctx.sizes, ctx.device_ = st, sizes, x.device
        return _gather_rows(x, st, sizes)

    @staticmethod
    @_collective_backward
    def backward(ctx, g):
        st, sizes = ctx.st, ctx.sizes
        g = g.contiguous().to(st.dev)
        st.sync.collective(dist.all_reduce, "the backward all_reduce of the gathered rows",
                    g)
        off = sum(sizes[:st.rank])
        mine = g[off:off + sizes[st.rank]].to(ctx.device_) if ctx.needs_input_grad[0] else None
        return mine, None, None, None


def _gather(x, st, sizes, trained):
    """_AllGather of x. Its backward all_reduce must run on every rank once any rank
    trains these rows (`trained`, agreed by _agree): where x is frozen here, a stand-in
    leaf puts the gather in this rank's graph, so its backward still takes part."""
    tie = None
    if trained and torch.is_grad_enabled() and not x.requires_grad:
        tie = x.new_zeros((), dtype=torch.float32).requires_grad_()
    return _AllGather.apply(x, st, sizes, tie)


def _gather_rows(x, st, sizes):
    mx = max(sizes)
    pad = x.new_zeros((mx,) + tuple(x.shape[1:])).to(st.dev)
    pad[:x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(st.world)]
    st.sync.collective(dist.all_gather, "the all_gather of every rank's rows", parts, pad)
    return torch.cat([t[:n] for t, n in zip(parts, sizes)]).to(x.device)


@_doc
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
                    normalize: bool = False,
                    timeout: Optional[Union[float, datetime.timedelta]] = None,
                    backend: str = "auto", **options: Any) -> torch.Tensor:
    """`info_nce` over the global batch by an all-gather (with gradient) of the keys.

    Local queries against all keys (and, if symmetric, local keys against all queries),
    as open_clip's local_loss=True, gather_with_grad=True; memory O(global batch * D).
    Same values, gradient contract and fault handling as `ring_info_nce`. Collective:
    every rank of `group` must call it, and call backward. Without an initialized
    process group it warns once (UserWarning) and returns the local `info_nce`; with
    world size 1 it returns the local loss.

    Args:
        [INFO_NCE_ARGS]
        teacher, teacher_logit_scale, teacher_weight, teacher_weighting: accepted for
            the local loss only; a teacher with more than one rank raises (use
            `ring_info_nce`).
        [FAULT_ARGS]
        backend: "auto" or a backend name, for every local call.
        **options: kernel options, for every local call.

    Returns:
        This rank's share of the global loss, as `ring_info_nce` returns it.

    Raises:
        TypeError: an argument of the wrong type (as `info_nce`).
        ValueError: an invalid argument on any rank (every rank raises), settings that
            differ between ranks, and with more than one rank: key=None, a teacher, or
            a per-query temperature with symmetric=True.
        [FAULT_RAISES]

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
    common = dict(temperature=temperature, logit_scale=logit_scale, logit_bias=logit_bias,
                  symmetric=False, label_smoothing=label_smoothing, reduction="none",
                  margin=margin, decoupled=decoupled, backend=backend, **options)
    return _info_nce_call("gather_info_nce", lambda st: _gather_info_nce(st, common),
                          query, key, group, normalize, timeout, backend, options, kwargs)


def _zero_losses(n, dtype, *inputs):
    """(n,) zeros that depend on `inputs` (all-gathered tensors): a rank with nothing to
    compute still backpropagates through them, so that every rank's backward takes part
    in their collectives."""
    tie = sum(x.reshape(-1)[:0].sum() for x in inputs)
    return torch.zeros(n, dtype=dtype, device=inputs[0].device) + tie.to(dtype)


def _local_loss(fn, x, y, dtype, tie=(), **kwargs):
    """fn(x, y, **kwargs): the local loss of this rank's rows `x` against the gathered
    `y`, or zeros (_zero_losses of y, x and `tie`; summed unless reduction "none") when
    either has no rows."""
    if x.shape[0] and y.shape[0]:
        return fn(x, y, **kwargs)
    out = _zero_losses(x.shape[0], dtype, y, x, *tie)
    return out if kwargs["reduction"] == "none" else out.sum()


def _gather_info_nce(st, common):
    p, acc = st.p, st.p.out_dtype
    n = p.query.shape[0]
    tie = (p.scale,) if p.per_row else ()     # an empty per-row scale gets its gradient
    k_all = _gather(p.key, st, st.sizes_m, st.any_grad and st.any_key_grad)
    if p.labels is not None:
        kl_all = _gather_rows(p.key_labels, st, st.sizes_m)
        row = _local_loss(info_nce, p.query, k_all, acc, tie, labels=p.labels,
                          key_labels=kl_all, **common)
        row_ok = _has_loss(p.labels, kl_all, p.decoupled)
    else:
        row = _local_loss(info_nce, p.query, k_all, acc, tie,
                          positive_index=p.positive_index, **common)
        row_ok = torch.full_like(row, bool(n and st.m_global) and
                                 (not p.decoupled or st.m_global > 1), dtype=torch.bool)
    col = None
    if p.symmetric:
        q_all = _gather(p.query, st, st.sizes_n, st.any_grad)
        if p.labels is not None:
            ql_all = _gather_rows(p.labels, st, st.sizes_n)
            col_lab, q_lab = p.key_labels, ql_all
        else:
            # column j's positives are the queries i with positive_index[i] == j: as labels
            dev = p.key.device
            col_lab = torch.arange(st.sizes_m[st.rank], device=dev) + st.offs_m[st.rank]
            q_lab = _gather_rows(p.positive_index, st, st.sizes_n)
        c = _local_loss(info_nce, p.key, q_all, acc, labels=col_lab, key_labels=q_lab,
                        **common)
        col = (c, _has_loss(col_lab, q_lab, p.decoupled))
    return _finish(st, (row, row_ok), col, p.reduction)


def _has_loss(labels, other, decoupled):
    """Rows (by label) with a positive among `other`, and (decoupled) a negative too."""
    if labels.numel() == 0 or other.numel() == 0:
        return torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    vals, counts = torch.unique(other, return_counts=True)
    at = torch.searchsorted(vals, labels).clamp_max(vals.numel() - 1)
    same = torch.where(vals[at] == labels, counts[at], torch.zeros_like(counts[at]))
    ok = same > 0
    return ok & (same < other.numel()) if decoupled else ok


@_doc
def gather_siglip_loss(query: torch.Tensor, key: torch.Tensor, *,
                       group: Optional[Any] = None,
                       logit_scale: Union[float, torch.Tensor] = SIGLIP_SCALE,
                       logit_bias: Union[float, torch.Tensor] = SIGLIP_BIAS,
                       positive_index: Optional[torch.Tensor] = None,
                       labels: Optional[torch.Tensor] = None,
                       key_labels: Optional[torch.Tensor] = None, reduction: str = "mean",
                       normalize: bool = False,
                       timeout: Optional[Union[float, datetime.timedelta]] = None,
                       backend: str = "auto", passes: Optional[int] = None,
                       **options: Any) -> torch.Tensor:
    """`siglip_loss` over the global batch by an all-gather (with gradient) of the keys.

    Local queries against all keys, memory O(global batch * D); the values, gradient
    contract and fault handling of `ring_siglip_loss`, for comparison with it.
    Collective: every rank of `group` must call it, and call backward. Without an
    initialized process group it warns once (UserWarning) and returns the local
    `siglip_loss`; with world size 1 it returns the local loss.

    Args:
        [SIGLIP_ARGS]
        [FAULT_ARGS]
        backend: "auto" or a backend name, for every local call.
        passes: None, 3 or 4, as for `siglip_loss`, for every local call.
        **options: kernel options deterministic and precision.

    Returns:
        This rank's share of the global loss, as `ring_siglip_loss` returns it.

    Raises:
        TypeError: `key` None or an argument of the wrong type (as `siglip_loss`).
        ValueError: an invalid argument on any rank (every rank raises), or settings
            that differ between ranks.
        [FAULT_RAISES]

    Example:
        Run on every rank after torch.distributed.init_process_group:

            loss = ck.gather_siglip_loss(image_emb, text_emb, logit_scale=10.0,
                                         logit_bias=-10.0)
            loss.backward()     # collective as well
    """
    kwargs = dict(logit_scale=logit_scale, logit_bias=logit_bias,
                  positive_index=positive_index, labels=labels, key_labels=key_labels,
                  reduction=reduction)
    common = dict(logit_scale=logit_scale, logit_bias=logit_bias, backend=backend,
                  passes=passes, **options)
    return _siglip_call("gather_siglip_loss", lambda st: _gather_siglip(st, common), query,
                        key, group, normalize, timeout, backend, passes, options, kwargs)


def _gather_siglip(st, common):
    p, world = st.p, st.world
    k_all = _gather(p.key, st, st.sizes_m, st.any_grad and st.any_key_grad)
    if p.labels is not None:
        pos = dict(labels=p.labels, key_labels=_gather_rows(p.key_labels, st, st.sizes_m))
    else:
        pos = dict(positive_index=p.positive_index)
    # an empty rank's zero loss still gives the scale and bias a (zero) gradient
    tie = tuple(x for x in (p.scale, p.bias) if torch.is_tensor(x))
    out = _local_loss(siglip_loss, p.query, k_all, p.out_dtype, tie, **pos, **common,
                      reduction="none" if p.reduction == "none" else "sum")
    return out * (world / max(st.n_global, 1)) if p.reduction == "mean" else out
