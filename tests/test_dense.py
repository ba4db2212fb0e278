"""The small-problem path of backend="auto" on the CPU (contrastive_kernels/dense.py):
values and every gradient against the float64 reference, and when it is (not) taken."""
import warnings

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import dense
from conftest import TOL, rel_err, seed_for
from test_info_nce import run_and_compare

pytestmark = pytest.mark.cpu_only


def _count(monkeypatch, node):
    """A list that grows by one at each call of node.apply."""
    seen = []
    apply = node.apply
    monkeypatch.setattr(node, "apply", lambda *a: seen.append(1) or apply(*a))
    return seen


@pytest.fixture
def calls(monkeypatch):
    """Counts the dense path's calls."""
    return _count(monkeypatch, dense._Loss)


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


def _use_ops(request, monkeypatch, flag):
    """request.param "cpp": dense's C++ ops (named by flag), "torch": torch's fallback."""
    if request.param == "cpp" and not getattr(dense, flag):
        pytest.skip("the C++ extension is not loaded")
    monkeypatch.setattr(dense, flag, request.param == "cpp")
    return request.param


@pytest.fixture(params=["cpp", "torch"])
def tile_ops(request, monkeypatch):
    """The tile's log-sum-exps and gradient: the C++ ops, or torch's (no extension)."""
    return _use_ops(request, monkeypatch, "_OPS")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_matches_reference(case, dtype, calls, tile_ops):
    n, m, kw = CASES[case]
    q, k = _inputs(n, m or n, 23, case)
    run_and_compare("auto", q, k, kw, dtype, scale=9.0)
    assert calls, "auto did not take the dense path"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", ["symmetric", "supcon_self", "hard_negatives"])
def test_large_logits_stay_finite(case, dtype, calls, tile_ops):
    """|S| far above 88 (exp overflows float32): values and gradients still match."""
    n, m, kw = CASES[case]
    q, k = _inputs(n, m or n, 23, case, "large")
    run_and_compare("auto", q, k, kw, dtype, scale=400.0)
    assert calls


def test_learnable_scale_warns_nothing(calls):
    q, k = _inputs(16, 16, 8, "warn")
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.info_nce(q.requires_grad_(), k, logit_scale=scale, symmetric=True).backward()
    assert calls and scale.grad is not None


@pytest.mark.parametrize("scale", [1e-3, 1e5, 2e-4, 3e5])
def test_scale_range(scale, calls):
    """Scales inside SCALE_RANGE are served densely, those outside by the fused kernel;
    both match the reference (the scale's gradient included)."""
    q, k = _inputs(21, 21, 9, "scale", scale)
    q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    run_and_compare("auto", q, k, dict(symmetric=True), torch.float32, scale=scale)
    lo, hi = dense.SCALE_RANGE
    assert bool(calls) == (lo <= scale <= hi)


