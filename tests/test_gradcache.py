"""ck.GradCache against the direct whole-batch step: loss_fn(*[enc(x) ...]).backward().

Every test compares the loss and the gradient of every parameter (towers, a learnable
logit scale and bias inside loss_fn) with the step on the whole batch, on fresh random
inputs of odd sizes, ragged last chunks included. With dropout the reference encodes
the same chunks one after another with gradients under the same seed. The DDP test runs
2 gloo processes and counts the all-reduces with a comm hook.
"""
import collections
import copy
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import contrastive_kernels as ck
from test_distributed import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, DX, DY, HID, EMB = 13, 5, 7, 11, 6


# ----------------------------------------------------------------------------- helpers

def tower(d_in, dropout=0.0, dtype=torch.float64):
    return nn.Sequential(nn.Linear(d_in, HID), nn.Tanh(), nn.Dropout(dropout),
                         nn.Linear(HID, EMB)).to(dtype)


class Loss(nn.Module):
    """loss_fn with its own parameters: a learnable log scale (and bias for SigLIP)."""

    def __init__(self, kind, dtype=torch.float64):
        super().__init__()
        self.kind = kind
        self.log_scale = nn.Parameter(torch.tensor(math.log(5.0), dtype=dtype))
        self.bias = nn.Parameter(torch.tensor(-3.0, dtype=dtype))
        self.fused = ck.FusedInfoNCE(symmetric=True)

    def forward(self, q, k, **kw):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        s = self.log_scale.exp()
        if self.kind == "info_nce":
            return ck.info_nce(q, k, logit_scale=s, symmetric=len(q) == len(k), **kw)
        if self.kind == "fused":
            return self.fused(q, k, logit_scale=s, **kw)
        if self.kind == "siglip":
            return ck.siglip_loss(q, k, logit_scale=s, logit_bias=self.bias, **kw)
        raise AssertionError(self.kind)


def params(*mods):
    seen, out = set(), []
    for m in mods:
        for p in ([m] if torch.is_tensor(m) else m.parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def data(seed, rows=(N, N), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows[0], DX, generator=g, dtype=dtype),
            torch.randn(rows[1], DY, generator=g, dtype=dtype))


def whole_step(encoders, loss_fn, inputs, **kw):
    loss = loss_fn(*[e(x) for e, x in zip(encoders, inputs)], **kw)
    loss.backward()
    return loss.detach()


def assert_grads(got_mods, want_mods, rtol=1e-9, atol=1e-12, none_ok=False):
    got, want = params(*got_mods), params(*want_mods)
    assert len(got) == len(want) and got
    for i, (a, b) in enumerate(zip(got, want)):
        if b.grad is None:
            assert none_ok and a.grad is None, f"param {i}: grad {a.grad} where none expected"
            continue
        assert a.grad is not None, f"param {i} got no gradient"
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol,
                                   msg=lambda m: f"param {i}: {m}")


