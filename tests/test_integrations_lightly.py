"""integrations.lightly.NTXentLoss against the installed lightly's NTXentLoss.

lightly is loaded by tests/compat.py (lightly_ntxent) without its package __init__,
which needs torchvision. Each comparison runs both losses on the same fresh random
inputs (odd batch sizes) in the same dtype: float32 within TOL32, float64 within TOL64
(relative to the largest reference value; the loss with a floor of 1), float16 against
lightly in float64 within HALF_TOL. With a memory bank both start from lightly's bank and
run several consecutive calls, so that the FIFO wraps; the banks and pointers must then
be equal. gather_distributed runs on 2, 3 and 4 gloo processes (one spawn per world
size, with a timeout), against lightly's gather_distributed=True on every rank.
"""
import sys

import pytest
import torch
import torch.distributed as dist

import compat
from dispatch import SeeThrough
from test_distributed import spawn

from contrastive_kernels.integrations import lightly as ours

Lightly = compat.lightly_ntxent()
pytestmark = pytest.mark.skipif(Lightly is None, reason="lightly is not installed")

TOL32 = dict(loss=1e-5, grad=1e-4)
TOL64 = dict(loss=1e-10, grad=1e-9)
HALF_TOL = dict(loss=2e-3, grad=1e-2)
TOL = {torch.float32: TOL32, torch.float64: TOL64}
D = 8


def run(loss, a, b, grad=True, no_grad=False):
    """(value, d out0, d out1) of one call on fresh leaves (that require a gradient if
    grad); no_grad: the call under torch.no_grad(), no backward."""
    x = a.detach().clone().requires_grad_(grad)
    y = b.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(not no_grad):
        v = loss(x, y)
    if grad and not no_grad:
        v.backward()
    return v.detach(), x.grad, y.grad


def check(got, want, tol, where=""):
    compat.check_against(got, want, tol, where, names=("out0", "out1"))


def same_bank(mine, theirs, where=""):
    assert torch.equal(mine.memory_bank.bank_ptr, theirs.memory_bank.bank_ptr), where
    assert compat.rel(mine.memory_bank.bank, theirs.memory_bank.bank) <= 1e-6, where


def copy_bank(mine, theirs):
    with torch.no_grad():
        mine.memory_bank.bank.copy_(theirs.memory_bank.bank)
        mine.memory_bank.bank_ptr.copy_(theirs.memory_bank.bank_ptr)