@pytest.mark.skipif(not dense._OPS, reason="the C++ extension is not loaded")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n,m", [(1, 1), (1, 37), (29, 1), (37, 301), (300, 129), (65, 64)])
def test_tile_ops_match_torch(n, m, dtype):
    """contrastive_kernels::dense_lse and dense_grad against float64 torch: odd shapes,
    masked (-inf) entries, a row and a column with none valid, large logits, broadcast
    gradients; the suite's poisoning fills their outputs with NaN first."""
    ops = torch.ops.contrastive_kernels
    g = torch.Generator().manual_seed(seed_for("tile_ops", n, m))
    s64 = torch.randn(n, m, generator=g, dtype=torch.float64) * 60       # |S| up to ~300
    s64[torch.rand(n, m, generator=g) < 0.2] = float("-inf")
    if n > 1 and m > 1:
        s64[0, :] = float("-inf")
        s64[:, 0] = float("-inf")
    s = s64.to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for cols in (False, True):
        lse_r, lse_c = ops.dense_lse(s, cols)
        want_r, want_c = s.double().logsumexp(1), s.double().logsumexp(0)
        assert torch.equal(lse_r.isinf(), want_r.isinf())
        fin = want_r.isfinite()
        assert rel_err(lse_r[fin], want_r[fin], floor=1.0) <= tol
        assert lse_c.shape == ((m,) if cols else (0,))
        if cols:
            assert torch.equal(lse_c.isinf(), want_c.isinf())
            fin = want_c.isfinite()
            assert rel_err(lse_c[fin], want_c[fin], floor=1.0) <= tol
    g_r = torch.randn(n, generator=g, dtype=torch.float64)
    g_c = torch.randn(m, generator=g, dtype=torch.float64)
    p_r = torch.softmax(s.double(), 1).nan_to_num(0.0)       # a line with no entry: 0
    p_c = torch.softmax(s.double(), 0).nan_to_num(0.0)
    for scale in (1.0, 0.37):
        want = scale * (g_r[:, None] * p_r + g_c[None, :] * p_c)
        got = ops.dense_grad(s, lse_r, g_r.to(dtype), lse_c, g_c.to(dtype), scale, False)
        assert rel_err(got, want) <= (1e-11 if dtype == torch.float64 else 1e-5)
        rows_only = ops.dense_grad(s, lse_r, g_r.to(dtype), s.new_empty(0), s.new_empty(0),
                                   scale, False)
        assert rel_err(rows_only, scale * g_r[:, None] * p_r) <= (
            1e-11 if dtype == torch.float64 else 1e-5)
    one = torch.ones((), dtype=dtype).expand(n)                  # a broadcast gradient
    assert torch.allclose(ops.dense_grad(s, lse_r, one, s.new_empty(0), s.new_empty(0), 1.0,
                                         False).double(), p_r, atol=1e-6)
    if n == m:
        masked = ops.dense_grad(s, lse_r, g_r.to(dtype), lse_c, g_c.to(dtype), 1.0, True)
        assert not masked.diagonal().any()


@pytest.mark.skipif(not dense._OPS, reason="the C++ extension is not loaded")
def test_tile_ops_propagate_nan_and_reject_bad_input():
    ops = torch.ops.contrastive_kernels
    s = torch.randn(5, 40)
    s[2, 17] = float("nan")
    lse_r, lse_c = ops.dense_lse(s, True)
    assert lse_r[2].isnan() and lse_r[[0, 1, 3, 4]].isfinite().all()
    assert lse_c[17].isnan() and lse_c.isnan().sum() == 1
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.dense_lse(s.half(), False)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.dense_lse(s.T, False)
    with pytest.raises(RuntimeError, match="g_r must be a vector of 5"):
        ops.dense_grad(s, lse_r, torch.ones(4), lse_c, torch.ones(40), 1.0, False)
    with pytest.raises(RuntimeError, match="square"):
        ops.dense_grad(s, lse_r, torch.ones(5), lse_c, torch.ones(40), 1.0, True)


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


# ---- the sigmoid loss (dense._SigLoss)

@pytest.fixture
def sig_calls(monkeypatch):
    """Counts the dense sigmoid loss's calls."""
    return _count(monkeypatch, dense._SigLoss)


@pytest.fixture(params=["cpp", "torch"])
def siglip_ops(request, monkeypatch):
    """The tile's pass: the C++ op, or torch's (no extension)."""
    return _use_ops(request, monkeypatch, "_SIGLIP_OPS")


def _sig_case(name, gen):
    """(n, m, kwargs) of a sigmoid-loss case."""
    lab = lambda n, c: torch.randint(0, c, (n,), generator=gen)
    return {
        "diagonal": lambda: (37, 37, {}),
        "extra_keys": lambda: (29, 71, {}),
        "one_query": lambda: (1, 9, {}),
        "index": lambda: (33, 40, dict(positive_index=torch.randint(0, 40, (33,),
                                                                    generator=gen))),
        "labels": lambda: (23, 53, dict(labels=lab(23, 5), key_labels=lab(53, 5))),
        "labels_same": lambda: (41, 41, dict(labels=lab(41, 6))),
        "sum": lambda: (30, 45, dict(reduction="sum")),
        "none": lambda: (31, 31, dict(reduction="none")),
        "none_index": lambda: (17, 5, dict(reduction="none",
                                           positive_index=torch.randint(0, 5, (17,),
                                                                        generator=gen))),
        "none_labels": lambda: (26, 19, dict(reduction="none", labels=lab(26, 3),
                                             key_labels=lab(19, 3))),
    }[name]()


