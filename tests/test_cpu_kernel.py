"""The fused C++ CPU kernel (csrc/cpu/), called directly through torch.ops, against
float64 math (the torch_tiled backend on float64 inputs)."""
import pytest
import torch

from contrastive_kernels import extension, backends, make_options

pytestmark = pytest.mark.skipif(not extension.has_kernel("lse_forward", "CPU"),
                                reason="C++ CPU kernel not built")

TILE = 256  # kRows = kCols in csrc/cpu/lse_cpu.cpp


def ops():
    return torch.ops.contrastive_kernels


def run(q, k, scale, self_mask, cols, g_r, g_c, col_lse=None):
    """Kernel forward + backward; col_lse: pass lse_c to backward even without g_c."""
    lr, lc = ops().lse_forward(q, k, scale, self_mask, cols)
    e = lr.new_empty(0)
    lc_b = lc if (g_c is not None or col_lse) else e
    dq, dk = ops().lse_backward(q, k, scale, self_mask, lr, lc_b, g_r, e if g_c is None else g_c)
    return lr, lc, dq, dk


def expected(q, k, scale, self_mask, cols, g_r, g_c):
    qd, kd = q.double(), k.double()
    tt, opts = backends.get("torch"), make_options()
    s = torch.tensor(scale, dtype=torch.float64)
    lr, lc = tt.lse_forward(qd, kd, s, self_mask, cols, opts)
    dq, dk = tt.lse_backward(qd, kd, s, self_mask, lr, lc if g_c is not None else None,
                             g_r.double(), None if g_c is None else g_c.double(), True, True, opts)
    return lr, lc, dq, dk


def close(a, e, tol):
    a, e = a.double(), e.double()
    assert a.shape == e.shape
    fin = torch.isfinite(e)
    assert torch.equal(fin, torch.isfinite(a)), "non-finite entries differ"
    assert torch.equal(a[~fin], e[~fin])
    if fin.any():
        err = (a[fin] - e[fin]).abs().max() / e[fin].abs().max().clamp_min(1e-30)
        assert err < tol, float(err)


