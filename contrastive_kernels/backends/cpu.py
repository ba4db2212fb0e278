"""Fused C++ CPU kernel (csrc/cpu/), called through torch.ops.contrastive_kernels."""
from .. import _ext
from .._ext import lse_backward, lse_forward  # noqa: F401  (the backend contract)

NAME = "cpu"


def unavailable_reason(device):
    if device.type != "cpu":
        return "it runs on CPU tensors only"
    if not _ext.loaded():
        return _ext.missing_reason()
    if not _ext.has_kernel("lse_forward", "CPU"):
        return "the loaded C++ extension has no CPU kernel; rebuild it"
    return None
