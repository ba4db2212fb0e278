"""Compile checks of the CUDA backend that need nvcc but no GPU (and no CUDA torch).

Every torch-free kernel file csrc/cuda/*.cu is compiled for sm_80 and sm_90, and the
PTX of the fp16/bf16 (and TF32) paths must use tensor-core mma instructions. The
whole extension against a CUDA build of torch is checked by .ci/cuda_build.sh.
"""
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from contrastive_kernels import backends, make_options

cuda_backend = backends.get("cuda")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CUDA_DIR = os.path.join(CSRC, "cuda")
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|pybind11)/', re.M)


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + \
            [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME to check the CUDA kernels compile)")

# The project's nvcc flags (csrc/build_flags.json) and those torch's CUDAExtension gives
# nvcc that matter to device code.
with open(os.path.join(CSRC, "build_flags.json")) as _f:
    _NVCC = json.load(_f)["nvcc"]
FLAGS = ["-std=c++17", *_NVCC, "-I", CSRC,
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def _kernel_files():
    return sorted(os.path.join(CUDA_DIR, f) for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))


def _torch_free(path, seen=None):
    """True if `path` and the project headers it includes include no torch header."""
    seen = set() if seen is None else seen
    if path in seen:
        return True
    seen.add(path)
    text = open(path).read()
    if TORCH_INCLUDE.search(text):
        return False
    for inc in re.findall(r'^\s*#\s*include\s*"([^"]+)"', text, re.M):
        for base in (os.path.dirname(path), CSRC):
            p = os.path.join(base, inc)
            if os.path.exists(p):
                if not _torch_free(p, seen):
                    return False
                break
    return True


def _run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    return r


def test_kernel_files_exist_and_are_torch_free():
    files = _kernel_files()
    assert files, "no .cu kernel files in csrc/cuda"
    for f in files:
        assert _torch_free(f), f"{f} includes torch headers; kernel files must be torch-free"


@pytest.mark.cpu_only
@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_kernels_compile(arch, tmp_path):
    for src in _kernel_files():
        obj = tmp_path / (os.path.basename(src) + f".{arch}.o")
        _run([NVCC, "-c", f"-arch={arch}", *FLAGS, src, "-o", str(obj)], tmp_path)
        assert obj.stat().st_size > 0


@pytest.mark.cpu_only
@needs_nvcc
def test_half_paths_use_tensor_cores(tmp_path):
    ptx = tmp_path / "lse_kernels.ptx"
    _run([NVCC, "-ptx", "-arch=sm_90", *FLAGS, os.path.join(CUDA_DIR, "lse_kernels.cu"),
          "-o", str(ptx)], tmp_path)
    text = ptx.read_text()
    entries = re.split(r"\.entry\s+", text)[1:]

    def mma_in(kernel_type_tag):
        # mangled names: __half -> 6__half, __nv_bfloat16 -> 13__nv_bfloat16, float -> f
        bodies = [e for e in entries if kernel_type_tag in e.split("(", 1)[0]]
        assert bodies, f"no kernel instantiated for {kernel_type_tag}"
        return all(re.search(r"\bmma\.sync\b|\bwmma\.mma\b", b) for b in bodies)

    assert mma_in("I6__half"), "fp16 kernels do not use tensor-core mma"
    assert mma_in("I13__nv_bfloat16"), "bf16 kernels do not use tensor-core mma"
    assert re.search(r"wmma\.mma\.sync\.\S*\.tf32\.tf32", text), "no TF32 tensor-core path"
    assert re.search(r"\.bf16\.bf16\.", text), "no bf16 mma"


@pytest.mark.skipif(os.environ.get("CK_TEST_CUDA_EMU") == "1",
                    reason="CK_TEST_CUDA_EMU=1: the emulated cuda backend runs on CPU tensors")
def test_unavailable_reason_explains_the_build():
    call = backends.Call(torch.device("cpu"), torch.float32, 4, 4, 4)
    assert cuda_backend.reasons(call, make_options()) == ["runs on cuda tensors, not cpu"]
    if torch.version.cuda is None:
        reason = cuda_backend.unavailable_reason(torch.device("cuda"))
        assert reason is not None and "CK_BUILD_CUDA=1 pip install -e . --no-build-isolation" in reason


# ---- numerical checks against the torch backend: run only where a GPU is visible ------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SHAPES = [(1, 1, 1), (5, 3, 7), (64, 64, 64), (130, 67, 33), (97, 200, 200), (65, 65, 1)]


def _s(scale, dtype, device="cpu"):
    return torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                        device=device)


def _ref(q, k, scale, self_mask, cols, g_r, g_c):
    tt, opts = backends.get("torch"), make_options()
    q64, k64 = q.double(), k.double()
    s = _s(scale, torch.float64)
    lse_r, lse_c = tt.lse_forward(q64, k64, s, self_mask, cols, opts)
    dq, dk = tt.lse_backward(q64, k64, s, self_mask, lse_r, lse_c, g_r.double(),
                             None if g_c is None else g_c.double(), True, True, opts)
    return lse_r, lse_c, dq, dk


