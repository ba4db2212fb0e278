"""Faults of the distributed losses (gloo, 2, 3 and 4 processes, every spawn with a
timeout): a rank that does not call the loss (raises before it and goes on, or comes
late), one that skips backward, one that dies inside the ring or between collectives;
the ranks that wait raise a CollectiveFault naming it within the call's `timeout`
(short here), and where every rank stays alive the group stays usable (the next call
works). Also the shards a data-parallel job meets at its edges, against the float64
reference on the concatenated batch: a rank with no rows (N_r = 0), keys but no
queries, symmetric=True with more keys than queries (hard negatives), normalize=True.
"""
import datetime
import functools
import os
import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import contrastive_kernels as ck
from contrastive_kernels import distributed as ckd
from test_distributed import _allreduce, _close, _offsets, spawn

pytestmark = pytest.mark.cpu_only

D = 6
T = 0.5          # seconds: the timeout of a call that must fail (a rank stays away)
T_DIES = 1.5     # the timeout of a call in which a rank dies
SPAWN_LIMIT = 90
FNS = ("ring_info_nce", "gather_info_nce", "ring_siglip_loss", "gather_siglip_loss")


def _shard(rank, n=3, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    q = torch.randn(n, D, generator=g, dtype=torch.float64)
    k = torch.randn(n, D, generator=g, dtype=torch.float64)
    return q.requires_grad_(grad), k.requires_grad_(grad)


def _call(name, q, k, **kw):
    return getattr(ckd, name)(q, k, backend="torch", **kw)


def _expect_fault(fn, *patterns):
    """fn() raises a CollectiveFault whose message matches every pattern; returns
    (message, seconds taken)."""
    t0 = time.monotonic()
    try:
        fn()
    except ckd.CollectiveFault as e:
        took, msg = time.monotonic() - t0, str(e)
    else:
        raise AssertionError(f"rank {dist.get_rank()}: no CollectiveFault")
    for pat in patterns:
        assert re.search(pat, msg), f"rank {dist.get_rank()}: {pat!r} not in: {msg}"
    return msg, took


def _others(world, away):
    return dist.new_group([r for r in range(world) if r != away])


# ----------------------------------------------------------------------------- alive

def _absent_in_forward(world, rank, name, away, late=False):
    """Rank `away` raises before the loss and goes on to the barrier (late=False), or
    calls it after the others gave up (late=True); the others raise, naming it."""
    others = _others(world, away)
    q, k = _shard(rank)
    before = _call(name, q, k).detach()
    if rank != away:
        dist.barrier(group=others)          # the others arrive together
        _, took = _expect_fault(lambda: _call(name, q, k, timeout=T),
                                rf"rank {away} did not call {name} within {T:g} s",
                                "every rank of the group must call it",
                                "process group is still usable")
        assert took < T + 10, took
    elif late:
        time.sleep(T + 1.5)     # past the others' timeout (a FileStore's wait may add 1 s)
        # its check-in was given up: it moves on, waits for the others there, and
        # raises (they are at the barrier), naming them
        _expect_fault(lambda: _call(name, q, k, timeout=T),
                      rf"ranks? \[?[\d, ]+\]? did not call {name}")
    else:
        try:
            raise RuntimeError("this rank's data loader failed")
        except RuntimeError:
            pass
    dist.barrier()      # no collective was started: the barriers meet
    after = _call(name, q, k)      # the ranks are in step again
    _close(f"{name} after a fault", after, before, 1e-12)


def _absent_in_backward(world, rank, name, away, next_call=False):
    """Rank `away` does not call backward: it goes on to the barrier, or (next_call)
    straight to the next loss call, which every rank then reports at once."""
    others = _others(world, away)
    q, k = _shard(rank)
    dist.barrier()                          # every rank arrives within T
    loss = _call(name, q, k, timeout=T)
    if next_call:
        if rank == away:
            _expect_fault(lambda: _call(name, q, k, timeout=T), "not at the same step",
                          f"'backward of {name}'")
        else:
            _expect_fault(loss.backward, "not at the same step", f"rank {away}: '{name}'",
                          "call backward on every rank")
    elif rank != away:
        dist.barrier(group=others)
        _expect_fault(loss.backward, rf"backward of {name}: rank {away} did not call "
                      rf"backward within {T:g} s", "backward must be called on every rank")
    dist.barrier()
    q.grad = k.grad = None
    _call(name, q, k).backward()           # a whole step works again
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def _grad_of_queries_only(world, rank, name, away):
    """Rank `away` asks torch.autograd.grad for the queries' gradient only, the others
    for both. The ring's one backward node still runs there: every rank gets its
    gradients. A gather's keys have their own collective node, which autograd leaves
    out on `away`: the others raise within T, naming it and the cause."""
    q, k = _shard(rank, seed=2)
    want = torch.autograd.grad(_call(name, q, k), [q, k])
    dist.barrier()
    loss = _call(name, q, k, timeout=T)
    if rank == away:
        got = torch.autograd.grad(loss, [q])
        _close(f"{name}: dq alone", got[0], want[0], 1e-12)
    elif name.startswith("ring"):
        got = torch.autograd.grad(loss, [q, k])
        for a, b, what in zip(got, want, ("dq", "dk")):
            _close(f"{name}: {what}", a, b, 1e-12)
    else:
        _expect_fault(lambda: torch.autograd.grad(loss, [q, k]),
                      rf"backward of {name}: rank {away} did not call backward",
                      r"must ask for the same tensors on every rank")
    dist.barrier()
    _call(name, q, k).backward()           # a whole step works again


def _default_timeout_is_the_groups(world, rank):
    """timeout=None: the process group's own timeout (a subgroup's, set short here);
    a subgroup's ranks are named with their global ranks."""
    members = list(range(1, world)) if world > 2 else [0, 1]
    sub = dist.new_group(members)
    dist.barrier()
    if rank not in members:
        dist.barrier()
        return
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=T), sub)
    away = members[-1]
    q, k = _shard(rank)
    if rank != away:
        named = (rf"rank {len(members) - 1} of the group \(global rank {away}\)"
                 if members[0] else rf"rank {away}")
        _expect_fault(lambda: ckd.ring_info_nce(q, k, group=sub, backend="torch"),
                      rf"{named} did not call ring_info_nce within {T:g} s")
    dist.barrier()