def record_calls(mod, name, log):
    """Log (name, rows, grad enabled, autocast on) at every call of mod."""
    def hook(m, args):
        x = args[0]
        rows = x.shape[0] if torch.is_tensor(x) else len(next(
            v for v in (x.values() if isinstance(x, collections.abc.Mapping) else x)
            if torch.is_tensor(v) and v.dim()))
        log.append((name, rows, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
    return mod.register_forward_pre_hook(hook)


def chunks(x, size):
    return [x[s:s + size] for s in range(0, x.shape[0], size)]


# ----------------------------------------------------------------------------- whole batch

@pytest.mark.parametrize("kind", ["info_nce", "fused", "siglip"])
@pytest.mark.parametrize("chunk", [1, 4, 13, 40])
def test_matches_whole_batch(kind, chunk):
    torch.manual_seed(hash((kind, chunk)) % 1000)
    a, b, lf = tower(DX), tower(DY), Loss(kind)
    a2, b2, lf2 = copy.deepcopy((a, b, lf))
    x, y = data(chunk)
    log = []
    hooks = [record_calls(a, "a", log), record_calls(b, "b", log)]
    loss = ck.GradCache([a, b], lf, chunk)(x, y)
    for h in hooks:
        h.remove()
    want = whole_step([a2, b2], lf2, (x, y))
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert_grads([a, b, lf], [a2, b2, lf2], none_ok=kind != "siglip")   # bias: siglip only
    sizes = [min(chunk, N - s) for s in range(0, N, chunk)]
    k = len(sizes)
    # stage 1 without a graph, a's chunks then b's; stage 3 the same chunks with one
    want_log = [(n, r, False, False) for n in "ab" for r in sizes] + \
               [(n, r, True, False) for n in "ab" for r in sizes]
    assert log == want_log and len(log) == 4 * k


def test_one_chunk_of_activations_alive():
    """In the re-forward, the previous chunk's activations are gone (its graph freed)
    when the next chunk starts: the tanh outputs (saved for backward) are watched."""
    import weakref
    torch.manual_seed(2)
    a, b, lf = tower(DX), tower(DY), Loss("info_nce")
    alive, refs = [], []

    def hook(m, i, out):
        if torch.is_grad_enabled():
            alive.append(sum(r() is not None for r in refs))
            refs.append(weakref.ref(out))
    h = a[1].register_forward_hook(hook)
    ck.GradCache([a, b], lf, 3)(*data(16))
    h.remove()
    assert alive == [0] * 5


def test_float32_and_loss_kwargs():
    torch.manual_seed(1)
    a, b = tower(DX, dtype=torch.float32), tower(DY, dtype=torch.float32)
    s = nn.Parameter(torch.tensor(2.0))
    a2, b2, s2 = copy.deepcopy((a, b, s))
    fused = ck.FusedInfoNCE(symmetric=False)
    x, y = data(11, rows=(10, 23), dtype=torch.float32)   # hard negatives: M > N
    loss = ck.GradCache([a, b], fused, 6)(x, y, logit_scale=s.exp())
    want = whole_step([a2, b2], fused, (x, y), logit_scale=s2.exp())
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    assert_grads([a, b], [a2, b2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-6)


def test_dropout_replays_rng(device):
    """CPU (and under CK_TEST_DEVICE=cuda, CUDA) RNG states replayed per chunk."""
    a, b, lf = tower(DX, 0.3).to(device), tower(DY, 0.4).to(device), Loss("info_nce").to(device)
    a2, b2, lf2 = copy.deepcopy((a, b, lf))
    x, y = (t.to(device) for t in data(3))

    def noisy(fn):              # a loss that draws random numbers too
        return lambda q, k: fn(q, k) + 0 * torch.rand(3, dtype=q.dtype, device=q.device).sum()

    def rng():
        return [torch.get_rng_state()] + (
            [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])
    torch.manual_seed(123)
    loss = ck.GradCache([a, b], noisy(lf), 4)(x, y)
    rng_after = rng()
    # reference: the same chunks encoded one after another with gradients
    torch.manual_seed(123)
    q = torch.cat([a2(c) for c in chunks(x, 4)])
    k = torch.cat([b2(c) for c in chunks(y, 4)])
    want = noisy(lf2)(q, k)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    assert_grads([a, b, lf], [a2, b2, lf2], none_ok=True)
    assert all(torch.equal(u, v) for u, v in zip(rng_after, rng()))
    # dropout was active: the same model without it gives another loss
    a2.eval(), b2.eval()
    with torch.no_grad():
        assert abs(float(lf2(a2(x), b2(y))) - float(loss)) > 1e-3


@pytest.mark.parametrize("how", ["single", "listed"])
def test_shared_tower(how):
    torch.manual_seed(5)
    a, lf = tower(DX), Loss("info_nce")
    a2, lf2 = copy.deepcopy((a, lf))
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(9, DX, generator=g, dtype=torch.float64), \
        torch.randn(14, DX, generator=g, dtype=torch.float64)   # 9 queries, 14 keys
    log = []
    h = record_calls(a, "a", log)
    loss = ck.GradCache(a if how == "single" else [a, a], lf, 4)(x, y)
    h.remove()
    want = whole_step([a2, a2], lf2, (x, y))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert_grads([a, lf], [a2, lf2], none_ok=True)
    assert [r for _, r, _, _ in log] == [4, 4, 1, 4, 4, 4, 2] * 2


class Features(collections.UserDict):
    pass


Pair = collections.namedtuple("Pair", "x mask pos scale name")


class DictTower(nn.Module):
    """Takes one container: x (N, DX), mask (N, DX), pos (1, DX) broadcast, scale 0-dim,
    name a string; returns a dict. Records the container type it got."""

    def __init__(self):
        super().__init__()
        self.net = tower(DX)
        self.seen = []

    def forward(self, batch):
        self.seen.append(type(batch))
        if isinstance(batch, collections.abc.Mapping):
            x, mask, pos, scale, name = (batch[k] for k in Pair._fields)
        else:
            x, mask, pos, scale, name = batch
        assert name == "feats" and pos.shape == (1, DX) and scale.dim() == 0
        return {"emb": self.net(x * mask + pos) * scale, "note": name}


def containers():
    out = [dict, collections.OrderedDict, Features, list, tuple, Pair]
    try:
        from transformers import BatchEncoding
        out.append(BatchEncoding)
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("kind", containers(), ids=lambda t: t.__name__)
def test_container_inputs(kind):
    torch.manual_seed(7)
    enc_a, enc_b, lf = DictTower(), DictTower(), Loss("fused")
    a2, b2, lf2 = copy.deepcopy((enc_a, enc_b, lf))
    g = torch.Generator().manual_seed(8)

    def make(n):
        vals = dict(x=torch.randn(n, DX, generator=g, dtype=torch.float64),
                    mask=(torch.rand(n, DX, generator=g) > 0.3).double(),
                    pos=torch.randn(1, DX, generator=g, dtype=torch.float64),
                    scale=torch.tensor(1.5, dtype=torch.float64), name="feats")
        if kind in (list, tuple):
            return kind(vals[k] for k in Pair._fields)
        if kind is Pair:
            return Pair(**vals)
        return kind(vals)
    x, y = make(N), make(N)
    loss = ck.GradCache([enc_a, enc_b], lf, 5, get_embedding=lambda o: o["emb"])(x, y)
    want = lf2(a2(x)["emb"], b2(y)["emb"])
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    assert_grads([enc_a, enc_b, lf], [a2, b2, lf2], none_ok=True)
    assert enc_a.seen == [kind] * 6 and enc_b.seen == [kind] * 6   # 3 chunks, 2 passes


def test_autocast_bf16():
    torch.manual_seed(9)
    a, b = tower(DX, dtype=torch.float32), tower(DY, dtype=torch.float32)
    lf = Loss("info_nce", dtype=torch.float32)
    a2, b2, lf2 = copy.deepcopy((a, b, lf))
    x, y = data(10, dtype=torch.float32)
    log, dtypes = [], []
    hooks = [record_calls(a, "a", log),
             a[3].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ck.GradCache([a, b], lf, 4)(x, y)
        want = whole_step([a2, b2], lf2, (x, y))
    for h in hooks:
        h.remove()
    assert all(ac for _, _, _, ac in log) and len(log) == 8
    assert dtypes[:8] == [torch.bfloat16] * 8       # both passes (then the reference's)
    torch.testing.assert_close(loss, want, rtol=1e-2, atol=1e-2)
    for p, q in zip(params(a, b, lf), params(a2, b2, lf2)):
        if q.grad is None:                          # the unused bias
            assert p.grad is None
            continue
        assert p.grad.dtype == torch.float32
        err = (p.grad - q.grad).abs().max() / q.grad.abs().max()
        assert err < 3e-2, err


def test_grad_scaler():
    torch.manual_seed(10)
    a, b, lf = tower(DX), tower(DY), Loss("siglip")
    a2, b2, lf2 = copy.deepcopy((a, b, lf))
    a3, b3, lf3 = copy.deepcopy((a, b, lf))
    x, y = data(12)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = ck.GradCache([a, b], lf, 4, scaler=scaler)(x, y)
    ref = torch.amp.GradScaler("cpu", init_scale=1024.0)
    want = lf2(a2(x), b2(y))
    ref.scale(want).backward()
    whole_step([a3, b3], lf3, (x, y))
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)   # unscaled
    assert_grads([a, b, lf], [a2, b2, lf2])
    for p, q in zip(params(a, b, lf), params(a3, b3, lf3)):     # scaled by 1024
        torch.testing.assert_close(p.grad, 1024 * q.grad, rtol=1e-9, atol=1e-9)
    opt = torch.optim.SGD(params(a, b, lf), lr=0.1)
    scaler.step(opt)          # the usual update works on the scaled gradients
    scaler.update()


def test_two_calls_accumulate():
    torch.manual_seed(11)
    a, b, lf = tower(DX), tower(DY), Loss("info_nce")
    a2, b2, lf2 = copy.deepcopy((a, b, lf))
    gc = ck.GradCache([a, b], lf, 3)
    (x1, y1), (x2, y2) = data(13), data(14, rows=(8, 8))
    l1, l2 = gc(x1, y1), gc(x2, y2)
    w1, w2 = whole_step([a2, b2], lf2, (x1, y1)), whole_step([a2, b2], lf2, (x2, y2))
    torch.testing.assert_close(torch.stack([l1, l2]), torch.stack([w1, w2]), rtol=1e-12,
                               atol=1e-12)
    assert_grads([a, b, lf], [a2, b2, lf2], none_ok=True)


def test_unused_embedding_gets_no_gradient():
    torch.manual_seed(12)
    a, b = tower(DX), tower(DY)
    a2, b2 = copy.deepcopy((a, b))
    x, y = data(15)
    def lf(q, k):
        return (q ** 2).sum()
    log = []
    h = record_calls(b, "b", log)
    ck.GradCache([a, b], lf, 5)(x, y)
    h.remove()
    whole_step([a2, b2], lf, (x, y))
    assert_grads([a, b], [a2, b2], none_ok=True)
    assert all(p.grad is None for p in b.parameters())
    assert [g for _, _, g, _ in log] == [False] * 3      # b: no re-forward


def test_locked_tower():
    """A frozen tower (LiT): its embedding needs no gradient, it is not re-forwarded."""
    torch.manual_seed(13)
    a, b, lf = tower(DX), tower(DY), Loss("info_nce")
    b.requires_grad_(False)
    a2, b2, lf2 = copy.deepcopy((a, b, lf))
    x, y = data(16)
    log, seen = [], []
    h = record_calls(b, "b", log)

    def spy(q, k):
        seen.append((q.requires_grad, k.requires_grad))
        return lf(q, k)
    loss = ck.GradCache([a, b], spy, 5)(x, y)
    h.remove()
    want = whole_step([a2, b2], lf2, (x, y))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert_grads([a, b, lf], [a2, b2, lf2], none_ok=True)
    assert seen == [(True, False)] and len(log) == 3


# ----------------------------------------------------------------------------- bad input

class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DX, EMB).double()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x["x"] if isinstance(x, dict) else x)


def lf_ok(q, k):
    return ck.info_nce(q, k)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=-3), ValueError, "chunk_size"),
    (dict(chunk_size=2.0), TypeError, "chunk_size"),
    (dict(chunk_size=True), TypeError, "chunk_size"),
    (dict(chunk_size="4"), TypeError, "chunk_size"),
    (dict(chunk_size=None), TypeError, "chunk_size"),
    (dict(encoders=3), TypeError, "encoders"),
    (dict(encoders=[]), ValueError, "encoders"),
    (dict(encoders="enc"), TypeError, "encoders"),
    (dict(loss_fn=None), TypeError, "loss_fn"),
    (dict(get_embedding=3), TypeError, "get_embedding"),
    (dict(scaler="x"), TypeError, "scaler"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(encoders=Counter(), loss_fn=lf_ok, chunk_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ck.GradCache(args.pop("encoders"), args.pop("loss_fn"), args.pop("chunk_size"), **args)


def test_bad_encoder_in_list():
    with pytest.raises(TypeError, match=re.escape("encoders[1]")):
        ck.GradCache([Counter(), 5], lf_ok, 4)


def _x(n=N):
    return torch.randn(n, DX, dtype=torch.float64)


@pytest.mark.parametrize("inputs, exc, match", [
    (lambda: (), ValueError, "at least one input"),
    (lambda: (_x(), _x(), _x()), ValueError, "3 inputs for 2 encoders"),
    (lambda: (_x(), {"x": _x(), "mask": _x(12)}), ValueError, re.escape("input 1['mask']")),
    (lambda: (_x(), [_x(), _x(7)]), ValueError, re.escape("input 1[1]")),
    (lambda: (5, _x()), TypeError, "input 0"),
    (lambda: (_x(), torch.tensor(1.0)), ValueError, "input 1"),
    (lambda: (_x(), {"name": "no tensors"}), TypeError, "input 1"),
    (lambda: (_x(0), _x()), ValueError, "input 0"),
])
def test_bad_inputs_raise_before_work(inputs, exc, match):
    a, b = Counter(), Counter()
    with pytest.raises(exc, match=match):
        ck.GradCache([a, b], lf_ok, 4)(*inputs())
    assert a.calls == b.calls == 0


def _dict_encoder(enc):
    return lambda x: {"emb": enc(x)}


# case: (loss_fn, encoder wrapper, get_embedding)
BAD_OUTPUTS = {
    "vector loss": (lambda q, k: ck.info_nce(q, k, reduction="none"), None, None),
    "float loss": (lambda q, k: 1.0, None, None),
    "no grad loss": (lambda q, k: torch.zeros(()), None, None),
    "dict output": (lf_ok, _dict_encoder, None),
    "int output": (lf_ok, None, lambda o: o.long()),
    "rows": (lf_ok, None, lambda o: o.mean(0, keepdim=True)),
}


@pytest.mark.parametrize("case, exc, match", [
    ("vector loss", ValueError, "loss_fn must return a scalar"),
    ("float loss", TypeError, "loss_fn must return a tensor"),
    ("no grad loss", ValueError, "loss_fn"),
    ("dict output", TypeError, "get_embedding"),
    ("int output", TypeError, "get_embedding"),
    ("rows", ValueError, "get_embedding"),
])
def test_bad_outputs(case, exc, match):
    a = Counter()
    lf, wrap, get = BAD_OUTPUTS[case]
    with pytest.raises(exc, match=match):
        ck.GradCache(wrap(a) if wrap else a, lf, 4, get_embedding=get)(_x(), _x())
    assert a.calls > 0                                     # it failed after the first pass
    assert all(p.grad is None for p in a.parameters())    # nothing was backwarded


# ----------------------------------------------------------------------------- DDP (gloo)

def _counted(ddp):
    calls = []

    def hook(state, bucket):
        calls.append(1)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        return allreduce_hook(state, bucket)
    ddp.register_comm_hook(None, hook)
    return calls


def _ddp_cases(world, rank):
    from torch.nn.parallel import DistributedDataParallel as DDP
    nl, chunk = 7, 3                       # 3 chunks per rank, the last of 1 row
    mine = slice(rank * nl, (rank + 1) * nl)

    def ring(log_scale):
        def lf(q, k):
            return ck.ring_info_nce(F.normalize(q, dim=-1), F.normalize(k, dim=-1),
                                    logit_scale=log_scale.exp(), symmetric=True)
        return lf

    for shared in (False, True):
        torch.manual_seed(0)
        a = tower(DX)
        b = a if shared else tower(DY)
        s = nn.Parameter(torch.tensor(math.log(5.0), dtype=torch.float64))
        g = torch.Generator().manual_seed(20)
        batches = [(torch.randn(nl * world, DX, generator=g, dtype=torch.float64),
                    torch.randn(nl * world, DX if shared else DY, generator=g,
                                dtype=torch.float64)) for _ in range(2)]
        # GradCache over DDP towers vs the ordinary whole-batch DDP step, two steps each
        runs = {}
        for name in ("gc", "whole"):
            da = DDP(copy.deepcopy(a), bucket_cap_mb=0.0005)
            db = da if shared else DDP(copy.deepcopy(b), bucket_cap_mb=0.0005)
            uniq = [da] if shared else [da, db]
            calls = [_counted(d) for d in uniq]
            sp = copy.deepcopy(s)
            counts, losses, grads = [], [], []
            for X, Y in batches:
                if name == "gc":
                    loss = ck.GradCache([da, db], ring(sp), chunk)(X[mine], Y[mine])
                else:
                    loss = whole_step([da, db], ring(sp), (X[mine], Y[mine]))
                dist.all_reduce(sp.grad)     # the replicated scale's shares, averaged
                sp.grad /= world             # as DDP does
                counts.append([len(c) for c in calls])
                losses.append(loss)
                grads.append([p.grad.clone() for p in params(*uniq, sp)])
                for c in calls:
                    c.clear()
                sp.grad = None               # (its average is not idempotent)
            runs[name] = counts, losses, grads
        (cg, lg, gg), (cw, lw, gw) = runs["gc"], runs["whole"]
        assert cg == cw and all(c > 0 for step in cw for c in step), (rank, shared, cg, cw)
        for u, v in zip(lg, lw):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
        for step_g, step_w in zip(gg, gw):       # the towers' grads accumulate over steps
            for u, v in zip(step_g, step_w):
                torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)
        # the first step equals one process on the global batch
        ua = copy.deepcopy(a)
        ub = ua if shared else copy.deepcopy(b)
        sr = copy.deepcopy(s)
        X, Y = batches[0]
        ck.info_nce(F.normalize(ua(X), dim=-1), F.normalize(ub(Y), dim=-1),
                    logit_scale=sr.exp(), symmetric=True).backward()
        for u, v in zip(gg[0], [p.grad for p in params(ua, ub, sr)]):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)



