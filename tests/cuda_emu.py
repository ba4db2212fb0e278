"""The CUDA backend on the CPU, under an emulator (csrc/test/cuda_emu/).

`build()` compiles the CUDA backend's own sources with the host compiler: the device code
(csrc/cuda/lse_kernels.cu and .cuh, every `kernel<<<...>>>(...)` rewritten to an emulated
launch) and its ATen launcher (csrc/cuda/lse_cuda.cpp), registered for CPU tensors as
torch.ops.ck_cuda_emu.{lse_forward, lse_backward, siglip_tiles} with the schemas of
csrc/ops.cpp. `backend()` is the "cuda" backend (same name, dtypes and features) calling
them, for the suite to run on CPU tensors (CK_TEST_CUDA_EMU=1, tests/conftest.py) and for
tests/test_cuda_emu.py.

It checks what the kernels compute (tiling, masks, tails, reductions, barriers, the
launcher's passes), not GPU timing, memory ordering or the real tensor cores: a block's
threads are fibers switched at barriers, shuffles and compare-and-swap, and wmma
fragments are emulated in fp32 (docs/DESIGN.md, "How it is tested").

Needs the CUDA toolkit's headers (cuda_runtime_api.h, cuda_fp16.h, cuda_bf16.h; no GPU,
no nvcc run) and a C++ compiler; `unavailable()` says why not.
"""
import hashlib
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMU = os.path.join(CSRC, "test", "cuda_emu")
OPS = ("lse_forward", "lse_backward", "siglip_tiles")
_state = {"built": False, "error": None}


def cuda_include():
    from torch.utils import cpp_extension as ce
    home = ce.CUDA_HOME or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    inc = os.path.join(home, "include")
    need = ("cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h")
    return inc if all(os.path.exists(os.path.join(inc, h)) for h in need) else None


def unavailable():
    """None if the emulator can be built here, else why not."""
    if cuda_include() is None:
        return "no CUDA toolkit headers (cuda_runtime_api.h, cuda_fp16.h, cuda_bf16.h)"
    return None


def rewrite_launches(src):
    """`kernel<args><<<grid, block, smem, stream>>>(` -> `::ck_emu::launch(&kernel<args>,
    grid, block, smem, stream)(`."""
    pat = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
    out, n = pat.subn(lambda m: f"::ck_emu::launch(&{m.group(1)}, {m.group(2)})(", src)
    if n == 0 or "<<<" in out:
        raise RuntimeError("cuda_emu: could not rewrite the kernel launches of lse_kernels.cu")
    return out


def schemas():
    """The m.def(...) lines of csrc/ops.cpp for OPS, as C++ statements."""
    text = open(os.path.join(CSRC, "ops.cpp")).read()
    out = []
    for call in re.findall(r"m\.def\((.*?)\);", text, re.S):
        schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call))
        if schema.split("(")[0] in OPS:
            out.append(f'  m.def("{schema}");')
    if len(out) != len(OPS):
        raise RuntimeError(f"cuda_emu: found {len(out)} of the schemas {OPS} in csrc/ops.cpp")
    return "\n".join(out) + "\n"