def _bad_arguments_raise_everywhere(world, rank):
    """A bad timeout or normalize on one rank: it raises its error, the others a
    ValueError naming it, and none waits."""
    q, k = _shard(rank)
    odd = rank == world - 1
    for name in FNS:
        for kw, err, match in ((dict(timeout=-1.0 if odd else 5.0), ValueError,
                                "timeout must be finite and > 0"),
                               (dict(timeout="5s" if odd else None), TypeError,
                                "timeout must be None, a number of seconds or"),
                               (dict(normalize="yes" if odd else False), TypeError,
                                "normalize must be a bool")):
            try:
                _call(name, q, k, **kw)
            except (TypeError, ValueError) as e:
                want = (err, match) if odd else \
                    (ValueError, rf"invalid arguments on rank\(s\) \[{world - 1}\]")
                assert isinstance(e, want[0]) and re.search(want[1], str(e)), repr(e)
            else:
                raise AssertionError(f"{name} {kw}: no error")
    dist.barrier()


def _alive_cases(world, rank):
    _edge_shards(world, rank)
    _bad_arguments_raise_everywhere(world, rank)
    # world 3 runs every function, 2 and 4 one each (each case waits about T to 2 T)
    names = {2: FNS[:1], 3: FNS, 4: FNS[2:3]}[world]
    for i, name in enumerate(names):
        _absent_in_forward(world, rank, name, away=(world - 1 - i) % world)
        _absent_in_backward(world, rank, name, away=i % world)
    if world != 3:
        late = "gather_siglip_loss" if world == 2 else "ring_info_nce"
        _absent_in_forward(world, rank, late, away=world - 1, late=True)
    _absent_in_backward(world, rank, FNS[world - 1], away=world - 1, next_call=True)
    for name in {2: FNS[3:], 3: FNS[1:3], 4: FNS[:1]}[world]:
        _grad_of_queries_only(world, rank, name, away=world - 2)
    _default_timeout_is_the_groups(world, rank)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_faults_where_every_rank_stays_alive(world, tmp_path):
    spawn(world, tmp_path, _alive_cases, timeout_s=SPAWN_LIMIT)


