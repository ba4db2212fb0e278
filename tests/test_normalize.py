"""normalize=True: query and key L2-normalized (torch.nn.functional.normalize, dim=-1)
before the loss, on every backend against the float64 reference called the same way,
values and every gradient, on raw inputs whose norms are far from 1."""
import pytest
import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from conftest import DEVICE, TOL, rel_err, seed_for
from contrastive_kernels import backends

BACKENDS = ck.available_backends(DEVICE)
SIGLIP_BACKENDS = [b for b in BACKENDS if "siglip" in backends.get(b).features]

# (N, M, D): odd sizes; M > N (extra keys are negatives); an even N for NT-Xent
SHAPES = [(37, 37, 19), (37, 53, 19), (38, 38, 19)]


def raw_inputs(n, m, d, dtype, gen):
    """Rows of random directions with norms spread over [0.05, 20] (log-uniform): a loss
    that skipped the normalization would be far off (the logits scale with the norms)."""
    def rows(r):
        x = torch.randn(r, d, generator=gen, dtype=torch.float64)
        norms = torch.exp(torch.empty(r, 1, dtype=torch.float64).uniform_(-3.0, 3.0,
                                                                          generator=gen))
        return F.normalize(x, dim=1) * norms
    return rows(n).to(dtype), rows(m).to(dtype)


def _labels(n, classes, gen):
    return torch.randint(0, classes, (n,), generator=gen)


def case_plain(n, m, gen):
    return dict() if m >= n else None


def case_symmetric(n, m, gen):
    return dict(symmetric=True) if m == n else None


def case_labels(n, m, gen):
    return dict(labels=_labels(n, 5, gen), key_labels=_labels(m, 5, gen), symmetric=True,
                label_smoothing=0.1)


def case_ntxent(n, m, gen):
    return dict(key=None) if n % 2 == 0 else None


def case_ntxent_sym(n, m, gen):
    return dict(key=None, symmetric=True, reduction="none") if n % 2 == 0 else None


CASES = [case_plain, case_symmetric, case_labels, case_ntxent, case_ntxent_sym]


