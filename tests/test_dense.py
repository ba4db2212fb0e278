"""The small-problem path of backend="auto" on the CPU (contrastive_kernels/dense.py):
values and every gradient against the float64 reference, and when it is (not) taken."""
import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import dense
from conftest import TOL, rel_err, seed_for
from test_info_nce import run_and_compare

pytestmark = pytest.mark.cpu_only


@pytest.fixture
def calls(monkeypatch):
    """Counts the dense path's calls."""
    seen = []
    apply = dense._Loss.apply
    monkeypatch.setattr(dense._Loss, "apply", lambda *a: seen.append(1) or apply(*a))
    return seen


def _inputs(n, m, d, *parts):
    g = torch.Generator().manual_seed(seed_for("dense", n, m, d, *parts))
    return torch.randn(n, d, generator=g, dtype=torch.float64), \
        torch.randn(m, d, generator=g, dtype=torch.float64)


def _labels(n, classes, *parts):
    g = torch.Generator().manual_seed(seed_for("labels", n, classes, *parts))
    return torch.randint(0, classes, (n,), generator=g)


CASES = {
    "clip": (37, 37, {}),
    "symmetric": (37, 37, dict(symmetric=True)),
    "hard_negatives": (29, 71, {}),
    "permuted_index": (33, 40, dict(positive_index=torch.tensor([i * 7 % 40 for i in range(33)]))),
    "repeated_index": (31, 31, dict(positive_index=torch.tensor([i // 3 for i in range(31)]),
                                    symmetric=True)),
    "smoothing": (37, 37, dict(symmetric=True, label_smoothing=0.1)),
    "supcon": (41, 41, dict(labels=_labels(41, 6, "a"), symmetric=True)),
    "supcon_keys": (23, 53, dict(labels=_labels(23, 5, "b"), key_labels=_labels(53, 5, "c"),
                                 symmetric=True, label_smoothing=0.2)),
    "lonely_rows": (19, 19, dict(labels=torch.arange(19) % 13, symmetric=True)),
    "ntxent": (38, None, dict(key=None, symmetric=True)),
    "ntxent_smoothing": (38, None, dict(key=None, label_smoothing=0.15)),
    "supcon_self": (39, None, dict(key=None, labels=_labels(39, 4, "d"), symmetric=True)),
    "none": (37, 37, dict(symmetric=True, reduction="none", label_smoothing=0.05)),
    "sum": (30, 45, dict(reduction="sum")),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_matches_reference(case, dtype, calls):
    n, m, kw = CASES[case]
    q, k = _inputs(n, m or n, 23, case)
    run_and_compare("auto", q, k, kw, dtype, scale=9.0)
    assert calls, "auto did not take the dense path"


def test_not_taken_above_the_limit_or_for_a_named_backend(calls):
    side = int(dense.DENSE_MAX ** 0.5)
    q, k = torch.randn(side, 8), torch.randn(side, 8)
    ck.info_nce(q, k)
    assert len(calls) == 1
    q2, k2 = torch.randn(side, 8), torch.randn(side + 1, 8)   # one key over the limit
    ck.info_nce(q2, k2)
    for be in ck.available_backends("cpu"):
        if be != "triton":
            ck.info_nce(q, k, backend=be)
    assert len(calls) == 1


@pytest.mark.parametrize("kw", [
    dict(margin=0.1), dict(decoupled=True), dict(temperature=torch.full((16,), 0.1)),
    dict(teacher=(torch.randn(16, 4), torch.randn(16, 4))), dict(low_memory=True)],
    ids=["margin", "decoupled", "per_query_temperature", "teacher", "low_memory"])
def test_not_taken_for_variants(kw, calls):
    if "low_memory" in kw and not any(
            "low_memory" in ck.backends.get(b).features for b in ck.available_backends("cpu")):
        pytest.skip("no CPU backend with low_memory")
    ck.info_nce(torch.randn(16, 8), torch.randn(16, 8), **kw)
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_not_taken_for_half_types(dtype, calls):
    ck.info_nce(torch.randn(16, 8, dtype=dtype), torch.randn(16, 8, dtype=dtype))
    assert not calls


@pytest.mark.no_poison         # the suite's poisoning mode stays out of dynamo's way
def test_not_taken_under_compile(calls):
    f = torch.compile(lambda q, k: ck.info_nce(q, k, symmetric=True), fullgraph=True,
                      backend="eager")
    q = torch.randn(16, 8, requires_grad=True)
    k = torch.randn(16, 8)
    got = f(q, k)
    got.backward()
    assert not calls
    want = ck.reference.info_nce(q.detach(), k, symmetric=True)
    assert rel_err(got, want, floor=1.0) <= TOL[torch.float32]["loss"]


def test_bad_positive_index_raises_as_in_the_fused_path(calls):
    with pytest.raises(ValueError, match="positive_index"):
        ck.info_nce(torch.randn(8, 4), torch.randn(8, 4), positive_index=torch.tensor([8] * 8))


def test_double_backward_raises_and_retain_graph_repeats(calls):
    q = torch.randn(20, 6, requires_grad=True)
    s = torch.tensor(5.0, requires_grad=True)
    loss = ck.info_nce(q, torch.randn(20, 6), logit_scale=s, symmetric=True,
                       label_smoothing=0.1)
    assert calls
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, q, create_graph=True)
    g1 = torch.autograd.grad(loss, (q, s), retain_graph=True)
    g2 = torch.autograd.grad(loss, (q, s))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))   # saved tensors left unchanged