def _close(a, e, tol, what):
    a, e = a.double().cpu(), e.double().cpu()
    fin = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), fin), f"{what}: non-finite pattern differs"
    if fin.any():
        err = float((a[fin] - e[fin]).abs().max() / e[fin].abs().max().clamp_min(1e-30))
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["atomic", "deterministic", "tf32"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("self_mask,cols", [(False, False), (False, True), (True, True)])
def test_cuda_matches_reference(dtype, mode, shape, self_mask, cols):
    if mode == "tf32" and dtype != torch.float32:
        pytest.skip("TF32 applies to float32 only")
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    opts = make_options(deterministic=mode == "deterministic",
                        precision="tf32" if mode == "tf32" else "ieee")
    n, m, d = shape
    if self_mask:
        m = n
    gen = torch.Generator().manual_seed(n * 1000 + m * 10 + d)
    q = torch.randn(n, d, generator=gen).to(dtype)
    k = torch.randn(m, d, generator=gen).to(dtype)
    scale = 1.0 / 0.07 / max(d, 1) ** 0.5
    g_r = torch.rand(n, generator=gen, dtype=torch.float64)
    g_c = torch.rand(m, generator=gen, dtype=torch.float64) if cols else None
    lse_r, lse_c, dq, dk = _ref(q, k, scale, self_mask, cols, g_r, g_c)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    qc, kc = q.cuda(), k.cuda()
    sc = _s(scale, dtype, "cuda")
    r, c = cuda_backend.lse_forward(qc, kc, sc, self_mask, cols, opts)
    assert r.dtype == acc and r.shape == (n,)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}[dtype]
    gtol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    if mode == "tf32":
        tol, gtol = 2e-3, 2e-2
    _close(r, lse_r, tol, "lse_rows")
    if cols:
        assert c.shape == (m,)
        _close(c, lse_c, tol, "lse_cols")
    else:
        assert c is None
    gq, gk = cuda_backend.lse_backward(qc, kc, sc, self_mask, r, c, g_r.to(acc).cuda(),
                                       None if g_c is None else g_c.to(acc).cuda(), True, True,
                                       opts)
    assert gq.dtype == acc and gq.shape == (n, d) and gk.shape == (m, d)
    _close(gq, dq, gtol, "dq")
    _close(gk, dk, gtol, "dk")
    if mode == "deterministic":
        gq2, gk2 = cuda_backend.lse_backward(qc, kc, sc, self_mask, r, c, g_r.to(acc).cuda(),
                                             None if g_c is None else g_c.to(acc).cuda(), True,
                                             True, opts)
        assert torch.equal(gq, gq2) and torch.equal(gk, gk2)


@gpu
def test_cuda_fully_masked_row_gives_zero_grad():
    if cuda_backend.unavailable_reason(torch.device("cuda")) is not None:
        pytest.skip("cuda backend unavailable")
    q = torch.randn(1, 8, device="cuda")
    opts, sc = make_options(), _s(2.0, torch.float32, "cuda")
    r, c = cuda_backend.lse_forward(q, q, sc, True, True, opts)
    assert r.item() == float("-inf") and c.item() == float("-inf")
    gq, gk = cuda_backend.lse_backward(q, q, sc, True, r, c, torch.ones_like(r), torch.ones_like(c),
                                       True, True, opts)
    assert torch.equal(gq, torch.zeros_like(gq)) and torch.equal(gk, torch.zeros_like(gk))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["atomic", "deterministic", "tf32"])
@pytest.mark.parametrize("want", ["sums", "sums+dq+dk", "dq", "dk", "g+dq+dk"])
def test_cuda_siglip_tiles_match_reference(dtype, mode, want):
    """The backward kernel's SigLIP mode, every launch the backend makes, against the
    torch backend in float64."""
    if mode == "tf32" and dtype != torch.float32:
        pytest.skip("TF32 applies to float32 only")
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    opts = make_options(deterministic=mode == "deterministic",
                        precision="tf32" if mode == "tf32" else "ieee")
    n, m, d = 77, 130, 45
    gen = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1).to(dtype)
    g = torch.rand(n, generator=gen, dtype=torch.float64) if want.startswith("g") else None
    sums, need_dq, need_dk = "sums" in want, "dq" in want, "dk" in want
    tt = backends.get("torch")
    s64, b64 = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    # positives: a class id per row and per key (some rows with none)
    rid = torch.randint(-1, 4, (n,), generator=gen, dtype=torch.int32)
    cid = torch.randint(0, 4, (m,), generator=gen, dtype=torch.int32)
    ref = tt.siglip_tiles(q.double(), k.double(), s64, b64, g, True, True, True, make_options(),
                          (rid, cid))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sc, bc = (torch.tensor(v, dtype=acc, device="cuda") for v in (10.0, -10.0))
    got = cuda_backend.siglip_tiles(q.cuda(), k.cuda(), sc, bc,
                                    None if g is None else g.to(acc).cuda(), sums, need_dq,
                                    need_dk, opts, (rid.cuda(), cid.cuda()))
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    if mode == "tf32":
        tol = 2e-2
    for name, a, e, wanted in zip(("r", "t", "dq", "dk"), got, ref,
                                  (sums, sums, need_dq, need_dk)):
        if wanted:
            assert a.dtype == acc
            _close(a, e, tol, name)
        else:
            assert a is None, name
