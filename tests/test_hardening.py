"""Faults found by the adversarial trial (issue 17): double backward, meta tensors, silent
acceptances (warnings), and per-rank options that disagree in the ring and gather."""
import os
import warnings

import pytest
import torch
import torch.distributed as dist

import contrastive_kernels as ck
from contrastive_kernels import distributed as ckd
from contrastive_kernels import problem
from conftest import DEVICE
from test_distributed import _expect_value_error_everywhere, spawn

BACKENDS = [b for b in ("cpu", "torch", "triton", "cuda")
            if b in ck.available_backends(torch.device(DEVICE))]


def _inputs(n=5, m=7, d=3, grad=True):
    g = torch.Generator().manual_seed(n * 100 + m)
    q = torch.randn(n, d, generator=g, dtype=torch.float64).to(DEVICE).float()
    k = torch.randn(m, d, generator=g, dtype=torch.float64).to(DEVICE).float()
    return q.requires_grad_(grad), k.requires_grad_(grad)


LOSSES = {
    "info_nce": lambda q, k, s, be: ck.info_nce(q, k, logit_scale=s, backend=be),
    "info_nce symmetric labels": lambda q, k, s, be: ck.info_nce(
        q, k[:5], labels=torch.tensor([0, 1, 0, 2, 1], device=q.device), symmetric=True,
        logit_scale=s, backend=be),
    "info_nce teacher": lambda q, k, s, be: ck.info_nce(
        q, k, logit_scale=s, teacher=(q.detach() + 1, k.detach()), teacher_weight=0.5,
        backend=be),
    "siglip_loss": lambda q, k, s, be: ck.siglip_loss(q, k, logit_scale=s, backend=be),
    "FusedInfoNCE": lambda q, k, s, be: ck.FusedInfoNCE(backend=be)(q, k[:5], logit_scale=s),
}


@pytest.mark.parametrize("learnable", [False, True], ids=["fixed scale", "learnable scale"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_clearly(backend, loss, learnable):
    """create_graph=True would give a gradient without its second-order terms (or an
    opaque error later): it raises at once, naming the way out."""
    if loss == "info_nce teacher" and backend == "cuda":
        pytest.skip("the cuda backend does not declare teacher targets")
    q, k = _inputs()
    s = torch.tensor(7.0, device=q.device, requires_grad=learnable) if learnable else 7.0
    out = LOSSES[loss](q, k, s, backend)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\).*"
                                           r"contrastive_kernels\.reference"):
        torch.autograd.grad(out, q, create_graph=True)
    # a plain backward still works, and the reference does support double backward
    out = LOSSES[loss](q, k, s, backend)
    (gq,) = torch.autograd.grad(out, q)
    assert torch.isfinite(gq).all()


FORWARD_AD_LOSSES = dict(LOSSES, **{
    "uniformity_loss": lambda q, k, s, be: ck.uniformity_loss(q, backend=be),
    "siglip_loss passes=4": lambda q, k, s, be: ck.siglip_loss(q, k, logit_scale=s,
                                                                backend=be, passes=4)})


@pytest.mark.parametrize("mode", ["forward_ad", "func.jvp"])
@pytest.mark.parametrize("where", ["q", "k", "scale"])
@pytest.mark.parametrize("loss", list(FORWARD_AD_LOSSES))
@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_forward_mode_ad_raises_clearly(backend, loss, where, mode):
    """The custom ops have no forward derivative: torch would return a zero (or no)
    tangent. A tangent on any input raises, naming it; the reference computes one."""
    if loss == "info_nce teacher" and backend == "cuda":
        pytest.skip("the cuda backend does not declare teacher targets")
    if where != "q" and loss == "uniformity_loss":
        pytest.skip("uniformity_loss has one input")
    q, k = _inputs(grad=False)
    s = torch.tensor(7.0, device=q.device)
    args = dict(q=q, k=k, scale=s)
    tangent = torch.randn_like(args[where])
    name = {"q": "query|x", "k": "key", "scale": "logit_scale"}[where]

    def run(x):
        a = dict(args, **{where: x})
        return FORWARD_AD_LOSSES[loss](a["q"], a["k"], a["scale"], backend)

    with pytest.raises(NotImplementedError, match=rf"({name}) carries a forward-mode AD "
                                                  r"tangent.*contrastive_kernels\.reference"):
        if mode == "func.jvp":
            torch.func.jvp(run, (args[where],), (tangent,))
        else:
            import torch.autograd.forward_ad as fwad
            with fwad.dual_level():
                run(fwad.make_dual(args[where], tangent))
    # the reference's jvp matches its finite difference (what a fused jvp would have to give)
    if loss.startswith("siglip") and backend == "auto":
        ref = lambda x: ck.reference.siglip_loss(*[dict(args, **{where: x})[n].double()
                                                   for n in ("q", "k")],
                                                 logit_scale=dict(args, **{where: x})["scale"])
        x0 = args[where].double()
        _, t = torch.func.jvp(ref, (x0,), (tangent.double(),))
        h = 1e-6
        fd = (ref(x0 + h * tangent.double()) - ref(x0 - h * tangent.double())) / (2 * h)
        assert torch.allclose(t, fd, rtol=1e-5, atol=1e-8) and float(t.abs()) > 0


