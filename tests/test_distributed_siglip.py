"""The sigmoid loss over the global batch (ring_siglip_loss, FusedSigLIPLoss(distributed=
"ring")) with gloo on 2, 3 and 4 processes, against the reference on the concatenated
batch: both pass schedules, uneven shards, global positive_index, cross-rank labels, DDP
equivalence (scale and bias included), errors on every rank, no hang."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import contrastive_kernels as ck
from contrastive_kernels import distributed as ckd
from test_distributed import (SIZES_M, SIZES_N, _allreduce, _close,
                              _expect_value_error_everywhere, _offsets, spawn)

pytestmark = pytest.mark.cpu_only

D = 8


def _case(world, rank, *, uneven_m=False, labels=False, global_pi=False, reduction="mean",
          passes=None, dtype=torch.float64, backend="torch", overlap=True, frozen=None, seed=0,
          mode="ring", options=None):
    sizes_n = SIZES_N[:world]
    sizes_m = SIZES_M[:world] if uneven_m else list(sizes_n)
    ng, mg = sum(sizes_n), sum(sizes_m)
    gen = torch.Generator().manual_seed(seed)
    Q = F.normalize(torch.randn(ng, D, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    K = F.normalize(torch.randn(mg, D, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    on, om = _offsets(sizes_n), _offsets(sizes_m)
    rn = slice(on[rank], on[rank] + sizes_n[rank])
    rm = slice(om[rank], om[rank] + sizes_m[rank])
    loc, ref_kw = {}, {}
    if labels:
        lab, klab = torch.randint(0, 3, (ng,), generator=gen), torch.randint(0, 4, (mg,),
                                                                             generator=gen)
        loc, ref_kw = dict(labels=lab[rn], key_labels=klab[rm]), dict(labels=lab,
                                                                      key_labels=klab)
    elif global_pi:
        pi = torch.randint(0, mg, (ng,), generator=gen)
        loc, ref_kw = dict(positive_index=pi[rn]), dict(positive_index=pi)
    else:   # the diagonal within each rank
        ref_kw = dict(positive_index=torch.cat([torch.arange(n) + o
                                                for n, o in zip(sizes_n, om)]))

    def leaf(x, grad=True):
        return x.detach().clone().requires_grad_(grad)

    k_frozen = frozen == "keys" or (frozen == "keys_rank0" and rank == 0)
    q, k = leaf(Q[rn], frozen != "queries"), leaf(K[rm], not k_frozen)
    s, b = leaf(torch.tensor(6.0, dtype=dtype)), leaf(torch.tensor(-3.0, dtype=dtype))
    if mode == "ring":
        loss = ckd.ring_siglip_loss(q, k, logit_scale=s, logit_bias=b, reduction=reduction,
                                    passes=passes, backend=backend, overlap=overlap, **loc,
                                    **(options or {}))
    else:
        loss = ckd.gather_siglip_loss(q, k, logit_scale=s, logit_bias=b, reduction=reduction,
                                      passes=passes, backend=backend, **loc, **(options or {}))
    loss.sum().backward()
    Qr, Kr = leaf(Q, frozen != "queries"), leaf(K, frozen != "keys")
    sr, br = leaf(torch.tensor(6.0, dtype=dtype)), leaf(torch.tensor(-3.0, dtype=dtype))
    ref = ck.reference.siglip_loss(Qr, Kr, logit_scale=sr, logit_bias=br, reduction=reduction,
                                   **ref_kw)
    ref.sum().backward()
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    factor = world if reduction == "mean" else 1
    if reduction == "none":
        _close("loss (none)", loss, ref[rn], tol)
    else:
        _close("sum of rank losses", _allreduce(loss), factor * ref.reshape(1), tol)
    if frozen == "queries":
        assert q.grad is None
    else:
        _close("dq", q.grad, factor * Qr.grad[rn], tol)
    if k_frozen:
        assert k.grad is None
    else:
        _close("dk", k.grad, factor * Kr.grad[rm], tol)
    _close("d logit_scale", _allreduce(s.grad), factor * sr.grad.reshape(1), tol)
    _close("d logit_bias", _allreduce(b.grad), factor * br.grad.reshape(1), tol)


def _ddp(world, rank, passes, seed=5):
    """Shared encoders, learnable scale and bias: DDP's averaged gradients equal a single
    process on the concatenated batch (the scale and bias not multiplied by P)."""
    sizes = SIZES_N[:world]
    off = _offsets(sizes)
    gen = torch.Generator().manual_seed(seed)
    ng, din = sum(sizes), 5
    X = torch.randn(ng, din, generator=gen, dtype=torch.float64)
    Y = torch.randn(ng, din, generator=gen, dtype=torch.float64)

    def make():
        torch.manual_seed(seed)
        return (torch.nn.Linear(din, D).double(), torch.nn.Linear(din, D).double(),
                torch.nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64)),
                torch.nn.Parameter(torch.tensor(-10.0, dtype=torch.float64)))

    def params(m):
        return list(m[0].parameters()) + list(m[1].parameters()) + [m[2], m[3]]

    m = make()
    sl = slice(off[rank], off[rank] + sizes[rank])
    loss_fn = ck.FusedSigLIPLoss(backend="torch", distributed="ring", passes=passes)
    loss = loss_fn(F.normalize(m[0](X[sl]), dim=1), F.normalize(m[1](Y[sl]), dim=1),
                   m[2].exp(), m[3])
    loss.backward()
    ddp = [_allreduce(p.grad) / world for p in params(m)]
    r = make()
    ref = ck.reference.siglip_loss(F.normalize(r[0](X), dim=1), F.normalize(r[1](Y), dim=1),
                                   logit_scale=r[2].exp(), logit_bias=r[3],
                                   positive_index=torch.arange(ng))
    ref.backward()
    _close(f"DDP loss (passes={passes})", _allreduce(loss) / world, ref.reshape(1), 1e-9)
    for i, (g, p) in enumerate(zip(ddp, params(r))):
        _close(f"DDP grad {i} (passes={passes})", g, p.grad.reshape(-1), 1e-9)


def _cases(world, rank):
    C = lambda **kw: _case(world, rank, **kw)  # noqa: E731
    for passes in (3, 4):
        ckd.reset_ring_stats()
        C(passes=passes)                                               # uneven shards
        C(passes=passes, uneven_m=True, dtype=torch.float32, backend="auto")  # hard negatives
        C(passes=passes, uneven_m=True, labels=True)                   # cross-rank labels
        C(passes=passes, uneven_m=True, global_pi=True)                # global positive_index
        C(passes=passes, reduction="sum", labels=True)
        C(passes=passes, overlap=False, global_pi=True)
        C(passes=passes, frozen="keys", uneven_m=True)
        C(passes=passes, frozen="queries", labels=True)
        C(passes=passes, frozen="keys_rank0", global_pi=True, uneven_m=True)
        assert ckd.RING_STATS["remote_key_blocks"] <= 2, ckd.RING_STATS
        assert ckd.RING_STATS["dk_buffers"] <= 3, ckd.RING_STATS
        _ddp(world, rank, passes)
    C(reduction="none", uneven_m=True, labels=True)
    # kernel options reach the ring: Triton's blocked algorithm, S read from a GEMM or
    # computed in the kernels (interpreter; one row per block)
    for passes, algo in ((3, "blocked"), (3, "epilogue"), (4, "epilogue")):
        C(passes=passes, uneven_m=True, labels=True, dtype=torch.float32, backend="triton",
          options=dict(algorithm=algo, workspace=1))
    # gather mode (all keys on every rank), for comparison
    C(mode="gather", uneven_m=True, labels=True)
    C(mode="gather", frozen="keys_rank0", global_pi=True, uneven_m=True)
    C(mode="gather", global_pi=True, reduction="sum", passes=4)
    C(mode="gather", reduction="none", dtype=torch.float32, backend="auto")
    # the 3-pass schedule sends nothing in backward but one scalar: its forward is the
    # only pass over the ring (the 4-pass backward would call siglip_tiles with g_r)
    calls = []
    be = ck.backends.get("torch")
    real = be.siglip_tiles
    be.siglip_tiles = lambda *a, **kw: calls.append(a[4] is not None) or real(*a, **kw)
    try:
        C(passes=3, labels=True)
        assert calls and not any(calls), calls
        calls.clear()
        C(passes=4, labels=True)
        assert any(calls), calls
    finally:
        del be.siglip_tiles
    # the 3-pass backward refuses upstream gradients that differ between ranks
    q, k = torch.randn(3, D, requires_grad=True), torch.randn(3, D)
    loss = ckd.ring_siglip_loss(q, k, backend="torch", passes=3)
    try:
        (loss * (rank + 1)).backward()
    except RuntimeError as e:
        assert "differs between ranks" in str(e), str(e)
    else:
        raise AssertionError("no error for differing upstream gradients")
    dist.barrier()
    # errors on every rank
    q = torch.randn(4, D)
    bad = torch.full((4,), 10 ** 6) if rank == world - 1 else torch.zeros(4, dtype=torch.long)
    _expect_value_error_everywhere(
        lambda: ckd.ring_siglip_loss(q, q.clone(), positive_index=bad, backend="torch"),
        "positive_index values must be in")
    _expect_value_error_everywhere(
        lambda: ckd.ring_siglip_loss(q, q.clone(), backend="torch",
                                     passes=5 if rank == 0 else None), "passes must be")
    scale = 10.0 if rank else -1.0
    _expect_value_error_everywhere(
        lambda: ckd.ring_siglip_loss(q, q.clone(), logit_scale=scale, backend="torch"),
        "logit_scale must be > 0")
    _expect_value_error_everywhere(
        lambda: ckd.ring_siglip_loss(q, q.clone(), backend="torch",
                                     reduction="sum" if rank else "mean"),
        "reduction must be the same on every rank, got ['mean', 'sum'")
    # the ring's schedule decides backward's collectives: ranks must agree on it
    qg = torch.randn(4, D, requires_grad=True)
    _expect_value_error_everywhere(
        lambda: ckd.ring_siglip_loss(qg, q.clone(), backend="torch",
                                     passes=3 if rank == 0 else 4),
        "the pass schedule (passes, reduction='none', a gradient needed) must be the same")
    # the same schedule written differently, or no backward at all, or gather: fine
    for p_a, p_b, red, x, fn in ((None, 3, "mean", qg, ckd.ring_siglip_loss),
                                  (3, 4, "none", qg, ckd.ring_siglip_loss),
                                  (3, 4, "mean", q, ckd.ring_siglip_loss),
                                  (3, 4, "mean", qg, ckd.gather_siglip_loss)):
        loss = fn(x, q.clone(), backend="torch", reduction=red,
                  passes=p_a if rank == 0 else p_b)
        if loss.requires_grad:
            loss.sum().backward()
        dist.barrier()
    # a rank that needs no gradient could not join the others' collective backward
    _expect_value_error_everywhere(
        lambda: ckd.ring_siglip_loss(torch.randn(4, D, requires_grad=rank != 0),
                                     torch.randn(4, D), backend="torch"),
        "need a gradient and rank(s) [0] do not")
    # a backend name one rank cannot use fails every rank before any collective
    bad_be = "nope" if rank == world - 1 else "torch"
    for fn in (ckd.ring_siglip_loss, ckd.gather_siglip_loss, ckd.ring_info_nce,
               ckd.gather_info_nce):
        _expect_value_error_everywhere(lambda: fn(q, q.clone(), backend=bad_be),
                                       "backend must be 'auto' or one of")
    # a rank without query rows: its scale and bias still get a (zero) gradient, so
    # that DDP finds them used on every rank
    for fn in (ckd.ring_siglip_loss, ckd.gather_siglip_loss):
        qe = torch.randn(0 if rank == 0 else 3, D, dtype=torch.float64, requires_grad=True)
        ke = torch.randn(3, D, dtype=torch.float64)
        s = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
        fn(qe, ke, logit_scale=s, logit_bias=b, backend="torch").backward()
        assert s.grad is not None and b.grad is not None, fn.__name__
        if rank == 0:
            assert float(s.grad) == 0.0 and float(b.grad) == 0.0, fn.__name__
        dist.barrier()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_global_batch(world, tmp_path):
    spawn(world, tmp_path, _cases)


def _env_cases(world, rank):
    """CK_LOW_MEMORY=1 / CK_ALGORITHM=blocked, job-wide (every rank's environment), are
    preferences in the ring as in a local call: a loss or backend that cannot take them
    runs without them, on every rank, with the reference's numbers. Set on one rank only,
    an option that changes what travels fails every rank, naming it."""
    from contrastive_kernels import options as ck_options
    C = lambda **kw: _case(world, rank, **kw)  # noqa: E731
    g = torch.Generator().manual_seed(11 + rank)
    q, k = torch.randn(3 + rank, D, generator=g), torch.randn(7, D, generator=g)
    plain = [fn(q, k, **kw) for fn, kw in _ENV_CALLS]
    saved = dict(ck_options.ENV_DEFAULTS)
    for name, value in (("low_memory", True), ("algorithm", "blocked"),
                        ("algorithm", "epilogue")):
        ck_options.ENV_DEFAULTS[name] = value
        try:
            assert getattr(ck_options.make_options(), name) == value
            for passes in (3, 4):
                C(passes=passes, labels=True)                       # torch: lacks both
                C(passes=passes, uneven_m=True, dtype=torch.float32, backend="auto")
            C(mode="gather", global_pi=True)
            for (fn, kw), want in zip(_ENV_CALLS, plain):   # the same bits (auto: above)
                assert torch.equal(fn(q, k, **kw), want), (name, fn.__name__, kw)
        finally:
            ck_options.ENV_DEFAULTS.update(saved)
        dist.barrier()
    # one rank's environment asks Triton's ring for dk blocks in the input dtype
    ck_options.ENV_DEFAULTS["low_memory"] = rank == 0
    try:
        qg = torch.randn(4, D, requires_grad=True)
        _expect_value_error_everywhere(
            lambda: ckd.ring_info_nce(qg, torch.randn(4, D), backend="triton"), "low_memory")
    finally:
        ck_options.ENV_DEFAULTS.update(saved)


_ENV_CALLS = ((ckd.ring_siglip_loss, dict(backend="torch")),
              (ckd.ring_siglip_loss, dict(backend="cpu", passes=4)),
              (ckd.ring_info_nce, dict(backend="cpu", margin=0.2)),
              (ckd.ring_info_nce, dict(backend="torch", symmetric=True)),
              (ckd.gather_siglip_loss, dict(backend="cpu")))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_environment_preferences_in_the_ring(world, tmp_path):
    spawn(world, tmp_path, _env_cases)


def test_no_process_group_is_local():
    assert not dist.is_initialized()
    q, k = torch.randn(5, 4), torch.randn(5, 4)
    torch.testing.assert_close(ckd.ring_siglip_loss(q, k, backend="torch"),
                               ck.siglip_loss(q, k, backend="torch"))
    torch.testing.assert_close(ck.FusedSigLIPLoss(distributed="ring")(q, k, 10.0, -10.0),
                               ck.siglip_loss(q, k))
