"""Fused CUDA C++ backend (csrc/cuda/), called through torch.ops.contrastive_kernels.

The kernels are built into `contrastive_kernels._C` when the package is installed
with a CUDA build of torch and a CUDA toolkit:

    CK_BUILD_CUDA=1 pip install -e . --no-build-isolation

If the loaded `_C` has no CUDA kernels (e.g. it was built without nvcc), the first
use on a CUDA tensor compiles csrc/cuda/ just in time with
`torch.utils.cpp_extension.load` (ninja, cached in the torch extensions folder,
TORCH_EXTENSIONS_DIR; takes a few minutes once). CK_CUDA_JIT=0 turns that off.

Algorithm (same as the other backends, docs/DESIGN.md): one CTA of 4 warps per block
of 64 rows (32 for fp64) sweeps all column blocks, computing tiles of S = scale q k^T
in shared memory with fp32 (fp64 for fp64 inputs) accumulation. fp16/bf16 use tensor
cores (nvcuda::wmma m16n16k16); fp32 and fp64 use a SIMT path.

Options (arguments, contrastive_kernels/options.py):
  deterministic: no floating-point atomics, so results are bitwise reproducible. The
      column log-sum-exp comes from a second, transposed forward pass instead of being
      merged across row blocks by compare-and-swap, and dk from a second backward pass
      over column blocks (recomputing S) instead of fp32/fp64 atomicAdd. Costs one more
      forward pass (with column statistics) and one more S recomputation in backward.
  precision="tf32": fp32 inputs use TF32 tensor cores (wmma m16n16k8) instead of the
      exact fp32 SIMT path (faster, about 1e-3 relative error in S).
fp64 inputs always get their column statistics from the second pass. The scale is read
on the host (one device sync per call).

The sigmoid loss is declared to lag on GPUs (`lags`, backends/base.py): `auto` skips
this backend for it on CUDA tensors and `backend="cuda"` raises the reason.
"""
import json
import logging
import os
import threading
import types

import torch

from .. import extension
from .base import Backend

BUILD_HOWTO = ("install a CUDA build of torch and a CUDA toolkit with nvcc (CUDA_HOME), then "
               "run `CK_BUILD_CUDA=1 pip install -e . --no-build-isolation`")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CSRC = os.path.join(_ROOT, "csrc")
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_jit = {"tried": False, "error": None}


def _has_cuda_kernels():
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            "contrastive_kernels::lse_forward", "CUDA")
    except RuntimeError:  # the op is not defined at all (no _C, no JIT module)
        return False


def _jit_sources(standalone):
    d = os.path.join(_CSRC, "cuda")
    names = ["lse_kernels.cu", "lse_cuda.cpp"]
    # The op schemas live in _C; without it the JIT module defines them itself (ops.cpp).
    extra = [os.path.join(_CSRC, "ops.cpp")] if standalone else []
    return [os.path.join(d, s) for s in names] + extra


def _jit_build():
    """Compile csrc/cuda/ just in time (once per process); None on success, else why not."""
    with _lock:
        if _jit["tried"]:
            return _jit["error"]
        _jit["tried"] = True
        _jit["error"] = _jit_build_locked()
        return _jit["error"]


def _jit_build_locked():
    if os.environ.get("CK_CUDA_JIT", "1") == "0":
        return f"the loaded extension has no CUDA kernels and just-in-time builds are off (CK_CUDA_JIT=0); {BUILD_HOWTO}"
    from torch.utils import cpp_extension as ce
    if ce.CUDA_HOME is None:
        return f"the loaded extension has no CUDA kernels and no CUDA toolkit (nvcc) was found to build them; {BUILD_HOWTO}"
    standalone = not extension.loaded()
    sources = _jit_sources(standalone)
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        return f"the CUDA sources are not installed ({missing[0]} is missing); {BUILD_HOWTO}"
    # no -std flag: torch adds the standard its headers need (C++20 for torch >= 2.13)
    with open(os.path.join(_CSRC, "build_flags.json")) as f:
        fl = json.load(f)
    define = "-D" + fl["cuda_define"]
    flags = fl["cxx"] + [define]
    cuda_flags = fl["nvcc"] + [define]
    name = "contrastive_kernels_cuda" + ("_standalone" if standalone else "")
    _log.warning("contrastive_kernels: the loaded extension has no CUDA kernels; building them "
                 "just in time (once, takes minutes) ...")
    try:
        ce.load(name=name, sources=sources, extra_include_paths=[_CSRC], extra_cflags=flags,
                extra_cuda_cflags=cuda_flags, is_python_module=False, verbose=False)
    except Exception as e:  # compiler errors, missing ninja, ...
        return f"the just-in-time build of the CUDA kernels failed ({type(e).__name__}: {e}); {BUILD_HOWTO}"
    if not _has_cuda_kernels():
        return f"the just-in-time CUDA module loaded but registered no CUDA kernels; {BUILD_HOWTO}"
    return None


class CudaBackend(Backend):
    name = "cuda"
    device_types = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    min_capability = {torch.float16: (7, 0), torch.bfloat16: (8, 0)}   # wmma fragments
    features = frozenset({"siglip"})
    # The sigmoid loss's pass is lse_backward_kernel with a bias pointer: the kernel whose
    # InfoNCE steps ran 14x slower than triton's (README "GPU"); its own time is the cuda
    # row of `bench/bench_gpu.py --loss siglip`, not yet measured. Its numbers are tested
    # (tests/test_cuda_emu.py; on a GPU, tests/test_siglip.py: the suite lifts `lags`).
    lags = types.MappingProxyType({"siglip": (
        "lags triton on GPUs: its sigmoid-loss pass is lse_backward_kernel (no wgmma, "
        "cp.async or TMA), which ran InfoNCE 14x slower than triton on an H200 (bf16, "
        "N=65536, D=768: 1214 ms vs 89 ms a step, bench/bench_gpu.py); use backend='triton' "
        "or 'auto'")})

    def unavailable_reason(self, device):
        if _has_cuda_kernels():
            return None
        if torch.version.cuda is None:
            return (f"torch {torch.__version__} is a CPU-only build, which cannot build or run "
                    f"the CUDA kernels; {BUILD_HOWTO}")
        return _jit_build()

    def lse_forward(self, q, k, scale, self_mask, cols, options):
        return extension.lse_forward(q, k, scale, self_mask, cols, options)

    def siglip_tiles(self, q, k, scale, bias, g_r, sums, need_dq, need_dk, options, pos):
        # (a JIT-built module registers its CUDA kernel under the same op)
        return extension.siglip_tiles(q, k, scale, bias, g_r, sums, need_dq, need_dk, options,
                                      pos)

    def lse_backward(self, q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq, need_dk,
                     options):
        return extension.lse_backward(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq,
                                 need_dk, options)


BACKEND = CudaBackend()
