"""Fused C++ CPU kernel (csrc/cpu/), called through torch.ops.contrastive_kernels."""
import torch

from .. import _ext

NAME = "cpu"


def unavailable_reason(device):
    if device.type != "cpu":
        return "it runs on CPU tensors only"
    if not _ext.loaded():
        return _ext.missing_reason()
    if not _ext.has_kernel("lse_forward", "CPU"):
        return "the loaded C++ extension has no CPU kernel; rebuild it"
    return None


def lse_forward(q, k, scale, self_mask, cols):
    lse_r, lse_c = torch.ops.contrastive_kernels.lse_forward(q, k, scale, self_mask, cols)
    return lse_r, (lse_c if cols else None)


def lse_backward(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c):
    empty = lse_r.new_empty(0)
    return torch.ops.contrastive_kernels.lse_backward(
        q, k, scale, self_mask, lse_r, empty if lse_c is None else lse_c,
        g_r, empty if g_c is None else g_c)
