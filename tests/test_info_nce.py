"""Every backend against the float64 reference: loss and every gradient.

Fresh random inputs on odd shapes, every option of the loss family.
"""
import pytest
import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from conftest import DEVICE, TOL, rel_err, seed_for

BACKENDS = ck.available_backends(DEVICE)
# The Triton interpreter runs on numpy: keep its shapes small.
MAX_SIZE = {"triton": 257} if DEVICE == "cpu" else {}

SIZES = [1, 3, 17, 100, 257, 1000]
# (N, M, D) triples covering every size in every position.
SHAPES = [(1, 1, 1), (3, 3, 17), (17, 17, 3), (100, 100, 257), (257, 257, 100),
          (1000, 1000, 17), (3, 17, 1000), (17, 257, 1), (100, 1000, 3), (257, 1000, 17)]


def _labels(n, classes, gen):
    return torch.randint(0, classes, (n,), generator=gen)


# Each case maps (n, m, gen) to keyword arguments, or None when the shape does not fit.
def case_clip(n, m, gen):
    return dict(symmetric=True) if n == m else None


def case_one_way(n, m, gen):
    return dict() if m >= n else None          # M > N: extra keys are hard negatives


def case_perm(n, m, gen):
    return dict(positive_index=torch.randperm(m, generator=gen)[:n], symmetric=(n == m))


def case_smooth(n, m, gen):
    return dict(symmetric=(n == m), label_smoothing=0.1) if m >= n else None


def case_ntxent(n, m, gen):
    return dict(key=None) if n % 2 == 0 else None


def case_ntxent_sym_smooth(n, m, gen):
    return dict(key=None, symmetric=True, label_smoothing=0.2) if n % 2 == 0 else None


def case_supcon(n, m, gen):
    return dict(labels=_labels(n, 5, gen), key_labels=_labels(m, 5, gen), symmetric=True)


def case_supcon_same(n, m, gen):
    return dict(labels=_labels(n, 3, gen)) if n == m else None   # key_labels default to labels


def case_supcon_self(n, m, gen):
    return dict(key=None, labels=_labels(n, 4, gen), label_smoothing=0.05)


def case_supcon_self_sym(n, m, gen):
    return dict(key=None, labels=_labels(n, 4, gen), symmetric=True)


def case_sum(n, m, gen):
    return dict(symmetric=(n == m), reduction="sum") if m >= n else None


def case_none(n, m, gen):
    return dict(labels=_labels(n, 3, gen), key_labels=_labels(m, 3, gen), symmetric=True,
                reduction="none")


CASES = [case_clip, case_one_way, case_perm, case_smooth, case_ntxent, case_ntxent_sym_smooth,
         case_supcon, case_supcon_same, case_supcon_self, case_supcon_self_sym, case_sum, case_none]


def _inputs(n, m, d, dtype, gen, unit=True):
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(m, d, generator=gen, dtype=torch.float64)
    if unit:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return q.to(dtype), k.to(dtype)


def run_and_compare(backend, q, k, kwargs, dtype, ref_dtype=torch.float64, scale=14.0, bias=-0.5,
                    grad_tol=None):
    """Loss and gradients of query, key, logit_scale and logit_bias vs the reference
    (grad_tol: the gradients' tolerance instead of TOL's)."""
    kwargs = dict(kwargs)
    self_contrast = "key" in kwargs and kwargs.pop("key") is None
    dev = torch.device(DEVICE)

    def leaves(dt, base_dtype):
        qq = q.to(dev, base_dtype).to(dt).requires_grad_()
        kk = None if self_contrast else k.to(dev, base_dtype).to(dt).requires_grad_()
        s = torch.tensor(scale, dtype=torch.float64 if dt == torch.float64 else torch.float32,
                         device=dev, requires_grad=True)
        b = torch.tensor(bias, dtype=s.dtype, device=dev, requires_grad=True)
        return qq, kk, s, b

    kw = {key: (v.to(dev) if torch.is_tensor(v) else v) for key, v in kwargs.items()}
    qa, ka, sa, ba = leaves(dtype, dtype)
    qr, kr, sr, br = leaves(ref_dtype, dtype)
    out = ck.info_nce(qa, ka, logit_scale=sa, logit_bias=ba, backend=backend, **kw)
    ref = ck.reference.info_nce(qr, kr, logit_scale=sr, logit_bias=br, **kw)
    assert out.shape == ref.shape
    tol = TOL[dtype]
    err = rel_err(out, ref, floor=1.0)
    assert err <= tol["loss"], ("loss", err)
    # A random upstream gradient exercises reduction="none" fully.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dev)
    ins_a = [x for x in (qa, ka, sa, ba) if x is not None]
    ins_r = [x for x in (qr, kr, sr, br) if x is not None]
    ga = torch.autograd.grad((out.double() * w).sum(), ins_a)
    gr = torch.autograd.grad((ref.double() * w).sum(), ins_r)
    names = ["query", "key", "logit_scale", "logit_bias"] if ka is not None else \
        ["query", "logit_scale", "logit_bias"]
    for name, a, r, leaf in zip(names, ga, gr, ins_a):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        if name == "logit_bias":
            # The softmax is shift invariant: the exact gradient is 0.
            assert abs(float(a)) <= 1e-6 * max(1.0, float(out.detach().abs().max())), (name, float(a))
            continue
        # Floor 1e-2: where the exact gradient is ~0 (P - w cancels), rounding leaves
        # an absolute error of about eps * scale; compare it against 1e-2, not against 0.
        err = rel_err(a, r, floor=1e-2)
        assert err <= (tol["grad"] if grad_tol is None else grad_tol), (name, err)
    return out