def test_reference_supports_double_backward():
    q, k = _inputs()
    loss = ck.reference.info_nce(q, k, temperature=0.2)
    (g,) = torch.autograd.grad(loss, q, create_graph=True)
    assert g.requires_grad
    g.pow(2).sum().backward()
    assert torch.isfinite(k.grad).all() and k.grad.abs().sum() > 0


@pytest.mark.no_poison
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_meta_tensors_infer_shapes(reduction):
    """Meta tensors (shape inference, e.g. a model built on the meta device) go through
    the fake kernels: the right shape and dtype, no data read."""
    q = torch.empty(6, 4, device="meta", requires_grad=True)
    k = torch.empty(9, 4, device="meta", requires_grad=True)
    out = ck.info_nce(q, k, reduction=reduction)
    assert out.device.type == "meta" and out.dtype == torch.float32
    assert out.shape == (() if reduction == "mean" else (6,))
    out.sum().backward()
    assert q.grad.shape == q.shape and q.grad.device.type == "meta"
    s = ck.siglip_loss(q, k, reduction=reduction)
    assert s.device.type == "meta" and s.shape == (() if reduction == "mean" else (6,))


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(problem, "_WARNED", set())


def _warnings_from(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
        fn()
    return [w for w in rec if "contrastive_kernels" in str(w.message)]


def test_learnable_bias_in_softmax_loss_warns_once(fresh_warnings):
    q, k = _inputs()
    b = torch.tensor(0.5, device=q.device, requires_grad=True)
    got = _warnings_from(lambda: ck.info_nce(q, k, logit_bias=b).backward())
    assert len(got) == 1 and "logit_bias has no effect" in str(got[0].message)
    assert os.path.basename(got[0].filename) == os.path.basename(__file__)   # the caller
    assert b.grad is not None and float(b.grad.abs()) < 1e-6                 # why it warns
    # a float bias, or one without gradient, says nothing; nor does the sigmoid loss
    assert not _warnings_from(lambda: ck.info_nce(q, k, logit_bias=0.5))
    problem._WARNED.clear()
    assert not _warnings_from(lambda: ck.siglip_loss(q, k, logit_bias=b))


@pytest.mark.parametrize("fn", ["ring_info_nce", "gather_info_nce", "ring_siglip_loss",
                                "gather_siglip_loss", "module"])
def test_distributed_without_process_group_warns_once(fresh_warnings, fn):
    assert not dist.is_initialized()
    q, k = _inputs(5, 5)
    call = (lambda: ck.FusedInfoNCE(distributed="ring")(q, k)) if fn == "module" else (
        lambda: getattr(ckd, fn)(q, k))
    got = _warnings_from(call)
    assert len(got) == 1 and "without an initialized torch.distributed process group" in \
        str(got[0].message)
    assert os.path.basename(got[0].filename) == os.path.basename(__file__)


def test_module_logit_scale_overrides_its_temperature():
    """FusedInfoNCE(temperature=t)(q, k, logit_scale=s) uses s (open_clip's call): the
    module passes one of the two, never both."""
    q, k = _inputs(5, 5)
    got = ck.FusedInfoNCE(temperature=0.5, backend="torch")(q, k, logit_scale=3.0)
    want = ck.reference.info_nce(q, k, logit_scale=3.0, symmetric=True)
    assert torch.allclose(got.double(), want.double(), rtol=1e-5)


# ----------------------------------------------------------------------------- ranks

def _disagreeing_options(world, rank):
    torch.manual_seed(0)
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    qb, kb = q.bfloat16(), k.bfloat16()
    odd = rank == world - 1            # the last rank differs
    cases = [
        (lambda: ckd.ring_info_nce(q, k, label_smoothing=0.1 if odd else 0.0,
                                   backend="torch"), "label_smoothing must be the same"),
        (lambda: ckd.gather_info_nce(q, k, label_smoothing=0.1 if odd else 0.0,
                                     backend="torch"), "label_smoothing must be the same"),
        (lambda: ckd.ring_info_nce(q, k, temperature=0.2 if odd else 0.1, backend="torch"),
         "the logit scale (1 / temperature) must be the same"),
        (lambda: ckd.ring_info_nce(q, k, logit_scale=torch.tensor(5.0) if odd else 5.0,
                                   backend="torch"), "the kind of scale"),
        (lambda: ckd.ring_info_nce(q, k, logit_scale=torch.tensor(6.0 if odd else 5.0),
                                   backend="torch"), "the logit scale"),
        (lambda: ckd.ring_siglip_loss(q, k, logit_bias=-5.0 if odd else -10.0,
                                      backend="torch"), "logit_bias must be the same"),
        (lambda: ckd.gather_siglip_loss(q, k, logit_scale=3.0 if odd else 10.0,
                                        backend="torch"),
         "logit_scale must be the same on every rank, got ["),
        (lambda: ckd.ring_info_nce(q, k, teacher=(q, k), teacher_weight=0.3 if odd else 0.5,
                                   backend="torch"), "teacher_weight must be the same"),
        (lambda: ckd.ring_info_nce(q, k, teacher=(q, k), backend="torch",
                                   teacher_weighting="linear" if odd else "softmax"),
         "teacher_weighting must be the same"),
        (lambda: ckd.ring_info_nce(q, k, teacher=(q, k) if odd else None, backend="torch"),
         "teacher (given or not) must be the same"),
        (lambda: ckd.ring_info_nce(q, k, normalize=odd, backend="torch"),
         "normalize must be the same"),
        (lambda: ckd.gather_info_nce(q, k, normalize=odd, backend="torch"),
         "normalize must be the same"),
        (lambda: ckd.ring_siglip_loss(q, k, normalize=odd, backend="torch"),
         "normalize must be the same"),
        (lambda: ckd.gather_siglip_loss(q, k, normalize=odd, backend="torch"),
         "normalize must be the same"),
        # an option no backend (or not the named one) can serve, on one rank: found in the
        # set-up's checks, under "auto" too (bf16: not even the Triton interpreter)
        (lambda: ckd.ring_siglip_loss(qb, kb, algorithm="blocked" if odd else None),
         "no backend can run this call"),
        (lambda: ckd.gather_siglip_loss(qb, kb, algorithm="epilogue" if odd else None),
         "no backend can run this call"),
        (lambda: ckd.ring_info_nce(qb, kb, low_memory=odd), "no backend can run this call"),
        (lambda: ckd.gather_info_nce(qb, kb, algorithm="blocked" if odd else None),
         "no backend can run this call"),
        (lambda: ckd.ring_info_nce(q, k, backend="torch", low_memory=odd),
         "'torch' cannot run this call"),
        (lambda: ckd.ring_siglip_loss(q, k, timeout=5e-4 if odd else 5.0),
         "timeout must be at least 0.001 seconds"),
    ]
    if "triton" in ck.available_backends("cpu"):      # the interpreter: low_memory runs
        cases.append((lambda: ckd.ring_info_nce(q, k, backend="triton", low_memory=odd),
                      "low_memory (the dtype of the dk blocks that travel) must be the same"))
    for fn, match in cases:
        _expect_value_error_everywhere(fn, match)
    # agreeing options still run, and a double backward raises on every rank before any
    # collective (so none waits)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    for fn in (ckd.ring_info_nce, ckd.ring_siglip_loss):
        loss = fn(qg, kg, backend="torch")
        try:
            torch.autograd.grad(loss, qg, create_graph=True)
        except RuntimeError as e:
            assert "double backward" in str(e), str(e)
        else:
            raise AssertionError("no RuntimeError for create_graph=True")
        dist.barrier()


@pytest.mark.cpu_only
@pytest.mark.parametrize("world", [2, 3, 4])
def test_options_must_agree_across_ranks(world, tmp_path):
    spawn(world, tmp_path, _disagreeing_options)


@pytest.mark.parametrize("passes", [3, 4])
def test_siglip_frozen_towers_learned_scale_and_bias(passes):
    """Only the scale and bias need a gradient (frozen encoders): the forward's empty dq
    and dk outputs must be distinct tensors (a custom op's outputs may not alias)."""
    q, k = _inputs(5, 7, grad=False)
    s = torch.tensor(4.0, device=q.device, requires_grad=True)
    b = torch.tensor(-2.0, device=q.device, requires_grad=True)
    loss = ck.siglip_loss(q, k, logit_scale=s, logit_bias=b, passes=passes)
    loss.backward()
    s2, b2 = s.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ck.reference.siglip_loss(q.double(), k.double(), logit_scale=s2, logit_bias=b2).backward()
    assert torch.allclose(s.grad.double(), s2.grad, rtol=1e-4)
    assert torch.allclose(b.grad.double(), b2.grad, rtol=1e-4)
