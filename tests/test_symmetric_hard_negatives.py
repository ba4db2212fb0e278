"""symmetric=True with M != N keys (no labels): the column loss l^c_j is the row formula
on S^T, the positives of key j are the queries whose positive set contains j, and the
columns with none (hard negatives) are left out of the mean; reduction="none" gives
cat(l / 2, l^c / 2) of shape (N + M,), 0 for a left-out column. Every backend against the
float64 reference (values and every gradient, every variant), and the reference against
an independent plain-torch formula of sentence-transformers' doc_to_query direction."""
import pytest
import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from contrastive_kernels import backends
from conftest import DEVICE, TOL, rel_err, seed_for

BACKENDS = ck.available_backends(DEVICE)
N, M, D = 23, 61, 17


def positives(kind, n, m, gen):
    """positive_index of a kind: None (the default arange(N)), a random injection into
    the keys, the same with repeated targets (several queries share a key), or (M < N)
    an index onto fewer keys (every key hit, some several times)."""
    if kind == "default":
        return None
    if kind == "injection":
        return torch.randperm(m, generator=gen)[:n]
    if kind == "repeats":
        pi = torch.randperm(m, generator=gen)[:n]
        pi[5] = pi[11] = pi[2]
        pi[17] = pi[9]
        return pi
    if kind == "fewer_keys":
        return torch.cat([torch.randperm(m, generator=gen),
                          torch.randint(0, m, (n - m,), generator=gen)])
    raise ValueError(kind)


def teacher_pair(n, m, gen, dtype):
    tq = F.normalize(torch.randn(n, 7, generator=gen, dtype=torch.float64), dim=1)
    tk = F.normalize(torch.randn(m, 7, generator=gen, dtype=torch.float64), dim=1)
    return tq.to(dtype), tk.to(dtype)


# name -> (keyword arguments, per-query scale): every variant of the loss family
VARIANTS = {
    "plain": dict(),
    "smoothing": dict(label_smoothing=0.15),
    "margin": dict(margin=0.25),
    "decoupled": dict(decoupled=True),
    "margin_decoupled": dict(margin=0.1, decoupled=True),
    "smoothing_decoupled": dict(label_smoothing=0.1, decoupled=True),
    "per_query": dict(per_row=True),
    "per_query_margin": dict(per_row=True, margin=0.2),
    "teacher": dict(teacher=True, teacher_weight=0.4, teacher_logit_scale=8.0),
    "teacher_only": dict(teacher=True, teacher_weight=1.0),
    "teacher_linear": dict(teacher=True, teacher_weight=0.6, teacher_weighting="linear"),
    "per_query_teacher": dict(per_row=True, teacher=True, teacher_weight=0.5),
}