def randn(gen, *shape, dtype=torch.float64):
    return (2 * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("b,t,dtype", [(7, 0.5, torch.float32), (13, 0.1, torch.float32),
                                       (9, 0.2, torch.float64), (1, 0.5, torch.float32)])
def test_without_bank(b, t, dtype):
    gen = torch.Generator().manual_seed(b)
    for _ in range(2):
        a, c = randn(gen, b, D, dtype=dtype), randn(gen, b, D, dtype=dtype)
        want = run(Lightly(temperature=t), a, c)
        got = run(ours.NTXentLoss(temperature=t), a, c)
        assert got[0].dtype == want[0].dtype
        check(got, want, TOL[dtype])


def test_half_precision():
    gen = torch.Generator().manual_seed(1)
    a, c = randn(gen, 11, D).half(), randn(gen, 11, D).half()
    want = run(Lightly(temperature=0.2), a.double(), c.double())
    got = run(ours.NTXentLoss(temperature=0.2), a, c)
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float16
    check(got, want, HALF_TOL)


@pytest.mark.parametrize("b,k,dtype", [(7, 20, torch.float32), (5, 13, torch.float64),
                                       (9, 4, torch.float32)])
def test_memory_bank(b, k, dtype):
    """Six training calls (the FIFO fills, wraps and drops the overflow), then a call on
    inputs that need no gradient and one under torch.no_grad() (neither updates the
    bank), and one more training call."""
    gen = torch.Generator().manual_seed(k)
    theirs = Lightly(temperature=0.3, memory_bank_size=(k, D)).to(dtype)
    mine = ours.NTXentLoss(temperature=0.3, memory_bank_size=(k, D)).to(dtype)
    copy_bank(mine, theirs)
    for step in range(9):
        a, c = randn(gen, b, D, dtype=dtype), randn(gen, b, D, dtype=dtype)
        kw = dict(grad=step != 6, no_grad=step == 7)
        want, got = run(theirs, a, c, **kw), run(mine, a, c, **kw)
        check(got, want, TOL[dtype], f"step {step}")
        same_bank(mine, theirs, f"step {step}")


@pytest.mark.parametrize("size", [0, (0, D), (0, 3)])
def test_disabled_bank(size):
    gen = torch.Generator().manual_seed(3)
    a, c = randn(gen, 5, D, dtype=torch.float32), randn(gen, 5, D, dtype=torch.float32)
    check(run(ours.NTXentLoss(memory_bank_size=size), a, c),
          run(Lightly(memory_bank_size=size), a, c), TOL32)


class MaxSize(SeeThrough):
    """The largest tensor any op makes (inside the package's ops too)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def handle(self, func, args, kwargs):
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("size", [0, (200, 4)])
def test_never_builds_logits(size, monkeypatch):
    """No op makes a tensor larger than an input (the bank, or the 2B x D stacked
    views): the logits would be 2B x 2B = 1764, or B x K = 4200. (auto's small-problem
    path materializes by design, up to dense.DENSE_MAX logits: switched off here.)"""
    from contrastive_kernels import dense
    monkeypatch.setattr(dense, "DENSE_MAX", 0)
    gen = torch.Generator().manual_seed(0)
    a, c = randn(gen, 21, 4, dtype=torch.float32), randn(gen, 21, 4, dtype=torch.float32)
    loss = ours.NTXentLoss(memory_bank_size=size)
    with MaxSize() as sizes:
        run(loss, a, c)
    assert 0 < sizes.largest <= (42 * 4 if size == 0 else 200 * 4), sizes.largest


def test_errors():
    for size in (5, (-1, D), (3,), (3, 4, 5)):
        with pytest.raises(ValueError):
            Lightly(memory_bank_size=size)
        with pytest.raises(ValueError, match="memory_bank_size"):
            ours.NTXentLoss(memory_bank_size=size)
    with pytest.raises(ValueError, match="temperature"):
        ours.NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ours.NTXentLoss(temperature=-0.5)
    with pytest.raises(ValueError, match="gather_distributed"):
        ours.NTXentLoss(gather_distributed="yes")


def test_loader_leaves_no_stand_ins():
    """compat.lightly_ntxent removed its bare packages and torchvision stand-in."""
    tv = sys.modules.get("torchvision")
    assert tv is None or not hasattr(getattr(tv, "ops", None), "StochasticDepth") or (
        tv.ops.StochasticDepth is not compat._StochasticDepth)
    lt = sys.modules.get("lightly")
    assert lt is None or getattr(lt, "__file__", None)


# ----------------------------------------------------------------------------- gloo

def _cases(world, rank):
    b = 5       # per rank (lightly's all_gather needs equal shards)
    mine = slice(rank * b, (rank + 1) * b)
    gen = torch.Generator().manual_seed(world)      # the same inputs on every rank
    for dtype, t, gather in ((torch.float64, 0.5, True), (torch.float32, 0.1, True),
                             (torch.float32, 0.5, False)):
        a, c = randn(gen, world * b, D, dtype=dtype), randn(gen, world * b, D, dtype=dtype)
        want = run(Lightly(temperature=t, gather_distributed=gather), a[mine], c[mine])
        got = run(ours.NTXentLoss(temperature=t, gather_distributed=gather), a[mine], c[mine])
        check(got, want, TOL[dtype], f"rank {rank} {dtype} t={t} gather={gather}")
    # memory bank: the loss stays local; with gather_distributed every rank enqueues all
    # ranks' out1 (world * b rows per call: the FIFO wraps within 4 calls)
    for gather, steps in ((True, 4), (False, 2)):
        theirs = Lightly(temperature=0.3, memory_bank_size=(23, D), gather_distributed=gather)
        loss = ours.NTXentLoss(temperature=0.3, memory_bank_size=(23, D),
                               gather_distributed=gather)
        theirs.memory_bank.bank.copy_(torch.nn.functional.normalize(
            randn(gen, 23, D, dtype=torch.float32), dim=1))   # the same bank on every rank
        copy_bank(loss, theirs)
        for step in range(steps):
            a = randn(gen, world * b, D, dtype=torch.float32)
            c = randn(gen, world * b, D, dtype=torch.float32)
            where = f"rank {rank} bank gather={gather} step {step}"
            check(run(loss, a[mine], c[mine]), run(theirs, a[mine], c[mine]), TOL32, where)
            same_bank(loss, theirs, where)



@pytest.mark.cpu_only
@pytest.mark.parametrize("world", [2, 3, 4])
def test_gather_distributed(world, tmp_path):
    spawn(world, tmp_path, _cases)