def case(n, m, d, self_mask, cols, col_grad, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=dtype)
    k = q if self_mask else torch.randn(m, d, generator=g, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g_r = torch.randn(n, generator=g, dtype=acc)
    g_c = torch.randn(k.shape[0], generator=g, dtype=acc) if (cols and col_grad) else None
    return q, k, g_r, g_c


SHAPES = [(1, 1), (3, 17), (17, 3), (257, 1), (1, 257), (TILE - 1, TILE + 1), (TILE + 1, TILE - 1),
          (2 * TILE + 3, 3 * TILE - 5)]


@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("self_mask,cols,col_grad", [(False, False, False), (False, True, True),
                                                      (False, True, False), (True, True, True),
                                                      (True, False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64(n, m, self_mask, cols, col_grad, dtype):
    if self_mask:
        m = n
    q, k, g_r, g_c = case(n, m, 19, self_mask, cols, col_grad, dtype)
    got = run(q, k, 1.7, self_mask, cols, g_r, g_c, col_lse=cols)
    want = expected(q, k, 1.7, self_mask, cols, g_r, g_c)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for a in got:
        assert a.dtype == acc
    close(got[0], want[0], tol)
    if cols:
        close(got[1], want[1], tol)
    else:
        assert got[1].numel() == 0
    close(got[2], want[2], 10 * tol)
    close(got[3], want[3], 10 * tol)


def test_empty_row_self_mask():
    """N = M = 1 under self-contrast: lse = -inf, zero (not NaN) gradients."""
    q = torch.randn(1, 4)
    lr, lc, dq, dk = run(q, q, 2.0, True, True, torch.ones(1), torch.ones(1))
    assert lr.item() == float("-inf") and lc.item() == float("-inf")
    assert torch.equal(dq, torch.zeros(1, 4)) and torch.equal(dk, torch.zeros(1, 4))


def test_large_logits_negative_scale():
    """Large and negative scales: no overflow, the shift is per row/column."""
    q, k, g_r, g_c = case(300, 290, 8, False, True, True)
    for scale in (60.0, -45.0):
        got = run(q, k, scale, False, True, g_r, g_c)
        want = expected(q, k, scale, False, True, g_r, g_c)
        for a, e in zip(got, want):
            close(a, e, 1e-4)


def test_threads_agree():
    q, k, g_r, g_c = case(3 * TILE + 11, 2 * TILE + 7, 33, False, True, True)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(q, k, 3.0, False, True, g_r, g_c)
        torch.set_num_threads(2)
        two = run(q, k, 3.0, False, True, g_r, g_c)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        close(b, a, 1e-6)


def test_non_contiguous():
    q, k, g_r, g_c = case(300, 270, 24, False, True, True)
    qs = torch.empty(24, 300).T.copy_(q)  # column-major
    kb = torch.randn(270, 48)
    kb[:, ::2] = k  # strided columns
    ks = kb[:, ::2]
    assert not qs.is_contiguous() and not ks.is_contiguous()
    got = run(qs, ks, 2.0, False, True, g_r, g_c)
    want = run(q, k, 2.0, False, True, g_r, g_c)
    for a, b in zip(got, want):
        close(a, b, 1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-5), (torch.bfloat16, 1e-5)])
def test_half_types(dtype, tol):
    """Half inputs are upcast exactly, so they match fp32 on the same (rounded) values."""
    q, k, g_r, g_c = case(TILE + 5, 300, 40, False, True, True, dtype=dtype)
    got = run(q, k, 2.5, False, True, g_r, g_c)
    want = run(q.float(), k.float(), 2.5, False, True, g_r, g_c)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        close(a, b, tol)
    # and self-contrast
    got = run(q, q, 2.5, True, False, g_r, None)
    want = run(q.float(), q.float(), 2.5, True, False, g_r, None)
    for a, b in zip(got, want):
        close(a, b, tol)


def test_outputs_fully_written():
    """Results do not depend on memory left by earlier calls (the caching allocator
    hands back freed blocks): fill memory with NaN-heavy junk, recompute, compare."""
    q, k, g_r, g_c = case(TILE + 9, 2 * TILE + 1, 16, False, True, True)
    first = run(q, k, 2.0, False, True, g_r, g_c)
    for _ in range(3):
        junk = [torch.full((s,), float("nan")) for s in (TILE * TILE, 600 * 16, 600)]
        del junk
        again = run(q, k, 2.0, False, True, g_r, g_c)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_bad_arguments():
    q, k = torch.randn(4, 3), torch.randn(5, 3)
    lr, lc = ops().lse_forward(q, k, 1.0, False, True)
    e = torch.empty(0)
    with pytest.raises(RuntimeError, match="g_r"):
        ops().lse_backward(q, k, 1.0, False, lr, lc, torch.ones(5), e)
    with pytest.raises(RuntimeError, match="lse_c"):
        ops().lse_backward(q, k, 1.0, False, lr, e, torch.ones(4), torch.ones(5))
    with pytest.raises(RuntimeError, match="embedding dim"):
        ops().lse_forward(q, torch.randn(5, 4), 1.0, False, True)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops().lse_forward(q, k.double(), 1.0, False, True)
    with pytest.raises(RuntimeError, match="2-D"):
        ops().lse_forward(q[0], k, 1.0, False, True)


@pytest.mark.cpu_only
def test_hot_loops_are_vectorized():
    """The elementwise passes over a tile (exp, softplus, sigmoid) must be vectorized in
    their AVX2 and AVX-512 clones: once, exp_poly stopped being inlined and the AVX2
    grad_tile had no vector instruction left (the InfoNCE backward ran 1.5x slower)."""
    import shutil
    import subprocess
    if shutil.which("objdump") is None:
        pytest.skip("objdump not found")
    so = extension._C.__file__
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True,
                         text=True, check=True).stdout
    counts, name = {}, None
    for line in asm.splitlines():
        if line.endswith(">:"):
            name = line.split("<", 1)[1][:-2]
            counts[name] = 0
        elif name and ("ymm" in line or "zmm" in line):
            counts[name] += 1
    clones = {n: c for n, c in counts.items()
              if any(f in n for f in ("row_partials", "grad_tile", "siglip_tile"))
              and n.endswith((".avx2", ".avx512f"))}
    if not clones:
        pytest.skip("no target clones in this build (not GCC on x86-64)")
    assert len(clones) == 6, sorted(clones)
    low = {n: c for n, c in clones.items() if c < 40}
    assert not low, low
