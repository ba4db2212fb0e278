"""torch.compile(fullgraph=True) of training steps that call the loss: no graph break, the
eager loss and gradients (aot_eager and inductor, on CPU), and no host read of the scale."""
import pytest
import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from conftest import DEVICE
from contrastive_kernels import ops
from dispatch import SeeThrough

# CPU compile checks (CI runs them); the suite's poisoning mode stays out of dynamo's way.
pytestmark = [pytest.mark.cpu_only, pytest.mark.no_poison]

D_IN, D = 12, 8
N = 16


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.enc = torch.nn.Linear(D_IN, D)
        with torch.no_grad():
            self.enc.weight.copy_(torch.randn(D, D_IN, generator=g))
            self.enc.bias.copy_(torch.randn(D, generator=g))
        self.log_scale = torch.nn.Parameter(torch.tensor(2.3))
        self.bias = torch.nn.Parameter(torch.tensor(-3.0))
        self.clip = ck.FusedInfoNCE(symmetric=True, label_smoothing=0.1)
        self.siglip = ck.FusedSigLIPLoss()

    def embed(self, x):
        return F.normalize(self.enc(x), dim=-1)


def clip(m, x, y):
    return m.clip(m.embed(x), m.embed(y), logit_scale=m.log_scale.exp())


def hard_negatives(m, x, y):
    q, k = m.embed(x), m.embed(y)
    keys = torch.cat([k, q.flip(0)])               # extra keys: negatives
    pi = torch.arange(q.shape[0], device=q.device)
    return ck.info_nce(q, keys, positive_index=pi, logit_scale=m.log_scale.exp())


def supcon(m, x, y):
    q, k = m.embed(x), m.embed(y)
    labels = torch.arange(q.shape[0], device=q.device) % 5
    return ck.info_nce(q, k, labels=labels, symmetric=True, temperature=0.1)


def ntxent(m, x, y):
    views = torch.cat([m.embed(x), m.embed(y)])
    return ck.info_nce(views, None, symmetric=True, logit_scale=m.log_scale.exp(),
                       label_smoothing=0.05)


def siglip(m, x, y):
    """The sigmoid loss with a learnable scale and bias: the 3-pass schedule."""
    return m.siglip(m.embed(x), m.embed(y), m.log_scale.exp(), m.bias)


def siglip_4pass(m, x, y):
    q, k = m.embed(x), m.embed(y)
    labels = torch.arange(q.shape[0], device=q.device) % 5
    return ck.siglip_loss(q, k, logit_scale=m.log_scale.exp(), logit_bias=m.bias,
                          labels=labels, passes=4)


def margin_dcl(m, x, y):
    """The positive shift (margin, decoupled) with a learnable scale."""
    q, k = m.embed(x), m.embed(y)
    labels = torch.arange(q.shape[0], device=q.device) % 5
    return ck.info_nce(q, k, labels=labels, symmetric=True, logit_scale=m.log_scale.exp(),
                       margin=0.2, decoupled=True)


def distill(m, x, y):
    """Teacher soft targets (softmax weighting): the teacher is a frozen copy's output."""
    q, k = m.embed(x), m.embed(y)
    with torch.no_grad():
        tq, tk = m.embed(x.flip(1)), m.embed(y.flip(1))
    return ck.info_nce(q, k, symmetric=True, logit_scale=m.log_scale.exp(), teacher=(tq, tk),
                       teacher_logit_scale=10.0, teacher_weight=0.5)


CASES = [clip, hard_negatives, supcon, ntxent, siglip, siglip_4pass, margin_dcl, distill]


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_no_graph_break(case):
    torch._dynamo.reset()
    m = Model()
    x, y = _data()
    ex = torch._dynamo.explain(lambda x, y: case(m, x, y))(x, y)
    assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]
    assert ex.graph_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_fullgraph_matches_eager(case, backend):
    torch._dynamo.reset()
    x, y = _data()
    m = Model()
    params = [m.enc.weight, m.enc.bias, m.log_scale, m.bias]
    eager = case(m, x, y)
    g_eager = torch.autograd.grad(eager, params, allow_unused=True)
    step = torch.compile(lambda x, y: case(m, x, y), fullgraph=True, backend=backend)
    compiled = step(x, y)
    g_compiled = torch.autograd.grad(compiled, params, allow_unused=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_compiled, g_eager):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the fused op is in the graph, as one call
    assert torch.ops.contrastive_kernels.info_nce_stats.default in ops.BODIES


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_scale_is_never_read_on_the_host(backend, monkeypatch):
    # A learnable scale tensor goes to the kernels as a tensor: no .item() / float() of it
    # (on a GPU, a device sync every step). The only reads are the value checks of a CPU
    # scale (check_values), switched off here. (The C++ backends take a float: `cpu` reads
    # it on the host, which is free; `cuda` pays one sync per call.)
    if backend not in ck.available_backends(DEVICE):
        pytest.skip(f"{backend} not available")
    monkeypatch.setattr(ops, "check_values", lambda *a, **k: None)
    reads = []

    class Reads(SeeThrough):
        def handle(self, func, args, kwargs):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default) \
                    and args[0].is_floating_point():
                reads.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    q = F.normalize(torch.randn(10, 6), dim=1).requires_grad_()
    k = F.normalize(torch.randn(10, 6), dim=1).requires_grad_()
    s = torch.tensor(5.0, requires_grad=True)
    with Reads():
        loss = ck.info_nce(q, k, logit_scale=s, symmetric=True, backend=backend)
        loss.backward()
    assert s.grad is not None and not reads, reads
    if "cpu" in ck.available_backends("cpu"):
        # the check can fail: the C++ CPU backend reads its float scale
        with Reads():
            ck.info_nce(q, k, logit_scale=s, symmetric=True, backend="cpu")
        assert reads
