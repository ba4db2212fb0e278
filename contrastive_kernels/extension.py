"""Loads the compiled extension `contrastive_kernels._C`, if it was built.

Importing the package never fails because of it: backends that need it report
themselves unavailable, with the reason below.

A C++ extension only works with the torch it was compiled against (torch's C++ ABI
changes between releases, and between the CPU and CUDA builds of one release). The
build records that torch in `_build_info.py` beside `_C` (setup.py); under any other
torch `_C` is not imported at all (it could fail with an undefined symbol, or load and
misbehave), and the backends that need it say why. The whole version string is
compared, local tag included ("2.13.0+cpu" is not "2.13.0+cu130"). Without a record (a
build by other means) the import is tried, and its failure is reported the same way.
"""
import torch

BUILD_HINT = "build it with `pip install -e . --no-build-isolation` (torch must be installed first)"
REBUILD_HINT = ("rebuild it against this torch: `pip install --no-build-isolation .` (or "
                "`pip install --no-build-isolation -e .` for an editable install)")


def _compiled_against():
    """The torch version `_C` was compiled against, or None where unrecorded."""
    try:
        from ._build_info import TORCH_VERSION
    except Exception:    # no record (not built by setup.py), or an unreadable one
        return None
    return str(TORCH_VERSION)


COMPILED_TORCH = _compiled_against()
RUNNING_TORCH = str(torch.__version__)
TORCH_MISMATCH = COMPILED_TORCH is not None and COMPILED_TORCH != RUNNING_TORCH

if TORCH_MISMATCH:
    _C = None
    LOAD_ERROR = (f"compiled against torch {COMPILED_TORCH}, running torch {RUNNING_TORCH} "
                  f"(not loaded): {REBUILD_HINT}")
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.contrastive_kernels.*)
        LOAD_ERROR = None
    except Exception as e:  # ImportError, or an undefined symbol after a torch upgrade
        _C = None
        LOAD_ERROR = f"{type(e).__name__}: {e}"


def loaded():
    return _C is not None


def has_kernel(op, dispatch_key):
    """True if the loaded extension registered `op` for `dispatch_key` ("CPU", "CUDA")."""
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"contrastive_kernels::{op}", dispatch_key)


def missing_reason():
    if TORCH_MISMATCH:
        return f"the C++ extension was {LOAD_ERROR}"
    # an unrecorded build under another torch fails here, with an undefined symbol
    hint = REBUILD_HINT if "undefined symbol" in str(LOAD_ERROR) else BUILD_HINT
    return f"the C++ extension is not built or failed to load ({LOAD_ERROR}); {hint}"


# The C++ ops: the dispatcher picks the CPU or the CUDA kernel by the tensors' device.
# `scale` is read on the host here (a CUDA tensor costs a sync: only the `cuda` backend).
def lse_forward(q, k, scale, self_mask, cols, options, shift=None):
    flags = (options.deterministic, options.precision == "tf32")
    if shift is None:
        lse_r, lse_c = torch.ops.contrastive_kernels.lse_forward(
            q, k, float(scale), self_mask, cols, *flags)
    else:
        lse_r, lse_c = torch.ops.contrastive_kernels.lse_forward_ext(
            q, k, float(scale), self_mask, cols, *shift, *flags)
    return lse_r, (lse_c if cols else None)


def lse_backward(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq, need_dk, options,
                 shift=None, need_dshift=False, prod=None):
    empty = lse_r.new_empty(0)
    args = (q, k, float(scale), self_mask, lse_r, empty if lse_c is None else lse_c,
            g_r, empty if g_c is None else g_c)
    flags = (options.deterministic, options.precision == "tf32")
    if shift is None and prod is None:
        dq, dk = torch.ops.contrastive_kernels.lse_backward(*args, need_dq, need_dk, *flags)
    else:
        ids = shift if shift is not None else (empty.int(), empty.int(), empty)
        dq, dk, dshift = torch.ops.contrastive_kernels.lse_backward_ext(
            *args, *ids, *(prod if prod is not None else (empty, empty)), need_dq, need_dk,
            need_dshift, *flags)
    # The op returns an empty tensor for a gradient that was not asked for.
    out = (dq if need_dq else None), (dk if need_dk else None)
    return out if shift is None else out + ((dshift if need_dshift else None),)