@pytest.mark.cpu_only
def test_ddp_syncs_once_and_matches(tmp_path):
    spawn(2, tmp_path, _ddp_cases)


# ----------------------------------------------------------------------------- example

@pytest.mark.cpu_only
@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_example_smoke(loss):
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_clip.py"), "--loss", loss,
           "--batch", "512", "--chunk", "128", "--steps", "3", "--naive-steps", "2",
           "--memory-budget", "0.004", "--print-every", "1"]
    if loss == "siglip":
        cmd[cmd.index("--naive-steps") + 1] = "0"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    name = "FusedInfoNCE" if loss == "infonce" else "FusedSigLIPLoss"
    assert f"ck.GradCache + ck.{name}, batch 512, chunk 128, 3 steps" in text
    steps = re.findall(r"fused step +(\d+) +loss ([-\d.e+]+|nan|inf) +([\d.]+) s", text)
    assert [int(s) for s, _, _ in steps] == [1, 2, 3], text
    assert all(math.isfinite(float(v)) for _, v, _ in steps)
    assert re.search(r"naive at batch 512 would need ~[\d.]+ GiB \(budget 0.004 GiB\)", text)
    assert re.search(r"fused +batch +512 +loss [\d.]+ -> [\d.]+ +[\d.]+ s/step +peak RSS", text)
    if loss == "infonce":
        assert "naive: largest batch in the budget 192" in text
        assert re.search(r"naive +batch +192 +loss [\d.]+ -> [\d.]+ +[\d.]+ s/step", text)
    assert re.search(r"fused loss (decreased|did not decrease): ", text)
