"""retrieval_metrics: against a materialized float64 reference (every way of giving
positives, exact ties, half types, forced small tiles), hand-computed examples, bad
input, and the peak memory at N = M = 32768."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import DEVICE, seed_for
from contrastive_kernels import metrics
from contrastive_kernels.backends import REGISTRY
from contrastive_kernels.metrics import retrieval_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, M, D = 37, 53, 19
DEFAULT_KS = (1, 5, 10)


# ---------------------------------------------------------------- the reference

def reference(q, k=None, positive_index=None, labels=None, key_labels=None, ks=DEFAULT_KS,
              ties_to_positive=True):
    """(metrics, ranks, has_pos) from the full float64 score matrix and explicit masks.
    ties_to_positive=False counts keys that tie the best positive (for showing that the
    tie rule is tested)."""
    self_ret = k is None
    qd = q.detach().cpu().double()
    kd = qd if self_ret else k.detach().cpu().double()
    n, m = qd.shape[0], kd.shape[0]
    s = qd @ kd.T
    valid = torch.ones(n, m, dtype=torch.bool)
    if self_ret:
        valid.fill_diagonal_(False)
    pos = torch.zeros(n, m, dtype=torch.bool)
    if labels is not None:
        lq = labels.cpu()
        lk = lq if key_labels is None else key_labels.cpu()
        pos = lq[:, None] == lk[None, :]
    else:
        if positive_index is None:
            positive_index = (torch.arange(n) + n // 2) % n if self_ret else torch.arange(n)
        pos[torch.arange(n), positive_index.cpu().long()] = True
    pos &= valid
    has_pos = pos.any(1)
    best = torch.where(pos, s, torch.tensor(-math.inf, dtype=torch.float64)).amax(1)
    beats = s > best[:, None] if ties_to_positive else s >= best[:, None]
    ranks = 1 + (beats & valid & ~pos).sum(1)
    r = ranks[has_pos].double()
    out = {f"recall@{x}": (r <= x).double().mean() for x in ks}
    out["mrr"] = (1.0 / r).mean()
    out["mean_rank"] = r.mean()
    out["median_rank"] = torch.median(r)
    return out, ranks, has_pos


def check(out, ref, dtype):
    """out: the fused metrics; ref: the reference's (float64, CPU)."""
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert list(out) == list(ref)
    for name, v in out.items():
        assert v.shape == () and v.dtype == want and v.device.type == DEVICE, (name, v)
        assert not v.requires_grad
        e = ref[name].to(want)
        if name == "mrr":    # a float sum: order may differ
            torch.testing.assert_close(v.cpu(), e, rtol=1e-12 if want == torch.float64 else 1e-6,
                                       atol=0, msg=name)
        else:                # exact: counts of integer ranks over the rows
            assert v.cpu().item() == e.item(), (name, v.item(), e.item())


# ---------------------------------------------------------------- the cases

def _labels(n, classes, gen):
    return torch.randint(0, classes, (n,), generator=gen)


def case_diagonal(gen):
    return N, M, True, {}


def case_index(gen):
    return N, M, True, dict(positive_index=torch.randint(0, M, (N,), generator=gen))


def case_index_int32(gen):
    return N, M, True, dict(positive_index=torch.randint(0, M, (N,), generator=gen,
                                                         dtype=torch.int32))


def case_fewer_keys(gen):
    # M < N: several queries share a key
    return M, N, True, dict(positive_index=torch.randint(0, N, (M,), generator=gen))


def case_labels(gen):
    # duplicate labels: several positives per row
    return N, M, True, dict(labels=_labels(N, 5, gen), key_labels=_labels(M, 5, gen))


def case_labels_missing(gen):
    # query labels 0..7, key labels 0..4: rows with label 5..7 have no positive
    return N, M, True, dict(labels=_labels(N, 8, gen), key_labels=_labels(M, 5, gen))


def case_labels_same_rows(gen):
    # key given with M == N: key_labels defaults to labels
    return N, N, True, dict(labels=_labels(N, 6, gen))


def case_self_labels(gen):
    lab = _labels(N, 9, gen)
    lab[0] = 100          # a label seen once: that row has no positive
    return N, None, False, dict(labels=lab)