def _digest(paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _write(path, text):
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        with open(path, "w") as f:
            f.write(text)


def build():
    """Build (once per process; cached by torch across processes) and load the emulated
    ops. None on success, else the reason."""
    if _state["built"] or _state["error"]:
        return _state["error"]
    why = unavailable()
    if why:
        _state["error"] = why
        return why
    from torch.utils import cpp_extension as ce
    base = os.path.join(os.path.expanduser("~"), ".cache", "contrastive_kernels",
                        f"cuda_emu-torch{torch.__version__}")
    os.makedirs(base, exist_ok=True)
    # The headers' digest goes into the generated sources, so that a change to any of
    # them rebuilds (torch hashes the sources it is given, not what they include).
    headers = [os.path.join(CSRC, "cuda", f) for f in
               ("lse_kernels.cuh", "lse_kernels.h", "lse_cuda.cpp")]
    headers += [os.path.join(CSRC, "common", "tile_math.h"), os.path.join(EMU, "cuda_emu.h"),
                os.path.join(EMU, "ops_emu.cpp")]
    for d, _, files in os.walk(os.path.join(EMU, "include")):
        headers += sorted(os.path.join(d, f) for f in files)
    stamp = f"// inputs {_digest(headers)}\n"
    kernels = os.path.join(base, "lse_kernels_emu.cpp")
    src = open(os.path.join(CSRC, "cuda", "lse_kernels.cu")).read()
    _write(kernels, stamp + rewrite_launches(src) + _RUNTIME)
    _write(os.path.join(base, "ck_emu_schemas.h"), schemas())
    ops = os.path.join(base, "ops_emu.cpp")
    _write(ops, stamp + open(os.path.join(EMU, "ops_emu.cpp")).read())
    try:
        ce.load(name="ck_cuda_emu", sources=[kernels, ops],
                extra_include_paths=[os.path.join(EMU, "include"), EMU, CSRC, base,
                                     cuda_include()],
                extra_cflags=["-O1", "-w"], build_directory=base, is_python_module=False,
                verbose=False)
    except Exception as e:  # compiler errors
        _state["error"] = f"the emulator build failed: {type(e).__name__}: {e}"
        return _state["error"]
    _state["built"] = True
    return None


# Appended to the kernels' source: the runtime calls lse_kernels.cu makes.
_RUNTIME = r"""
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = ::ck_emu::last_error();
  ::ck_emu::last_error() = cudaSuccess;
  return e;
}
const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated launch failed (see stderr)";
}
"""


def op_set():
    """The emulated ops' OpOverloads (empty when not built)."""
    if not _state["built"]:
        return set()
    ns = torch.ops.ck_cuda_emu
    return {getattr(ns, name).default for name in OPS}


def backend():
    """The "cuda" backend object, for CPU tensors, over the emulated ops."""
    from contrastive_kernels.backends import cuda
    from contrastive_kernels.backends.base import key_ids

    class EmulatedCuda(cuda.CudaBackend):
        device_types = ("cpu",)

        def unavailable_reason(self, device):
            return build()

        def lse_forward(self, q, k, scale, self_mask, cols, options):
            lse_r, lse_c = torch.ops.ck_cuda_emu.lse_forward(
                q, k, float(scale), self_mask, cols, *_flags(options))
            return lse_r, (lse_c if cols else None)

        def lse_backward(self, q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq,
                         need_dk, options):
            empty = lse_r.new_empty(0)
            dq, dk = torch.ops.ck_cuda_emu.lse_backward(
                q, k, float(scale), self_mask, lse_r, empty if lse_c is None else lse_c, g_r,
                empty if g_c is None else g_c, need_dq, need_dk, *_flags(options))
            return (dq if need_dq else None), (dk if need_dk else None)

        def siglip_tiles(self, q, k, scale, bias, g_r, sums, need_dq, need_dk, options, pos):
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            r, t, dq, dk = torch.ops.ck_cuda_emu.siglip_tiles(
                q, k, float(scale), float(bias), q.new_empty(0, dtype=acc) if g_r is None
                else g_r, pos[0], key_ids(pos, k), sums, need_dq, need_dk,
                *_flags(options))
            return ((r, t) if sums else (None, None)) + ((dq if need_dq else None),
                                                         (dk if need_dk else None))

    return EmulatedCuda()


def _flags(options):
    return options.deterministic, options.precision == "tf32"


def install(registry):
    """Make `registry`'s "cuda" backend the emulated one, on CPU tensors, after the fused
    CPU backends in auto's order (CK_TEST_CUDA_EMU=1: the whole suite runs it)."""
    registry.by_name["cuda"] = backend()
    order = [n for n in registry.order["cpu"] if n != "cuda"]
    order.insert(order.index("torch") if "torch" in order else len(order), "cuda")
    registry.order["cpu"] = tuple(order)