# ----------------------------------------------------------------------------- deaths

def _die_in_the_ring(nth):
    """In this process: os._exit at the start of the nth ring step (counted from now),
    before its transfers are posted."""
    orig, count = ckd.RingBlocks._next_block, [0]

    def next_block(self, *args):
        count[0] += 1
        if count[0] == nth:
            os._exit(0)
        return orig(self, *args)
    ckd.RingBlocks._next_block = next_block


def _die_in_local_loss():
    """In this process: os._exit in gather mode's local loss (after its all_gather, before
    its all_reduce)."""
    def die(*args, **kwargs):
        os._exit(0)
    ckd.info_nce = die


def _post_late(seconds):
    """In this process: every ring transfer is posted `seconds` late (by then a peer that
    died has closed its connection, and gloo refuses the post itself)."""
    orig = ckd.RingBlocks._exchange

    def exchange(self, *args):
        time.sleep(seconds)
        return orig(self, *args)
    ckd.RingBlocks._exchange = exchange


def _dies(world, rank, name, victim, where, late=False):
    """Rank `victim` dies inside the call (forward or backward); every other rank raises
    within T_DIES plus the reports' grace, naming it. late: the others post each ring
    transfer 0.3 s late, so that a post (not only a wait) meets the closed connection."""
    survivors = _others(world, victim)
    q, k = _shard(rank)
    kw = dict(symmetric=True) if "info_nce" in name else {}
    _call(name, q, k, **kw).backward()            # a step that works
    if rank == victim:
        if where == "local loss":
            _die_in_local_loss()
        else:       # the second step of the forward's ring, or of the backward's
            _die_in_the_ring(2 if where == "forward" else world + 2)
    elif late:
        _post_late(0.3)
    dist.barrier()

    def step():
        _call(name, q, k, timeout=T_DIES, **kw).backward()
    msg, took = _expect_fault(step, r"No record from ranks? \[?[\d, ]+\]? within",
                              "may now be unusable")
    silent = re.search(r"No record from ranks? \[?([\d, ]+)\]?", msg).group(1)
    assert victim in [int(x) for x in silent.split(",")], msg
    assert took < T_DIES + ckd.REPORT_GRACE_S + 10, took
    if where in ("forward", "backward"):
        # the ring names the step and, next to the victim, the lost connection
        assert "ring step" in msg, msg
        if rank in ((victim + 1) % world, (victim - 1) % world):
            assert f"rank {victim}: connection closed, probably died" in msg, msg
    return survivors        # the closing barrier: the ranks still alive


DEATHS = [(2, "ring_info_nce", 1, "forward"), (2, "gather_info_nce", 0, "local loss"),
          (3, "ring_info_nce", 1, "backward"), (4, "ring_siglip_loss", 2, "forward")]


@pytest.mark.parametrize("world,name,victim,where", DEATHS,
                         ids=[f"{w}-{n}-{where}" for w, n, _, where in DEATHS])
def test_a_rank_dies_inside_the_call(world, name, victim, where, tmp_path):
    cases = functools.partial(_dies, name=name, victim=victim, where=where)
    # a short group timeout bounds what gloo itself may still wait for at the end
    spawn(world, tmp_path, cases, pg_timeout_s=20, timeout_s=SPAWN_LIMIT)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_post_to_a_dead_rank_is_a_fault(world, tmp_path):
    """The victim dies in the forward's ring while the others post their transfers late:
    gloo then raises as the transfer is posted, and that too is a CollectiveFault naming
    the victim (it was a bare RuntimeError)."""
    cases = functools.partial(_dies, name="ring_info_nce", victim=1, where="forward",
                              late=True)
    spawn(world, tmp_path, cases, pg_timeout_s=20, timeout_s=SPAWN_LIMIT)