def siglip_tiles(q, k, scale, bias, g_r, sums, need_dq, need_dk, options, pos):
    from .backends.base import key_ids      # (backends import this module)
    r, t, dq, dk = torch.ops.contrastive_kernels.siglip_tiles(
        q, k, float(scale), float(bias), q.new_empty(0, dtype=_acc(q.dtype)) if g_r is None
        else g_r, pos[0], key_ids(pos, k), sums, need_dq, need_dk, options.deterministic,
        options.precision == "tf32")
    return ((r, t) if sums else (None, None)) + ((dq if need_dq else None),
                                                 (dk if need_dk else None))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_fakes():
    """Shape-only (fake) kernels of the C++ ops, for tracing (torch.compile)."""
    @torch.library.register_fake("contrastive_kernels::lse_forward")
    def _forward(q, k, scale, self_mask, cols, deterministic=False, tf32=False, poison=False):
        acc = _acc(q.dtype)
        return q.new_empty(q.shape[0], dtype=acc), q.new_empty(k.shape[0] if cols else 0, dtype=acc)

    @torch.library.register_fake("contrastive_kernels::lse_backward")
    def _backward(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq=True, need_dk=True,
                  deterministic=False, tf32=False, poison=False):
        acc = _acc(q.dtype)
        return (q.new_empty(q.shape[0] if need_dq else 0, q.shape[1], dtype=acc),
                q.new_empty(k.shape[0] if need_dk else 0, k.shape[1], dtype=acc))


    @torch.library.register_fake("contrastive_kernels::lse_forward_ext")
    def _forward_ext(q, k, scale, self_mask, cols, rid, cid, delta, deterministic=False,
                     tf32=False, poison=False):
        return _forward(q, k, scale, self_mask, cols)

    @torch.library.register_fake("contrastive_kernels::lse_backward_ext")
    def _backward_ext(q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, rid, cid, delta, pq, pk,
                      need_dq=True, need_dk=True, need_dshift=True, deterministic=False,
                      tf32=False, poison=False):
        acc = _acc(q.dtype)
        d = pq.shape[1] if pq.numel() else q.shape[1]
        return (q.new_empty(q.shape[0] if need_dq else 0, d, dtype=acc),
                q.new_empty(k.shape[0] if need_dk else 0, d, dtype=acc),
                q.new_empty(q.shape[0] if need_dshift else 0, dtype=acc))

    @torch.library.register_fake("contrastive_kernels::siglip_tiles")
    def _siglip(q, k, scale, bias, g_r, rid, cid, sums, need_dq, need_dk, deterministic=False,
                tf32=False, poison=False):
        acc = _acc(q.dtype)
        n = q.shape[0] if sums else 0
        return (q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc),
                q.new_empty(q.shape[0] if need_dq else 0, q.shape[1], dtype=acc),
                q.new_empty(k.shape[0] if need_dk else 0, k.shape[1], dtype=acc))

    @torch.library.register_fake("contrastive_kernels::dense_lse")
    def _dense_lse(s, cols, poison=False):
        return s.new_empty(s.shape[0]), s.new_empty(s.shape[1] if cols else 0)

    @torch.library.register_fake("contrastive_kernels::dense_grad")
    def _dense_grad(s, lse_r, g_r, lse_c, g_c, scale, self_mask, poison=False):
        return s.new_empty(s.shape)

    @torch.library.register_fake("contrastive_kernels::dense_siglip")
    def _dense_siglip(s, bias, rid, cid, poison=False):
        return s.new_empty(s.shape[0]), s.new_empty(s.shape[0])


if _C is not None:
    register_fakes()
