"""contrastive_kernels.integrations.open_clip against the installed open_clip's losses
(tests/compat.py): ClipLoss, SigLipLoss and DistillClipLoss, losses and every gradient
(features, logit scale, logit bias), locally and over gloo process groups of 2, 3 and 4
processes with every flag combination open_clip has (DDP-averaged gradients).

Tolerances: float32 rtol 1e-4, atol 1e-5 (values and gradients); bf16 / fp16 inputs
against open_clip in float64 on the same rounded inputs: rtol 2e-2, atol 2e-3 (bf16),
rtol 5e-3, atol 5e-4 (fp16), the gradients being rounded to the input dtype.
"""
import ast
import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from compat import open_clip_loss
from contrastive_kernels.integrations import open_clip as ocx
from test_distributed import spawn

TOL = dict(rtol=1e-4, atol=1e-5)
HALF_TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
            torch.float16: dict(rtol=5e-3, atol=5e-4)}


@pytest.fixture(scope="module")
def oc():
    mod = open_clip_loss()
    if mod is None or not hasattr(mod, "DistillClipLoss"):
        pytest.skip("open_clip is not installed")
    return mod


def _unit(n, d, gen, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def _inputs(n, d, seed, dtype=torch.float32, bias=True):
    """Leaves: image and text features, a learnable log scale, a bias (or None)."""
    gen = torch.Generator().manual_seed(seed)
    img, txt = _unit(n, d, gen, dtype), _unit(n, d, gen, dtype)
    log_s = torch.tensor(math.log(12.0) + 0.3 * torch.rand((), generator=gen).item())
    b = torch.tensor(-3.0 + torch.rand((), generator=gen).item()) if bias else None
    return [img, txt, log_s, b]


def _leaves(xs, dtype=None):
    return [None if x is None else
            x.detach().to(dtype or x.dtype).clone().requires_grad_() for x in xs]


def _grads(out, xs):
    xs = [x for x in xs if x is not None]
    return torch.autograd.grad(out, xs, retain_graph=True, allow_unused=True)


def _assert_close(got, want, tol, what):
    for i, (g, w) in enumerate(zip(got, want)):
        g = torch.zeros_like(w) if g is None else g
        torch.testing.assert_close(g.to(torch.float64), w.to(torch.float64), **tol,
                                   msg=lambda m: f"{what} [{i}]: {m}")


# ---------------------------------------------------------------- world_size == 1

@pytest.mark.parametrize("n", [7, 13])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("flags", [{}, dict(local_loss=True, gather_with_grad=True,
                                            cache_labels=True)])
def test_clip_loss(oc, n, bias, flags):
    xs = _inputs(n, 16, seed=n + 10 * bias)
    ours_in, ref_in = _leaves(xs), _leaves(xs)

    def call(cls, ins, **kw):
        img, txt, log_s, b = ins
        return cls(**flags)(img, txt, log_s.exp(), b, **kw)
    ours, ref = call(ocx.ClipLoss, ours_in), call(oc.ClipLoss, ref_in)
    _assert_close([ours], [ref], TOL, "loss")
    _assert_close(_grads(ours, ours_in), _grads(ref, ref_in), TOL, "grads")
    d = call(ocx.ClipLoss, ours_in, output_dict=True)
    assert list(d) == list(call(oc.ClipLoss, ref_in, output_dict=True)) == ["contrastive_loss"]
    _assert_close([d["contrastive_loss"]], [ref], TOL, "output_dict")


@pytest.mark.parametrize("n", [5, 11])
@pytest.mark.parametrize("bias", [False, True])
def test_siglip_loss(oc, n, bias):
    xs = _inputs(n, 12, seed=100 + n + bias, bias=bias)
    ours_in, ref_in = _leaves(xs), _leaves(xs)

    def call(cls, ins, **kw):
        img, txt, log_s, b = ins
        return cls()(img, txt, log_s.exp(), b, **kw)
    ours, ref = call(ocx.SigLipLoss, ours_in), call(oc.SigLipLoss, ref_in)
    _assert_close([ours], [ref], TOL, "loss")
    _assert_close(_grads(ours, ours_in), _grads(ref, ref_in), TOL, "grads")
    d = call(ocx.SigLipLoss, ours_in, output_dict=True)
    assert list(d) == ["contrastive_loss"]
    _assert_close([d["contrastive_loss"]], [ref], TOL, "output_dict")


def _teacher(n, dt, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return _unit(n, dt, gen, dtype), _unit(n, dt, gen, dtype), torch.tensor(20.0 + seed % 7)


@pytest.mark.parametrize("n", [9, 15])
def test_distill_clip_loss(oc, n):
    xs = _inputs(n, 16, seed=200 + n, bias=False)[:3]
    teacher = _teacher(n, 10, seed=n)
    ours_in, ref_in = _leaves(xs), _leaves(xs)

    def call(cls, ins, **kw):
        img, txt, log_s = ins
        return cls()(img, txt, log_s.exp(), *teacher, **kw)
    ours, ref = call(ocx.DistillClipLoss, ours_in), call(oc.DistillClipLoss, ref_in)
    assert isinstance(ours, tuple) and len(ours) == 2
    for name, o, r in zip(("contrastive", "distill"), ours, ref):
        _assert_close([o], [r], TOL, f"{name} loss")
        _assert_close(_grads(o, ours_in), _grads(r, ref_in), TOL, f"{name} grads")
    d, dr = call(ocx.DistillClipLoss, ours_in, output_dict=True), call(
        oc.DistillClipLoss, ref_in, output_dict=True)
    assert list(d) == list(dr) == ["contrastive_loss", "distill_loss"]
    _assert_close(list(d.values()), list(dr.values()), TOL, "output_dict")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_against_float64(oc, dtype):
    """Half features (the scale a float32 parameter, as under autocast) against open_clip
    in float64 on the same rounded inputs."""
    n, tol = 11, HALF_TOL[dtype]
    xs = _inputs(n, 16, seed=300, dtype=dtype)
    teacher = _teacher(n, 8, seed=3, dtype=dtype)
    t64 = [t.to(torch.float64) for t in teacher]
    for name in ("ClipLoss", "SigLipLoss", "DistillClipLoss"):
        ours_in, ref_in = _leaves(xs), _leaves(xs, torch.float64)
        img, txt, log_s, b = ours_in
        ri, rt, rs, rb = ref_in
        if name == "DistillClipLoss":
            ours = ocx.DistillClipLoss()(img, txt, log_s.exp(), *teacher)
            ref = oc.DistillClipLoss()(ri, rt, rs.exp(), *t64)
            ours_in, ref_in = ours_in[:3], ref_in[:3]
        else:
            ours = [getattr(ocx, name)()(img, txt, log_s.exp(), b)]
            ref = [getattr(oc, name)()(ri, rt, rs.exp(), rb)]
        assert img.dtype == dtype
        for o, r in zip(ours, ref):
            _assert_close([o], [r], tol, f"{name} {dtype} loss")
            g = _grads(o, ours_in)
            assert g[0].dtype == dtype
            _assert_close(g, _grads(r, ref_in), tol, f"{name} {dtype} grads")


def test_modules_and_errors():
    for m in (ocx.ClipLoss(), ocx.SigLipLoss(), ocx.DistillClipLoss()):
        assert isinstance(m, torch.nn.Module)
        assert m.to("cpu") is m and not list(m.parameters()) and not m.state_dict()
    assert "local_loss=True" in repr(ocx.ClipLoss(local_loss=True))
    assert ocx.SigLipLoss(dist_impl="shift").dist_impl == "shift"
    assert ocx.SigLipLoss().dist_impl == "bidir"     # open_clip's default
    bad = [
        (lambda: ocx.ClipLoss(use_horovod=True), "use_horovod"),
        (lambda: ocx.DistillClipLoss(use_horovod=True), "use_horovod"),
        (lambda: ocx.ClipLoss(local_loss="yes"), "local_loss"),
        (lambda: ocx.ClipLoss(gather_with_grad=1), "gather_with_grad"),
        (lambda: ocx.ClipLoss(cache_labels=None), "cache_labels"),
        (lambda: ocx.ClipLoss(rank=2, world_size=2), "rank"),
        (lambda: ocx.ClipLoss(world_size=0), "world_size"),
        (lambda: ocx.SigLipLoss(world_size=2.0), "world_size"),
        (lambda: ocx.SigLipLoss(dist_impl="ring"), "dist_impl"),
        (lambda: ocx.SigLipLoss(backend="nope"), "backend"),
        (lambda: ocx.ClipLoss(backend=None), "backend"),
    ]
    for make, name in bad:
        with pytest.raises(ValueError, match=name):
            make()
    # world_size > 1 without a process group: a clear error at the call
    assert not dist.is_initialized()
    q = torch.randn(4, 8)
    for m in (ocx.ClipLoss(rank=1, world_size=2), ocx.SigLipLoss(world_size=3)):
        with pytest.raises(ValueError, match="needs an initialized torch.distributed"):
            m(q, q, torch.tensor(10.0), torch.tensor(-1.0))
    # the teacher gets no gradient: one that asks for it is refused
    t = torch.randn(4, 3)
    s = torch.tensor(5.0)
    for i, name in enumerate(("dist_image_features", "dist_text_features",
                              "dist_logit_scale")):
        args = [t, t, s]
        args[i] = args[i].clone().requires_grad_()
        with pytest.raises(ValueError, match=name):
            ocx.DistillClipLoss()(q, q, s, *args)
    with torch.no_grad():
        ocx.DistillClipLoss()(q, q, s, t.requires_grad_(), t, s)


def test_does_not_import_open_clip():
    tree = ast.parse(open(ocx.__file__).read())
    names = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
             for a in node.names]
    names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not any(n.split(".")[0] == "open_clip" for n in names), names


# ---------------------------------------------------------------- gloo process groups

N_LOCAL, DIN, D, D_T = 5, 6, 8, 7      # odd local batch; equal shards (open_clip's gather)


def _allreduce_mean(x):
    x = x.detach().to(torch.float64).clone().reshape(-1)
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _ddp_case(world, rank, kind, seed, **flags):
    """Shared encoders, a learnable log scale (and bias): per rank, the loss values and
    the local features' gradients equal open_clip's with the same flags, and so do the
    DDP-averaged gradients of the encoders, the scale and the bias."""
    oc = open_clip_loss()
    gen = torch.Generator().manual_seed(seed)
    ng = world * N_LOCAL
    X = torch.randn(ng, DIN, generator=gen)
    Y = torch.randn(ng, DIN, generator=gen)
    TI, TT = _unit(ng, D_T, gen), _unit(ng, D_T, gen)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)

    def run(lib):
        torch.manual_seed(seed)
        enc_i, enc_t = torch.nn.Linear(DIN, D), torch.nn.Linear(DIN, D)
        log_s = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        b = torch.nn.Parameter(torch.tensor(-4.0))
        params = list(enc_i.parameters()) + list(enc_t.parameters()) + [log_s, b]
        img = F.normalize(enc_i(X[rows]), dim=1)
        txt = F.normalize(enc_t(Y[rows]), dim=1)
        img.retain_grad()
        txt.retain_grad()
        loss_fn = getattr(lib, kind)(rank=rank, world_size=world, **flags)
        if kind == "DistillClipLoss":
            out = loss_fn(img, txt, log_s.exp(), TI[rows], TT[rows], torch.tensor(15.0))
            total = out[0] + 0.7 * out[1]
            params = params[:-1]
        else:
            out = [loss_fn(img, txt, log_s.exp(), b)]
            total = out[0]
        total.backward()
        return ([o.detach() for o in out], [img.grad, txt.grad],
                [_allreduce_mean(p.grad) for p in params])
    what = f"world {world} rank {rank} {kind} {flags}"
    ours, ref = run(ocx), run(oc)
    _assert_close(ours[0], ref[0], TOL, f"{what} loss")
    _assert_close(ours[1], ref[1], TOL, f"{what} feature grads")
    _assert_close(ours[2], ref[2], TOL, f"{what} DDP-averaged grads")


def _dist_cases(world, rank):
    seed = itertools.count(world * 100)
    for local_loss, gwg in itertools.product((True, False), repeat=2):
        for kind in ("ClipLoss", "DistillClipLoss"):
            _ddp_case(world, rank, kind, next(seed), local_loss=local_loss,
                      gather_with_grad=gwg)
    for impl in (None, "bidir", "shift", "reduce", "gather"):
        _ddp_case(world, rank, "SigLipLoss", next(seed), dist_impl=impl)
    # rank / world_size must be torch.distributed's (checked at construction here)
    with pytest.raises(ValueError, match="rank="):
        ocx.ClipLoss(rank=(rank + 1) % world, world_size=world)
    with pytest.raises(ValueError, match="world_size="):
        ocx.SigLipLoss(rank=rank, world_size=world + 1)


@pytest.mark.cpu_only
@pytest.mark.parametrize("world", [2, 3, 4])
def test_process_groups(oc, world, tmp_path):
    spawn(world, tmp_path, _dist_cases)
