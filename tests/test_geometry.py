"""Wang & Isola's uniformity (through the fused kernel's self-masked log-sum-exp) and
alignment, against float64 references built from the full distance matrix."""
import pytest
import torch

import contrastive_kernels as ck
from conftest import DEVICE, TOL, rel_err, seed_for
from contrastive_kernels import backends

BACKENDS = ck.available_backends(DEVICE)
SHAPES = [(2, 1), (3, 17), (17, 3), (100, 257), (257, 100), (1000, 17)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_uniformity_against_reference(backend, dtype, shape):
    if backend == "triton" and DEVICE == "cpu" and max(shape) > 257:
        pytest.skip("the Triton interpreter is slow: small shapes only")
    n, d = shape
    gen = torch.Generator().manual_seed(seed_for("uniformity", shape, str(dtype)))
    x = (3 * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype)   # not unit
    for t in (2.0, 0.7):
        xa = x.to(DEVICE).requires_grad_()
        ta = torch.tensor(t, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                          device=DEVICE, requires_grad=True)
        xr = x.double().requires_grad_()
        tr = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        out = ck.uniformity_loss(xa, ta, backend=backend)
        ref = ck.reference.uniformity_loss(xr, tr)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert rel_err(out, ref, floor=1.0) <= TOL[dtype]["loss"], (t, float(out), float(ref))
        ga = torch.autograd.grad(out, (xa, ta))
        gr = torch.autograd.grad(ref, (xr, tr))
        for name, a, r in zip(("x", "t"), ga, gr):
            assert rel_err(a, r, floor=1e-2) <= TOL[dtype]["grad"], (name, t)


def test_uniformity_float_t_and_meaning():
    # spread-out points are more uniform (lower) than clustered ones
    gen = torch.Generator().manual_seed(1)
    spread = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    cluster = torch.ones(200, 8, dtype=torch.float64) + 0.05 * spread
    assert ck.uniformity_loss(spread) < ck.uniformity_loss(cluster)
    # two identical points: exp(0) = 1, log 1 = 0; two antipodal ones: -4t
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert abs(float(ck.uniformity_loss(e, 2.0))) < 1e-12
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert abs(float(ck.uniformity_loss(a, 2.0)) + 8.0) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_alignment_against_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(33, 7, generator=gen).to(dtype).requires_grad_()
    y = torch.randn(33, 7, generator=gen).to(dtype).requires_grad_()
    for alpha in (2.0, 1.0, 3):
        out = ck.alignment_loss(x, y, alpha)
        ref = ck.reference.alignment_loss(x.detach().double().requires_grad_(),
                                          y.detach().double().requires_grad_(), alpha)
        tol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
        assert rel_err(out, ref, floor=1.0) <= tol
        gx, gy = torch.autograd.grad(out, (x, y))
        assert gx.dtype == dtype and torch.isfinite(gx).all() and torch.isfinite(gy).all()


def test_uniformity_needs_no_n_by_n(monkeypatch):
    """The fused backends get the call (no cdist, no N x N tensor is made)."""
    seen = []
    be = backends.get(BACKENDS[0])
    real = be.lse_forward
    monkeypatch.setattr(be, "lse_forward", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    x = torch.randn(64, 5, device=DEVICE)
    ck.uniformity_loss(x, backend=BACKENDS[0])
    assert seen == [True]           # one self-masked pass


def test_bad_inputs_are_named():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="x must have at least 2 rows"):
        ck.uniformity_loss(torch.randn(1, 3))
    with pytest.raises(ValueError, match="t must be > 0"):
        ck.uniformity_loss(x, -1.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ck.uniformity_loss([[1.0]])
    with pytest.raises(ValueError, match="y must have the shape of x"):
        ck.alignment_loss(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        ck.alignment_loss(x, x, alpha=0)
    with pytest.raises(ValueError, match="alpha must be finite"):      # beyond the float range
        ck.alignment_loss(x, x, alpha=10**400)
    with pytest.raises(ValueError, match="t must be finite"):
        ck.uniformity_loss(x, 10**400)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ck.uniformity_loss(x, temperature=1.0)
