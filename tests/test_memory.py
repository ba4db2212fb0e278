"""The fused loss never holds an N x N matrix: peak memory of forward + backward.

CPU: each case runs in a fresh process (contrastive_kernels.bench.measure, the
harness of the benchmark) and reports its peak RSS minus the RSS after the
inputs were allocated. At N = 32768 one N x N fp32 matrix is 4 GiB; the fused
loss must stay below a quarter of that. The naive loss is run in the same
harness to show that it does see an N x N allocation.
"""
import os

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import bench

MiB = 1 << 20
CPU_BACKENDS = ck.available_backends("cpu")

# backend -> N for the symmetric CLIP loss at D = 128 (the torch backend takes
# ~20 s at N = 32768 on 2 cores, the cpu one less).
SIZES = {"cpu": 32768, "torch": 32768}
D = 128


def n_squared_bytes(n):
    return 4 * n * n


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