def compare(backend, n, m, d, dtype, variant, reduction, kind, seed_parts):
    """info_nce vs reference.info_nce, symmetric=True: the loss and the gradients of
    query, key and the logit scale (0-dim, or (N,) per query) under a random upstream
    gradient; returns the fused loss. Skipped for a backend that does not declare the
    variant (cuda: neither the shift nor the teacher; test_variants checks it refuses)."""
    v = VARIANTS[variant]
    need = ({"shift"} if v.get("margin") or v.get("decoupled") else set()) | \
        ({"teacher"} if v.get("teacher") else set())
    if need - backends.get(backend).features:
        pytest.skip(f"{backend} does not declare {sorted(need - backends.get(backend).features)}")
    gen = torch.Generator().manual_seed(seed_for(*seed_parts))
    dev = torch.device(DEVICE)
    kw = dict(VARIANTS[variant])
    per_row = kw.pop("per_row", False)
    if kw.pop("teacher", False):
        kw["teacher"] = tuple(x.to(dev) for x in teacher_pair(n, m, gen, dtype))
    pi = positives(kind, n, m, gen)
    if pi is not None:
        kw["positive_index"] = pi.to(dev)
    q0 = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    k0 = F.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1)
    s0 = (torch.rand(n, generator=gen, dtype=torch.float64) * 10 + 5) if per_row else \
        torch.tensor(12.0, dtype=torch.float64)

    def leaves(dt):
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        return [q0.to(dtype).to(dev, dt).requires_grad_(),
                k0.to(dtype).to(dev, dt).requires_grad_(),
                s0.to(dev, sdt).requires_grad_()]

    ia, ir = leaves(dtype), leaves(torch.float64)
    out = ck.info_nce(ia[0], ia[1], logit_scale=ia[2], symmetric=True, reduction=reduction,
                      backend=backend, **kw)
    ref = ck.reference.info_nce(ir[0], ir[1], logit_scale=ir[2], symmetric=True,
                                reduction=reduction, **kw)
    assert out.shape == ref.shape == ((n + m,) if reduction == "none" else ())
    tol = TOL[dtype]
    assert rel_err(out, ref, floor=1.0) <= tol["loss"], ("loss", rel_err(out, ref, floor=1.0))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64).to(dev)
    ga = torch.autograd.grad((out.double() * w).sum(), ia)
    gr = torch.autograd.grad((ref.double() * w).sum(), ir)
    for name, a, r, leaf in zip(["query", "key", "logit_scale"], ga, gr, ia):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        err = rel_err(a, r, floor=1e-2)
        assert err <= tol["grad"], (name, err)
    return out, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hard_negatives_against_reference(backend, dtype, reduction, variant):
    """N=23 queries, M=61 keys, the default positives arange(N): keys N..M-1 are hard
    negatives and not anchors of the column loss. Tolerances (conftest.TOL): float64
    loss 1e-10, gradients 1e-9; float32 loss 1e-5, gradients 1e-4."""
    out, ref = compare(backend, N, M, D, dtype, variant, reduction, "default",
                       ("symhn", variant, reduction, str(dtype)))
    if reduction == "none" and VARIANTS[variant].get("teacher_weight") != 1.0:
        # the hard-negative columns are left out: exactly 0
        assert torch.equal(out.detach()[N + N:], torch.zeros(M - N, dtype=out.dtype,
                                                             device=out.device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["injection", "repeats", "fewer_keys"])
@pytest.mark.parametrize("variant", ["plain", "smoothing", "margin_decoupled",
                                     "per_query_margin", "teacher"])
def test_positive_index_against_reference(backend, dtype, reduction, kind, variant):
    """A positive_index: a random injection into M=61 keys, one with repeated targets
    (a column with several positive queries), and M=17 < N keys."""
    m = 17 if kind == "fewer_keys" else M
    compare(backend, N, m, D, dtype, variant, reduction, kind,
            ("symhn-pi", kind, variant, reduction, str(dtype)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", [dict(low_memory=True), dict(algorithm="blocked"),
                                    dict(algorithm="epilogue"), dict(deterministic=True)],
                         ids=["low_memory", "blocked", "epilogue", "deterministic"])
def test_kernel_options(backend, option):
    """The kernel options on M > N (a backend that lacks one says so: ValueError)."""
    gen = torch.Generator().manual_seed(seed_for("symhn-opt", str(option)))
    q = F.normalize(torch.randn(N, D, generator=gen), dim=1).to(DEVICE).requires_grad_()
    k = F.normalize(torch.randn(M, D, generator=gen), dim=1).to(DEVICE).requires_grad_()
    kw = dict(symmetric=True, temperature=0.1, label_smoothing=0.1, reduction="none")
    try:
        out = ck.info_nce(q, k, backend=backend, **kw, **option)
    except ValueError as e:
        assert "cannot run this call" in str(e)
        pytest.skip(f"{backend}: {option} not supported")
    ref = ck.reference.info_nce(q, k, **kw)
    w = torch.randn(out.shape, generator=gen).to(DEVICE)
    ga = torch.autograd.grad((out * w).sum(), [q, k])
    gr = torch.autograd.grad((ref * w).sum(), [q, k])
    assert rel_err(out, ref, floor=1.0) <= 1e-5
    for a, r in zip(ga, gr):
        assert rel_err(a, r, floor=1e-2) <= 1e-4


def st_doc_to_query(q, k, pi, scale, eps=0.0):
    """Written from the definition, independently of contrastive_kernels: sentence-
    transformers' MultipleNegativesRankingLoss with directions query_to_doc and
    doc_to_query, the two averaged. query_to_doc: cross-entropy of each query over all M
    docs (its positive pi_i, the hard negatives included). doc_to_query: each positive
    doc j = pi_i against the N queries (softmax over the queries; the hard-negative docs
    are no anchor). Returns (mean loss, per-query q2d losses, per-doc d2q losses (M,),
    0 where a doc is no positive)."""
    s = scale * q @ k.T                                       # N x M
    n, m = s.shape
    q2d = F.cross_entropy(s, pi, reduction="none", label_smoothing=eps)
    d2q = torch.zeros(m, dtype=s.dtype)
    for j in range(m):
        rows = (pi == j).nonzero().flatten()
        if rows.numel() == 0:
            continue
        logp = torch.log_softmax(s[:, j], 0)
        target = torch.zeros(n, dtype=s.dtype)
        target[rows] = 1.0 / rows.numel()
        target = (1 - eps) * target + eps / n
        d2q[j] = -(target * logp).sum()
    anchors = torch.bincount(pi, minlength=m) > 0
    loss = 0.5 * q2d.mean() + 0.5 * d2q[anchors].mean()
    return loss, q2d, d2q


@pytest.mark.parametrize("kind", ["default", "repeats"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_an_independent_doc_to_query_formula(kind, eps):
    gen = torch.Generator().manual_seed(seed_for("symhn-st", kind, eps))
    q0 = F.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=1)
    k0 = F.normalize(torch.randn(M, D, generator=gen, dtype=torch.float64), dim=1)
    pi = positives(kind, N, M, gen)
    idx = torch.arange(N) if pi is None else pi
    scale = 20.0                     # ST's default scale
    qw, kw_ = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    want, q2d, d2q = st_doc_to_query(qw, kw_, idx, scale, eps)
    gw = torch.autograd.grad(want, [qw, kw_])
    args = dict(logit_scale=scale, symmetric=True, label_smoothing=eps)
    if pi is not None:
        args["positive_index"] = pi
    fns = [("reference", ck.reference.info_nce, {})] + \
        [(b, ck.info_nce, dict(backend=b)) for b in BACKENDS]
    for name, fn, extra in fns:
        qa = q0.to(DEVICE).requires_grad_()
        ka = k0.to(DEVICE).requires_grad_()
        kw = {a: (v.to(DEVICE) if torch.is_tensor(v) else v) for a, v in args.items()}
        got = fn(qa, ka, **kw, **extra)
        assert rel_err(got, want, floor=1.0) <= 1e-10, name
        for a, r in zip(torch.autograd.grad(got, [qa, ka]), gw):
            assert rel_err(a, r, floor=1e-2) <= 1e-9, name
        none = fn(q0.to(DEVICE), k0.to(DEVICE), reduction="none", **kw, **extra)
        assert rel_err(none, torch.cat([0.5 * q2d, 0.5 * d2q]).detach(), floor=1.0) <= 1e-10
        total = fn(q0.to(DEVICE), k0.to(DEVICE), reduction="sum", **kw, **extra)
        assert rel_err(total, none.sum(), floor=1.0) <= 1e-10


def test_module_and_no_error():
    """FusedInfoNCE (symmetric by default) takes extra keys; the old ValueError is gone,
    and M < N without a positive_index still raises (the default needs M >= N)."""
    gen = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(N, D, generator=gen), dim=1).to(DEVICE)
    k = F.normalize(torch.randn(M, D, generator=gen), dim=1).to(DEVICE)
    got = ck.FusedInfoNCE(temperature=0.05)(q, k)
    want = ck.reference.info_nce(q, k, temperature=0.05, symmetric=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"needs key rows >= query rows"):
        ck.info_nce(k, q, symmetric=True)
