"""Fused C++ CPU kernel (csrc/cpu/), called through torch.ops.contrastive_kernels."""
import torch

from .. import extension
from .base import Backend


class CpuBackend(Backend):
    name = "cpu"
    device_types = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    features = frozenset({"siglip", "shift", "teacher"})

    def unavailable_reason(self, device):
        if not extension.loaded():
            return extension.missing_reason()
        if not extension.has_kernel("lse_forward", "CPU"):
            return "the loaded C++ extension has no CPU kernel; rebuild it"
        return None

    def lse_forward(self, q, k, scale, self_mask, cols, options, shift=None):
        return extension.lse_forward(q, k, scale, self_mask, cols, options, shift)

    def lse_backward(self, q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq, need_dk,
                     options, shift=None, need_dshift=False, prod=None):
        return extension.lse_backward(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq,
                                      need_dk, options, shift, need_dshift, prod)

    def siglip_tiles(self, q, k, scale, bias, g_r, sums, need_dq, need_dk, options, pos):
        return extension.siglip_tiles(q, k, scale, bias, g_r, sums, need_dq, need_dk, options,
                                      pos)


BACKEND = CpuBackend()
