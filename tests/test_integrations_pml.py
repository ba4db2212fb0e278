"""integrations.pytorch_metric_learning against the installed pytorch-metric-learning.

The reference is PML's own NTXentLoss / SupConLoss run in float64 on the same inputs; the
adapter runs in float32 and must agree within TOL (relative to the largest reference
value; the loss with a floor of 1), one half-precision case within HALF_TOL. Inputs are
fresh random embeddings (not normalized: PML's CosineSimilarity normalizes), odd batch
sizes, labels with several positives per anchor and classes of one member (no positive).
"""
import zlib

import pytest
import torch

from compat import check_against
from dispatch import SeeThrough

import contrastive_kernels as ck
from contrastive_kernels.integrations import pytorch_metric_learning as ours

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, losses, reducers  # noqa: E402

TOL = dict(loss=1e-5, grad=1e-4)        # float32 against PML in float64
HALF_TOL = dict(loss=2e-3, grad=1e-2)   # float16 against PML in float64 (same inputs)
D = 12
LABELS = torch.tensor([-3, 7, 99, 4])   # any values, not 0..C-1


def make_labels(n, classes, singletons, gen):
    """n labels from `classes` shared values plus `singletons` classes of one member."""
    y = LABELS[torch.randint(0, classes, (n,), generator=gen)]
    y[:singletons] = 1000 + torch.arange(singletons)
    return y[torch.randperm(n, generator=gen)]


def run(loss, emb, labels, ref=None, ref_labels=None, same=False, temperature=None):
    """(value, d emb, d ref, d temperature) of one call on fresh leaves. same: pass the
    labels tensor itself as ref_labels (PML then drops the pairs (i, i))."""
    e = emb.detach().clone().requires_grad_()
    r = None if ref is None else ref.detach().clone().requires_grad_()
    if same:
        ref_labels = labels
    v = loss(e, labels, ref_emb=r, ref_labels=ref_labels)
    v.backward()
    t_grad = None if temperature is None else temperature.grad.clone()
    return v.detach(), e.grad, (None if r is None else r.grad), t_grad


def check(got, want, tol):
    check_against(got, want, tol, names=("embeddings", "ref_emb", "temperature"))


CASES = [  # (loss, mode, n, m, classes, singletons)
    ("NTXentLoss", "self", 37, 0, 3, 2),      # many positives per anchor
    ("NTXentLoss", "self", 41, 0, 4, 15),     # few positives, many rows without one
    ("NTXentLoss", "ref", 23, 31, 4, 3),      # ref_emb with its own labels
    ("NTXentLoss", "same", 29, 29, 3, 4),     # ref_labels is labels: (i, i) dropped
    ("NTXentLoss", "none", 29, 29, 4, 2),     # ref_labels=None: labels reused, (i, i) dropped
    ("SupConLoss", "self", 37, 0, 3, 2),
    ("SupConLoss", "self", 41, 0, 4, 15),
    ("SupConLoss", "ref", 23, 31, 4, 3),
]


def inputs(seed, n, m, classes, singletons, mode):
    gen = torch.Generator().manual_seed(seed)
    emb = 3 * torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = make_labels(n, classes, singletons, gen)
    ref = ry = None
    if mode != "self":
        ref = torch.randn(m, D, generator=gen, dtype=torch.float64)
    if mode == "ref":
        ry = make_labels(m, classes, singletons, gen)
    return emb, y, ref, ry


# tiny: many tiles of NTXentLoss's per-pair pass, class blocks split between tiles
RUNS = [(c, t) for c in CASES for t in (("default", "tiny") if c[0] == "NTXentLoss"
                                       else ("default",))]


@pytest.mark.parametrize("case,tiles", RUNS,
                         ids=["-".join(map(str, c[:3] + (t,))) for c, t in RUNS])
def test_matches_pml(case, tiles, monkeypatch):
    name, mode, n, m, classes, singletons = case
    if tiles == "tiny":
        monkeypatch.setattr(ours, "ROWS", 4)
        monkeypatch.setattr(ours, "COLS", 8)
    emb, y, ref, ry = inputs(zlib.crc32(repr(case).encode()), n, m, classes, singletons, mode)
    same = mode == "same"
    for temp in (None, 0.2):
        kw = {} if temp is None else dict(temperature=temp)
        want = run(getattr(losses, name)(**kw), emb, y, ref, ry, same)
        got = run(getattr(ours, name)(**kw), emb.float(), y,
                  None if ref is None else ref.float(), ry, same)
        assert got[0].dtype == torch.float32
        check(got, want, TOL)
        # PML's own float32 run is as close
        want32 = run(getattr(losses, name)(**kw), emb.float(), y,
                     None if ref is None else ref.float(), ry, same)
        check(got, want32, TOL)


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
def test_learnable_temperature(name):
    emb, y, _, _ = inputs(5, 21, 0, 3, 2, "self")
    res = []
    for mod, dtype in ((losses, torch.float64), (ours, torch.float32)):
        t = torch.tensor(0.15, dtype=dtype, requires_grad=True)
        res.append(run(getattr(mod, name)(temperature=t), emb.to(dtype), y, temperature=t))
    check(res[1], res[0], TOL)


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
def test_half_precision(name):
    emb, y, _, _ = inputs(11, 27, 0, 3, 3, "self")
    h = emb.half()
    want = run(getattr(losses, name)(), h.double(), y)
    got = run(getattr(ours, name)(), h, y)
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float16
    check(got, want, HALF_TOL)