SIG_CASES = ["diagonal", "extra_keys", "one_query", "index", "labels", "labels_same", "sum",
             "none", "none_index", "none_labels"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", SIG_CASES)
def test_siglip_dense_matches_reference(case, dtype, sig_calls, siglip_ops):
    """Loss and the gradients of query, key, logit_scale and logit_bias (a random
    upstream gradient) against the float64 reference."""
    from test_siglip import _inputs as sig_inputs, compare
    gen = torch.Generator().manual_seed(seed_for("dense_siglip", case, str(dtype)))
    n, m, kw = _sig_case(case, gen)
    q, k = sig_inputs(n, m, 19, dtype, gen)
    compare("auto", q, k, kw, dtype, scale=7.0, bias=-3.0)
    assert sig_calls, "auto did not take the dense path"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_siglip_large_logits_stay_finite(dtype, sig_calls, siglip_ops):
    """Raw embeddings: |z| in the thousands, far beyond exp's float32 range."""
    from test_siglip import _inputs as sig_inputs, compare
    gen = torch.Generator().manual_seed(seed_for("dense_siglip_large", str(dtype)))
    q, k = sig_inputs(40, 45, 48, dtype, gen, unit=False)
    q, k = 4 * q, 4 * k
    assert float((10.0 * q.double() @ k.double().T).abs().max()) > 1000
    # float32 logits this large carry an absolute error of about u s sum_d |q_d k_d|
    tol = 2 * 2.0**-24 * 10.0 * float((q.abs().double() @ k.abs().double().T).max())
    out, _ = compare("auto", q, k, {}, dtype,
                     grad_tol=max(TOL[dtype]["grad"], tol if dtype == torch.float32 else 0))
    assert sig_calls and torch.isfinite(out).all() and float(out.detach()) > 100


def test_siglip_float_scale_bias_and_frozen_parts(sig_calls):
    """Python-number scale and bias, a frozen tower, and only the scale or the bias
    trained: the gradients of what is trained match the reference, the rest get none."""
    q, k = _inputs(20, 23, 6, "siglip_frozen")
    for wants in [(True, False, True, True), (False, True, False, True),
                  (False, False, True, False), (False, False, False, True)]:
        leaves = [q.clone(), k.clone(), torch.tensor(5.0, dtype=torch.float64),
                  torch.tensor(-2.0, dtype=torch.float64)]
        ref_leaves = [x.clone() for x in leaves]
        for x, y, w in zip(leaves, ref_leaves, wants):
            x.requires_grad_(w)
            y.requires_grad_(w)
        out = ck.siglip_loss(*leaves[:2], logit_scale=leaves[2], logit_bias=leaves[3])
        ref = ck.reference.siglip_loss(*ref_leaves[:2], logit_scale=ref_leaves[2],
                                       logit_bias=ref_leaves[3])
        out.backward()
        ref.backward()
        for x, y, w in zip(leaves, ref_leaves, wants):
            if w:
                assert rel_err(x.grad, y.grad, floor=1e-2) < 1e-11, wants
            else:
                assert x.grad is None
    qq = q.clone().requires_grad_()
    out = ck.siglip_loss(qq, k, logit_scale=3.5, logit_bias=0.25)
    out.backward()
    qr = q.clone().requires_grad_()
    ref = ck.reference.siglip_loss(qr, k, logit_scale=3.5, logit_bias=0.25)
    ref.backward()
    assert rel_err(out, ref, floor=1.0) < 1e-12 and rel_err(qq.grad, qr.grad) < 1e-11
    assert len(sig_calls) == 5


def test_siglip_gradcheck_and_non_contiguous(sig_calls):
    g = torch.Generator().manual_seed(seed_for("dense_siglip_gradcheck"))
    q = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    for kw in (dict(), dict(reduction="none"), dict(labels=torch.tensor([0, 1, 0, 2, 1]),
                                                    key_labels=torch.tensor([1, 0, 2, 2, 0, 1]))):
        fn = lambda q, k, s, b: ck.siglip_loss(q, k, logit_scale=s, logit_bias=b, **kw)
        assert torch.autograd.gradcheck(fn, (q, k, s, b))
    from test_siglip import compare
    base_q, base_k = torch.randn(40, 34, generator=g), torch.randn(34, 40, generator=g)
    qn, kn = base_q[::2, ::2], base_k.T[::2, ::2]
    assert not qn.is_contiguous() and not kn.is_contiguous()
    compare("auto", qn, kn, {}, torch.float32)
    assert sig_calls


def test_siglip_not_taken_for_passes_backends_half_large_or_compile(sig_calls):
    """A schedule or a backend asked for by name, half types, above DENSE_MAX, scales
    outside SCALE_RANGE, and torch.compile go to the kernels (which still match)."""
    q, k = torch.randn(16, 8), torch.randn(16, 8)
    for kw in (dict(passes=3), dict(passes=4), dict(logit_scale=3e5), dict(logit_scale=1e-4)):
        ck.siglip_loss(q.requires_grad_(), k, **kw).backward()
    for be in ck.available_backends("cpu"):
        if be != "triton" and "siglip" in ck.backends.get(be).features:
            ck.siglip_loss(q, k, backend=be)
    for dtype in (torch.float16, torch.bfloat16):
        ck.siglip_loss(q.detach().to(dtype), k.to(dtype))
    side = int(dense.DENSE_MAX ** 0.5)
    ck.siglip_loss(torch.randn(side, 4), torch.randn(side + 1, 4))
    assert not sig_calls
    ck.siglip_loss(torch.randn(side, 4), torch.randn(side, 4))
    assert len(sig_calls) == 1


@pytest.mark.no_poison         # the suite's poisoning mode stays out of dynamo's way
def test_siglip_not_taken_under_compile(sig_calls):
    f = torch.compile(lambda q, k: ck.siglip_loss(q, k), fullgraph=True, backend="eager")
    q = torch.randn(16, 8, requires_grad=True)
    k = torch.randn(16, 8)
    got = f(q, k)
    got.backward()
    assert not sig_calls
    want = ck.reference.siglip_loss(q.detach(), k)
    assert rel_err(got, want, floor=1.0) <= TOL[torch.float32]["loss"]


def test_siglip_bad_input_raises_before_the_pass(sig_calls, monkeypatch):
    ran = []
    monkeypatch.setattr(dense, "_siglip_pass", lambda *a: ran.append(1))
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    for bad, match in ((dict(positive_index=torch.tensor([0, 1, 2, 9])), "positive_index"),
                       (dict(logit_bias=torch.tensor(float("nan"))), "logit_bias"),
                       (dict(logit_scale=torch.tensor(-1.0)), "logit_scale")):
        with pytest.raises(ValueError, match=match):
            ck.siglip_loss(q, k, **bad)
    assert not ran


def test_siglip_double_backward_raises_and_retain_graph_repeats(sig_calls):
    q = torch.randn(20, 6, requires_grad=True)
    s = torch.tensor(5.0, requires_grad=True)
    b = torch.tensor(-2.0, requires_grad=True)
    loss = ck.siglip_loss(q, torch.randn(20, 6), logit_scale=s, logit_bias=b)
    assert sig_calls
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, q, create_graph=True)
    g1 = torch.autograd.grad(loss, (q, s, b), retain_graph=True)
    g2 = torch.autograd.grad(loss, (q, s, b))
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))     # saved tensors unchanged