def compare_info_nce(backend, q, k, kwargs, dtype, ref_dtype=torch.float64, scale=14.0,
                     bias=-0.5):
    """info_nce(normalize=True) vs reference.info_nce(normalize=True): the loss and the
    gradients of query, key and logit_scale (logit_bias: 0) under a random upstream
    gradient. The reference gets the same (rounded) raw inputs in ref_dtype."""
    kwargs = dict(kwargs)
    self_c = "key" in kwargs and kwargs.pop("key") is None
    dev = torch.device(DEVICE)
    kw = {a: (v.to(dev) if torch.is_tensor(v) else v) for a, v in kwargs.items()}

    def leaves(dt):
        qq = q.to(dev, dtype).to(dt).requires_grad_()
        kk = None if self_c else k.to(dev, dtype).to(dt).requires_grad_()
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        s = torch.tensor(scale, dtype=sdt, device=dev, requires_grad=True)
        b = torch.tensor(bias, dtype=sdt, device=dev, requires_grad=True)
        return [x for x in (qq, kk, s, b) if x is not None]

    ia, ir = leaves(dtype), leaves(ref_dtype)
    split = lambda xs: (xs[0], None if self_c else xs[1], xs[-2], xs[-1])
    qa, ka, sa, ba = split(ia)
    qr, kr, sr, br = split(ir)
    out = ck.info_nce(qa, ka, logit_scale=sa, logit_bias=ba, normalize=True, backend=backend,
                      **kw)
    ref = ck.reference.info_nce(qr, kr, logit_scale=sr, logit_bias=br, normalize=True, **kw)
    # the test means something: the loss of the raw inputs is far from it
    raw = ck.reference.info_nce(qr.detach(), None if kr is None else kr.detach(),
                                logit_scale=float(scale), **kw)
    assert rel_err(raw, ref, floor=1.0) > 0.1
    tol = TOL[dtype]
    assert out.shape == ref.shape
    assert rel_err(out, ref, floor=1.0) <= tol["loss"]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64).to(dev)
    ga = torch.autograd.grad((out.double() * w).sum(), ia)
    gr = torch.autograd.grad((ref.double() * w).sum(), ir)
    names = ["query"] + ([] if self_c else ["key"]) + ["logit_scale", "logit_bias"]
    for name, a, r, leaf in zip(names, ga, gr, ia):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        if name == "logit_bias":      # cancels in the softmax
            assert abs(float(a)) <= 1e-6 * max(1.0, float(out.detach().abs().max())), name
            continue
        assert rel_err(a, r, floor=1e-2) <= tol["grad"], (name, rel_err(a, r, floor=1e-2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_info_nce_against_reference(backend, dtype, case, shape):
    """Tolerances (conftest.TOL, relative to the largest reference value): float64 loss
    1e-10, gradients 1e-9; float32 loss 1e-5, gradients 1e-4."""
    n, m, d = shape
    gen = torch.Generator().manual_seed(seed_for("normalize", case.__name__, shape, str(dtype)))
    kwargs = case(n, m, gen)
    if kwargs is None:
        pytest.skip("shape does not fit this case")
    q, k = raw_inputs(n, m, d, dtype, gen)
    compare_info_nce(backend, q, k, kwargs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [case_symmetric, case_ntxent], ids=["symmetric", "ntxent"])
def test_info_nce_half_types(backend, dtype, case):
    """Half inputs are normalized in their own dtype by both (the reference then computes
    in float64): loss 1e-4, gradients 4e-3 (float16) and 3e-2 (bfloat16)."""
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; checked on GPU")
    n, m, d = 38, 38, 19
    gen = torch.Generator().manual_seed(seed_for("normalize-half", case.__name__, str(dtype)))
    q, k = raw_inputs(n, m, d, dtype, gen)
    compare_info_nce(backend, q, k, case(n, m, gen), dtype, ref_dtype=dtype)


def _siglip_cases(n, m, gen):
    return {"diagonal": dict(),
            "index": dict(positive_index=torch.randint(0, m, (n,), generator=gen)),
            "labels_none": dict(labels=_labels(n, 4, gen), key_labels=_labels(m, 4, gen),
                                reduction="none"),
            "sum": dict(reduction="sum")}


@pytest.mark.parametrize("backend", SIGLIP_BACKENDS)
@pytest.mark.parametrize("passes", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", ["diagonal", "index", "labels_none", "sum"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_siglip_against_reference(backend, passes, dtype, case, shape):
    """siglip_loss(normalize=True) vs the reference: the loss and the gradients of query,
    key, logit_scale and logit_bias. Tolerances as test_info_nce_against_reference."""
    n, m, d = shape
    gen = torch.Generator().manual_seed(seed_for("normalize-siglip", case, shape, str(dtype)))
    kw = {a: (v.to(DEVICE) if torch.is_tensor(v) else v)
          for a, v in _siglip_cases(n, m, gen)[case].items()}
    q, k = raw_inputs(n, m, d, dtype, gen)
    dev = torch.device(DEVICE)

    def leaves(dt):
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        return [q.to(dev, dt).requires_grad_(), k.to(dev, dt).requires_grad_(),
                torch.tensor(7.0, dtype=sdt, device=dev, requires_grad=True),
                torch.tensor(-3.0, dtype=sdt, device=dev, requires_grad=True)]

    ia, ir = leaves(dtype), leaves(torch.float64)
    out = ck.siglip_loss(ia[0], ia[1], logit_scale=ia[2], logit_bias=ia[3], normalize=True,
                         backend=backend, passes=passes, **kw)
    ref = ck.reference.siglip_loss(ir[0], ir[1], logit_scale=ir[2], logit_bias=ir[3],
                                   normalize=True, **kw)
    raw = ck.reference.siglip_loss(ir[0].detach(), ir[1].detach(), logit_scale=7.0,
                                   logit_bias=-3.0, **kw)
    assert rel_err(raw, ref, floor=1.0) > 0.1
    tol = TOL[dtype]
    assert out.shape == ref.shape
    assert rel_err(out, ref, floor=1.0) <= tol["loss"]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64).to(dev)
    ga = torch.autograd.grad((out.double() * w).sum(), ia)
    gr = torch.autograd.grad((ref.double() * w).sum(), ir)
    for name, a, r, leaf in zip(["query", "key", "logit_scale", "logit_bias"], ga, gr, ia):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        assert rel_err(a, r, floor=1e-2) <= tol["grad"], (name, rel_err(a, r, floor=1e-2))


def _grads(fn, q, k, *args, **kwargs):
    qq = q.clone().requires_grad_()
    kk = None if k is None else k.clone().requires_grad_()
    out = fn(qq, kk, *args, **kwargs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    gs = torch.autograd.grad((out * w.to(out.device)).sum(),
                             [x for x in (qq, kk) if x is not None])
    return out.detach(), gs


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_prenormalized_inputs(backend):
    """normalize=True is the same call on F.normalize(x, dim=-1): values and the gradients
    of the raw inputs (the normalization's Jacobian applied by autograd)."""
    gen = torch.Generator().manual_seed(5)
    q, k = (x.to(DEVICE) for x in raw_inputs(38, 45, 19, torch.float32, gen))
    pi = torch.randperm(45, generator=gen)[:38].to(DEVICE)
    pre = lambda fn: (lambda a, b, **kw: fn(F.normalize(a, dim=-1),
                                            None if b is None else F.normalize(b, dim=-1), **kw))
    for kw in (dict(positive_index=pi, symmetric=True, reduction="none"),
               dict(temperature=0.05, label_smoothing=0.1)):
        got = _grads(ck.info_nce, q, k, normalize=True, backend=backend, **kw)
        want = _grads(pre(ck.info_nce), q, k, backend=backend, **kw)
        _close(got[0], want[0])
        for a, b in zip(got[1], want[1]):
            _close(a, b)
    got = _grads(ck.info_nce, q, None, normalize=True, backend=backend)      # NT-Xent
    want = _grads(pre(ck.info_nce), q, None, backend=backend)
    _close(got[0], want[0])
    _close(got[1][0], want[1][0])
    if backend in SIGLIP_BACKENDS:
        for passes in (3, 4):
            got = _grads(ck.siglip_loss, q, k, normalize=True, backend=backend, passes=passes)
            want = _grads(pre(ck.siglip_loss), q, k, backend=backend, passes=passes)
            _close(got[0], want[0])
            for a, b in zip(got[1], want[1]):
                _close(a, b)


def test_false_is_unchanged():
    """normalize=False (the default) uses the embeddings as given."""
    gen = torch.Generator().manual_seed(6)
    q, k = (x.to(DEVICE) for x in raw_inputs(37, 37, 19, torch.float32, gen))
    for fn in (ck.info_nce, ck.reference.info_nce):
        base = fn(q, k, symmetric=True, temperature=0.5)
        assert torch.equal(fn(q, k, symmetric=True, temperature=0.5, normalize=False), base)
        assert not torch.allclose(fn(q, k, symmetric=True, temperature=0.5, normalize=True),
                                  base, rtol=1e-2)
    torch.testing.assert_close(ck.info_nce(q, k, temperature=0.5),
                               ck.reference.info_nce(q, k, temperature=0.5), rtol=1e-5,
                               atol=1e-5)
    for fn in (ck.siglip_loss, ck.reference.siglip_loss):
        base = fn(q, k)
        assert torch.equal(fn(q, k, normalize=False), base)
        assert not torch.allclose(fn(q, k, normalize=True), base, rtol=1e-2)
    for mod in (ck.FusedInfoNCE(), ck.FusedSigLIPLoss()):
        assert mod.normalize is False and "normalize=False" in repr(mod)


def test_unit_inputs_are_unchanged_up_to_rounding():
    gen = torch.Generator().manual_seed(8)
    q, k = (F.normalize(x, dim=1).to(DEVICE) for x in raw_inputs(37, 37, 19, torch.float64,
                                                                 gen))
    torch.testing.assert_close(ck.info_nce(q, k, normalize=True, symmetric=True),
                               ck.info_nce(q, k, symmetric=True), rtol=1e-12, atol=1e-12)


def test_zero_row_follows_functional_normalize():
    """A zero embedding stays zero (F.normalize's eps 1e-12): finite, as the reference."""
    gen = torch.Generator().manual_seed(9)
    q, k = (x.to(DEVICE) for x in raw_inputs(37, 37, 19, torch.float64, gen))
    q[4] = 0
    got = _grads(ck.info_nce, q, k, normalize=True, symmetric=True)
    want = _grads(ck.reference.info_nce, q, k, normalize=True, symmetric=True)
    assert torch.isfinite(got[0]).all()
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("weighting", ["softmax", "linear"])
def test_teacher_is_not_normalized(weighting):
    """The flag normalizes the student's query and key only: the raw teacher embeddings
    give the targets (their norms matter to the softmax weighting)."""
    gen = torch.Generator().manual_seed(10)
    q, k = (x.to(DEVICE) for x in raw_inputs(37, 37, 19, torch.float64, gen))
    tq, tk = (x.to(DEVICE) for x in raw_inputs(37, 37, 7, torch.float64, gen))
    if weighting == "linear":       # CWCL's (1 + <tq, tk>) / 2 needs |<tq, tk>| <= 1
        tq, tk = 0.2 * F.normalize(tq, dim=1), F.normalize(tk, dim=1)
    kw = dict(symmetric=True, teacher=(tq, tk), teacher_weight=0.5,
              teacher_weighting=weighting, temperature=0.1)
    got = _grads(ck.info_nce, q, k, normalize=True, **kw)
    want = _grads(ck.info_nce, F.normalize(q, dim=-1), F.normalize(k, dim=-1), **kw)
    ref = _grads(ck.reference.info_nce, q, k, normalize=True, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-9, atol=1e-9)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    kw_n = dict(kw, teacher=(F.normalize(tq, dim=-1), F.normalize(tk, dim=-1)))
    assert not torch.allclose(ck.info_nce(q, k, normalize=True, **kw_n), got[0], rtol=1e-3)


def test_modules():
    gen = torch.Generator().manual_seed(12)
    q, k = (x.to(DEVICE) for x in raw_inputs(37, 37, 19, torch.float32, gen))
    m = ck.FusedInfoNCE(temperature=0.1, normalize=True)
    assert m.normalize is True and "normalize=True" in repr(m)
    got = _grads(m, q, k)
    want = _grads(ck.reference.info_nce, q, k, temperature=0.1, symmetric=True,
                  normalize=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    s = ck.FusedSigLIPLoss(normalize=True)
    assert s.normalize is True and "normalize=True" in repr(s)
    got = _grads(s, q, k, 10.0, -10.0)
    want = _grads(ck.reference.siglip_loss, q, k, logit_scale=10.0, logit_bias=-10.0,
                  normalize=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [1, 0, "yes", None, 1.0, torch.tensor(True)],
                         ids=["int", "zero", "str", "None", "float", "tensor"])
def test_bad_type_raises(bad):
    q = torch.randn(4, 3, device=DEVICE)
    calls = [lambda: ck.info_nce(q, q, normalize=bad),
             lambda: ck.info_nce(q, None, normalize=bad),
             lambda: ck.reference.info_nce(q, q, normalize=bad),
             lambda: ck.siglip_loss(q, q, normalize=bad),
             lambda: ck.reference.siglip_loss(q, q, normalize=bad),
             lambda: ck.FusedInfoNCE(normalize=bad),
             lambda: ck.FusedSigLIPLoss(normalize=bad)]
    for call in calls:
        with pytest.raises(TypeError, match=r"normalize must be a bool"):
            call()


@pytest.mark.cpu_only
@pytest.mark.no_poison
@pytest.mark.parametrize("loss", ["info_nce", "siglip"])
def test_compile_fullgraph(loss):
    """torch.compile(fullgraph=True, aot_eager) of a step with normalize=True (raw encoder
    outputs, a learnable scale): no graph break, the eager loss and gradients."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    enc = torch.nn.Linear(12, 8)
    with torch.no_grad():
        enc.weight.copy_(3 * torch.randn(8, 12, generator=g))
    log_scale = torch.nn.Parameter(torch.tensor(2.3))
    x, y = torch.randn(16, 12, generator=g), torch.randn(19, 12, generator=g)

    def step(x, y):
        q, k = enc(x), enc(y)
        if loss == "info_nce":
            return ck.info_nce(q, k, symmetric=True, logit_scale=log_scale.exp(),
                               label_smoothing=0.1, normalize=True)
        return ck.siglip_loss(q, k, logit_scale=log_scale.exp(), logit_bias=-3.0,
                              normalize=True)

    params = [enc.weight, enc.bias, log_scale]
    eager = step(x, y)
    g_eager = torch.autograd.grad(eager, params)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y)
    g_compiled = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
