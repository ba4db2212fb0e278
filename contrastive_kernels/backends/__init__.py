"""The backends and per-call dispatch (the contract: backends/base.py).

    REGISTRY.select(name, call, options)  the backend for one call; "auto" takes the first
                                          in the device's preference order that declares
                                          it can serve the call, else ValueError with
                                          every backend's reasons
    available_backends(device)            names of the backends built and installed there
"""
from typing import List, Optional, Union

import torch

from . import cpu, cuda, torch_tiled, triton
from .base import Backend, Call, Registry, needed_features  # noqa: F401  (the contract)

# Preference order per device type, fastest first. On CUDA triton comes first: on an
# H200 (bf16, N = 65536, D = 768) a step took 89 ms with triton and 1214 ms with the
# CUDA C++ kernels (bench/bench_gpu.py; README "GPU").
REGISTRY = Registry(
    [cuda.BACKEND, triton.BACKEND, cpu.BACKEND, torch_tiled.BACKEND],
    order={"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "triton", "torch")},
    default_order=("torch",))


def available_backends(device: Optional[Union[str, torch.device]] = None) -> List[str]:
    """Names of the backends built and installed for `device`, fastest first.

    Any of them may be passed as `backend=` to the losses; "auto" picks, per call, the
    first one in this order that can serve the call (dtype, size, variant, options).
    The "torch" backend (tiled torch ops) runs everywhere and is the last resort.

    Args:
        device: a torch.device or a device string ("cpu", "cuda", "cuda:1"). None: the
            backends for the CPU, followed by those for CUDA when a GPU is visible.

    Returns:
        A list of backend names, e.g. ["cpu", "torch"] on a CPU-only install; "cpu"
        needs the compiled extension, "triton" the triton package, "cuda" the extension
        built with CUDA.

    Raises:
        RuntimeError: `device` is not a valid device (as torch.device raises).

    Example:
        >>> import contrastive_kernels as ck
        >>> "torch" in ck.available_backends("cpu")
        True
        >>> set(ck.available_backends("cpu")) <= set(ck.available_backends())
        True
    """
    if device is not None:
        return REGISTRY.available(device)
    out = []
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        out += [n for n in REGISTRY.available(dev) if n not in out]
    return out


def get(name):
    """The backend object called `name` (for tests and benchmarks that call it directly)."""
    return REGISTRY.by_name[name]
