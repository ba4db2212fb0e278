"""The sigmoid loss (SigLIP): every backend against the float64 reference, both pass
schedules, the bias gradient, large logits, half types, errors, dispatch, open_clip."""
import pytest
import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from compat import open_clip_loss
from conftest import DEVICE, TOL, rel_err, seed_for
from contrastive_kernels import backends

AVAILABLE = ck.available_backends(DEVICE)
BACKENDS = [b for b in AVAILABLE if "siglip" in backends.get(b).features]
MAX_SIZE = {"triton": 257} if DEVICE == "cpu" else {}

SHAPES = [(1, 1, 1), (3, 3, 17), (17, 17, 3), (100, 100, 257), (257, 257, 100),
          (1000, 1000, 17), (3, 17, 1000), (17, 257, 1), (100, 1000, 3), (257, 1000, 17)]


def _labels(n, classes, gen):
    return torch.randint(0, classes, (n,), generator=gen)


def case_diagonal(n, m, gen):
    return dict() if m >= n else None                  # M > N: extra keys are negatives


def case_index(n, m, gen):
    return dict(positive_index=torch.randint(0, m, (n,), generator=gen))   # repeats allowed


def case_labels(n, m, gen):
    return dict(labels=_labels(n, 4, gen), key_labels=_labels(m, 4, gen))


def case_labels_same(n, m, gen):
    return dict(labels=_labels(n, 3, gen)) if n == m else None


def case_sum(n, m, gen):
    return dict(reduction="sum") if m >= n else None


def case_none(n, m, gen):
    return dict(reduction="none", labels=_labels(n, 3, gen), key_labels=_labels(m, 3, gen))


CASES = [case_diagonal, case_index, case_labels, case_labels_same, case_sum, case_none]


def _inputs(n, m, d, dtype, gen, unit=True):
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(m, d, generator=gen, dtype=torch.float64)
    if unit:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return q.to(dtype), k.to(dtype)


def compare(backend, q, k, kwargs, dtype, ref_dtype=torch.float64, scale=10.0, bias=-10.0,
            grad_tol=None, **opts):
    """Loss and the gradients of query, key, logit_scale and logit_bias vs the reference,
    under a random upstream gradient."""
    dev = torch.device(DEVICE)

    def leaves(dt):
        qq = q.to(dev, dtype).to(dt).requires_grad_()
        kk = k.to(dev, dtype).to(dt).requires_grad_()
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        s = torch.tensor(scale, dtype=sdt, device=dev, requires_grad=True)
        b = torch.tensor(bias, dtype=sdt, device=dev, requires_grad=True)
        return qq, kk, s, b

    kw = {key: (v.to(dev) if torch.is_tensor(v) else v) for key, v in kwargs.items()}
    ins_a, ins_r = leaves(dtype), leaves(ref_dtype)
    out = ck.siglip_loss(ins_a[0], ins_a[1], logit_scale=ins_a[2], logit_bias=ins_a[3],
                         backend=backend, **kw, **opts)
    ref = ck.reference.siglip_loss(ins_r[0], ins_r[1], logit_scale=ins_r[2],
                                   logit_bias=ins_r[3], **kw)
    assert out.shape == ref.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = TOL[dtype]
    err = rel_err(out, ref, floor=1.0)
    assert err <= tol["loss"], ("loss", err)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64).to(dev)
    ga = torch.autograd.grad((out.double() * w).sum(), ins_a)
    gr = torch.autograd.grad((ref.double() * w).sum(), ins_r)
    for name, a, r, leaf in zip(["query", "key", "logit_scale", "logit_bias"], ga, gr, ins_a):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        err = rel_err(a, r, floor=1e-2)
        assert err <= (tol["grad"] if grad_tol is None else grad_tol), (name, err)
    return out, ga


