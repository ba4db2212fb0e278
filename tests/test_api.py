"""The public API: the module, backend selection, and the build fallback."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from contrastive_kernels import backends, dense, extension
from conftest import DEVICE


def test_public_names():
    for name in ("info_nce", "FusedInfoNCE", "available_backends", "reference"):
        assert hasattr(ck, name)
    assert callable(ck.reference.info_nce)


def test_available_backends():
    cpu = ck.available_backends("cpu")
    assert cpu[-1] == "torch" and len(set(cpu)) == len(cpu)
    assert set(cpu) <= set(ck.available_backends())
    assert ck.available_backends(torch.device("cpu")) == cpu


def test_module_is_drop_in_for_open_clip_loss():
    """FusedInfoNCE(image, text, logit_scale=...) == open_clip's ClipLoss, values and grads."""
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(50, 32, generator=gen), dim=1).to(DEVICE).requires_grad_()
    txt = F.normalize(torch.randn(50, 32, generator=gen), dim=1).to(DEVICE).requires_grad_()
    log_scale = torch.tensor(2.659, device=DEVICE, requires_grad=True)   # log(1/0.07)
    loss = ck.FusedInfoNCE()(img, txt, logit_scale=log_scale.exp())
    grads = torch.autograd.grad(loss, [img, txt, log_scale])

    logits = log_scale.exp() * img @ txt.T
    t = torch.arange(50, device=DEVICE)
    want = (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2
    want_grads = torch.autograd.grad(want, [img, txt, log_scale])
    assert torch.allclose(loss, want, rtol=1e-5)
    for a, b in zip(grads, want_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_module_repr_and_options():
    m = ck.FusedInfoNCE(temperature=0.1, symmetric=False, label_smoothing=0.1, reduction="sum")
    assert "temperature=0.1" in repr(m) and "reduction='sum'" in repr(m)
    q = torch.randn(8, 4, device=DEVICE)
    want = ck.reference.info_nce(q, q.flip(0), temperature=0.1, label_smoothing=0.1, reduction="sum")
    assert torch.allclose(m(q, q.flip(0)), want, rtol=1e-5)


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CPU fallback")
    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "LOAD_ERROR", "ImportError: simulated")
    monkeypatch.setattr(backends.REGISTRY, "_warned", set())
    monkeypatch.setitem(backends.REGISTRY.order, "cpu", ("cpu", "torch"))
    q = torch.randn(int(dense.DENSE_MAX ** 0.5) + 1, 4)   # above DENSE_MAX: auto needs a backend
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ck.info_nce(q, q)
        ck.info_nce(q, q)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "falling back" in msgs[0] and "simulated" in msgs[0]
    assert "cpu" not in ck.available_backends("cpu")
    with pytest.raises(ValueError, match=r"backend 'cpu' cannot run this call on cpu.*not built.*"
                                         r"pip install -e"):
        ck.info_nce(q, q, backend="cpu")


def test_import_without_extension():
    code = ("import sys; sys.modules['contrastive_kernels._C'] = None\n"
            "import torch, contrastive_kernels as ck\n"
            "assert 'cpu' not in ck.available_backends('cpu')\n"
            "q = torch.randn(4, 3); print(float(ck.info_nce(q, q, backend='torch')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(not extension.loaded(), reason="extension not built")
def test_extension_is_used_by_auto_on_cpu():
    call = backends.Call(torch.device("cpu"), torch.float32, 8, 8, 4)
    assert backends.REGISTRY.select("auto", call, ck.make_options()).name == "cpu"


def test_autocast_does_not_lower_the_precision():
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    gen = torch.Generator().manual_seed(9)
    q = F.normalize(torch.randn(300, 64, generator=gen), dim=1)
    k = F.normalize(torch.randn(300, 64, generator=gen), dim=1)
    want = ck.reference.info_nce(q, k, symmetric=True)
    for be in ck.available_backends("cpu"):
        if be == "triton":
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ck.info_nce(q, k, symmetric=True, backend=be)
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=1e-5), be


def test_torch_compile_trainer_step_matches_eager():
    """A torch.compile'd step that calls FusedInfoNCE: same loss and gradients as eager
    (the loss runs as one opaque call; the model around it is compiled)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    dev = torch.device(DEVICE)
    lin = torch.nn.Linear(24, 16).to(dev)
    log_scale = torch.nn.Parameter(torch.tensor(2.3, device=dev))
    x, y = torch.randn(2, 37, 24, generator=gen).to(dev)
    loss_fn = ck.FusedInfoNCE(symmetric=True, label_smoothing=0.1)

    def step(x, y):
        q, k = F.normalize(lin(x), dim=-1), F.normalize(lin(y), dim=-1)
        return loss_fn(q, k, logit_scale=log_scale.exp())

    params = [lin.weight, lin.bias, log_scale]
    eager = step(x, y)
    g_eager = torch.autograd.grad(eager, params)
    compiled = torch.compile(step)(x, y)
    g_compiled = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


def test_import_does_not_load_dynamo():
    # torch._dynamo takes ~1 s to import; the package loads it only when the loss is called.
    code = "import sys, contrastive_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
