"""Declared capabilities and per-call dispatch, and the kernel options as arguments."""
import subprocess
import sys

import pytest
import torch

import contrastive_kernels as ck
from conftest import DEVICE
from contrastive_kernels import backends, make_options
from contrastive_kernels.backends.base import Backend, Call, Registry


class Fake(Backend):
    def __init__(self, name, dtypes, features=(), available=True):
        self.name, self.dtypes, self.features = name, dtypes, frozenset(features)
        self.device_types = ("cpu",)
        self.available_ = available

    def unavailable_reason(self, device):
        return None if self.available_ else "not built"


CALL = Call(torch.device("cpu"), torch.float64, 8, 8, 4)


def _registry():
    fast = Fake("fast", (torch.float32,))
    low = Fake("low", (torch.float32, torch.float64), features=("low_memory",))
    slow = Fake("slow", (torch.float32, torch.float64))
    return Registry([fast, low, slow], order={"cpu": ("fast", "low", "slow")},
                    default_order=("slow",), fallback="slow")


def test_auto_skips_a_backend_that_cannot_serve_the_call():
    reg = _registry()
    f32 = Call(torch.device("cpu"), torch.float32, 8, 8, 4)
    assert reg.select("auto", f32, make_options()).name == "fast"
    assert reg.select("auto", CALL, make_options()).name == "low"          # no float64 in fast
    assert reg.select("auto", f32, make_options(low_memory=True)).name == "low"
    reg.by_name["low"].available_ = False
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert reg.select("auto", CALL, make_options()).name == "slow"


def test_explicit_backend_lists_its_reasons():
    reg = _registry()
    with pytest.raises(ValueError, match=r"backend 'fast' cannot run this call on cpu .*"
                                         r"does not support float64.*Available for this call: "
                                         r"\['low', 'slow'\]"):
        reg.select("fast", CALL, make_options())
    with pytest.raises(ValueError, match=r"'slow' cannot .*does not support low_memory=True"):
        reg.select("slow", CALL, make_options(low_memory=True))


def test_no_backend_fits_lists_every_reason():
    reg = _registry()
    with pytest.raises(ValueError, match=r"no backend can run this call.*'fast': does not "
                                         r"support float64.*'low': does not have the blocked "
                                         r"algorithm.*'slow': does not have the blocked"):
        reg.select("auto", CALL, make_options(algorithm="blocked"))


def test_minimum_compute_capability_is_declared(monkeypatch):
    from contrastive_kernels.backends import base
    old = Fake("old", (torch.bfloat16, torch.float32))
    old.device_types, old.min_capability = ("cuda",), {torch.bfloat16: (8, 0)}
    reg = Registry([old, Fake("slow", (torch.bfloat16,))], order={"cuda": ("old", "slow")},
                   default_order=("slow",), fallback="slow")
    reg.by_name["slow"].device_types = ("cuda",)
    bf16 = Call(torch.device("cuda", 0), torch.bfloat16, 8, 8, 4)
    monkeypatch.setattr(base, "capability", lambda device: (7, 5))
    assert reg.explain(bf16, make_options())["old"] == [
        "bfloat16 needs compute capability 8.0 or newer"]
    f32 = Call(bf16.device, torch.float32, 8, 8, 4)
    assert reg.explain(f32, make_options())["old"] == []
    with pytest.warns(RuntimeWarning, match="needs compute capability 8.0"):
        assert reg.select("auto", bf16, make_options()).name == "slow"
    monkeypatch.setattr(base, "capability", lambda device: (9, 0))
    assert reg.select("auto", bf16, make_options()).name == "old"
    # the real GPU backends declare it
    assert backends.get("cuda").min_capability[torch.bfloat16] == (8, 0)
    assert backends.get("triton").min_capability[torch.bfloat16] == (8, 0)


