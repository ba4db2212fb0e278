"""Fused C++ CPU kernel (csrc/cpu/), called through torch.ops.contrastive_kernels."""
import torch

from .. import _ext
from .base import Backend


class CpuBackend(Backend):
    name = "cpu"
    device_types = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def unavailable_reason(self, device):
        if not _ext.loaded():
            return _ext.missing_reason()
        if not _ext.has_kernel("lse_forward", "CPU"):
            return "the loaded C++ extension has no CPU kernel; rebuild it"
        return None

    def lse_forward(self, q, k, scale, self_mask, cols, options):
        return _ext.lse_forward(q, k, scale, self_mask, cols, options)

    def lse_backward(self, q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq, need_dk,
                     options):
        return _ext.lse_backward(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq,
                                 need_dk, options)


BACKEND = CpuBackend()