def case_ntxent(gen):
    return N + 1, None, False, {}      # even N: (i + N/2) % N


def case_self_index(gen):
    idx = (torch.arange(N) + torch.randint(1, N, (N,), generator=gen)) % N   # never i
    return N, None, False, dict(positive_index=idx)


CASES = [case_diagonal, case_index, case_index_int32, case_fewer_keys, case_labels,
         case_labels_missing, case_labels_same_rows, case_self_labels, case_ntxent,
         case_self_index]
IDS = [c.__name__[5:] for c in CASES]


def make(case, data, dtype, d=D):
    """(query, key or None, kwargs) on DEVICE. data: "gauss" (random normal) or "int"
    (integers in [-2, 2]: exact scores in every dtype, and many ties)."""
    gen = torch.Generator().manual_seed(seed_for("metrics", case.__name__, data, str(dtype)))
    n, m, with_key, kw = case(gen)

    def draw(rows):
        if data == "int":
            x = torch.randint(-2, 3, (rows, d), generator=gen).double()
        else:
            x = torch.randn(rows, d, generator=gen, dtype=torch.float64)
        return x.to(DEVICE, dtype)

    q = draw(n)
    k = draw(m) if with_key else None
    kw = {name: v.to(DEVICE) for name, v in kw.items()}
    return q, k, kw


def run_both(q, k, kw, ks=DEFAULT_KS):
    out = retrieval_metrics(q, k, ks=ks, **kw)
    ref, ranks, has = reference(q, k, ks=ks, **kw)
    return out, ref, ranks, has


def every_k(q, k):
    """ks 1 .. M + 2: the recalls then give the whole distribution of the ranks."""
    m = (q if k is None else k).shape[0]
    return tuple(range(1, m + 3))


# ---------------------------------------------------------------- against the reference

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gauss_against_reference(case, dtype):
    q, k, kw = make(case, "gauss", dtype)
    out, ref, ranks, has = run_both(q, k, kw, ks=every_k(q, k) + DEFAULT_KS)
    check(out, ref, dtype)
    assert ranks[has].max() > 1      # not trivially all first


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_integer_embeddings_exact_with_ties(case, dtype):
    """Integer embeddings: every score is exact, so the result must equal the reference
    exactly, in every dtype; many keys tie the best positive, and they do not count."""
    q, k, kw = make(case, "int", dtype)
    ks = every_k(q, k)
    out, ref, ranks, has = run_both(q, k, kw, ks=ks)
    check(out, ref, dtype)
    # ties occur, and counting them would give other metrics: the tie rule is tested
    strict, _, _ = reference(q, k, ks=ks, ties_to_positive=False, **kw)
    assert any(strict[x] != ref[x] for x in ref), "no tie in the data"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [case_diagonal, case_labels, case_self_labels],
                         ids=["diagonal", "labels", "self_labels"])
def test_half_scores_in_float32(case, dtype):
    """Random half inputs: products of half values are exact in float32, so float32 scores
    rank as the float64 reference of the same values; scores rounded to the half type
    would tie and flip many of them."""
    q, k, kw = make(case, "gauss", dtype, d=64)
    out, ref, _, _ = run_both(q, k, kw, ks=every_k(q, k))
    check(out, ref, dtype)


def test_rows_without_positive_left_out():
    q, k, kw = make(case_labels_missing, "gauss", torch.float64)
    _, _, has = reference(q, k, **kw)
    assert 0 < has.sum() < len(has)
    full = retrieval_metrics(q, k, **kw)
    lab = kw["labels"]
    kept = retrieval_metrics(q[has.to(DEVICE)], k, labels=lab[has.to(DEVICE)],
                             key_labels=kw["key_labels"])
    for name in full:
        assert full[name].item() == kept[name].item(), name


