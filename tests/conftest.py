"""Shared test settings.

CK_TEST_DEVICE=cuda runs the suite on CUDA tensors (bench/gpu_check.sh does).
Without a GPU, the Triton interpreter is switched on so the Triton backend is
tested on CPU tensors; it must be set before triton is imported.
CK_TEST_SHARD=i/n keeps every n-th run of consecutive tests from the i-th on (a module
whose tests share an expensive module fixture stays whole), so that n processes share a
run with the heavy tests spread among them (bench/gpu_check.sh: Triton compiles in
parallel).
Tests marked `cpu_only` (CPU memory, builds, compile checks, the gloo ring, CPU bench
smoke tests, sharding, op counts: CI runs them) are skipped under CK_TEST_DEVICE=cuda.
CK_TEST_CUDA_EMU=1 adds the "cuda" backend on CPU tensors, its kernels run under the
emulator of tests/cuda_emu.py, to every test that takes the available backends.
Every test runs under the poisoning dispatch mode of tests/dispatch.py unless marked
`no_poison`.
"""
import os
import zlib

DEVICE = os.environ.get("CK_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# CK_TEST_CUDA_EMU=1: the "cuda" backend's kernels also run on CPU tensors, under the
# emulator (tests/cuda_emu.py), in every test that takes the available backends.
if DEVICE == "cpu" and os.environ.get("CK_TEST_CUDA_EMU") == "1":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cuda_emu  # noqa: E402
    from contrastive_kernels import backends as _backends  # noqa: E402
    _why = cuda_emu.build()
    if _why:
        raise pytest.UsageError(f"CK_TEST_CUDA_EMU=1: {_why}")
    cuda_emu.install(_backends.REGISTRY)

# A backend declared to lag on GPUs for a loss (Backend.lags) still has its numbers
# checked: the suite lifts the declarations (the classes keep them; test_dispatch.py
# checks their effect).
from contrastive_kernels import backends as _registry  # noqa: E402
for _b in _registry.REGISTRY.by_name.values():
    _b.lags = types.MappingProxyType({})

# The benchmark harness (bench/sweep.py, bench/harness.py) lives outside the package.
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
if BENCH not in sys.path:
    sys.path.append(BENCH)


# Modules whose tests share one expensive module-scoped fixture: dealt as one.
TOGETHER = ("test_triton_aot.py",)


def shard_index(shard):
    """(i, n) of CK_TEST_SHARD "i/n"."""
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise pytest.UsageError(f"CK_TEST_SHARD must look like 'i/n', got {shard!r}") from None
    if not 0 <= i < n:
        raise pytest.UsageError(f"CK_TEST_SHARD {shard!r}: need 0 <= i < n")
    return i, n


def shard_items(items, i, n, chunks_per_shard=8):
    """The tests of shard i of n. The suite is cut into runs of consecutive tests (about
    chunks_per_shard per shard; neighbours share kernel variants, so a run compiles few)
    and a TOGETHER module whole; these groups are dealt in turn, which spreads the heavy
    parts of the suite over all shards."""
    size = max(1, -(-len(items) // (n * chunks_per_shard)))
    group, groups, together = [], [], {}
    for it in items:
        name = it.path.name
        if name in TOGETHER:
            if name not in together:
                together[name] = []
                groups.append(together[name])
            together[name].append(it)
            continue
        if len(group) == size:
            group = []
        if not group:
            groups.append(group)
        group.append(it)
    return [it for g in groups[i::n] for it in g]


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: a CPU-side check (memory, build, gloo); "
                                       "skipped under CK_TEST_DEVICE=cuda")
    config.addinivalue_line("markers", "no_poison: runs without the poisoning dispatch mode "
                                       "(torch.compile, op counts, memory tracking)")


@pytest.fixture(autouse=True)
def poison(request):
    """Every uninitialized floating allocation starts as NaN and the C++ ops poison their
    outputs (tests/dispatch.py), so an element a kernel fails to write fails the comparison."""
    if request.node.get_closest_marker("no_poison"):
        yield None
        return
    from dispatch import Poison
    with Poison() as mode:
        yield mode


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cuda":
        skip = pytest.mark.skip(reason="CPU-side check, run by CI; CK_TEST_DEVICE=cuda runs "
                                       "the tests of CUDA tensors")
        for it in items:
            if it.get_closest_marker("cpu_only"):
                it.add_marker(skip)
    shard = os.environ.get("CK_TEST_SHARD")
    if not shard:
        return
    keep = shard_items(items, *shard_index(shard))
    kept = set(map(id, keep))
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in kept])
    items[:] = keep


@pytest.fixture
def device():
    return torch.device(DEVICE)


# Tolerances against the float64 reference, relative to the largest reference value.
# Half types are compared with an fp32-accumulated reference on the same (rounded) inputs:
# the loss is accumulated in fp32, gradients are rounded once to the input dtype.
TOL = {
    torch.float64: dict(loss=1e-10, grad=1e-9),
    torch.float32: dict(loss=1e-5, grad=1e-4),
    torch.float16: dict(loss=1e-4, grad=4e-3),
    torch.bfloat16: dict(loss=1e-4, grad=3e-2),
}


# Inputs are random but reproducible; CK_TEST_SEED=<n> draws a different set.
SEED = int(os.environ.get("CK_TEST_SEED", "0"))


def seed_for(*parts):
    return (zlib.crc32(repr(parts).encode()) + SEED) % 2**31


def rel_err(actual, expected, floor=1e-30):
    """max |a - e| / max(max |e|, floor), computed in float64.

    Losses use floor=1: a loss is a difference of log-sum-exps of size |S|, so
    its rounding error scales with the logits, not with the (possibly tiny) loss.
    """
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), "non-finite values"
    return float((a - e).abs().max() / e.abs().max().clamp_min(floor)) if e.numel() else 0.0