def test_a_backend_declared_to_lag_is_skipped_on_gpus_and_refuses():
    """Backend.lags: auto skips the backend for that loss on CUDA tensors and naming it
    raises the declared reason; other losses, CPU tensors (the CUDA emulator) and
    `measuring` are not refused. The real declaration: cuda's sigmoid loss."""
    from contrastive_kernels.backends import cuda
    from contrastive_kernels.backends.base import measuring

    class Built(cuda.CudaBackend):          # the real declarations, built
        def unavailable_reason(self, device):
            return None

    lagging = Built()
    fast = Fake("triton", (torch.float32,), features=("siglip",))
    fast.device_types = ("cuda",)
    reg = Registry([lagging, fast], order={"cuda": ("cuda", "triton")},
                   default_order=("triton",), fallback="torch")
    gpu = torch.device("cuda", 0)
    sig = Call(gpu, torch.float32, 8, 8, 4, loss="siglip")
    reason = cuda.CudaBackend.lags["siglip"]
    assert "lags triton" in reason and "bench_gpu" in reason
    assert reg.explain(sig, make_options())["cuda"] == [reason]
    assert reg.select("auto", sig, make_options()).name == "triton"
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot run this call on cuda:0 "
                                         r"\(siglip, .*\): lags triton on GPUs.*Available "
                                         r"for this call: \['triton'\]"):
        reg.select("cuda", sig, make_options())
    # InfoNCE on the same backend, and the sigmoid loss on CPU tensors, are served
    assert reg.select("cuda", Call(gpu, torch.float32, 8, 8, 4), make_options()) is lagging
    emulated = Built()
    emulated.device_types = ("cpu",)
    assert emulated.reasons(Call(torch.device("cpu"), torch.float32, 8, 8, 4, loss="siglip"),
                            make_options()) == []
    with measuring(lagging):
        assert reg.select("cuda", sig, make_options()) is lagging
    assert reg.explain(sig, make_options())["cuda"] == [reason]      # restored
    # the suite lifts the real backends' declarations (conftest) to check their numbers
    assert backends.get("cuda").lags == {}


def test_real_backends_declare_and_refuse():
    dev = torch.device(DEVICE)
    q = torch.randn(6, 4, device=dev)
    call = Call(dev, torch.float32, 6, 6, 4)
    table = backends.REGISTRY.explain(call, make_options(low_memory=True))
    # only Triton declares the low-memory backward
    assert all(r for n, r in table.items() if n != "triton"), table
    for name in ("torch", "cpu") if DEVICE == "cpu" else ("torch", "cuda"):
        with pytest.raises(ValueError, match=f"backend '{name}' cannot run this call.*"
                                             f"low_memory=True"):
            ck.info_nce(q, q, backend=name, low_memory=True)
    with pytest.raises(ValueError, match="does not have the blocked algorithm"):
        ck.info_nce(q, q, backend="torch", algorithm="blocked")


def test_options_reach_the_backend(monkeypatch):
    be = backends.get("torch")
    seen, real = [], be.lse_forward

    def spy(*a, **kw):
        seen.append(kw["options"])
        return real(*a, **kw)

    monkeypatch.setattr(be, "lse_forward", spy)
    q = torch.randn(6, 4, device=DEVICE)
    ck.info_nce(q, q, backend="torch", deterministic=True, precision="tf32")
    ck.FusedInfoNCE(backend="torch", deterministic=False)(q, q)
    assert seen[0].deterministic and seen[0].precision == "tf32"
    assert not seen[1].deterministic and seen[1].precision == "ieee"


def test_bad_options_are_named():
    q = torch.randn(6, 4, device=DEVICE)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['fast'\]; the "
                                        r"kernel options are"):
        ck.info_nce(q, q, fast=True)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        ck.info_nce(q, q, deterministic=1)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        ck.info_nce(q, q, algorithm="tiled")
    with pytest.raises(ValueError, match="workspace must be >= 0"):
        ck.info_nce(q, q, workspace=-1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ck.FusedInfoNCE(lowmem=True)


def test_torch_deterministic_mode_implies_deterministic():
    assert not make_options().deterministic
    torch.use_deterministic_algorithms(True)
    try:
        assert make_options(deterministic=False).deterministic
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cpu_only
def test_environment_supplies_defaults_only():
    code = ("import contrastive_kernels as ck; o = ck.make_options(); "
            "p = ck.make_options(deterministic=False, precision='ieee'); "
            "print(o.deterministic, o.precision, p.deterministic, p.precision)")
    env = {"CK_DETERMINISTIC": "1", "CK_PRECISION": "tf32"}
    import os
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "tf32", "False", "ieee"]


def _lacking(feature):
    return [n for n in ck.available_backends(DEVICE) if feature not in backends.get(n).features]


@pytest.mark.parametrize("env", [dict(low_memory=True), dict(algorithm="blocked"),
                                 dict(algorithm="epilogue")], ids=str)
