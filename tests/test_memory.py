"""The fused loss never holds an N x N matrix: peak memory of forward + backward.

CPU: each case runs in a fresh process (bench/sweep.py's measure, the
harness of the benchmark) and reports its peak RSS minus the RSS after the
inputs were allocated. At N = 32768 one N x N fp32 matrix is 4 GiB; the fused
loss must stay below a quarter of that. The naive loss is run in the same
harness to show that it does see an N x N allocation.
"""
import os

import pytest
import torch

import contrastive_kernels as ck
import sweep as bench

MiB = 1 << 20
CPU_BACKENDS = ck.available_backends("cpu")

# backend -> N for the symmetric CLIP loss at D = 128 (the torch backend takes
# ~20 s at N = 32768 on 2 cores, the cpu one less).
SIZES = {"cpu": 32768, "torch": 32768}
D = 128


def n_squared_bytes(n):
    return 4 * n * n


@pytest.mark.cpu_only
@pytest.mark.parametrize("backend", sorted(SIZES))
def test_fused_peak_rss_far_below_n_squared(backend):
    if backend not in CPU_BACKENDS:
        pytest.skip(f"backend {backend!r} is not available on CPU")
    n = SIZES[backend]
    res = bench.measure(backend, n, D, repeats=1, timeout=600)
    assert res["status"] == "ok", res["note"]
    bound = n_squared_bytes(n) / 4  # 1 GiB at N = 32768
    above = res["above_inputs"]
    assert above < bound, (f"{backend}: peak RSS {above / MiB:.0f} MiB above the inputs at "
                           f"N={n}, D={D}; bound {bound / MiB:.0f} MiB")


@pytest.mark.cpu_only
@pytest.mark.parametrize("method", ["siglip-cpu", "siglip-cpu-4p", "siglip-torch"])
def test_siglip_peak_rss_far_below_n_squared(method):
    """The sigmoid loss, both pass schedules: forward + backward at N = 32768, D = 128."""
    backend = method.split("-")[1]
    if backend not in CPU_BACKENDS:
        pytest.skip(f"backend {backend!r} is not available on CPU")
    n = 32768
    res = bench.measure(method, n, D, repeats=1, timeout=600)
    assert res["status"] == "ok", res["note"]
    above = res["above_inputs"]
    assert above < n_squared_bytes(n) / 4, (f"{method}: peak RSS {above / MiB:.0f} MiB above "
                                            f"the inputs at N={n}, D={D}")


@pytest.mark.cpu_only
def test_naive_siglip_exceeds_n_squared_in_same_harness():
    n = 4096
    res = bench.measure("siglip-naive", n, D, repeats=1, timeout=300)
    assert res["status"] == "ok", res["note"]
    assert res["above_inputs"] > n_squared_bytes(n), res["above_inputs"] / MiB


@pytest.mark.cpu_only
def test_naive_loss_exceeds_n_squared_in_same_harness():
    # The harness must be able to fail: the materializing loss holds several N x N buffers.
    n = 4096
    res = bench.measure("naive", n, D, repeats=1, timeout=300)
    assert res["status"] == "ok", res["note"]
    assert res["above_inputs"] > n_squared_bytes(n), (
        f"naive: {res['above_inputs'] / MiB:.0f} MiB above inputs, expected more than "
        f"{n_squared_bytes(n) / MiB:.0f} MiB (one N x N fp32 matrix)")