def _fits(backend, n, m, d):
    cap = MAX_SIZE.get(backend)
    return cap is None or max(n, m, d) <= cap


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("passes", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_against_reference(backend, passes, dtype, case, shape):
    n, m, d = shape
    if not _fits(backend, n, m, d):
        pytest.skip(f"{backend} on {DEVICE}: shapes above {MAX_SIZE[backend]} are too slow here")
    gen = torch.Generator().manual_seed(seed_for("siglip", case.__name__, shape, str(dtype)))
    kwargs = case(n, m, gen)
    if kwargs is None:
        pytest.skip("shape does not fit this case")
    q, k = _inputs(n, m, d, dtype, gen)
    # scale and bias away from SigLIP's initialisation too, so every term matters
    compare(backend, q, k, kwargs, dtype, scale=7.0, bias=-3.0, passes=passes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [case_diagonal, case_labels, case_none],
                         ids=["diagonal", "labels", "none"])
def test_half_types(backend, dtype, case):
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; checked on GPU")
    n, m, d = 100, 120, 64
    gen = torch.Generator().manual_seed(3)
    q, k = _inputs(n, m, d, dtype, gen)
    compare(backend, q, k, case(n, m, gen), dtype, ref_dtype=torch.float32)


class _NotLaunched:
    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"the blocked algorithm launched {self.name}")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not available here")