def _fits(backend, n, m, d):
    cap = MAX_SIZE.get(backend)
    return cap is None or max(n, m, d) <= cap


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_against_reference(backend, dtype, case, shape):
    n, m, d = shape
    if not _fits(backend, n, m, d):
        pytest.skip(f"{backend} on {DEVICE}: shapes above {MAX_SIZE[backend]} are too slow here")
    gen = torch.Generator().manual_seed(seed_for(case.__name__, shape, str(dtype)))
    kwargs = case(n, m, gen)
    if kwargs is None:
        pytest.skip("shape does not fit this case")
    q, k = _inputs(n, m, d, dtype, gen)
    run_and_compare(backend, q, k, kwargs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [case_clip, case_ntxent, case_supcon], ids=["clip", "ntxent", "supcon"])
def test_half_types(backend, dtype, case):
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; checked on GPU")
    n, m, d = 100, 100, 64
    gen = torch.Generator().manual_seed(3)
    q, k = _inputs(n, m, d, dtype, gen)
    # Reference: float32 accumulation of the same rounded inputs.
    run_and_compare(backend, q, k, case(n, m, gen), dtype, ref_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_do_not_overflow(backend):
    gen = torch.Generator().manual_seed(11)
    n, d = 64, 48
    # Scale 100 on unit vectors, then raw unnormalized embeddings (|S| in the thousands).
    q, k = _inputs(n, n, d, torch.float32, gen)
    run_and_compare(backend, q, k, dict(symmetric=True), torch.float32, scale=100.0)
    q, k = _inputs(n, n, d, torch.float32, gen, unit=False)
    # fp32 logits as large as these carry an absolute rounding error of about
    # u * scale * sum_d |q_d k_d| (u = 2**-24), which exp(S - lse) turns into a relative
    # error of the gradient: the tolerance is twice that (1.4e-3 here; the CUDA C++
    # kernel's summation order gave 1.6e-4 on an H200, over the 1e-4 of unit-scale logits).
    grad_tol = 2 * 2.0**-24 * 14.0 * float(((4 * q).abs() @ (4 * k).abs().T).max())
    out = run_and_compare(backend, q * 4, k * 4, dict(symmetric=True), torch.float32, scale=14.0,
                          grad_tol=max(TOL[torch.float32]["grad"], grad_tol))
    assert float(out.detach()) > 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    gen = torch.Generator().manual_seed(5)
    base_q = torch.randn(40, 34, generator=gen)
    base_k = torch.randn(34, 40, generator=gen)
    q, k = base_q[::2, ::2], base_k.T[::2, ::2]     # strided rows and columns
    assert not q.is_contiguous() and not k.is_contiguous()
    run_and_compare(backend, q, k, dict(symmetric=True, label_smoothing=0.1), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    gen = torch.Generator().manual_seed(1)
    dev = torch.device(DEVICE)
    q = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(dev).requires_grad_()
    k = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(dev).requires_grad_()
    s = torch.tensor(2.5, dtype=torch.float64, device=dev, requires_grad=True)
    b = torch.tensor(0.3, dtype=torch.float64, device=dev, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1], device=dev)

    def clip(q, k, s, b):
        return ck.info_nce(q, k, logit_scale=s, logit_bias=b, symmetric=True,
                           label_smoothing=0.1, backend=backend)

    def supcon(q, s):
        return ck.info_nce(q, labels=labels, logit_scale=s, reduction="sum", backend=backend)

    assert torch.autograd.gradcheck(clip, (q, k, s, b))
    assert torch.autograd.gradcheck(supcon, (q, s))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_positive_anywhere_gives_zero_not_nan(backend):
    q = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    out = ck.info_nce(q, labels=torch.arange(6, device=DEVICE), backend=backend)
    out.backward()
    assert float(out.detach()) == 0.0 and torch.equal(q.grad, torch.zeros_like(q))


# (input, value) put into one embedding entry
NON_FINITE = [("query", float("nan")), ("key", float("nan")), ("query", float("inf")),
              ("key", -float("inf"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [case_clip, case_supcon, case_ntxent_sym_smooth],
                         ids=["clip", "supcon", "ntxent_sym_smooth"])
@pytest.mark.parametrize("where,value", NON_FINITE, ids=["nan_q", "nan_k", "inf_q", "-inf_k"])
def test_non_finite_inputs_propagate(backend, case, where, value, **options):
    """A NaN or inf in one embedding reaches every loss term the reference makes
    non-finite (a NaN logit is not a masked one), so training loops and AMP's GradScaler
    see it. NaN: the same NaN losses and non-finite gradient entries as the reference.
    inf: the same non-finite losses (inf or NaN: a row's log-sum-exp may be inf where
    the reference's log_softmax gives NaN), and non-finite gradients where it has them."""
    n, d = 70, 16                      # 70 rows: several tiles in every backend
    gen = torch.Generator().manual_seed(seed_for("nonfinite", where))
    kw = case(n, n, gen)
    self_contrast = kw.pop("key", "") is None
    if self_contrast and where == "key":
        pytest.skip("self-contrast: the key is the query")
    kw = {key: (v.to(DEVICE) if torch.is_tensor(v) else v) for key, v in kw.items()}
    q, k = (x.to(DEVICE) for x in _inputs(n, n, d, torch.float32, gen))
    (q if where == "query" else k)[5, 3] = value

    def run(fn, **extra):
        qq = q.clone().requires_grad_()
        kk = None if self_contrast else k.clone().requires_grad_()
        out = fn(qq, kk, temperature=0.1, reduction="none", **kw, **extra)
        out.sum().backward()
        return out.detach(), [x.grad for x in (qq, kk) if x is not None]

    out, grads = run(ck.info_nce, backend=backend, **options)
    ref, ref_grads = run(ck.reference.info_nce)
    assert not ref.isfinite().all()
    assert torch.equal(out.isfinite(), ref.isfinite())
    if value != value:
        assert torch.equal(out.isnan(), ref.isnan())
    for g, r in zip(grads, ref_grads):
        if value != value:
            assert torch.equal(g.isfinite(), r.isfinite())
        else:
            assert g.isfinite().all() == r.isfinite().all()


def test_reference_matches_cross_entropy():
    """Anchor the oracle to F.cross_entropy, the loss users replace."""
    gen = torch.Generator().manual_seed(2)
    q, k = _inputs(33, 33, 16, torch.float64, gen)
    s, b = 20.0, 0.25
    logits = s * q @ k.T + b
    t = torch.arange(33)
    for eps in (0.0, 0.1):
        want = (F.cross_entropy(logits, t, label_smoothing=eps)
                + F.cross_entropy(logits.T, t, label_smoothing=eps)) / 2
        got = ck.reference.info_nce(q, k, logit_scale=s, logit_bias=b, symmetric=True,
                                    label_smoothing=eps)
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
    # NT-Xent: two views stacked, the positive of i is (i + B) mod 2B, the diagonal excluded.
    x = torch.cat([q[:16], k[:16]])
    sim = (x @ x.T / 0.5).masked_fill(torch.eye(32, dtype=torch.bool), float("-inf"))
    want = F.cross_entropy(sim, (torch.arange(32) + 16) % 32)
    assert torch.allclose(ck.reference.info_nce(x, temperature=0.5), want, rtol=1e-12, atol=0)


def test_reduction_none_layout():
    gen = torch.Generator().manual_seed(4)
    q, k = _inputs(9, 9, 5, torch.float64, gen)
    none = ck.info_nce(q, k, symmetric=True, reduction="none")
    assert none.shape == (18,)
    total = ck.info_nce(q, k, symmetric=True, reduction="sum")
    mean = ck.info_nce(q, k, symmetric=True)
    assert torch.allclose(none.sum(), total) and torch.allclose(none.sum() / 9, mean)
    assert ck.info_nce(q, k, reduction="none").shape == (9,)


def test_temperature_and_defaults():
    gen = torch.Generator().manual_seed(6)
    q, k = _inputs(12, 12, 8, torch.float64, gen)
    a = ck.info_nce(q, k)                           # temperature 0.07
    b = ck.info_nce(q, k, temperature=0.07)
    c = ck.info_nce(q, k, logit_scale=1 / 0.07)
    with pytest.raises(ValueError, match="either temperature or logit_scale, not both"):
        ck.info_nce(q, k, logit_scale=1 / 0.07, temperature=5.0)
    d = ck.reference.info_nce(q, k, logit_scale=1 / 0.07)
    assert torch.allclose(a, b) and torch.allclose(a, c) and torch.allclose(a, d, rtol=1e-10)
    t = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)   # learnable temperature
    ck.info_nce(q, k, temperature=t).backward()
    tr = t.detach().clone().requires_grad_()
    ck.reference.info_nce(q, k, temperature=tr).backward()
    assert torch.allclose(t.grad, tr.grad, rtol=1e-9)


# Frozen inputs: a memory bank or a locked tower gives keys (or queries) that need no
# gradient. The backend is then asked for the other gradient only, and makes only that.
FROZEN = {"key": (True, False, False), "query": (False, True, False),
          "both": (False, False, True)}   # which of (query, key, logit_scale) require grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [case_clip, case_supcon, case_ntxent_sym_smooth],
                         ids=["clip", "supcon", "ntxent"])
@pytest.mark.parametrize("frozen", sorted(FROZEN))
def test_frozen_inputs_get_no_gradient_work(backend, case, frozen, monkeypatch):
    n, d = 34, 19
    gen = torch.Generator().manual_seed(seed_for("frozen", case.__name__, frozen))
    kwargs = dict(case(n, n, gen))
    self_contrast = "key" in kwargs and kwargs.pop("key") is None
    if self_contrast and frozen == "query":
        pytest.skip("under self-contrast the keys are the queries")
    q, k = _inputs(n, n, d, torch.float32, gen)
    dev = torch.device(DEVICE)
    want = FROZEN[frozen]
    kw = {key: (v.to(dev) if torch.is_tensor(v) else v) for key, v in kwargs.items()}

    def leaves(dt):
        qq = q.to(dev, dt).requires_grad_(want[0])
        kk = None if self_contrast else k.to(dev, dt).requires_grad_(want[1])
        s = torch.tensor(14.0, dtype=dt, device=dev, requires_grad=want[2])
        return qq, kk, s

    be = ck.backends.get(backend)
    calls, real = [], be.lse_backward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs.get("need_dq", True), kwargs.get("need_dk", True),
                      out[0] is not None, out[1] is not None))
        return out

    monkeypatch.setattr(be, "lse_backward", spy)
    qa, ka, sa = leaves(torch.float32)
    qr, kr, sr = leaves(torch.float64)
    out = ck.info_nce(qa, ka, logit_scale=sa, backend=backend, **kw)
    ref = ck.reference.info_nce(qr, kr, logit_scale=sr, **kw)
    ins_a = [x for x in (qa, ka, sa) if x is not None and x.requires_grad]
    ins_r = [x for x in (qr, kr, sr) if x is not None and x.requires_grad]
    for name, a, r in zip(frozen, torch.autograd.grad(out, ins_a), torch.autograd.grad(ref, ins_r)):
        assert rel_err(a, r, floor=1e-2) <= TOL[torch.float32]["grad"], (frozen, name)
    assert len(calls) == 1
    need_dq, need_dk, got_dq, got_dk = calls[0]
    expect = {"key": (True, self_contrast), "query": (False, True), "both": (True, False)}[frozen]
    assert (need_dq, need_dk) == expect, calls
    assert (got_dq, got_dk) == expect, "a gradient not asked for came back (or one asked for did not)"
