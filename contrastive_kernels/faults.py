"""Fault handling of the distributed losses (contrastive_kernels.distributed).

A distributed loss is collective: every rank of the group must call it, and call its
backward. What happens when one does not (distributed's docstring, "Faults and
timeouts"):

* Check-in. Before its first collective, a call (and each backward node that
  communicates) checks in to the group's store under a slot number that every rank
  counts alike: one compare_set of the key ck/<slot>/<rank> to a label naming the step
  ("ring_info_nce" or "backward of ring_info_nce"), a wait for the other ranks' keys,
  one multi_get. A rank whose key is missing after the timeout is locked out by an
  atomic compare_set to "abort" (a late arrival then sees "abort" and moves on to the
  next slot, so the ranks stay in step), and every rank that waited raises the same
  CollectiveFault naming it. Labels that differ (one rank in backward, another in the
  next forward) raise on every rank at once. No collective has started, so the process
  group stays usable.
* In the call. Every collective and ring transfer is waited with the timeout (gloo;
  NCCL keeps its own watchdog). A rank whose wait fails (a timeout, or the connection to
  a dead peer closed) records why in the store, waits a short grace for the others'
  records and raises a CollectiveFault naming the ranks that recorded nothing (dead,
  hung, or stopped outside the call) and what the others saw. A rank that raises
  anything else inside the call records it too. The group may then be unusable.
"""
import contextlib
import datetime
import math
import weakref

import torch
import torch.distributed as dist

__all__ = ["CollectiveFault", "REPORT_GRACE_S", "check_timeout", "Sync", "Pending"]

REPORT_GRACE_S = 2.0     # how long a failing rank waits for the other ranks' records
_KEEP_SLOTS = 4          # a rank deletes its own check-in key this many slots later
_SLOTS = weakref.WeakKeyDictionary()     # process group -> its next rendezvous slot
_ABORT = "abort"


class CollectiveFault(RuntimeError):
    """A distributed loss's collective did not complete on this rank: a peer rank did not
    arrive in time, died, or failed. The message names the ranks where it could."""


def check_timeout(timeout):
    """`timeout` as a datetime.timedelta (None stays None); TypeError / ValueError."""
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        secs = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        secs = float(timeout) if abs(timeout) <= 1e300 else math.inf    # a huge int overflows
    else:
        raise TypeError(f"timeout must be None, a number of seconds or a datetime.timedelta, "
                        f"got {type(timeout).__name__}")
    if not (math.isfinite(secs) and secs > 0):
        raise ValueError(f"timeout must be finite and > 0 seconds, got {secs}")
    if secs < 1e-3:      # torch.distributed rounds down to whole ms, and 0 ms waits forever
        raise ValueError(f"timeout must be at least 0.001 seconds (torch.distributed counts "
                         f"whole milliseconds), got {secs}")
    return datetime.timedelta(seconds=secs)


def _pg(group):
    return group if group is not None else dist.distributed_c10d._get_default_group()


def _group_timeout(group=None, device=None):
    """The timeout of process group `group` (None: the default group), as given to
    init_process_group / new_group (torch's default when none was given): the default
    `timeout` of the distributed losses."""
    pg = _pg(group)
    dev = torch.device("cpu") if device is None else device
    try:
        t = pg._get_backend(dev).options._timeout
        if isinstance(t, datetime.timedelta) and t.total_seconds() > 0:
            return t
    except Exception:       # another torch version, or a backend without options
        pass
    try:
        return dist.distributed_c10d._get_default_timeout(dist.get_backend(group))
    except Exception:
        return datetime.timedelta(minutes=30)


def _group_store(pg):
    try:
        return pg.get_group_store()
    except Exception:
        try:
            return dist.distributed_c10d._get_process_group_store(pg)
        except Exception:
            return None


def _secs(t):
    return f"{t.total_seconds():g} s"