def test_frozen_key_and_fixed_scale(calls):
    q, k = _inputs(25, 31, 9, "frozen")
    q = q.float().requires_grad_()
    k = k.float()
    loss = ck.info_nce(q, k, symmetric=True, temperature=0.1)
    loss.backward()
    qr = q.detach().double().requires_grad_()
    ck.reference.info_nce(qr, k.double(), symmetric=True, temperature=0.1).backward()
    assert rel_err(q.grad, qr.grad, floor=1e-2) <= TOL[torch.float32]["grad"]
    assert calls


def test_autocast_does_not_lower_the_precision(calls):
    q, k = _inputs(40, 40, 32, "autocast")
    q, k = q.float(), k.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ck.info_nce(q, k, symmetric=True, temperature=0.05)
    assert calls and got.dtype == torch.float32
    want = ck.reference.info_nce(q, k, symmetric=True, temperature=0.05)
    assert rel_err(got, want, floor=1.0) <= TOL[torch.float32]["loss"]


@pytest.mark.parametrize("shape", [(1, 5), (4, 1), (1, 1)])
def test_tiny_shapes(shape, calls):
    n, m = shape
    q, k = _inputs(n, m, 3, "tiny")
    run_and_compare("auto", q, k, dict(positive_index=torch.zeros(n, dtype=torch.long),
                                       symmetric=True), torch.float64)
    assert calls


# ---- the closed-form gradients of the shared stages (engine.reduce_vjp, side_losses_vjp)

def _side(n, with_p, smoothing, g):
    """Random statistics of one side: (lse, A, P or None, B or None)."""
    lse = torch.randn(n, generator=g, dtype=torch.float64) + 3
    a = torch.randn(n, generator=g, dtype=torch.float64)
    p = torch.randint(0, 3, (n,), generator=g).double() if with_p else None
    b = torch.randn(n, generator=g, dtype=torch.float64) if smoothing else None
    return lse, a, p, b


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["rows", "symmetric"])
@pytest.mark.parametrize("with_p", [False, True], ids=["one_positive", "counts"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_stage_vjps_match_autograd(reduction, symmetric, with_p, eps, scale_kind):
    """side_losses -> reduce differentiated by autograd equals the closed forms, for the
    statistics, the scale and (bias) a zero gradient, on rows without a positive too."""
    from contrastive_kernels import engine
    g = torch.Generator().manual_seed(seed_for("vjp", reduction, symmetric, with_p, eps))
    n, m = 13, 17
    sides = [_side(n, with_p, eps, g)] + ([_side(m, with_p, eps, g)] if symmetric else [])
    leaves = [[x.clone().requires_grad_() if x is not None and i != 2 else x
               for i, x in enumerate(s)] for s in sides]
    scale = 7.5 if scale_kind == "float" else torch.tensor(7.5, dtype=torch.float64,
                                                           requires_grad=True)
    bias = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    nvalid = (m, n)
    outs = [engine.side_losses(*st, scale, bias, eps, nv) for st, nv in zip(leaves, nvalid)]
    loss = engine.reduce(outs[0], outs[1] if symmetric else None, reduction)
    up = torch.randn(loss.shape, generator=g, dtype=torch.float64)
    wrt = [x for st in leaves for i, x in enumerate(st) if x is not None and i != 2]
    wrt += [bias] + ([scale] if torch.is_tensor(scale) else [])
    want = torch.autograd.grad(loss, wrt, up, allow_unused=True)

    side_args = [(len(st[0]), o[1]) for st, o in zip(sides, outs)]
    w = engine.reduce_vjp(side_args[0], side_args[1] if symmetric else None, reduction, up)
    got, d_scale = [], 0.0
    for st, o, wi, nv in zip(sides, outs, w, nvalid):
        lse, a, p, b = st
        g_lse, g_a, g_b, ds = engine.side_losses_vjp(wi, o[1], a, p, b, scale, eps, nv)
        got += [g_lse, g_a] + ([g_b] if eps else [])
        d_scale = d_scale + ds
    got += [torch.zeros(())] + ([d_scale] if torch.is_tensor(scale) else [])
    assert len(got) == len(want)
    for x, y in zip(got, want):
        y = torch.zeros(()) if y is None else y
        torch.testing.assert_close(x.double().expand(y.shape), y.double(), rtol=1e-12,
                                   atol=1e-12)


def test_dense_loss_is_one_autograd_node(calls):
    """The small-problem path records one node (its backward in closed form), so a
    step's overhead does not grow with the stages' small ops."""
    q = torch.randn(32, 8, requires_grad=True)
    k = torch.randn(32, 8, requires_grad=True)
    loss = ck.info_nce(q, k, symmetric=True, label_smoothing=0.1)
    assert calls
    assert type(loss.grad_fn).__name__ == "_LossBackward"
    leaves = {type(f).__name__ for f, _ in loss.grad_fn.next_functions if f is not None}
    assert leaves == {"AccumulateGrad"}