def test_self_retrieval_never_retrieves_itself():
    """The query itself would be every row's top key (unit rows): key=None must skip it,
    while the same matrix passed as key counts it."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    q = torch.nn.functional.normalize(q, dim=1).to(DEVICE)
    lab = (torch.arange(40) % 4).to(DEVICE)
    own = retrieval_metrics(q, labels=lab)
    ref, _, _ = reference(q, labels=lab)
    check(own, ref, torch.float64)
    # with key=q the diagonal is a valid positive (same label): rank 1 everywhere
    both = retrieval_metrics(q, q, labels=lab)
    assert both["recall@1"].item() == 1.0 and own["recall@1"].item() < 1.0


# ---------------------------------------------------------------- hand-computed

def test_hand_computed():
    """Scores by hand. Row 0: positive 1.0, keys above it 2.0, tie 1.0 -> rank 2.
    Row 1: positive 3.0 is the top -> rank 1. Row 2: positive 0.0, above it 2.0, 1.0, 1.0
    -> rank 4. Ranks 2, 1, 4: median 2, mean 7/3."""
    k = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0]], device=DEVICE)
    q = torch.tensor([[1.0, 0.0], [1.5, 0.0], [1.0, 0.0]], device=DEVICE)
    out = retrieval_metrics(q, k, positive_index=torch.tensor([0, 1, 3], device=DEVICE),
                            ks=(1, 2, 3, 4))
    got = {name: v.item() for name, v in out.items()}
    assert got == pytest.approx({"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 2 / 3,
                                 "recall@4": 1.0, "mrr": (1 / 2 + 1 + 1 / 4) / 3,
                                 "mean_rank": 7 / 3, "median_rank": 2.0}, rel=1e-6)
    # labels: keys 0 and 1 are positives of row 0: the best (2.0) is the top -> rank 1
    out = retrieval_metrics(q[:1], k, labels=torch.tensor([7], device=DEVICE),
                            key_labels=torch.tensor([7, 7, 0, 0], device=DEVICE), ks=(1,))
    assert out["recall@1"].item() == 1.0 and out["mean_rank"].item() == 1.0


def test_median_is_the_lower_middle():
    # ranks 1 and 3: torch.median gives 1, not the average 2
    k = torch.tensor([[3.0], [2.0], [1.0]], device=DEVICE)
    q = torch.tensor([[1.0], [1.0]], device=DEVICE)
    out = retrieval_metrics(q, k, positive_index=torch.tensor([0, 2], device=DEVICE))
    assert out["mean_rank"].item() == 2.0
    assert out["median_rank"].item() == 1.0


def test_all_tied_is_rank_one():
    q = torch.ones(6, 4, device=DEVICE)
    out = retrieval_metrics(q, torch.ones(9, 4, device=DEVICE), ks=(1,))
    assert out["recall@1"].item() == 1.0 and out["mrr"].item() == 1.0
    assert retrieval_metrics(q)["mean_rank"].item() == 1.0     # NT-Xent, self


def test_k_above_m_is_full_recall():
    q, k, kw = make(case_diagonal, "gauss", torch.float32)
    out = retrieval_metrics(q, k, ks=(1, M, M + 1, 10 * M))
    assert all(out[f"recall@{x}"].item() == 1.0 for x in (M, M + 1, 10 * M))
    assert out["recall@1"].item() < 1.0


# ---------------------------------------------------------------- tiling

TILES = [(5, 7), (16, 3), (1, 1), (36, 52), (64, 8)]


@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_small_tiles_identical(case, tiles, monkeypatch):
    q, k, kw = make(case, "int", torch.float32)
    q = q + 0.25 * torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ks = every_k(q, k)
    whole = retrieval_metrics(q, k, ks=ks, **kw)
    blocks = []
    real = metrics.tile_scores

    def spy(qb, keys, i0, j0, j1, self_mask, acc):
        blocks.append((i0, qb.shape[0], j0, j1))
        return real(qb, keys, i0, j0, j1, self_mask, acc)

    monkeypatch.setattr(metrics, "tile_scores", spy)
    monkeypatch.setattr(metrics, "ROW_TILE", tiles[0])
    monkeypatch.setattr(metrics, "KEY_TILE", tiles[1])
    tiled = retrieval_metrics(q, k, ks=ks, **kw)
    for name in whole:
        assert tiled[name].item() == whole[name].item(), name
    n, m = q.shape[0], (q if k is None else k).shape[0]
    # the tiles were that small, and the edges ragged where the sizes do not divide
    assert {rows for _, rows, _, _ in blocks} <= {tiles[0], n % tiles[0] or tiles[0]}
    assert max(j1 - j0 for _, _, j0, j1 in blocks) == min(tiles[1], m)
    assert len({i0 for i0, _, _, _ in blocks}) == -(-n // tiles[0])
    if m % tiles[1]:
        assert any(j1 == m and j1 - j0 == m % tiles[1] for _, _, j0, j1 in blocks)


def test_small_tiles_larger_problem(monkeypatch):
    """Many tiles each way with labels and ties, against the reference."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-1, 2, (301, 6), generator=gen).float().to(DEVICE)
    k = torch.randint(-1, 2, (499, 6), generator=gen).float().to(DEVICE)
    lab, klab = _labels(301, 7, gen).to(DEVICE), _labels(499, 7, gen).to(DEVICE)
    monkeypatch.setattr(metrics, "ROW_TILE", 64)
    monkeypatch.setattr(metrics, "KEY_TILE", 96)
    ks = (1, 3, 10, 50, 500)
    for kw in (dict(labels=lab, key_labels=klab), {},
               dict(positive_index=torch.randint(0, 499, (301,), generator=gen).to(DEVICE))):
        out = retrieval_metrics(q, k, ks=ks, **kw)
        check(out, reference(q, k, ks=ks, **kw)[0], torch.float32)
    out = retrieval_metrics(q, labels=lab, ks=ks)
    check(out, reference(q, labels=lab, ks=ks)[0], torch.float32)