# ----------------------------------------------------------------------------- edge shards

def _edge_case(world, rank, name, sizes_n, sizes_m, *, symmetric=False, labels=False,
               normalize=False, reduction="mean", self_contrast=False, global_pi=False,
               per_row=False, teacher=None, backend="torch", seed=1):
    """`name` on shards of the given sizes (0 allowed) vs the float64 reference on the
    concatenated batch: the sum of the rank losses and every gradient. per_row: one
    logit scale per query (a leaf); teacher: its weighting (unit teacher rows)."""
    siglip = "siglip" in name
    ng, mg = sum(sizes_n), sum(sizes_m)
    gen = torch.Generator().manual_seed(seed)
    # rows of varied norms: normalize=True must matter
    Q = torch.randn(ng, D, generator=gen, dtype=torch.float64) * 3
    K = None if self_contrast else torch.randn(mg, D, generator=gen, dtype=torch.float64) * 3
    if not normalize:
        Q = F.normalize(Q, dim=1)
        K = None if K is None else F.normalize(K, dim=1)
    on, om = _offsets(sizes_n), _offsets(sizes_m)
    rn = slice(on[rank], on[rank] + sizes_n[rank])
    rm = slice(om[rank], om[rank] + sizes_m[rank])
    lab = klab = None
    if labels:
        lab = torch.randint(0, 3, (ng,), generator=gen)
        klab = lab if self_contrast else torch.randint(0, 3, (mg,), generator=gen)
    # global_pi: positives anywhere in the global keys, repeats (columns with several
    # positives) and unmatched columns included
    pi = torch.randint(0, mg, (ng,), generator=gen) if global_pi else None
    S = 3.0 + 4.0 * torch.rand(ng, generator=gen, dtype=torch.float64)
    TQ = F.normalize(torch.randn(ng, 4, generator=gen, dtype=torch.float64), dim=1)
    TK = TQ if self_contrast else F.normalize(torch.randn(mg, 4, generator=gen,
                                                          dtype=torch.float64), dim=1)
    scale = dict(logit_scale=4.0, logit_bias=-2.0) if siglip else dict(logit_scale=5.0)
    kw = dict(reduction=reduction, **scale)
    if not siglip:
        kw.update(symmetric=symmetric, label_smoothing=0.1)
    if teacher is not None:
        kw.update(teacher_weighting=teacher, teacher_weight=0.5)

    def leaf(x):
        return x.detach().clone().requires_grad_()
    q = leaf(Q[rn])
    k = None if self_contrast else leaf(K[rm])
    loc = dict(kw)
    if per_row:
        loc.update(logit_scale=leaf(S[rn]))
    if teacher is not None:
        loc.update(teacher=TQ[rn] if self_contrast else (TQ[rn], TK[rm]))
    if labels:
        loc.update(labels=lab[rn])
        if not self_contrast:
            loc.update(key_labels=klab[rm])
    if pi is not None:
        loc.update(positive_index=pi[rn])
    loss = getattr(ckd, name)(q, k, normalize=normalize, backend=backend, **loc)
    loss.sum().backward()

    Qr, Kr = leaf(Q), None if self_contrast else leaf(K)
    Qn = F.normalize(Qr, dim=-1) if normalize else Qr
    Kn = None if Kr is None else (F.normalize(Kr, dim=-1) if normalize else Kr)
    ref_kw = dict(kw)
    if per_row:
        ref_kw.update(logit_scale=leaf(S))
    if teacher is not None:
        ref_kw.update(teacher=TQ if self_contrast else (TQ, TK))
    if labels:
        ref_kw.update(labels=lab, key_labels=None if self_contrast else klab)
    elif pi is not None:
        ref_kw.update(positive_index=pi)
    else:   # the default pairing within each rank, in global terms
        parts = []
        for n, off_n, off_m in zip(sizes_n, on, om):
            i = torch.arange(n)
            parts.append((i + n // 2) % n + off_n if self_contrast and n else i + off_m)
        ref_kw.update(positive_index=torch.cat(parts))
    ref_fn = ck.reference.siglip_loss if siglip else ck.reference.info_nce
    ref = ref_fn(Qn, Kn, **ref_kw)
    ref.sum().backward()

    what = (f"{name} N={sizes_n} M={sizes_m} sym={symmetric} norm={normalize} {reduction}"
            f" per_row={per_row} teacher={teacher}")
    factor = world if reduction == "mean" else 1
    if reduction == "none":
        want = ref[:ng][rn]
        if symmetric:
            want = torch.cat([want, ref[ng:][rn if self_contrast else rm]])
        _close(f"{what}: loss (none)", loss, want, 1e-9)
    else:
        _close(f"{what}: sum of rank losses", _allreduce(loss), factor * ref.reshape(1), 1e-9)
    # an empty shard still gets its (empty) gradient: DDP sees every rank take part
    assert q.grad is not None and q.grad.shape == q.shape, what
    _close(f"{what}: dq", q.grad, factor * Qr.grad[rn], 1e-9)
    if k is not None:
        assert k.grad is not None and k.grad.shape == k.shape, what
        _close(f"{what}: dk", k.grad, factor * Kr.grad[rm], 1e-9)
    if per_row:
        s = loc["logit_scale"]
        assert s.grad is not None and s.grad.shape == s.shape, what
        _close(f"{what}: ds", s.grad, factor * ref_kw["logit_scale"].grad[rn], 1e-9)


EMPTY = {  # (query rows, key rows) per rank: a rank without rows, one with keys only
    2: ([0, 3], [0, 3], [2, 0], [4, 3]),
    3: ([3, 0, 2], [4, 0, 2], [2, 0, 3], [3, 2, 3]),
    4: ([2, 0, 0, 3], [2, 0, 1, 4], [0, 3, 0, 2], [1, 4, 2, 2]),
}


def _edge_shards(world, rank):
    n0, m0, n1, m1 = EMPTY[world]
    hn = [2, 3, 1, 2][:world]            # hard negatives: more keys than queries per rank
    hm = [4, 3, 3, 5][:world]
    C = functools.partial(_edge_case, world, rank)
    for name in FNS:
        C(name, n0, m0)                                     # a rank with no rows
        C(name, n1, m1, labels=True)                        # keys but no queries
        C(name, hn, hm, normalize=True)                     # normalize=True
    for name in ("ring_info_nce", "gather_info_nce"):
        C(name, n0, m0, symmetric=True, normalize=True)
        C(name, n1, m1, symmetric=True, labels=True, reduction="none")
        C(name, hn, hm, symmetric=True)                     # symmetric, M_r > N_r
        C(name, hn, hm, symmetric=True, reduction="none")
        C(name, n1, m1, symmetric=True)                     # ... and N_r = 0 < M_r
        C(name, hn, hm, symmetric=True, global_pi=True)     # global index, M > N
        C(name, hm, hn, symmetric=True, global_pi=True)     # global index, M < N
    C("ring_info_nce", [4, 0, 2, 2][:world], [4, 0, 2, 2][:world], self_contrast=True,
      symmetric=True, normalize=True)                       # NT-Xent, an empty rank
    # a per-query temperature and a teacher on a rank without queries (or keys)
    C("ring_info_nce", n0, m0, symmetric=True, per_row=True)
    C("gather_info_nce", n1, m1, labels=True, per_row=True)
    C("ring_info_nce", n1, m1, symmetric=True, teacher="softmax")
    C("ring_info_nce", n0, m0, symmetric=True, labels=True, teacher="linear")
    C("ring_info_nce", [4, 0, 2, 2][:world], [4, 0, 2, 2][:world], self_contrast=True,
      per_row=True, teacher="softmax")
    C("ring_siglip_loss", n0, m0, reduction="none")
    # the compiled CPU kernels never see an empty side either
    C("ring_info_nce", n1, m1, symmetric=True, labels=True, backend="cpu")
    C("ring_siglip_loss", n0, m0, backend="cpu")
    C("gather_siglip_loss", n1, m1, reduction="sum", normalize=True)