def _first_line(exc, limit=300):
    text = str(exc).strip().splitlines()
    text = text[0] if text else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class Sync:
    """Rendezvous, timed waits and fault reports of one distributed call (see above)."""

    def __init__(self, what, group, world, rank, timeout, dev):
        self.what, self.group, self.world, self.rank = what, group, world, rank
        self.pg = _pg(group)
        self.timeout = timeout if timeout is not None else _group_timeout(group, dev)
        # gloo (CPU tensors) takes a timeout per wait; NCCL keeps its own watchdog (and
        # its wait(timeout) would block the host on the stream)
        self.timed = dev.type == "cpu" and "gloo" in str(dist.get_backend(group))
        self.store = _group_store(self.pg)
        self.slot = None
        self.agreed = False     # inside the call: an error is recorded for the others

    # -- names
    def name(self, ranks):
        """'rank 1' / 'ranks [1, 2]', with the global ranks of a subgroup."""
        ranks = sorted(ranks)
        text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
        if self.group is not None:
            glob = [dist.get_global_rank(self.group, r) for r in ranks]
            if glob != ranks:
                text += (f" of the group (global rank {glob[0]})" if len(glob) == 1 else
                         f" of the group (global ranks {glob})")
        return text

    # -- the rendezvous
    def _next_slot(self):
        s = _SLOTS.get(self.pg, 0)
        _SLOTS[self.pg] = s + 1
        return s

    def _key(self, slot, rank):
        return f"ck/{slot}/{rank}"

    def rendezvous(self, label):
        """Check in as `label`; raise CollectiveFault on every rank that waited if a rank
        did not check in within the timeout, or checked in as something else."""
        self.agreed = False
        st = self.store
        if st is None:
            return
        try:
            s = self._next_slot()
            while st.compare_set(self._key(s, self.rank), "", label) == _ABORT.encode():
                s = self._next_slot()     # the others gave up on that slot: the next one
            keys = [self._key(s, r) for r in range(self.world)]
            try:
                st.wait(keys, self.timeout)
            except RuntimeError:
                for k in keys:      # lock the absent ranks out (atomic with their check-in)
                    st.compare_set(k, "", _ABORT)
            vals = [v.decode() for v in st.multi_get(keys)]
        except RuntimeError as e:
            raise CollectiveFault(
                f"{self.what}: the process group's store cannot be reached for the "
                f"check-in ({_first_line(e)}); the rank that hosts it (rank 0 with a "
                f"TCPStore) may have died") from e
        self.slot = s
        absent = [r for r, v in enumerate(vals) if v == _ABORT]
        if absent:
            raise CollectiveFault(self._absent_message(label, absent))
        if len(set(vals)) > 1:
            where = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(vals))
            raise CollectiveFault(
                f"{self.what}: the ranks are not at the same step ({where}). Every rank of "
                f"the group must make the same distributed loss calls in the same order and "
                f"call backward on every rank. No collective was started: the process group "
                f"is still usable")
        if s >= _KEEP_SLOTS:
            try:
                st.delete_key(self._key(s - _KEEP_SLOTS, self.rank))
            except RuntimeError:
                pass

    def _absent_message(self, label, absent):
        who = self.name(absent)
        if label.startswith("backward"):
            head = (f"{label}: {who} did not call backward within {_secs(self.timeout)}. "
                    f"The backward of a distributed loss is collective: backward must be "
                    f"called on every rank of the group (a rank whose loss is not used must "
                    f"still backpropagate it, e.g. loss * 0; torch.autograd.grad or "
                    f"backward(inputs=...) must ask for the same tensors on every rank, as "
                    f"a gather's keys left out on one rank skip their collective there; "
                    f"with ring_siglip_loss's 3-pass "
                    f"schedule the upstream gradient must also be the same on every rank, so "
                    f"use passes=4 there)")
        else:
            head = (f"{self.what}: {who} did not call {self.what} within "
                    f"{_secs(self.timeout)} (raised before it, skipped it, or is elsewhere). "
                    f"It is collective: every rank of the group must call it")
        return (head + ". No collective was started: the process group is still usable; a "
                "rank that arrives late skips this abandoned check-in and joins the next "
                "call")

    # -- waits inside the call
    def wait(self, works, step, peers=None):
        """Wait for `works` (with the timeout on gloo); on a failure record it, collect
        the other ranks' records and raise CollectiveFault. peers: the group rank each
        work talks to (a ring transfer), or None (a collective)."""
        for i, w in enumerate(works):
            try:
                if self.timed:
                    w.wait(self.timeout)
                else:
                    w.wait()
            except RuntimeError as e:
                if isinstance(e, CollectiveFault):
                    raise
                raise self.fault(step, e, None if peers is None else peers[i]) from e

    def post(self, ops, step, peers):
        """Start the ring transfers `ops` (dist.P2POp; peers: the group rank of each) and
        return their works. A post that fails (gloo: the connection to a peer that died is
        already closed) raises the CollectiveFault that a failed wait would. CUDA tensors
        are posted as one batch (NCCL coalesces them), CPU ones one at a time, so that a
        failure names its peer."""
        batches = [(ops, None)] if ops and ops[0].tensor.is_cuda else \
            [([op], peer) for op, peer in zip(ops, peers)]
        works = []
        for batch, peer in batches:
            try:
                works += dist.batch_isend_irecv(batch)
            except RuntimeError as e:
                if isinstance(e, CollectiveFault):
                    raise
                raise self.fault(step, e, peer) from e
        return works

    def collective(self, op, step, *args):
        """Run the collective `op(*args, group=, async_op=True)` and wait for it (timed);
        `step` names it in a fault."""
        work = op(*args, group=self.group, async_op=True)
        self.wait([work] if work is not None else [], step)

    def fault(self, step, exc, peer=None):
        low = str(exc).lower()
        if "timed out" in low or "timeout" in low:
            kind = "timeout"
            mine = f"timed out after {_secs(self.timeout)} at {step}"
            if peer is not None:
                mine += f" waiting for {self.name([peer])}"
        elif any(w in low for w in ("closed", "connection", "reset by peer", "broken pipe")):
            kind = "lost"
            mine = f"lost the connection at {step}"
            if peer is not None:
                mine += f" to {self.name([peer])}"
        else:
            kind = "error"
            mine = f"failed at {step}: {_first_line(exc)}"
        reports, store_err = self._exchange_reports(kind, peer, mine)
        others = [r for r in range(self.world) if r != self.rank]
        silent = [r for r in others if r not in reports]
        lost = sorted({p for k, p, _ in reports.values() if k == "lost" and p is not None} |
                      ({peer} if kind == "lost" and peer is not None else set()))
        msg = f"{self.what}: rank {self.rank} {mine}."
        if store_err is not None:
            msg += (f" The process group's store cannot be reached ({store_err}): the rank "
                    f"that hosts it (rank 0 with a TCPStore) may have died.")
        elif silent:
            msg += (f" No record from {self.name(silent)} within "
                    f"{min(REPORT_GRACE_S, self.timeout.total_seconds()):g} s: "
                    f"dead, hung, or stopped outside this call")
            dead = [r for r in lost if r in silent]
            msg += (f" ({self.name(dead)}: connection closed, probably died)." if dead
                    else ".")
        raised = {r: t for r, (k, _, t) in reports.items() if k == "raised"}
        if raised:
            msg += " Raised inside the call: " + "; ".join(
                f"rank {r}: {t}" for r, t in sorted(raised.items())) + "."
        seen = {r: t for r, (k, _, t) in reports.items() if k != "raised"}
        if seen:
            msg += " The other ranks: " + "; ".join(
                f"rank {r} {t}" for r, t in sorted(seen.items())) + "."
        msg += (" The process group may now be unusable (a collective can be left half "
                "done): destroy it and initialize a new one, or end the job.")
        return CollectiveFault(msg)

    def _fail_key(self, rank):
        return f"ck/{self.slot}/fail/{rank}"

    def record(self, kind, peer, text):
        """Record this rank's failure for the others (best effort)."""
        if self.store is None or self.slot is None:
            return None
        try:
            self.store.set(self._fail_key(self.rank),
                           f"{kind}|{'' if peer is None else peer}|{text}")
        except RuntimeError as e:
            return _first_line(e)
        return None

    def _exchange_reports(self, kind, peer, text):
        """Record this rank's failure, wait up to REPORT_GRACE_S for the others' records
        and read them: ({rank: (kind, peer, text)}, store error or None)."""
        err = self.record(kind, peer, text)
        if err is not None or self.store is None or self.slot is None:
            return {}, err
        st = self.store
        others = [r for r in range(self.world) if r != self.rank]
        grace = min(REPORT_GRACE_S, self.timeout.total_seconds())
        try:
            st.wait([self._fail_key(r) for r in others], datetime.timedelta(seconds=grace))
        except RuntimeError:
            pass
        out = {}
        try:
            for r in others:
                if st.check([self._fail_key(r)]):
                    k, p, t = st.get(self._fail_key(r)).decode().split("|", 2)
                    out[r] = (k, int(p) if p else None, t)
        except RuntimeError as e:
            return out, _first_line(e)
        return out, None

    @contextlib.contextmanager
    def guard(self):
        """Inside the call: an exception other than a CollectiveFault is recorded for the
        other ranks (who would otherwise only see a timeout), then raised."""
        try:
            yield
        except BaseException as e:
            if self.agreed and not isinstance(e, CollectiveFault):
                self.record("raised", None, _first_line(e))
            raise

    def backward(self):
        """The rendezvous of a backward node that communicates; returns its guard."""
        self.rendezvous(f"backward of {self.what}")
        self.agreed = True
        return self.guard()


class Pending:
    """Ring transfers in flight: wait() waits for them once (timed, see Sync.wait)."""

    def __init__(self, sync, reqs, step, peers):
        self.sync, self.reqs, self.step, self.peers = sync, reqs, step, peers

    def wait(self):
        reqs, self.reqs = self.reqs, []
        if reqs:
            self.sync.wait(reqs, self.step, self.peers)
