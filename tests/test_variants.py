"""The InfoNCE variants inside the kernels: additive margin and decoupled (DCL), on every
backend that declares the positive shift, against the float64 reference (which builds
the shifted S and the masks explicitly): loss and the gradients of query, key and the
temperature, odd shapes, combined with symmetric, labels, self-contrast, hard negatives
and label smoothing; half types; stability; errors; dispatch; memory."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from compat import open_clip_loss
from conftest import DEVICE, TOL, rel_err, seed_for
from contrastive_kernels import backends

AVAILABLE = ck.available_backends(DEVICE)
BACKENDS = [b for b in AVAILABLE if "shift" in backends.get(b).features]
MAX_SIZE = {"triton": 257} if DEVICE == "cpu" else {}
SHAPES = [(3, 3, 17), (37, 53, 19), (100, 100, 257), (257, 300, 33)]


def _labels(n, classes, gen):
    return torch.randint(0, classes, (n,), generator=gen)


# Each case: (kwargs, key is None) for sizes n, m, or None where the shape does not fit.
def case_clip_margin(n, m, gen):
    return (dict(symmetric=True, margin=0.3), False) if n == m else None


def case_hard_negatives_margin(n, m, gen):
    return (dict(margin=0.25, label_smoothing=0.1), False) if m >= n else None


def case_index_dcl_margin(n, m, gen):
    return dict(positive_index=torch.randint(0, m, (n,), generator=gen), decoupled=True,
                margin=-0.2), False


def case_supcon_margin_smoothing(n, m, gen):
    return dict(labels=_labels(n, 4, gen), key_labels=_labels(m, 4, gen), symmetric=True,
                margin=0.2, label_smoothing=0.1), False


def case_supcon_dcl(n, m, gen):
    return dict(labels=_labels(n, 3, gen), key_labels=_labels(m, 3, gen), symmetric=True,
                decoupled=True), False


def case_ntxent_margin(n, m, gen):
    return (dict(symmetric=True, margin=0.3), True) if n % 2 == 0 else None


def case_ntxent_dcl(n, m, gen):
    return (dict(decoupled=True, label_smoothing=0.1), True) if n % 2 == 0 else None


def case_selfsup_labels_dcl_margin(n, m, gen):
    return dict(labels=_labels(n, 3, gen), symmetric=True, decoupled=True, margin=0.1), True


def case_none_reduction(n, m, gen):
    return dict(labels=_labels(n, 4, gen), key_labels=_labels(m, 4, gen), symmetric=True,
                reduction="none", margin=0.15, decoupled=True), False


def case_sum_index(n, m, gen):
    return dict(positive_index=torch.randint(0, m, (n,), generator=gen), reduction="sum",
                margin=0.35), False


CASES = [case_clip_margin, case_hard_negatives_margin, case_index_dcl_margin,
         case_supcon_margin_smoothing, case_supcon_dcl, case_ntxent_margin, case_ntxent_dcl,
         case_selfsup_labels_dcl_margin, case_none_reduction, case_sum_index]


def compare(backend, q, k, kwargs, dtype, ref_dtype=torch.float64, temperature=0.2, tol=None,
            **opts):
    """Loss and the gradients of query, key (if any) and the temperature vs the reference,
    under a random upstream gradient."""
    dev = torch.device(DEVICE)

    def leaves(dt):
        qq = q.to(dev, dtype).to(dt).requires_grad_()
        kk = None if k is None else k.to(dev, dtype).to(dt).requires_grad_()
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        t = torch.as_tensor(temperature, dtype=sdt).to(dev).requires_grad_()
        return [x for x in (qq, kk, t) if x is not None]

    def on_dev(v):
        if isinstance(v, tuple):
            return tuple(on_dev(x) for x in v)
        return v.to(dev) if torch.is_tensor(v) else v

    kw = {key: on_dev(v) for key, v in kwargs.items()}
    ins_a, ins_r = leaves(dtype), leaves(ref_dtype)

    def call(fn, ins, **extra):
        key = ins[1] if k is not None else None
        return fn(ins[0], key, temperature=ins[-1], **kw, **extra)

    out = call(ck.info_nce, ins_a, backend=backend, **opts)
    ref = call(ck.reference.info_nce, ins_r)
    assert out.shape == ref.shape
    tol = tol or TOL[dtype]
    err = rel_err(out, ref, floor=1.0)
    assert err <= tol["loss"], ("loss", err)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64).to(dev)
    ga = torch.autograd.grad((out.double() * w).sum(), ins_a)
    gr = torch.autograd.grad((ref.double() * w).sum(), ins_r)
    names = ["query", "key", "temperature"] if k is not None else ["query", "temperature"]
    for name, a, r, leaf in zip(names, ga, gr, ins_a):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        err = rel_err(a, r, floor=1e-2)
        assert err <= tol["grad"], (name, err)
    return out, ref


def _inputs(n, m, d, dtype, gen, self_contrast):
    q = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    k = None if self_contrast else F.normalize(torch.randn(m, d, generator=gen,
                                                           dtype=torch.float64), dim=1)
    return q.to(dtype), None if k is None else k.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_against_reference(backend, dtype, case, shape):
    n, m, d = shape
    cap = MAX_SIZE.get(backend)
    if cap is not None and max(shape) > cap:
        pytest.skip(f"{backend} on {DEVICE}: shapes above {cap} are too slow here")
    gen = torch.Generator().manual_seed(seed_for("variants", case.__name__, shape, str(dtype)))
    made = case(n, m, gen)
    if made is None:
        pytest.skip("shape does not fit this case")
    kwargs, self_c = made
    q, k = _inputs(n, m, d, dtype, gen, self_c)
    compare(backend, q, k, kwargs, dtype)


# Per-query temperature: a (N,) temperature, with every variant it combines with.
PER_ROW_CASES = [dict(), dict(symmetric=True), dict(margin=0.3, symmetric=True),
                 "supcon_margin_smoothing", "index_dcl_margin", "ntxent_margin", "ntxent_dcl",
                 "selfsup_labels_dcl_margin", "none_reduction", "sum_index"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", PER_ROW_CASES, ids=str)
@pytest.mark.parametrize("shape", [(6, 6, 17), (38, 53, 19), (130, 130, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_per_query_temperature(backend, dtype, case, shape):
    """temperature of shape (N,): S_ij = <q_i, k_j> / t_i, the gradient of every t_i;
    symmetric losses read the same matrix; self-contrast too (the queries scaled, the
    keys not)."""
    n, m, d = shape
    gen = torch.Generator().manual_seed(seed_for("per_row", str(case), shape, str(dtype)))
    if isinstance(case, dict):
        if m < n or (case.get("symmetric") and m != n):
            pytest.skip("shape does not fit this case")
        kwargs, self_c = dict(case), False
    else:
        made = globals()["case_" + case](n, m, gen)
        if made is None:
            pytest.skip("shape does not fit this case")
        kwargs, self_c = made
    q, k = _inputs(n, m, d, dtype, gen, self_c)
    t = 0.05 + 0.3 * torch.rand(n, generator=gen, dtype=torch.float64)
    compare(backend, q, k, kwargs, dtype, temperature=t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_per_query_temperature_half_types(backend, dtype):
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; checked on GPU")
    gen = torch.Generator().manual_seed(4)
    q, k = _inputs(96, 96, 64, dtype, gen, False)
    t = 0.05 + 0.2 * torch.rand(96, generator=gen, dtype=torch.float64)
    # The kernels see the queries scaled, q_i / t_i, rounded once more to the input dtype
    # (about 2^-9 relative for bf16, 2^-12 for fp16): the loss tolerance is 4x the plain
    # one; the gradients keep theirs.
    tol = dict(TOL[dtype], loss=4 * TOL[dtype]["loss"])
    compare(backend, q, k, dict(symmetric=True, margin=0.2), dtype, ref_dtype=torch.float32,
            temperature=t, tol=tol)


def test_per_query_logit_scale():
    """logit_scale (N,) is the same as temperature 1 / logit_scale, gradients included."""
    gen = torch.Generator().manual_seed(8)
    q, k = _inputs(20, 20, 8, torch.float64, gen, False)
    s = (5 + 10 * torch.rand(20, generator=gen, dtype=torch.float64)).requires_grad_()
    out = ck.info_nce(q.to(DEVICE), k.to(DEVICE), logit_scale=s.to(DEVICE), symmetric=True,
                      margin=0.1)
    ref = ck.reference.info_nce(q, k, logit_scale=s, symmetric=True, margin=0.1)
    (g,) = torch.autograd.grad(out, s)
    (gr,) = torch.autograd.grad(ref, s)
    assert rel_err(out, ref, floor=1.0) < 1e-10 and rel_err(g, gr, floor=1e-2) < 1e-9
    # each row's scale matters: moving one changes only through that row's terms
    assert (g != 0).all()


def test_per_query_temperature_errors():
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"temperature must be .*shape \(6,\)"):
        ck.info_nce(q, k, temperature=torch.ones(5))
    with pytest.raises(TypeError, match="temperature must be a floating tensor"):
        ck.info_nce(q, k, temperature=torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ck.info_nce(q, k, temperature=torch.tensor([0.1, 0.2, -0.1, 0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        ck.info_nce(q, k, logit_scale=torch.tensor([1.0, 2, float("nan"), 1, 1, 1]))
    with pytest.raises(ValueError, match="must be a float or a 0-dim tensor"):
        ck.info_nce(q, k, temperature=torch.ones(2, 3))
    with pytest.raises(ValueError, match="logit_scale must be a float or a 0-dim tensor for "
                                         "siglip_loss"):
        ck.siglip_loss(q, k, logit_scale=torch.ones(6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_options_and_frozen_sides(backend, deterministic):
    """The deterministic kernels (Triton: the dk launch on S^T with the shift by column)
    and frozen keys or queries (only one gradient launch, the shift's gradient still
    comes with the rows)."""
    gen = torch.Generator().manual_seed(5)
    n, m, d = 45, 61, 24
    q, k = _inputs(n, m, d, torch.float64, gen, False)
    kw = dict(labels=_labels(n, 4, gen), key_labels=_labels(m, 4, gen), symmetric=True,
              margin=0.3, decoupled=False)
    compare(backend, q, k, kw, torch.float64, deterministic=deterministic)
    dev = torch.device(DEVICE)
    for frozen in ("query", "key"):
        qq = q.to(dev).requires_grad_(frozen != "query")
        kk = k.to(dev).requires_grad_(frozen != "key")
        t = torch.tensor(0.2, dtype=torch.float64, device=dev, requires_grad=True)
        out = ck.info_nce(qq, kk, temperature=t, backend=backend,
                          deterministic=deterministic, **kw)
        t2 = t.detach().clone().requires_grad_()
        ref = ck.reference.info_nce(q.to(dev), k.to(dev), temperature=t2, **kw)
        g = torch.autograd.grad(out, [x for x in (qq, kk, t) if x.requires_grad])
        g2 = torch.autograd.grad(ref, t2)
        assert rel_err(g[-1], g2[0], floor=1e-2) <= 1e-9, frozen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [case_clip_margin, case_supcon_dcl, case_ntxent_margin],
                         ids=["clip_margin", "supcon_dcl", "ntxent_margin"])
def test_half_types(backend, dtype, case):
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; checked on GPU")
    n = m = 96
    gen = torch.Generator().manual_seed(3)
    kwargs, self_c = case(n, m, gen)
    q, k = _inputs(n, m, 64, dtype, gen, self_c)
    compare(backend, q, k, kwargs, dtype, ref_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoupled_is_stable_when_the_positive_dominates(backend):
    """Keys equal to their queries at temperature 0.01: every positive logit is 100 and
    holds all but ~e-60 of its row's mass. The log-sum-exp without it (DCL) cannot come
    from subtracting the positive's term from the full one (fp32 cancellation: -inf or
    NaN); the kernels leave it out tile by tile."""
    gen = torch.Generator().manual_seed(9)
    n, d = 64, 256
    q = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    k = q.clone()
    for kw in (dict(decoupled=True), dict(decoupled=True, margin=0.5, symmetric=True)):
        out, ref = compare(backend, q, k, kw, torch.float32, temperature=0.01)
        assert torch.isfinite(out) and float(ref.detach()) < -20, float(ref.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits(backend):
    """Raw (unnormalized) embeddings with the margin: |S| in the hundreds."""
    gen = torch.Generator().manual_seed(11)
    n, d = 50, 40
    q = 3 * torch.randn(n, d, generator=gen)
    k = 3 * torch.randn(n, d, generator=gen)
    assert float((q @ k.T).abs().max() / 0.2) > 300
    compare(backend, q, k, dict(symmetric=True, margin=0.4, decoupled=True), torch.float32)


def test_row_without_negative_has_no_loss():
    """DCL: a query whose keys are all positives has an empty log-sum-exp; it gets loss 0
    and is left out of the mean, like a row without a positive."""
    dev = torch.device(DEVICE)
    q = F.normalize(torch.randn(4, 8), dim=1).to(dev)
    k = F.normalize(torch.randn(3, 8), dim=1).to(dev)
    labels = torch.tensor([0, 0, 1, 2], device=dev)
    key_labels = torch.tensor([0, 0, 0], device=dev)   # rows 0, 1: only positives
    for be in BACKENDS:
        rows = ck.info_nce(q, k, labels=labels, key_labels=key_labels, decoupled=True,
                           reduction="none", backend=be)
        assert rows.tolist() == [0.0] * 4, (be, rows)
        ref = ck.reference.info_nce(q, k, labels=labels, key_labels=key_labels,
                                    decoupled=True, reduction="none")
        assert ref.tolist() == [0.0] * 4
        # every row with a loss counts in the mean: here none
        assert float(ck.info_nce(q, k, labels=labels, key_labels=key_labels, decoupled=True,
                                 backend=be)) == 0.0


def test_variants_change_the_loss():
    """The options are not ignored: each changes the value (vs plain InfoNCE), and the
    margin raises the loss of matched pairs by about s m."""
    gen = torch.Generator().manual_seed(2)
    q, k = _inputs(32, 32, 16, torch.float64, gen, False)
    base = ck.info_nce(q, k, temperature=0.1)
    margin = ck.info_nce(q, k, temperature=0.1, margin=0.2)
    dcl = ck.info_nce(q, k, temperature=0.1, decoupled=True)
    assert float(margin - base) > 0.5 and float(dcl) < float(base)


def test_errors():
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises(TypeError, match="margin must be a float"):
        ck.info_nce(q, k, margin="0.2")
    with pytest.raises(TypeError, match="margin must be a float"):
        ck.info_nce(q, k, margin=True)
    with pytest.raises(ValueError, match="margin must be finite"):
        ck.info_nce(q, k, margin=float("nan"))
    with pytest.raises(TypeError, match="decoupled must be a bool"):
        ck.info_nce(q, k, decoupled=1)
    with pytest.raises(ValueError, match="does not support low_memory"):
        ck.info_nce(q, k, margin=0.1, low_memory=True)
    with pytest.raises(ValueError, match="does not support algorithm='blocked'"):
        ck.info_nce(q, k, decoupled=True, algorithm="blocked")
    with pytest.raises(ValueError, match="needs symmetric positives"):
        ck.info_nce(q, None, positive_index=torch.tensor([1, 2, 3, 4, 5, 0]), symmetric=True,
                    margin=0.1)
    with pytest.raises(ValueError, match="margin must be the same|margin"):
        ck.reference.info_nce(q, k, margin=float("inf"))


def test_dispatch_skips_a_backend_without_the_shift(monkeypatch):
    """A backend that does not declare "shift" is skipped by auto and, named, raises with
    the reason (the CUDA C++ kernels do not have it)."""
    assert "shift" not in backends.get("cuda").features
    name = BACKENDS[0]
    be = backends.get(name)
    monkeypatch.setattr(type(be), "features", be.features - {"shift"})
    q, k = torch.randn(8, 4, device=DEVICE), torch.randn(8, 4, device=DEVICE)
    with pytest.raises(ValueError, match="does not implement margin or decoupled"):
        ck.info_nce(q, k, margin=0.1, backend=name)
    out = ck.info_nce(q, k, margin=0.1)               # auto: another backend
    torch.testing.assert_close(out, ck.reference.info_nce(q, k, margin=0.1))
    ck.info_nce(q, k, backend=name)                   # without a variant it still serves


@pytest.mark.cpu_only
@pytest.mark.no_poison
def test_peak_memory_far_below_n_squared():
    """Margin + DCL + SupCon labels, symmetric, forward and backward at N = 16384, D = 64
    on the cpu backend, in a fresh process: peak RSS above the inputs stays under 256 MiB
    (one N x N float32 matrix is 1 GiB)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu backend is not built")
    script = textwrap.dedent("""
        import resource, torch, contrastive_kernels as ck
        torch.set_num_threads(2)
        n, d = 16384, 64
        g = torch.Generator().manual_seed(0)
        q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
        k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
        labels = torch.randint(0, 1000, (n,), generator=g)
        q.grad = torch.zeros_like(q); k.grad = torch.zeros_like(k)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = ck.info_nce(q, k, labels=labels, symmetric=True, margin=0.2, decoupled=True,
                           backend="cpu")
        loss.backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert p.returncode == 0, p.stderr[-2000:]
    above = int(p.stdout.strip().splitlines()[-1])
    assert above < 256 << 20, f"peak RSS {above >> 20} MiB above the inputs"


def test_module_takes_the_variants():
    m = ck.FusedInfoNCE(temperature=0.1, margin=0.2, decoupled=True)
    assert "margin=0.2" in repr(m) and "decoupled=True" in repr(m)
    q, k = torch.randn(8, 4, device=DEVICE), torch.randn(8, 4, device=DEVICE)
    want = ck.reference.info_nce(q, k, temperature=0.1, symmetric=True, margin=0.2,
                                 decoupled=True)
    torch.testing.assert_close(m(q, k), want)
    with pytest.raises(TypeError, match="decoupled must be a bool"):
        ck.FusedInfoNCE(decoupled="yes")


# ---------------------------------------------------------------- teacher soft targets

def _teacher(n, m, dt, gen, self_c, unit=False):
    tq = torch.randn(n, dt, generator=gen, dtype=torch.float64)
    tk = torch.randn(m, dt, generator=gen, dtype=torch.float64)
    if unit:        # CWCL's linear weighting assumes unit vectors (f = (1 + cos) / 2 >= 0)
        tq, tk = F.normalize(tq, dim=1), F.normalize(tk, dim=1)
    return tq if self_c else (tq, tk)


def tcase_distill_clip(n, m, gen):
    """open_clip's DistillClipLoss shape: symmetric, the teacher's targets only."""
    return (dict(symmetric=True, teacher=_teacher(n, m, 5, gen, False),
                 teacher_logit_scale=4.0), False) if n == m else None


def tcase_mixed_labels(n, m, gen):
    return dict(labels=_labels(n, 4, gen), key_labels=_labels(m, 4, gen), symmetric=True,
                label_smoothing=0.1, teacher=_teacher(n, m, 11, gen, False),
                teacher_weight=0.4), False


def tcase_hard_negatives_dcl(n, m, gen):
    return (dict(teacher=_teacher(n, m, 3, gen, False), teacher_weight=0.7, decoupled=True),
            False) if m >= n else None


def tcase_cwcl(n, m, gen):
    return dict(positive_index=torch.randint(0, m, (n,), generator=gen),
                teacher=_teacher(n, m, 9, gen, False, unit=True), teacher_weighting="linear",
                teacher_weight=0.5), False


def tcase_cwcl_symmetric(n, m, gen):
    return (dict(symmetric=True, teacher=_teacher(n, m, 6, gen, False, unit=True),
                 teacher_weighting="linear"), False) if n == m else None


def tcase_self_distill(n, m, gen):
    return (dict(teacher=_teacher(n, n, 7, gen, True), symmetric=True, teacher_weight=0.6),
            True) if n % 2 == 0 else None


def tcase_self_linear_labels(n, m, gen):
    return dict(labels=_labels(n, 3, gen), teacher=_teacher(n, n, 4, gen, True, unit=True),
                teacher_weighting="linear", reduction="none"), True


TEACHER_CASES = [tcase_distill_clip, tcase_mixed_labels, tcase_hard_negatives_dcl, tcase_cwcl,
                 tcase_cwcl_symmetric, tcase_self_distill, tcase_self_linear_labels]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", TEACHER_CASES, ids=lambda c: c.__name__[6:])
@pytest.mark.parametrize("shape", [(6, 6, 17), (37, 53, 19), (130, 130, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_teacher_against_reference(backend, dtype, case, shape):
    """The teacher's targets mixed into the hard ones, on every backend: the loss and the
    gradients of query, key and the temperature (the teacher gets none)."""
    n, m, d = shape
    gen = torch.Generator().manual_seed(seed_for("teacher", case.__name__, shape, str(dtype)))
    made = case(n, m, gen)
    if made is None:
        pytest.skip("shape does not fit this case")
    kwargs, self_c = made
    q, k = _inputs(n, m, d, dtype, gen, self_c)
    compare(backend, q, k, kwargs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["softmax", "linear"])
def test_teacher_with_per_query_temperature(backend, case):
    """The teacher's scale defaults to the student's, per row too."""
    gen = torch.Generator().manual_seed(12)
    n, d = 40, 16
    for self_c in (False, True):
        q, k = _inputs(n, n, d, torch.float64, gen, self_c)
        t = 0.05 + 0.3 * torch.rand(n, generator=gen, dtype=torch.float64)
        kw = dict(teacher=_teacher(n, n, 8, gen, self_c, unit=True), teacher_weighting=case,
                  teacher_weight=0.8, symmetric=True)
        compare(backend, q, k, kw, torch.float64, temperature=t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_teacher_half_types(backend, dtype):
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; checked on GPU")
    gen = torch.Generator().manual_seed(13)
    n = 96
    q, k = _inputs(n, n, 64, dtype, gen, False)
    tq, tk = _teacher(n, n, 32, gen, False)
    # the teacher is cast to the student's dtype: the reference gets the same rounded values
    kw = dict(symmetric=True, teacher=(tq.to(dtype), tk.to(dtype)), teacher_weight=0.5)
    compare(backend, q, k, kw, dtype, ref_dtype=torch.float32)


def test_teacher_gets_no_gradient_and_changes_the_loss():
    gen = torch.Generator().manual_seed(14)
    q, k = _inputs(24, 24, 8, torch.float64, gen, False)
    tq, tk = (x.requires_grad_() for x in _teacher(24, 24, 5, gen, False))
    base = ck.info_nce(q, k, symmetric=True)
    out = ck.info_nce(q, k, symmetric=True, teacher=(tq, tk))
    assert abs(float(out - base)) > 1e-3
    assert not out.requires_grad      # the teacher is treated as detached
    # weight 0: the hard targets (to rounding: the plain call takes auto's dense path, the
    # teacher call the fused kernel, and their target dots round differently)
    zero = ck.info_nce(q, k, symmetric=True, teacher=(tq, tk), teacher_weight=0.0)
    assert float(zero) == pytest.approx(float(base), rel=1e-13, abs=0)


def test_teacher_errors():
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    t = torch.randn(6, 3)
    with pytest.raises(TypeError, match="teacher must be a pair"):
        ck.info_nce(q, k, teacher=t)
    with pytest.raises(TypeError, match="teacher must be the teacher's query embeddings"):
        ck.info_nce(q, None, teacher=(t, t))
    with pytest.raises(ValueError, match="teacher query must have 6 rows"):
        ck.info_nce(q, k, teacher=(t[:5], t))
    with pytest.raises(ValueError, match="teacher key has embedding dim 2"):
        ck.info_nce(q, k, teacher=(t, t[:, :2]))
    with pytest.raises(ValueError, match="teacher_weight must be in"):
        ck.info_nce(q, k, teacher=(t, t), teacher_weight=1.5)
    with pytest.raises(TypeError, match="teacher_weight must be a float"):
        ck.info_nce(q, k, teacher=(t, t), teacher_weight="1")
    with pytest.raises(ValueError, match="teacher_weighting must be one of"):
        ck.info_nce(q, k, teacher=(t, t), teacher_weighting="kl")
    with pytest.raises(ValueError, match="teacher_logit_scale must be > 0"):
        ck.info_nce(q, k, teacher=(t, t), teacher_logit_scale=-1.0)
    with pytest.raises(ValueError, match="teacher_logit_scale needs a teacher"):
        ck.info_nce(q, k, teacher_logit_scale=2.0)
    with pytest.raises(ValueError, match="margin with a teacher is not supported"):
        ck.info_nce(q, k, teacher=(t, t), margin=0.2)
    with pytest.raises(ValueError, match="does not support low_memory"):
        ck.info_nce(q, k, teacher=(t, t), low_memory=True)
    with pytest.raises(TypeError, match="teacher query must be a torch.Tensor"):
        ck.info_nce(q, k, teacher=(None, t))


def test_dispatch_skips_a_backend_without_the_teacher(monkeypatch):
    assert "teacher" not in backends.get("cuda").features
    name = BACKENDS[0]
    be = backends.get(name)
    monkeypatch.setattr(type(be), "features", be.features - {"teacher"})
    q, k = torch.randn(8, 4, device=DEVICE), torch.randn(8, 4, device=DEVICE)
    t = (torch.randn(8, 3, device=DEVICE), torch.randn(8, 3, device=DEVICE))
    with pytest.raises(ValueError, match="does not implement teacher soft targets"):
        ck.info_nce(q, k, teacher=t, backend=name)
    torch.testing.assert_close(ck.info_nce(q, k, teacher=t),
                               ck.reference.info_nce(q, k, teacher=t))


def test_module_takes_a_teacher():
    m = ck.FusedInfoNCE(temperature=0.1, teacher_weight=0.5)
    q, k = torch.randn(8, 4, device=DEVICE), torch.randn(8, 4, device=DEVICE)
    t = (torch.randn(8, 3, device=DEVICE), torch.randn(8, 3, device=DEVICE))
    want = ck.reference.info_nce(q, k, temperature=0.1, symmetric=True, teacher=t,
                                 teacher_weight=0.5, teacher_logit_scale=2.0)
    torch.testing.assert_close(m(q, k, teacher=t, teacher_logit_scale=2.0), want)
    with pytest.raises(ValueError, match="teacher_weighting must be one of"):
        ck.FusedInfoNCE(teacher_weighting="soft")


@pytest.mark.cpu_only
@pytest.mark.no_poison
def test_teacher_peak_memory():
    """The teacher variant, forward and backward at N = 32768, D = 128, teacher D = 64 on
    the cpu backend, in a fresh process: peak RSS above the inputs <= 1 GiB (one N x N
    float32 matrix is 4 GiB)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu backend is not built")
    script = textwrap.dedent("""
        import resource, torch, contrastive_kernels as ck
        torch.set_num_threads(2)
        n, d, dt = 32768, 128, 64
        g = torch.Generator().manual_seed(0)
        unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=1)
        q, k = unit(n, d).requires_grad_(), unit(n, d).requires_grad_()
        tq, tk = unit(n, dt), unit(n, dt)
        q.grad = torch.zeros_like(q); k.grad = torch.zeros_like(k)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = ck.info_nce(q, k, symmetric=True, teacher=(tq, tk), teacher_weight=0.5,
                           backend="cpu")
        loss.backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert p.returncode == 0, p.stderr[-2000:]
    above = int(p.stdout.strip().splitlines()[-1])
    assert above < 1 << 30, f"peak RSS {above >> 20} MiB above the inputs"


def test_teacher_matches_open_clip_distill_clip_loss():
    """open_clip's DistillClipLoss, the installed library: its distill_loss is ours with
    teacher_weight=1, and contrastive + distill is twice ours at teacher_weight=0.5, values
    and the gradients of both towers and the scale."""
    loss_mod = open_clip_loss()
    if loss_mod is None or not hasattr(loss_mod, "DistillClipLoss"):
        pytest.skip("open_clip is not installed")
    gen = torch.Generator().manual_seed(21)
    n, d, dt = 40, 24, 12
    img, txt = (F.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
                for _ in range(2))
    t_img, t_txt = (F.normalize(torch.randn(n, dt, generator=gen), dim=1) for _ in range(2))
    s = torch.tensor(14.0, requires_grad=True)
    ts = torch.tensor(25.0)
    contrastive, distill = loss_mod.DistillClipLoss()(img, txt, s, t_img, t_txt, ts)
    for alpha, want in ((1.0, distill), (0.5, (contrastive + distill) / 2)):
        ours = ck.info_nce(img, txt, symmetric=True, logit_scale=s, teacher=(t_img, t_txt),
                           teacher_logit_scale=ts, teacher_weight=alpha)
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
        g = torch.autograd.grad(ours, [img, txt, s])
        gw = torch.autograd.grad(want, [img, txt, s], retain_graph=True)
        for a, b in zip(g, gw):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("self_c", [False, True], ids=["two_towers", "self"])
def test_linear_teacher_with_non_unit_rows(self_c):
    # (1 + <tq, tk>) / 2 goes negative for non-unit teacher rows: signed weights, the same
    # in the fused loss and the reference (which once dropped the negative ones)
    g = torch.Generator().manual_seed(seed_for("linear_non_unit", self_c))
    n, d, dt = 14, 9, 5
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(n, d, generator=g, dtype=torch.float64)
    tq = 2 * torch.randn(n, dt, generator=g, dtype=torch.float64)
    tk = 2 * torch.randn(n, dt, generator=g, dtype=torch.float64)
    teacher = tq if self_c else (tq, tk)
    assert ((1 + tq @ (tq if self_c else tk).T) < 0).any()
    kw = dict(teacher=teacher, teacher_weighting="linear", teacher_weight=0.5,
              symmetric=True)
    for be in [b for b in ck.available_backends("cpu") if b != "triton"]:
        qa = q.clone().requires_grad_()
        ka = None if self_c else k.clone().requires_grad_()
        qr = q.clone().requires_grad_()
        kr = None if self_c else k.clone().requires_grad_()
        got = ck.info_nce(qa, ka, backend=be, **kw)
        want = ck.reference.info_nce(qr, kr, **kw)
        assert rel_err(got, want, floor=1.0) <= TOL[torch.float64]["loss"], be
        ga = torch.autograd.grad(got, [x for x in (qa, ka) if x is not None])
        gr = torch.autograd.grad(want, [x for x in (qr, kr) if x is not None])
        for a, r in zip(ga, gr):
            assert rel_err(a, r, floor=1e-2) <= TOL[torch.float64]["grad"], be