@pytest.mark.parametrize("passes", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("case", [case_diagonal, case_labels, case_none],
                         ids=["diagonal", "labels", "none"])
@pytest.mark.parametrize("algorithm", ["blocked", "epilogue"])
def test_triton_blocked(monkeypatch, passes, dtype, case, algorithm):
    """algorithm="blocked" (auto's choice for CUDA fp16/bf16 with D > 256): S by GEMMs in
    blocks of 7 rows (a ragged last one), block_siglip_kernel for the sums and dS; or
    "epilogue": the same blocks, S computed in block_siglip_kernel. The fused kernels
    must not run. Half types against an fp32 reference of the same rounded inputs (dS is
    rounded to the input dtype for its GEMMs, as in InfoNCE's blocked backward)."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("triton declares no bfloat16 on CPU tensors (the interpreter's tl.dot)")
    from contrastive_kernels.backends import triton as T
    for name in ("lse_bwd_kernel", "lse_bwd_tuned"):
        monkeypatch.setattr(T._kernels(), name, _NotLaunched(name))
    launch = T._launch_block

    def checked(L, kernel, tile, *a):
        assert tile["FROM_QK"] == (algorithm == "epilogue"), tile
        return launch(L, kernel, tile, *a)
    monkeypatch.setattr(T, "_launch_block", checked)
    n, m, d = 30, 45, 19
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ws = 7 * 64 * ((0 if algorithm == "epilogue" else acc.itemsize)
                   + torch.empty(0, dtype=dtype).element_size())
    gen = torch.Generator().manual_seed(seed_for("siglip-blocked", case.__name__, str(dtype)))
    q, k = _inputs(n, m, d, dtype, gen)
    half = dtype in (torch.float16, torch.bfloat16)
    compare("triton", q, k, case(n, m, gen), dtype, ref_dtype=torch.float32 if half else
            torch.float64, scale=7.0, bias=-3.0, passes=passes, algorithm=algorithm,
            workspace=ws)


@pytest.mark.skipif(DEVICE != "cuda" or "triton" not in BACKENDS,
                    reason="auto takes the blocked algorithm on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("passes", [3, 4])
def test_auto_takes_blocked_for_wide_half_gpu(monkeypatch, dtype, passes):
    """fp16/bf16 with D above the one-chunk limit (256): cuBLAS S blocks (256 rows, the
    last ragged), block_siglip_kernel; no fused kernel is launched."""
    from contrastive_kernels.backends import triton as T
    for name in ("lse_bwd_kernel", "lse_bwd_tuned"):
        monkeypatch.setattr(T._kernels(), name, _NotLaunched(name))
    n, m, d = 1500, 1700, 768
    ws = 256 * (-(-m // 64) * 64) * (4 + 2)
    gen = torch.Generator().manual_seed(12)
    q, k = _inputs(n, m, d, dtype, gen)
    compare("auto", q, k, case_labels(n, m, gen), dtype, ref_dtype=torch.float32,
            scale=7.0, bias=-3.0, passes=passes, workspace=ws)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("passes", [3, 4])
def test_large_logits_do_not_overflow(backend, passes):
    """Raw embeddings: |z| in the thousands, far beyond exp's fp32 range (88)."""
    gen = torch.Generator().manual_seed(11)
    n, d = 64, 48
    q, k = _inputs(n, n + 5, d, torch.float32, gen, unit=False)
    q, k = 4 * q, 4 * k
    z = 10.0 * (q.double() @ k.double().T)
    assert float(z.abs().max()) > 1000
    # fp32 logits this large carry an absolute error of about u * s * sum_d |q_d k_d|,
    # which sigmoid's slope turns into a relative gradient error of up to twice that.
    tol = 2 * 2.0**-24 * 10.0 * float((q.abs() @ k.abs().T).max())
    out, _ = compare(backend, q, k, {}, torch.float32, grad_tol=max(TOL[torch.float32]["grad"], tol),
                     passes=passes)
    assert torch.isfinite(out).all() and float(out.detach()) > 100


def _confident(kind, gen, n=23, m=29, d=40):
    """A well-separated batch: every query near its positives' direction (a basis
    vector), every negative nearly orthogonal. With s = 100, b = -20 the positives' z are
    about 80 and the negatives' about -20: each row's loss is about M e^-20 ~ 6e-8, far
    below one rounding step of a positive's z (8e-6 in fp32)."""
    if kind == "labels":
        labels, key_labels = _labels(n, 5, gen), _labels(m, 5, gen)
        kw = dict(labels=labels, key_labels=key_labels)
        qd, kd = labels, key_labels
    elif kind == "index":
        qd = torch.randint(0, m, (n,), generator=gen)
        kw, kd = dict(positive_index=qd), torch.arange(m)
    else:
        qd = kd = None
        kw = {}
    eye = torch.eye(d, dtype=torch.float64)
    noise = lambda r: 0.01 * torch.randn(r, d, generator=gen, dtype=torch.float64)
    q = eye[torch.arange(n) if qd is None else qd] + noise(n)
    k = eye[torch.arange(m) if kd is None else kd] + noise(m)
    return q, k, kw


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("passes", [None, 3, 4])
@pytest.mark.parametrize("kind", ["diagonal", "index", "labels"])
def test_confident_pairs_keep_relative_accuracy(backend, passes, kind):
    """Each entry's term is computed with its target (a positive's as softplus(-z), never
    softplus(z) - z), so a tiny loss keeps fp32's relative accuracy in every row, in the
    total and in every gradient: the split R_i - s A_i - b P_i cancelled to rounding
    noise here, 0 or negative rows. triton also in its blocked and epilogue forms."""
    gen = torch.Generator().manual_seed(seed_for("siglip-confident", kind))
    q, k, kw = _confident(kind, gen)
    dev = torch.device(DEVICE)
    kw = {key: v.to(dev) for key, v in kw.items()}
    forms = [{}] + ([dict(algorithm="blocked"), dict(algorithm="epilogue")]
                    if backend == "triton" else [])
    for form in forms:
        for reduction in ("none", "sum"):
            leaves = [x.to(dev, torch.float32).requires_grad_() for x in (q, k)]
            refs = [x.to(dev).requires_grad_() for x in (q, k)]
            sb = [torch.tensor(v, device=dev, requires_grad=True) for v in (100.0, -20.0)]
            sb_ref = [torch.tensor(v, dtype=torch.float64, device=dev, requires_grad=True)
                      for v in (100.0, -20.0)]
            out = ck.siglip_loss(*leaves, logit_scale=sb[0], logit_bias=sb[1],
                                 reduction=reduction, backend=backend, passes=passes,
                                 **kw, **form)
            ref = ck.reference.siglip_loss(*refs, logit_scale=sb_ref[0],
                                           logit_bias=sb_ref[1], reduction=reduction, **kw)
            assert 0 < float(ref.detach().min()) and float(ref.detach().max()) < 1e-5
            rel = ((out.double() - ref) / ref).abs().max()
            assert (out > 0).all() and rel < 1e-3, (form, reduction, float(rel), out, ref)
            grads = torch.autograd.grad(out.sum(), leaves + sb)
            grads_ref = torch.autograd.grad(ref.sum(), refs + sb_ref)
            for name, a, r in zip(["query", "key", "logit_scale", "logit_bias"], grads,
                                  grads_ref):
                err = rel_err(a, r, floor=0.0)
                assert err < 1e-3, (form, reduction, name, err)


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("passes", [None, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pairs", ["negative", "positive"])
def test_every_logit_keeps_relative_accuracy(backend, passes, dtype, pairs):
    """Rows whose pairs all share one logit z (q_i = z_i, k_j = 1; all negative or all
    positive), z from -80 to 80 and densely where exp(-|z|) is about 1e-4: each row's loss
    M softplus(-+z) and dq keep the dtype's relative accuracy. Triton's log(1 + e) lost up
    to 2^-24 / e of it (5e-4 at z = -9.2; triton in its blocked and epilogue forms too)."""
    dev = torch.device(DEVICE)
    z = torch.cat([torch.linspace(-80, 80, 33, dtype=torch.float64),
                   torch.linspace(-12, -6, 25, dtype=torch.float64), -torch.linspace(-12, -6, 7,
                                                                             dtype=torch.float64)])
    n, m = z.shape[0], 16
    q = z[:, None].to(dev, dtype)
    k = torch.ones(m, 1, dtype=dtype, device=dev)
    labels = torch.zeros(n, dtype=torch.long, device=dev)
    key_labels = torch.full((m,), 0 if pairs == "positive" else 1, device=dev)
    kw = dict(logit_scale=1.0, logit_bias=0.0, labels=labels, key_labels=key_labels,
              reduction="none")
    zs = q.double().squeeze(1)
    y = 1.0 if pairs == "positive" else -1.0
    want = m * F.softplus(-y * zs)                                  # float64, exact inputs
    want_dq = -y * m * torch.sigmoid(-y * zs)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    forms = [{}] + ([dict(algorithm="blocked"), dict(algorithm="epilogue")]
                    if backend == "triton" else [])
    for form in forms:
        leaf = q.clone().requires_grad_()
        out = ck.siglip_loss(leaf, k, backend=backend, passes=passes, **kw, **form)
        (dq,) = torch.autograd.grad(out.sum(), leaf)
        rel = ((out.detach().double() - want) / want).abs()
        assert float(rel.max()) < tol, (form, float(rel.max()), zs[rel.argmax()])
        rel_dq = ((dq.double().squeeze(1) - want_dq) / want_dq).abs()
        assert float(rel_dq.max()) < tol, (form, float(rel_dq.max()), zs[rel_dq.argmax()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs_with_large_logits(backend):
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the interpreter's fp16 path is covered by test_half_types")
    gen = torch.Generator().manual_seed(12)
    q, k = _inputs(50, 50, 32, torch.float16, gen, unit=False)
    compare(backend, q, k, {}, torch.float16, ref_dtype=torch.float32, scale=30.0, bias=0.0,
            grad_tol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gradient_is_not_zero(backend):
    """Unlike InfoNCE's, the bias's gradient is sum_ij (sigmoid(z_ij) - [pos_ij]) / N."""
    gen = torch.Generator().manual_seed(2)
    q, k = _inputs(30, 30, 8, torch.float64, gen)
    compare(backend, q, k, {}, torch.float64, bias=0.0)
    b = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    ck.siglip_loss(q.to(DEVICE), k.to(DEVICE), logit_scale=1.0, logit_bias=b.to(DEVICE),
                   backend=backend).backward()
    # |z| <= 1 on unit vectors: sigmoid(z) is about 1/2, so about (N^2 / 2 - N) / N = 14
    assert 10 < float(b.grad) < 18, float(b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    gen = torch.Generator().manual_seed(5)
    base_q = torch.randn(40, 34, generator=gen)
    base_k = torch.randn(34, 40, generator=gen)
    q, k = base_q[::2, ::2], base_k.T[::2, ::2]
    assert not q.is_contiguous() and not k.is_contiguous()
    compare(backend, q, k, {}, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    gen = torch.Generator().manual_seed(1)
    dev = torch.device(DEVICE)
    q = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(dev).requires_grad_()
    k = torch.randn(6, 4, generator=gen, dtype=torch.float64).to(dev).requires_grad_()
    s = torch.tensor(2.0, dtype=torch.float64, device=dev, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, device=dev, requires_grad=True)
    for passes in (3, 4):
        fn = lambda q, k, s, b: ck.siglip_loss(q, k, logit_scale=s, logit_bias=b,
                                               backend=backend, passes=passes)
        assert torch.autograd.gradcheck(fn, (q, k, s, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_and_partial_gradients(backend):
    """A locked tower, a fixed scale, or only the bias trained: the same gradients as the
    reference for what is trained, none for the rest."""
    gen = torch.Generator().manual_seed(4)
    dev = torch.device(DEVICE)
    q, k = (x.to(dev) for x in _inputs(20, 23, 6, torch.float64, gen))
    for wants in [(True, False, True, True), (False, True, False, True),
                  (False, False, True, False), (False, False, False, True)]:
        for passes in (3, 4):
            leaves = [q.clone(), k.clone(), torch.tensor(5.0, dtype=torch.float64, device=dev),
                      torch.tensor(-2.0, dtype=torch.float64, device=dev)]
            ref_leaves = [x.clone() for x in leaves]
            for x, y, w in zip(leaves, ref_leaves, wants):
                x.requires_grad_(w)
                y.requires_grad_(w)
            out = ck.siglip_loss(leaves[0], leaves[1], logit_scale=leaves[2],
                                 logit_bias=leaves[3], backend=backend, passes=passes)
            ref = ck.reference.siglip_loss(ref_leaves[0], ref_leaves[1],
                                           logit_scale=ref_leaves[2], logit_bias=ref_leaves[3])
            out.backward()
            ref.backward()
            for x, y, w in zip(leaves, ref_leaves, wants):
                if w:
                    assert rel_err(x.grad, y.grad, floor=1e-2) < 1e-9, (wants, passes)
                else:
                    assert x.grad is None


def test_float_scale_and_bias_and_defaults():
    gen = torch.Generator().manual_seed(6)
    q, k = _inputs(9, 9, 5, torch.float64, gen)
    out = ck.siglip_loss(q, k)
    ref = ck.reference.siglip_loss(q, k, logit_scale=10.0, logit_bias=-10.0)
    assert rel_err(out, ref, floor=1.0) < 1e-12
    z = 10.0 * q @ k.T - 10.0
    y = 2 * torch.eye(9, dtype=torch.float64) - 1
    assert abs(float(out) - float(-F.logsigmoid(y * z).sum() / 9)) < 1e-12
    # numpy scalars (a config's np.float32) are floats too
    import numpy as np
    alt = ck.siglip_loss(q, k, logit_scale=np.float32(7.0), logit_bias=np.float64(-3.0))
    ref = ck.reference.siglip_loss(q, k, logit_scale=7.0, logit_bias=-3.0)
    assert rel_err(alt, ref, floor=1.0) < 1e-12


def test_reference_matches_its_definition():
    """The oracle itself, against -sum log sigmoid(y z) written out with labels."""
    gen = torch.Generator().manual_seed(8)
    q, k = _inputs(7, 9, 4, torch.float64, gen)
    lab, klab = torch.tensor([0, 1, 1, 2, 0, 3, 1]), torch.tensor([1, 0, 2, 2, 3, 1, 0, 4, 1])
    z = 3.0 * q @ k.T + 0.5
    y = (lab[:, None] == klab[None, :]).double() * 2 - 1
    want = torch.log1p(torch.exp(-y * z)).sum(1)
    got = ck.reference.siglip_loss(q, k, logit_scale=3.0, logit_bias=0.5, labels=lab,
                                   key_labels=klab, reduction="none")
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_propagate(backend):
    gen = torch.Generator().manual_seed(9)
    q, k = _inputs(6, 6, 4, torch.float32, gen)
    q[2, 1] = float("nan")
    rows = ck.siglip_loss(q.to(DEVICE), k.to(DEVICE), reduction="none", backend=backend).cpu()
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5]]).all()


# ---- errors, options, dispatch

def test_bad_inputs_are_named():
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match="siglip_loss needs key"):
        ck.siglip_loss(q, None)
    with pytest.raises(ValueError, match="key has embedding dim"):
        ck.siglip_loss(q, torch.randn(4, 5))
    with pytest.raises(ValueError, match="logit_scale must be"):
        ck.siglip_loss(q, k, logit_scale=-1.0)
    with pytest.raises(TypeError, match="logit_bias must be"):
        ck.siglip_loss(q, k, logit_bias="x")
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        ck.siglip_loss(q, k, logit_bias=torch.tensor(float("inf")))
    with pytest.raises(ValueError, match="passes must be"):
        ck.siglip_loss(q, k, passes=2)
    for bad in (3.0, True):
        with pytest.raises(TypeError, match="passes must be"):
            ck.siglip_loss(q, k, passes=bad)
    with pytest.raises(ValueError, match="low_memory=True is an info_nce option"):
        ck.siglip_loss(q, k, low_memory=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ck.siglip_loss(q, k, symmetric=True)
    with pytest.raises(ValueError, match="positive_index values must be in"):
        ck.siglip_loss(q, k, positive_index=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="default positive_index"):
        ck.siglip_loss(torch.randn(5, 3), k)
    with pytest.raises(ValueError, match="reduction must be"):
        ck.siglip_loss(q, k, reduction="avg")
    with pytest.raises(ValueError, match="key_labels is required"):
        ck.siglip_loss(q, torch.randn(6, 3), labels=torch.arange(4))


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS + ["reference"])
@pytest.mark.parametrize("arg", ["logit_scale", "logit_bias"])
@pytest.mark.parametrize("form", ["float", "fp64 tensor"])
def test_scalars_beyond_float32_are_refused(backend, arg, form):
    """The kernels hold the scale and bias in float32 (fp32/half inputs): a value beyond
    its range would be inf there (a NaN loss); every path refuses it, named."""
    q, k = torch.randn(4, 3, device=DEVICE), torch.randn(4, 3, device=DEVICE)
    v = 1e39 if arg == "logit_scale" else -1e39
    kw = {arg: v if form == "float" else torch.tensor(v, dtype=torch.float64)}
    fn = ck.reference.siglip_loss if backend == "reference" else ck.siglip_loss
    extra = {} if backend == "reference" else dict(backend=backend)
    with pytest.raises(ValueError, match=f"{arg} must be finite in float32"):
        fn(q, k, **kw, **extra)


def test_errors_come_before_any_kernel(monkeypatch):
    called = []
    for name in ("cpu", "torch"):
        if name in AVAILABLE:
            monkeypatch.setattr(backends.get(name), "siglip_tiles",
                                lambda *a, **kw: called.append(1))
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    for bad in (dict(logit_scale=0.0), dict(positive_index=torch.tensor([0, 1, 2, 9])),
                dict(logit_bias=torch.tensor(float("nan")))):
        with pytest.raises(ValueError):
            ck.siglip_loss(q, k, **bad)
    assert not called


def test_a_backend_without_siglip_is_skipped_and_refuses(monkeypatch):
    from contrastive_kernels.backends.base import Call
    call = Call(torch.device(DEVICE), torch.float32, 8, 8, 4, loss="siglip")
    table = backends.REGISTRY.explain(call, ck.make_options())
    for name, why in table.items():
        declared = "siglip" in backends.get(name).features
        assert ("does not implement the siglip loss" in why) == (not declared), (name, why)
    fast = AVAILABLE[0]
    if "siglip" not in backends.get(fast).features:
        pytest.skip(f"{fast} does not declare siglip")
    # take the declaration away from the first choice: auto must skip it, explicit refuse
    monkeypatch.setattr(type(backends.get(fast)), "features",
                        backends.get(fast).features - {"siglip"})
    q = torch.randn(8, 4, device=DEVICE)
    with pytest.raises(ValueError, match=f"backend '{fast}' cannot run this call.*does not "
                                         f"implement the siglip loss"):
        ck.siglip_loss(q, q, backend=fast)
    ref = ck.reference.siglip_loss(q, q)
    out = ck.siglip_loss(q, q)          # auto takes the next backend that declares it
    assert rel_err(out, ref, floor=1.0) < 1e-5


@pytest.mark.skipif(DEVICE != "cuda" or "cuda" not in AVAILABLE, reason="needs the CUDA kernels")
def test_cuda_declared_to_lag_is_skipped_and_refuses(monkeypatch):
    """On a GPU, with the real declaration (the suite lifts it): auto does not take cuda
    for the sigmoid loss, and naming it raises the declared reason."""
    be = backends.get("cuda")
    monkeypatch.setattr(be, "lags", type(be).lags)
    q = torch.randn(8, 4, device=DEVICE)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this call.*lags triton"):
        ck.siglip_loss(q, q, backend="cuda")
    with backends.base.measuring(be):
        fine = ck.siglip_loss(q, q, backend="cuda")
        q4 = q.clone().requires_grad_()
        ck.siglip_loss(q4, q4, backend="cuda", passes=4).backward()   # selects again
    assert rel_err(ck.siglip_loss(q, q), fine, floor=1.0) < 1e-5
    assert torch.isfinite(q4.grad).all()
    ck.info_nce(q, q, backend="cuda")           # InfoNCE stays served


def test_passes_schedule_is_chosen_as_documented(monkeypatch):
    """None: 3 passes for mean/sum with a gradient, 4 for "none" or without one."""
    from contrastive_kernels import ops
    seen = []
    for name in ("siglip_fused", "siglip_stats"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _r=real: seen.append(_n) or _r(*a))
    q, k = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3)
    be = AVAILABLE[0]           # (auto computes small CPU problems densely: test_dense.py)
    ck.siglip_loss(q, k, backend=be)
    ck.siglip_loss(q, k, reduction="sum", backend=be)
    ck.siglip_loss(q, k, reduction="none", backend=be)
    ck.siglip_loss(q, k, passes=4, backend=be)
    with torch.no_grad():
        ck.siglip_loss(q, k, backend=be)
    ck.siglip_loss(q.detach(), k, backend=be)
    assert seen == ["siglip_fused", "siglip_fused", "siglip_stats", "siglip_stats",
                    "siglip_stats", "siglip_stats"]


# ---- the module and open_clip

def test_module_matches_function():
    gen = torch.Generator().manual_seed(10)
    q, k = _inputs(12, 12, 6, torch.float32, gen)
    s = torch.tensor(9.0, requires_grad=True)
    b = torch.tensor(-8.0, requires_grad=True)
    mod = ck.FusedSigLIPLoss()
    out = mod(q, k, s, b)
    assert rel_err(out, ck.siglip_loss(q, k, logit_scale=s, logit_bias=b), floor=1.0) < 1e-6
    # without a bias: open_clip's call with logit_bias=None means no bias
    assert rel_err(mod(q, k, s), ck.reference.siglip_loss(q, k, logit_scale=s, logit_bias=0.0),
                   floor=1.0) < 1e-5
    assert "backend='auto'" in repr(mod)


@pytest.mark.skipif(open_clip_loss() is None, reason="open_clip is not installed")
@pytest.mark.parametrize("n,d", [(1, 4), (33, 16), (128, 64)])
def test_open_clip_drop_in(n, d):
    """open_clip's SigLipLoss (the installed library) against FusedSigLIPLoss: the same
    call, the same loss and the same gradients of the features, scale and bias."""
    oc = open_clip_loss()
    gen = torch.Generator().manual_seed(n)
    img, txt = _inputs(n, n, d, torch.float32, gen)
    s = torch.tensor(10.0).log()

    def run(loss_fn):
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        ls, lb = s.clone().requires_grad_(), torch.tensor(-10.0, requires_grad=True)
        out = loss_fn(i, t, ls.exp(), lb)
        out.backward()
        return out, (i.grad, t.grad, ls.grad, lb.grad)

    theirs, g_theirs = run(oc.SigLipLoss())
    ours, g_ours = run(ck.FusedSigLIPLoss())
    assert rel_err(ours, theirs, floor=1.0) < 1e-5
    for a, b in zip(g_ours, g_theirs):
        assert rel_err(a, b, floor=1e-3) < 1e-4
