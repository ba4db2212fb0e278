"""The CUDA backend's kernels and launcher (csrc/cuda/), run on the CPU under the emulator
(tests/cuda_emu.py, csrc/test/cuda_emu/), against the float64 reference: every kernel
variant (fp64, fp32 SIMT, TF32 and fp16/bf16 tensor-core engines; atomic and
deterministic passes; both pass schedules of the sigmoid loss), with tails in every tile
dimension, in both thread orders. CK_TEST_CUDA_EMU=1 runs the whole suite this way."""
import pytest
import torch
import torch.nn.functional as F

import contrastive_kernels as ck
import cuda_emu
from conftest import DEVICE, TOL, rel_err
from contrastive_kernels import backends

pytestmark = [pytest.mark.cpu_only]

# Tails everywhere: 64-row and 64-column blocks (32 for fp64), 32-wide chunks of D
# (16 for fp64): N = 70 and M = 131 end in partial blocks, D = 37 in a partial chunk.
N, M, D = 70, 131, 37
DTYPES = {"f64": (torch.float64, "ieee"), "f32": (torch.float32, "ieee"),
          "tf32": (torch.float32, "tf32"), "f16": (torch.float16, "ieee"),
          "bf16": (torch.bfloat16, "ieee")}
# TF32 rounds the inputs of S to 10 mantissa bits (about 1e-3 relative)
TF32_TOL = dict(loss=2e-3, grad=1e-2)


@pytest.fixture(scope="module")
def emulated():
    why = cuda_emu.build()
    if why:
        pytest.skip(f"CUDA emulator: {why}")
    return cuda_emu.backend()


@pytest.fixture
def cuda_backend(emulated, monkeypatch, request):
    """backend="cuda" on CPU tensors runs the emulated kernels, in the thread order asked."""
    monkeypatch.setitem(backends.REGISTRY.by_name, "cuda", emulated)
    order = getattr(request, "param", "forward")
    monkeypatch.setenv("CK_EMU_REVERSE", "1" if order == "reverse" else "0")
    return "cuda"


def _leaves(q, k, scale, bias, dtype, acc):
    qq = q.to(dtype).to(acc).requires_grad_()
    kk = k.to(dtype).to(acc).requires_grad_()
    sdt = torch.float64 if acc == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=sdt, requires_grad=True)
    b = torch.tensor(bias, dtype=sdt, requires_grad=True)
    return qq, kk, s, b


def _inputs(seed, n=N, m=M, d=D):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    return q, k, g


def _check(fn, ref_fn, q, k, dtype, precision, grads=(True, True, True, True), **opts):
    """fn on the dtype's inputs (fp32-accumulated reference on the same rounded inputs
    for half types) vs ref_fn in float64: the output and every gradient asked for, under
    a random upstream gradient."""
    ins = list(_leaves(q, k, 5.0, -2.0, dtype, dtype))
    ref_ins = list(_leaves(q, k, 5.0, -2.0, dtype, torch.float64))
    for x, r, want in zip(ins, ref_ins, grads):
        x.requires_grad_(want)
        r.requires_grad_(want)
    out = fn(*ins, backend="cuda", precision=precision, **opts)
    ref = ref_fn(*ref_ins)
    tol = TF32_TOL if precision == "tf32" else TOL[dtype]
    assert torch.isfinite(out).all()
    assert rel_err(out, ref, floor=1.0) <= tol["loss"], ("loss", rel_err(out, ref, floor=1.0))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaves = [x for x in ins if x.requires_grad]
    ref_leaves = [x for x in ref_ins if x.requires_grad]
    ga = torch.autograd.grad((out.double() * w).sum(), leaves)
    gr = torch.autograd.grad((ref.double() * w).sum(), ref_leaves)
    for i, (a, r) in enumerate(zip(ga, gr)):
        assert a.shape == r.shape and torch.isfinite(a).all(), i
        assert rel_err(a, r, floor=1e-2) <= tol["grad"], (i, rel_err(a, r, floor=1e-2))