def test_siglip_nan_stays_in_its_row(sig_calls, siglip_ops):
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    q[2, 1] = float("nan")
    rows = ck.siglip_loss(q, k, reduction="none")
    assert sig_calls
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5]]).all()


def test_siglip_autocast_and_one_node(sig_calls):
    q, k = _inputs(40, 40, 32, "siglip_autocast")
    q, k = q.float().requires_grad_(), k.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ck.siglip_loss(q, k, logit_scale=12.0)
    assert sig_calls and got.dtype == torch.float32
    assert type(got.grad_fn).__name__ == "_SigLossBackward"
    leaves = {type(f).__name__ for f, _ in got.grad_fn.next_functions if f is not None}
    assert leaves == {"AccumulateGrad"}
    want = ck.reference.siglip_loss(q.detach(), k.detach(), logit_scale=12.0)
    assert rel_err(got, want, floor=1.0) <= TOL[torch.float32]["loss"]


def _ids(n, m, kind, g):
    """(rid, cid) int32 of a kind of positives: none, each row's own key (the diagonal,
    -1 past the keys), a random key per row, or random classes."""
    if kind == "classes":
        return (torch.randint(0, 4, (n,), generator=g, dtype=torch.int32),
                torch.randint(0, 4, (m,), generator=g, dtype=torch.int32))
    rid = {"none": torch.full((n,), -1), "diagonal": torch.where(torch.arange(n) < m,
                                                                  torch.arange(n), -1),
           "index": torch.randint(0, m, (n,), generator=g)}[kind]
    return rid.to(torch.int32), torch.arange(m, dtype=torch.int32)