@pytest.mark.skipif(os.environ.get("CK_TEST_DEVICE") != "cuda" or not torch.cuda.is_available(),
                    reason="CUDA memory check: run with CK_TEST_DEVICE=cuda on a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_fused_cuda_peak_memory_far_below_n_squared(backend):
    if backend not in ck.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available on CUDA")
    n, dev = 32768, torch.device("cuda")
    q = torch.nn.functional.normalize(torch.randn(n, D, device=dev), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(n, D, device=dev), dim=1).requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ck.info_nce(q, k, logit_scale=1 / 0.07, symmetric=True, backend=backend).backward()
    torch.cuda.synchronize()
    above = torch.cuda.max_memory_allocated() - base
    assert above < n_squared_bytes(n) / 4, f"{backend}: {above / MiB:.0f} MiB above inputs"


# What autograd keeps between forward and backward must be q, k and O(N + M)
# statistics: no N x D target vectors, no float32 copies of half inputs.
SAVED_CASES = {
    "clip": dict(symmetric=True),
    "smoothing": dict(symmetric=True, label_smoothing=0.1),
    "supcon": dict(labels="labels", symmetric=True),
    "ntxent": dict(self_contrast=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", sorted(SAVED_CASES))
@pytest.mark.parametrize("backend", ck.available_backends(os.environ.get("CK_TEST_DEVICE", "cpu")))
def test_saved_for_backward_is_inputs_plus_linear_statistics(backend, case, dtype):
    dev = os.environ.get("CK_TEST_DEVICE", "cpu")
    if dtype == torch.bfloat16 and backend == "triton" and dev == "cpu":
        pytest.skip("bf16 Triton runs on GPU only")
    n, d = 96, 40
    kw = dict(SAVED_CASES[case])
    q = torch.randn(n, d, device=dev).to(dtype).requires_grad_()
    k = None if kw.pop("self_contrast", False) else torch.randn(n, d, device=dev).to(dtype).requires_grad_()
    if kw.get("labels") == "labels":
        kw["labels"] = torch.arange(n, device=dev) % 7
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ck.info_nce(q, k, backend=backend, **kw)
    inputs = {x.untyped_storage().data_ptr() for x in (q, k) if x is not None}
    extra = sum(v for ptr, v in saved.items() if ptr not in inputs)
    assert extra <= 16 * 8 * n, (f"{backend}/{case}: {extra} bytes saved beyond q and k; one "
                                 f"input is {n * d * q.element_size()} bytes")
    loss.backward()   # still differentiable after the hooks
    assert torch.isfinite(q.grad).all()



# Peak of one whole step beyond the inputs, against what the backend must hold: its
# own (N + M) x D float32 gradient buffers plus its declared scratch. The target terms
# and the casts add only chunk-sized temporaries on top (CHUNK_ELEMS), so an O(N * D)
# temporary anywhere in the host code (a target-vector matrix, a float copy of an input,
# a second gradient for autograd to sum) breaks the bound. The worker is
# bench/peak_step.py (fresh process, fixed mmap threshold, VmHWM).
def _peak_step():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "peak_step.py")
    spec = importlib.util.spec_from_file_location("peak_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _backend_scratch(backend, n, d, threads):
    if backend == "cpu":       # one dk partial per extra thread (csrc/cpu/lse_cpu.cpp)
        return (threads - 1) * n * d * 4
    from contrastive_kernels.backends import torch_tiled
    return 3 * torch_tiled.TILE ** 2 * 4   # a tile of logits and two of dS


@pytest.mark.cpu_only
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("case", ["clip", "supcon", "smoothing", "ntxent", "frozen_keys"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_step_peak_is_gradient_buffers_plus_backend_scratch(backend, case):
    if backend not in CPU_BACKENDS:
        pytest.skip(f"backend {backend!r} is not available on CPU")
    n, d = 8192, 512
    res = _peak_step().measure(backend, case, n, d)
    if case == "frozen_keys":         # dq alone: no dk buffer, no dk partials
        buffers, scratch = n * d * 4, _backend_scratch(backend, n, d, 1)
    else:                             # the backend's dq and dk (float32)
        buffers, scratch = 2 * n * d * 4, _backend_scratch(backend, n, d, res["threads"])
    bound = buffers + scratch + 12 * MiB
    assert res["above"] <= bound, (
        f"{backend}/{case}: peak {res['above'] / MiB:.0f} MiB above the inputs; bound "
        f"{bound / MiB:.0f} MiB ({buffers / MiB:.0f} MiB gradient buffers, one input is "
        f"{n * d * 4 / MiB:.0f} MiB)")
