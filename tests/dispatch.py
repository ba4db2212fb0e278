"""Dispatch modes for the tests: poisoned allocations, and seeing inside the package's ops.

The package's fused loss is a custom op (contrastive_kernels.ops); a TorchDispatchMode
sees it as one call. `SeeThrough` runs the op's Python body under the mode instead, so
that a test's mode also sees the allocations and kernels inside it.

While `Poison` is active (conftest turns it on for every test), every floating tensor
allocated uninitialized (torch.empty and its kin) starts as NaN, and the C++ ops run with
poison=True (they fill their own outputs and scratch with NaN). An entry a kernel fails
to write then shows up as NaN in the results. Production code reads nothing of this.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from contrastive_kernels import extension, ops

EMPTY = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
         torch.ops.aten.new_empty.default, torch.ops.aten.empty_like.default,
         torch.ops.aten.new_empty_strided.default}
BODIES = ops.BODIES


def c_ops():
    """The C++ ops (empty without the extension)."""
    import cuda_emu
    emulated = cuda_emu.op_set()   # the CUDA backend's kernels under the emulator, if built
    if not extension.loaded():
        return emulated
    ns = torch.ops.contrastive_kernels
    return emulated | {ns.lse_forward.default, ns.lse_backward.default, ns.siglip_tiles.default,
            ns.lse_forward_ext.default, ns.lse_backward_ext.default, ns.dense_lse.default,
            ns.dense_grad.default, ns.dense_siglip.default}


class SeeThrough(TorchDispatchMode):
    """A mode that also sees the ops inside the package's custom ops. Subclasses
    implement `handle(func, args, kwargs)`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in BODIES:
            with self:
                return BODIES[func](*args, **kwargs)
        return self.handle(func, args, kwargs)

    def handle(self, func, args, kwargs):
        return func(*args, **kwargs)


class Poison(SeeThrough):
    def __init__(self):
        super().__init__()
        self.c_ops = c_ops()
        self.filled = 0
        self.c_calls = 0

    def handle(self, func, args, kwargs):
        if func in self.c_ops:
            kwargs = dict(kwargs, poison=True)
            self.c_calls += 1
        out = func(*args, **kwargs)
        if func in EMPTY and out.is_floating_point() and out.device.type != "meta":
            out.fill_(float("nan"))
            self.filled += 1
        return out