@pytest.mark.skipif(not dense._SIGLIP_OPS, reason="the C++ extension is not loaded")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n,m", [(1, 1), (1, 37), (29, 1), (37, 301), (300, 129), (65, 64)])
def test_siglip_op_matches_torch(n, m, dtype):
    """contrastive_kernels::dense_siglip against float64 torch on odd shapes with |z| up
    to ~300 and every kind of positives: the rows' losses softplus(-y z) and sums of dz
    = sigmoid(z) - [positive], and dz left in place (the suite's poisoning fills the
    sums with NaN first)."""
    g = torch.Generator().manual_seed(seed_for("siglip_op", n, m))
    x64 = torch.randn(n, m, generator=g, dtype=torch.float64) * 60
    for kind in ("none", "diagonal", "index", "classes"):
        rid, cid = _ids(n, m, kind, g)
        pos = rid[:, None] == cid[None, :]
        for bias in (0.0, -10.0, 3.5):
            x = x64.to(dtype)
            z = x.double() + bias
            y = torch.where(pos, 1.0, -1.0).double()
            r, t = torch.ops.contrastive_kernels.dense_siglip(x, bias, rid, cid)
            assert r.shape == t.shape == (n,) and r.dtype == t.dtype == dtype
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            dz = torch.sigmoid(z) - pos.double()
            assert rel_err(r, -torch.nn.functional.logsigmoid(y * z).sum(1), floor=1.0) <= tol
            assert rel_err(t, dz.sum(1), floor=1.0) <= tol
            assert (x.double() - dz).abs().max() <= tol


@pytest.mark.skipif(not dense._SIGLIP_OPS, reason="the C++ extension is not loaded")
def test_siglip_op_propagates_nan_and_rejects_bad_input():
    op = torch.ops.contrastive_kernels.dense_siglip
    x = torch.randn(5, 40)
    x[2, 17] = float("nan")
    ids = _ids(5, 40, "diagonal", None)
    r, t = op(x, -1.0, *ids)
    assert r[2].isnan() and t[2].isnan() and r[[0, 1, 3, 4]].isfinite().all()
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(torch.randn(3, 4).half(), 0.0, *_ids(3, 4, "none", None))
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(4, 3).T, 0.0, *_ids(3, 4, "none", None))
    with pytest.raises(RuntimeError, match="non-empty matrix"):
        op(torch.randn(0, 3), 0.0, *_ids(0, 3, "none", None))
    for bad in ((ids[0].long(), ids[1]), (ids[0][:4], ids[1]), (ids[0], ids[1][::2])):
        with pytest.raises(RuntimeError, match="rid"):
            op(torch.randn(5, 40), 0.0, *bad)


@pytest.mark.parametrize("kw", [{}, dict(labels=torch.arange(1024) % 7)], ids=["diagonal",
                                                                              "labels"])
def test_siglip_holds_one_tile_at_the_limit(kw, sig_calls):
    """At N * M = DENSE_MAX the node keeps the inputs, sigmoid(z) (one N x M float32
    tile, 4 MiB) and O(N) statistics (labels: also the boolean mask); nothing else."""
    side = int(dense.DENSE_MAX ** 0.5)
    q, k = torch.randn(side, 16, requires_grad=True), torch.randn(side, 16)
    held = {}

    def pack(t):
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ck.siglip_loss(q, k, **kw)
    assert sig_calls
    tile = 4 * side * side
    mask = side * side if kw else 0
    assert sum(held.values()) <= tile + mask + 2 * 4 * side * 16 + 64 * side, held
    loss.backward()