@pytest.mark.parametrize("cuda_backend", ["forward", "reverse"], indirect=True)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("passes", [3, 4])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_siglip(cuda_backend, dt, passes, deterministic):
    dtype, precision = DTYPES[dt]
    q, k, g = _inputs(1)
    labels = dict(labels=torch.randint(0, 5, (N,), generator=g),
                  key_labels=torch.randint(0, 5, (M,), generator=g))
    _check(lambda qq, kk, s, b, **o: ck.siglip_loss(qq, kk, logit_scale=s, logit_bias=b,
                                                    reduction="none", **labels, **o),
           lambda qq, kk, s, b: ck.reference.siglip_loss(qq, kk, logit_scale=s, logit_bias=b,
                                                         reduction="none", **labels),
           q, k, dtype, precision, passes=passes, deterministic=deterministic)


@pytest.mark.parametrize("frozen", ["key", "query"])
@pytest.mark.parametrize("passes", [3, 4])
def test_siglip_one_side_trained(cuda_backend, frozen, passes):
    """A frozen tower: the launcher's dq-only and dk-only passes."""
    q, k, _ = _inputs(2)
    grads = (frozen != "query", frozen != "key", True, True)
    _check(lambda qq, kk, s, b, **o: ck.siglip_loss(qq, kk, logit_scale=s, logit_bias=b, **o),
           lambda qq, kk, s, b: ck.reference.siglip_loss(qq, kk, logit_scale=s, logit_bias=b),
           q, k, torch.float32, "ieee", grads=grads, passes=passes)


@pytest.mark.parametrize("cuda_backend", ["forward", "reverse"], indirect=True)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", ["clip", "ntxent", "supcon", "hard_negatives"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_info_nce(cuda_backend, dt, case, deterministic):
    """Rows and columns (symmetric), the self-masked diagonal, labels, M > N."""
    dtype, precision = DTYPES[dt]
    q, k, g = _inputs(3, m=N if case == "clip" else M)
    kw = {"clip": dict(symmetric=True),
          "ntxent": dict(key=None),
          "supcon": dict(key=None, labels=torch.randint(0, 6, (N,), generator=g)),
          "hard_negatives": dict(symmetric=True)}[case]

    def call(f, qq, kk, s, b, **o):
        key = kw.get("key", kk)
        rest = {a: v for a, v in kw.items() if a != "key"}
        return f(qq, key, logit_scale=s, reduction="none", **rest, **o)

    grads = (True, "key" not in kw, True, False)
    _check(lambda *a, **o: call(ck.info_nce, *a[:4], **o),
           lambda *a: call(ck.reference.info_nce, *a), q, k, dtype, precision, grads=grads,
           deterministic=deterministic)


def test_large_logits_and_odd_sizes(cuda_backend):
    """Raw embeddings (|z| far beyond exp's fp32 range) and sizes of one row, one column,
    one feature; every query's positive is key 0."""
    for n, m, d in [(1, 1, 1), (1, 65, 1), (65, 1, 33), (3, 200, 5)]:
        g = torch.Generator().manual_seed(n * 1000 + m)
        q = torch.randn(n, d, generator=g, dtype=torch.float64) * 8
        k = torch.randn(m, d, generator=g, dtype=torch.float64) * 8
        idx = torch.zeros(n, dtype=torch.long)
        for passes in (3, 4):
            _check(lambda qq, kk, s, b, **o: ck.siglip_loss(
                       qq, kk, logit_scale=s, logit_bias=b, positive_index=idx, **o),
                   lambda qq, kk, s, b: ck.reference.siglip_loss(
                       qq, kk, logit_scale=s, logit_bias=b, positive_index=idx),
                   q, k, torch.float32, "ieee", passes=passes)
        _check(lambda qq, kk, s, b, **o: ck.info_nce(qq, kk, logit_scale=s, positive_index=idx,
                                                     **o),
               lambda qq, kk, s, b: ck.reference.info_nce(qq, kk, logit_scale=s,
                                                          positive_index=idx),
               q, k, torch.float64, "ieee", grads=(True, True, True, False))


def test_the_emulated_backend_is_the_cuda_backend(emulated):
    """Same name, dtypes and declared features as the real one: the suite's dispatch and
    capability checks apply to it unchanged."""
    real = backends.REGISTRY.by_name["cuda"]
    assert (emulated.name, emulated.dtypes, emulated.features) == \
        (real.name, real.dtypes, real.features)
    assert DEVICE == "cpu"
