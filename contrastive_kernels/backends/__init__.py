"""Backend registry.

A backend computes only the fused, tiled part of the loss (see docs/DESIGN.md):

    lse_forward(q, k, scale, self_mask, cols) -> (lse_rows (N,), lse_cols (M,) or None)
        lse_rows[i] = log sum_j exp(scale * <q_i, k_j>)   over valid j
        lse_cols[j] = log sum_i exp(scale * <q_i, k_j>)   over valid i (only if cols)
        self_mask excludes the diagonal i == j.
    lse_backward(q, k, scale, self_mask, lse_rows, lse_cols, g_rows, g_cols,
                 need_dq=True, need_dk=True) -> (dq_raw, dk_raw)
        dS_ij  = g_rows[i] * exp(S_ij - lse_rows[i]) + g_cols[j] * exp(S_ij - lse_cols[j])
        dq_raw = dS @ k,   dk_raw = dS.T @ q          (no scale applied)
        A gradient that is not needed is None, and neither its buffer nor its GEMM is made.
        Both are fresh buffers the caller may change in place.

Optionally, a backend that can write the final gradients itself offers

    input_grads(q, k, scale, self_mask, lse_rows, lse_cols, g_rows, g_cols,
                weights, need_dq, need_dk, need_ds) -> (dq, dk, ds) or None
        dq = (scale * dS + W) @ k and dk = (scale * dS + W).T @ q in the input dtype,
        with the target weights W_ij = [rid_i == cid_j] (a_i + b_j) + e_i + f_j on valid
        entries (weights() returns (rid, cid, a, e, b, f), from loss.Targets.weights),
        and ds = sum_ij dS_ij <q_i, k_j>. Under
        self-contrast dq is the whole gradient and dk None. None: not offered for this
        call (the caller then uses lse_backward). Triton's LOW_MEMORY mode.

Statistics and raw gradients are float64 for float64 inputs and float32 otherwise.
Everything else (targets, bias, reductions, the scale gradient) is shared in
`contrastive_kernels.loss`.
"""
import warnings

import torch

from . import cpu as _cpu
from . import cuda as _cuda
from . import torch_tiled as _torch
from . import triton as _triton

# Preference order per device type: fastest first.
_BACKENDS = {b.NAME: b for b in (_cuda, _triton, _cpu, _torch)}
# On CUDA, triton comes first: on an H200 (bf16, N = 65536, D = 768) a step took 89 ms
# with triton and 1214 ms with the CUDA C++ kernels (bench/bench_gpu.py).
_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "triton", "torch")}
_DEFAULT_ORDER = ("torch",)
_warned = set()


def _why_not(name, device):
    """None if backend `name` can serve tensors on `device`, else the reason."""
    return _BACKENDS[name].unavailable_reason(torch.device(device))


def available_backends(device=None):
    """Backends that can run on `device` (a torch.device or string), fastest first.

    With device=None: the backends for the CPU, plus those for CUDA if a GPU is visible.
    """
    if device is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(device)]
    out = []
    for dev in devices:
        for name in _ORDER.get(torch.device(dev).type, _DEFAULT_ORDER):
            if name not in out and _why_not(name, dev) is None:
                out.append(name)
    return out


def get_backend(name, device):
    """Resolve `name` ("auto" or a backend name) for tensors on `device`."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    device = torch.device(device)
    avail = available_backends(device)
    if name == "auto":
        order = _ORDER.get(device.type, _DEFAULT_ORDER)
        for cand in order:
            if cand in avail:
                if cand == "torch" and order[0] != "torch":
                    _warn_fallback(order[:order.index("torch")], device)
                return _BACKENDS[cand]
        raise ValueError(f"no backend can run on {device}")
    if name not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_BACKENDS)}, got {name!r}; "
                         f"available on {device}: {avail}")
    reason = _why_not(name, device)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run on {device}: {reason}. "
                         f"Available on {device}: {avail}")
    return _BACKENDS[name]


def _warn_fallback(skipped, device):
    if device.type in _warned:
        return
    _warned.add(device.type)
    reasons = "; ".join(f"{name!r}: {_why_not(name, device)}" for name in skipped)
    warnings.warn(f"contrastive_kernels: no fused backend is available on {device} ({reasons}); "
                  f"falling back to the slower 'torch' backend", RuntimeWarning, stacklevel=4)