EDGES = {  # (labels, ref_labels or None (self)): PML's early exits and empty rows
    "all-same": ([5, 5, 5, 5, 5], None),                # no negative pair: zero loss
    "all-distinct": ([0, 1, 2, 3, 4], None),            # no positive pair: zero loss
    "one-row": ([3], None),
    "one-pos-one-neg": ([0], [0, 1]),                   # <= 1 pair of each: zero loss
    "rows-without-negative": ([0, 1, 0, 1, 0], [0, 0, 0]),
    "single-positive-only": ([0, 1, 0], [0]),           # SupCon rows of loss exactly 0
    "two-pos-one-neg": ([0, 1], [0, 0]),
}


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("edge", sorted(EDGES))
def test_edge_cases(name, edge):
    y, ry = (torch.tensor(v) if v is not None else None for v in EDGES[edge])
    gen = torch.Generator().manual_seed(len(edge))
    emb = torch.randn(len(y), D, generator=gen, dtype=torch.float64)
    ref = None if ry is None else torch.randn(len(ry), D, generator=gen, dtype=torch.float64)
    want = run(getattr(losses, name)(), emb, y, ref, ry)
    got = run(getattr(ours, name)(), emb.float(), y, None if ref is None else ref.float(), ry)
    check(got, want, TOL)


class MaxSize(SeeThrough):
    """The largest tensor any op makes (inside the package's ops too)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def handle(self, func, args, kwargs):
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_never_builds_n_by_m(name, mode, monkeypatch):
    """Two labels: about N * M / 2 positive pairs, yet no op makes a tensor larger than
    an input (N x D), in forward or backward (tiles of 8 x 16 for the per-pair pass)."""
    monkeypatch.setattr(ours, "ROWS", 8)
    monkeypatch.setattr(ours, "COLS", 16)
    emb, y, ref, ry = inputs(3, 97, 89, 2, 0, mode)
    e = emb.float().requires_grad_()
    r = None if ref is None else ref.float().requires_grad_()
    loss = getattr(ours, name)(backend="cpu" if "cpu" in ck.available_backends() else "auto")
    with MaxSize() as sizes:
        loss(e, y, ref_emb=r, ref_labels=ry).backward()
    assert 0 < sizes.largest <= 97 * D, sizes.largest     # N * M is 7 times that


def test_accepts_default_options():
    emb, y, _, _ = inputs(2, 15, 0, 3, 1, "self")
    for name, red in (("NTXentLoss", reducers.MeanReducer),
                      ("SupConLoss", reducers.AvgNonZeroReducer)):
        a = getattr(ours, name)(distance=distances.CosineSimilarity(), reducer=red())
        b = getattr(ours, name)()
        torch.testing.assert_close(a(emb.float(), y), b(emb.float(), y))


def test_errors():
    emb, y, ref, _ = inputs(1, 9, 9, 3, 1, "none")
    e, r = emb.float(), ref.float()
    for name in ("NTXentLoss", "SupConLoss"):
        cls = getattr(ours, name)
        with pytest.raises(ValueError, match="indices_tuple"):
            cls()(e, y, indices_tuple=(torch.arange(2), torch.arange(2), torch.arange(2)))
        with pytest.raises(ValueError, match="labels"):
            cls()(e)
        with pytest.raises(ValueError, match="ref_labels without ref_emb"):
            cls()(e, y, ref_labels=y.clone())
        with pytest.raises(ValueError, match="distance"):
            cls(distance=distances.LpDistance())
        with pytest.raises(ValueError, match="reducer"):
            cls(reducer=reducers.ThresholdReducer(low=0.1))
        with pytest.raises(ValueError, match="embedding_regularizer"):
            cls(embedding_regularizer=lambda x: x.sum())
        with pytest.raises(ValueError, match="margin"):
            cls(margin=0.1)
        with pytest.raises(ValueError, match="ref_emb without ref_labels"):
            cls()(e, y, ref_emb=r[:5])
    for ref_labels in (y, None):    # (i, i) dropped by PML: not supported by SupConLoss
        with pytest.raises(ValueError, match="ref_labels is labels"):
            ours.SupConLoss()(e, y, ref_emb=r, ref_labels=ref_labels)