def test_environment_preferences_are_left_out_where_a_call_cannot_take_them(env, monkeypatch):
    """CK_LOW_MEMORY=1 / CK_ALGORITHM=blocked are job-wide preferences: a loss, variant or
    backend that cannot take them runs without them (the reference's numbers); passed as
    arguments they still raise."""
    from contrastive_kernels import options
    name = next(iter(env))
    monkeypatch.setitem(options.ENV_DEFAULTS, name, env[name])
    assert getattr(make_options(), name) == env[name]          # the environment is read
    feature = "low_memory" if name == "low_memory" else "blocked"
    g = torch.Generator().manual_seed(5)
    q = torch.randn(13, 6, generator=g, dtype=torch.float64).to(DEVICE)
    k = torch.randn(17, 6, generator=g, dtype=torch.float64).to(DEVICE)
    t = (torch.randn(13, 3, generator=g).to(DEVICE), torch.randn(17, 3, generator=g).to(DEVICE))
    seen = []
    for be in _lacking(feature):
        real = backends.get(be).lse_forward
        monkeypatch.setattr(backends.get(be), "lse_forward",
                            lambda *a, _r=real, **kw: seen.append(kw["options"]) or _r(*a, **kw))
    calls = {
        "siglip": (lambda **kw: ck.siglip_loss(q, k, **kw), ck.reference.siglip_loss),
        "margin": (lambda **kw: ck.info_nce(q, k, margin=0.2, **kw),
                   lambda a, b: ck.reference.info_nce(a, b, margin=0.2)),
        "teacher": (lambda **kw: ck.info_nce(q, k, teacher=t, **kw),
                    lambda a, b: ck.reference.info_nce(a, b, teacher=t)),
        "info_nce": (lambda **kw: ck.info_nce(q, k, symmetric=True, **kw),
                     lambda a, b: ck.reference.info_nce(a, b, symmetric=True)),
    }
    for what, (fused, ref) in calls.items():
        want = ref(q, k)
        for be in _lacking(feature) + ["auto"]:
            if what == "info_nce" and be == "auto":
                continue        # a backend that has the feature may take it (Triton)
            if what == "teacher" and "teacher" not in backends.get(be if be != "auto" else
                                                                   "torch").features:
                continue
            got = fused(backend=be)
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (what, be, got, want)
    assert seen and all(getattr(o, name) == getattr(options.DEFAULTS, name) for o in seen)
    # passed as an argument, the same option is a requirement
    be = _lacking(feature)[0]
    with pytest.raises(ValueError, match=f"'{be}' cannot run this call"):
        ck.info_nce(q, k, backend=be, **env)
    if name == "low_memory":
        with pytest.raises(ValueError, match="low_memory=True is an info_nce option"):
            ck.siglip_loss(q, k, low_memory=True)
    with pytest.raises(ValueError, match="margin does not support"):
        ck.info_nce(q, k, margin=0.2, **env)


def test_the_package_reads_no_test_switch():
    # Poisoning is the test suite's dispatch mode (tests/dispatch.py): no production path
    # reads an environment variable or global for it.
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    for path in list((root / "contrastive_kernels").rglob("*.py")) + \
            list((root / "csrc").rglob("*.cpp")) + list((root / "csrc").rglob("*.cu")):
        text = path.read_text()
        assert "CK_POISON" not in text and "getenv" not in text, path


def test_an_unwritten_entry_shows_up(monkeypatch, poison):
    # The poisoning the suite relies on: a backend that forgets to write one row of its
    # output gives a NaN loss there (without the dispatch mode it could be any value).
    be = backends.get("torch")
    real = be.lse_forward

    def forgets_row_0(q, k, scale, self_mask, cols, options):
        lse_r, lse_c = real(q, k, scale, self_mask, cols, options=options)
        out = torch.empty_like(lse_r)
        out[1:] = lse_r[1:]
        return out, lse_c

    monkeypatch.setattr(be, "lse_forward", forgets_row_0)
    q = torch.randn(6, 4, device=DEVICE)
    loss = ck.info_nce(q, q.flip(0), backend="torch", reduction="none")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()
    assert poison.filled > 0


@pytest.mark.skipif(not ck.extension.loaded() or DEVICE != "cpu", reason="C++ CPU ops")
def test_c_ops_run_with_poison_under_the_suite(poison):
    q = torch.randn(6, 4)
    before = poison.c_calls
    loss = ck.info_nce(q, q.flip(0), backend="cpu")
    assert torch.isfinite(loss) and poison.c_calls > before