# ---------------------------------------------------------------- the call

def test_every_backend_same_result():
    q, k, kw = make(case_labels, "gauss", torch.float32)
    auto = retrieval_metrics(q, k, **kw)
    names = REGISTRY.available(DEVICE)
    assert names
    for name in names:
        out = retrieval_metrics(q, k, backend=name, **kw)
        assert {n: v.item() for n, v in out.items()} == {n: v.item() for n, v in auto.items()}


def test_inputs_that_require_grad(monkeypatch):
    """No graph is built: the tiles of inputs that require grad do not require grad."""
    q, k, kw = make(case_index, "gauss", torch.float32)
    q.requires_grad_()
    k.requires_grad_()
    seen = []
    real = metrics.tile_scores

    def spy(*args):
        s = real(*args)
        seen.append(s.requires_grad)
        return s

    monkeypatch.setattr(metrics, "tile_scores", spy)
    out = retrieval_metrics(q, k, **kw)
    assert seen and not any(seen)
    assert all(v.grad_fn is None and not v.requires_grad for v in out.values())
    check(out, reference(q, k, **kw)[0], torch.float32)


def test_under_autocast_scores_stay_float32():
    """Autocast (bf16 matmuls) must not reach the scores: with values that bf16 rounds,
    the result still matches the float32 reference."""
    q, k, kw = make(case_labels, "gauss", torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = retrieval_metrics(q, k, ks=every_k(q, k), **kw)
    check(out, reference(q, k, ks=every_k(q, k), **kw)[0], torch.float32)


# ---------------------------------------------------------------- bad input

def _q(n=4, d=3, **kw):
    return torch.randn(n, d, device=DEVICE, **kw)


def _i(*v):
    return torch.tensor(v, device=DEVICE)


OTHER_BACKENDS = [b for b in REGISTRY.names() if b not in REGISTRY.available(DEVICE)]

BAD = [
    # (description, kwargs, error type, message pattern)
    ("query not a tensor", dict(query=[[1.0]]), TypeError, r"query must be a torch.Tensor"),
    ("query integer", dict(query=torch.ones(4, 3, dtype=torch.long, device=DEVICE)), TypeError,
     r"query must be float16"),
    ("query rank 1", dict(query=torch.randn(4, device=DEVICE)), ValueError, r"query must be 2-D"),
    ("query no rows", dict(query=_q(0, 3)), ValueError, r"query must have at least one row"),
    ("query no dim", dict(query=_q(4, 0), key=_q(4, 0)), ValueError, r"non-zero embedding dim"),
    ("key not a tensor", dict(key=[[1.0]]), TypeError, r"key must be a torch.Tensor"),
    ("key rank 3", dict(key=torch.randn(2, 3, 4, device=DEVICE)), ValueError, r"key must be 2-D"),
    ("key no rows", dict(key=_q(0, 3)), ValueError, r"key must have at least one row"),
    ("key dim", dict(key=_q(4, 5)), ValueError, r"key has embedding dim 5 but query has 3"),
    ("key dtype", dict(key=_q(4, 3, dtype=torch.float64)), TypeError, r"key has dtype"),
    ("key device", dict(key=torch.randn(4, 3, device="meta")), ValueError, r"key is on meta"),
    ("ks int", dict(ks=5), TypeError, r"ks must be a tuple or list"),
    ("ks tensor", dict(ks=torch.tensor([1, 5])), TypeError, r"ks must be a tuple or list"),
    ("ks empty", dict(ks=()), ValueError, r"ks must not be empty"),
    ("ks zero", dict(ks=(1, 0)), ValueError, r"ks values must be >= 1"),
    ("ks negative", dict(ks=[-3]), ValueError, r"ks values must be >= 1"),
    ("ks bool", dict(ks=(True,)), TypeError, r"ks must hold ints"),
    ("ks float", dict(ks=(1.0,)), TypeError, r"ks must hold ints"),
    ("ks string", dict(ks=("5",)), TypeError, r"ks must hold ints"),
    ("backend not a string", dict(backend=None), TypeError, r"backend must be a string"),
    ("backend unknown", dict(backend="nope"), ValueError, r"backend must be 'auto' or one of"),
    ("both targets", dict(positive_index=_i(0, 1, 2, 3), labels=_i(0, 1, 2, 3)), ValueError,
     r"either positive_index or labels"),
    ("key_labels alone", dict(key_labels=_i(0, 1, 2, 3)), ValueError, r"key_labels needs labels"),
    ("labels list", dict(labels=[0, 1, 2, 3]), TypeError, r"labels must be an integer torch"),
    ("labels float", dict(labels=torch.zeros(4, device=DEVICE)), TypeError,
     r"labels must be an integer tensor"),
    ("labels bool", dict(labels=torch.ones(4, dtype=torch.bool, device=DEVICE)), TypeError,
     r"labels must be an integer tensor"),
    ("labels length", dict(labels=_i(0, 1, 2)), ValueError, r"labels must have shape \(4,\)"),
    ("labels device", dict(labels=torch.arange(4, device="meta")), ValueError,
     r"labels is on meta"),
    ("key_labels length", dict(key=_q(6, 3), labels=_i(0, 1, 2, 3), key_labels=_i(0, 1)),
     ValueError, r"key_labels must have shape \(6,\)"),
    ("key_labels float", dict(key=_q(6, 3), labels=_i(0, 1, 2, 3),
                              key_labels=torch.zeros(6, device=DEVICE)), TypeError,
     r"key_labels must be an integer tensor"),
    ("key_labels missing", dict(key=_q(6, 3), labels=_i(0, 1, 2, 3)), ValueError,
     r"key_labels is required"),
    ("key_labels self", dict(key=None, labels=_i(0, 0, 1, 1), key_labels=_i(0, 0, 1, 1)),
     ValueError, r"key_labels must be None when key is None"),
    ("positive_index list", dict(positive_index=[0, 1, 2, 3]), TypeError,
     r"positive_index must be an integer torch"),
    ("positive_index float", dict(positive_index=torch.zeros(4, device=DEVICE)), TypeError,
     r"positive_index must be an integer tensor"),
    ("positive_index 2-D", dict(positive_index=torch.zeros(4, 1, dtype=torch.long, device=DEVICE)),
     ValueError, r"positive_index must have shape \(4,\)"),
    ("positive_index length", dict(positive_index=_i(0, 1)), ValueError,
     r"positive_index must have shape \(4,\)"),
    ("positive_index = M", dict(key=_q(5, 3), positive_index=_i(0, 1, 2, 5)), ValueError,
     r"positive_index values must be in \[0, 5\)"),
    ("positive_index negative", dict(positive_index=_i(0, -1, 2, 3)), ValueError,
     r"positive_index values must be in \[0, 4\)"),
    ("positive_index self", dict(key=None, positive_index=_i(1, 1, 3, 2)), ValueError,
     r"positive_index must not point a query at itself"),
    ("positive_index device", dict(positive_index=torch.arange(4, device="meta")), ValueError,
     r"positive_index is on meta"),
    ("NT-Xent odd rows", dict(query=_q(5, 3), key=None), ValueError, r"even number of query rows"),
    ("default M < N", dict(key=_q(3, 3)), ValueError, r"default positive_index arange\(N\) needs"),
    ("no positive anywhere", dict(key=_q(6, 3), labels=_i(0, 1, 2, 3),
                                  key_labels=_i(7, 7, 8, 8, 9, 9)),
     ValueError, r"no query row has a positive"),
    ("no positive, self", dict(key=None, labels=_i(0, 1, 2, 3)), ValueError,
     r"no query row has a positive"),
] + [(f"backend {b} not on {DEVICE}", dict(backend=b), ValueError,
      rf"backend must be 'auto' or one of .*got '{b}'") for b in OTHER_BACKENDS]


@pytest.mark.parametrize("desc,kwargs,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input(desc, kwargs, exc, pattern, monkeypatch):
    def boom(*args, **kw):
        raise AssertionError("the ranking ran before the input was rejected")
    monkeypatch.setattr(metrics, "tiled_ranks", boom)
    args = dict(query=_q(), key=_q())
    args.update(kwargs)
    query, key = args.pop("query"), args.pop("key")
    with pytest.raises(exc, match=pattern):
        retrieval_metrics(query, key, **args)


def test_bad_backend_message_lists_the_available():
    with pytest.raises(ValueError) as e:
        retrieval_metrics(_q(), _q(), backend="nope")
    for name in REGISTRY.available(DEVICE):
        assert repr(name) in str(e.value)


def test_bad_input_checks_can_pass():
    """The valid versions of the calls above go through (the errors are not spurious)."""
    q = _q()
    retrieval_metrics(q, _q(), ks=[1, 2])
    retrieval_metrics(q, _q(6, 3), labels=_i(0, 1, 2, 3), key_labels=_i(0, 1, 2, 3, 4, 5))
    retrieval_metrics(q, _q(5, 3), positive_index=_i(0, 1, 2, 4))
    retrieval_metrics(q, None, positive_index=_i(1, 0, 3, 2))
    retrieval_metrics(q, None, labels=_i(0, 1, 1, 2))
    retrieval_metrics(q, _q(6, 3), backend="auto")
    for name in REGISTRY.available(DEVICE):
        retrieval_metrics(q, _q(), backend=name)


# ---------------------------------------------------------------- memory

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    torch.set_num_threads(2)
    sys.path.insert(0, {root!r})
    from contrastive_kernels.metrics import retrieval_metrics

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux

    def current():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    n, d = 32768, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, d, generator=g)
    k = q + 0.7 * torch.randn(n, d, generator=g)
    retrieval_metrics(q[:256], k[:256])           # warm up (lazy initialisation)
    before = peak()
    t = time.time()
    out = retrieval_metrics(q, k)
    seconds = time.time() - t
    fused = peak() - before
    # the same measurement sees a materialized 8192 x 32768 float32 block (1 GiB): the
    # peak after it, above the RSS before it (the fused call's peak may lie in between)
    before = current()
    s = q[:8192] @ k.T
    naive = peak() - before
    print(json.dumps(dict(fused=fused, naive=naive, seconds=seconds,
                          out={{name: v.item() for name, v in out.items()}})))
""")


@pytest.mark.cpu_only
@pytest.mark.no_poison
def test_peak_memory_far_below_n_by_m():
    script = MEMORY_SCRIPT.format(root=ROOT)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    mib = 2 ** 20
    assert got["fused"] < 512 * mib, f"peak RSS grew {got['fused'] / mib:.0f} MiB"
    assert got["naive"] > 512 * mib, (f"the harness missed a 1 GiB block: "
                                      f"{got['naive'] / mib:.0f} MiB")
    out = got["out"]
    assert 0.0 < out["recall@1"] <= out["recall@5"] <= out["recall@10"] <= 1.0
    assert out["mean_rank"] >= 1.0 and out["median_rank"] >= 1.0
