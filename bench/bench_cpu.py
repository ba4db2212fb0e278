"""pytest-benchmark version of the CPU comparison (time only; memory: see README.md).

    python -m pytest bench/bench_cpu.py --benchmark-only
    python bench/bench_cpu.py               # the same

Symmetric CLIP loss, forward + backward, fp32, D = 256, N in {2048, 4096}:
gemm (one N x N x D matmul), the naive materialized loss, and each CPU backend,
grouped by N. After the run, one line per case gives t / (4 t_gemm) and
t / t_naive (also stored in extra_info, which --benchmark-json writes out).
Not part of `pytest tests`.
"""
import pytest
import torch

import contrastive_kernels as ck
from harness import SCALE, naive_loss
from sweep import cpu_backends

D = 256
SIZES = (2048, 4096)
# gemm and naive first: the ratios of the later cases use their medians
METHODS = ["gemm", "naive"] + cpu_backends()
ROUNDS = 3


def _inputs(n):
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    return q.requires_grad_(), k.requires_grad_()


def _step(method, n):
    if method == "gemm":
        out = torch.empty(n, n)

        def step(q, k):
            with torch.no_grad():
                torch.mm(q, k.T, out=out)
    elif method == "naive":
        def step(q, k):
            naive_loss(q, k).backward()
    else:
        def step(q, k):
            ck.info_nce(q, k, logit_scale=SCALE, symmetric=True, backend=method).backward()

    def run(q, k):
        q.grad = k.grad = None
        step(q, k)
    return run


@pytest.fixture(scope="module")
def medians(request):
    """(n, method) -> median seconds; prints the ratios when the module is done."""
    found = {}
    yield found
    plugins = request.config.pluginmanager
    tr, capman = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if tr is None or capman is None or not found:
        return
    with capman.global_and_fixture_disabled():  # teardown output is captured otherwise
        tr.write_line("")
        tr.write_line(f"symmetric CLIP loss fwd+bwd, fp32, D={D}: median, t/(4 t_gemm), t/t_naive")
        for (n, m), t in sorted(found.items()):
            gemm, naive = found.get((n, "gemm")), found.get((n, "naive"))
            r_floor = f"{t / (4 * gemm):6.2f}" if gemm else "     -"
            r_naive = f"{t / naive:6.2f}" if naive else "     -"
            tr.write_line(f"  N={n:5d} {m:6s} {t:8.4f} s {r_floor} {r_naive}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", SIZES)
def test_clip_loss(benchmark, medians, n, method):
    benchmark.group = f"N={n} D={D}"
    q, k = _inputs(n)
    run = _step(method, n)
    run(q, k)  # warm-up
    benchmark.pedantic(run, args=(q, k), rounds=ROUNDS, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    t = benchmark.stats.stats.median
    medians[(n, method)] = t
    gemm, naive = medians.get((n, "gemm")), medians.get((n, "naive"))
    if gemm:
        benchmark.extra_info["t_over_4gemm"] = t / (4 * gemm)
    if naive:
        benchmark.extra_info["t_over_naive"] = t / naive


if __name__ == "__main__":
    import sys
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
