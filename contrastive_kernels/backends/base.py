"""The backend contract: what a backend declares and what it computes.

A backend computes only the fused, tiled part of the loss (docs/DESIGN.md):

    lse_forward(q, k, scale, self_mask, cols, options) -> (lse_rows (N,), lse_cols (M,) or None)
        lse_rows[i] = log sum_j exp(scale * <q_i, k_j>)   over valid j
        lse_cols[j] = log sum_i exp(scale * <q_i, k_j>)   over valid i (only if cols)
        self_mask excludes the diagonal i == j.
    lse_backward(q, k, scale, self_mask, lse_rows, lse_cols, g_rows, g_cols,
                 need_dq, need_dk, options) -> (dq_raw, dk_raw)
        dS_ij  = g_rows[i] * exp(S_ij - lse_rows[i]) + g_cols[j] * exp(S_ij - lse_cols[j])
        dq_raw = dS @ k,   dk_raw = dS.T @ q          (no scale applied)
        A gradient that is not needed is None, and neither its buffer nor its GEMM is made.
        Both are fresh buffers the caller may change in place.

`scale` is a tensor of one element (the accumulation dtype, on the inputs' device), so
that nothing reads it on the host. Statistics and raw gradients are float64 for float64
inputs and float32 otherwise. A backend that declares the feature "low_memory" also has

    input_grads(q, k, scale, self_mask, lse_rows, lse_cols, g_rows, g_cols, weights,
                need_dq, need_dk, need_ds, options) -> (dq, dk, ds)
        dq = (scale * dS + W) @ k and dk = (scale * dS + W).T @ q in the input dtype, with
        the target weights W_ij = [rid_i == cid_j] (a_i + b_j) + e_i + f_j on valid entries
        (weights() returns (rid, cid, a, e, b, f), from targets.Targets.weights), and
        ds = sum_ij dS_ij <q_i, k_j>. Under self_mask (k is q) dq is the whole gradient of
        q and dk is None.

A backend that declares the feature "shift" (the margin and decoupled variants) takes
`shift=(rid, cid, delta)` in both (int32 ids (N,), (M,), delta (N,) in the accumulation
dtype): S_ij += delta[i] where rid[i] == cid[j] (rid < 0: none; delta = -inf leaves the
entry out of both log-sum-exps). lse_backward then returns (dq_raw, dk_raw, dshift) with
dshift[i] = sum_j [rid[i] == cid[j]] dS_ij when need_dshift (else None).

A backend that declares the feature "teacher" (soft targets from a teacher's
similarities) takes `prod=(pq, pk)` in lse_backward: (N x D'), (M x D') product operands,
so that the logits come from (q, k) (the teacher's embeddings) and the gradients are
dq_raw = dS @ pk, dk_raw = dS.T @ pq (the student's).

A backend that declares the feature "siglip" also has the sigmoid loss's tile pass

    siglip_tiles(q, k, scale, bias, g_r, sums, need_dq, need_dk, options, pos)
            -> (r (N,) or None, t (N,) or None, dq_raw, dk_raw)
        z_ij = scale * <q_i, k_j> + bias,  y_ij = +1 if rid[i] == cid[j] else -1
        r[i] = sum_j softplus(-y_ij z_ij)   (the row's loss; only if sums)
        t[i] = sum_j dz_ij,  dz_ij = sigmoid(z_ij) - [y_ij = 1]   (only if sums)
        dS_ij = g_r[i] * dz_ij              (g_r None: 1, the 3-pass forward)
        dq_raw = dS @ k, dk_raw = dS.T @ q  (no scale applied; None when not needed)
    `bias` is a one-element tensor like `scale`; pos = (rid, cid), int32 ids (N,), (M,)
    (rid < 0: no positive among these keys; cid >= 0, or None: each key's id is its
    index, `key_ids` gives it as a tensor). Each entry's term is computed with its
    target: a positive's is softplus(-z) itself, never softplus(z) - z, which cancels
    to rounding noise when the pair is confident (docs/DESIGN.md, section 7).

What a backend supports is declared, not probed: its device types, dtypes, the minimum
compute capability per dtype on CUDA, features, the losses it computes correctly but
too slowly to offer on GPUs (`lags`, with the reason, from measurements), and
`reasons(call, options)`, which lists why it cannot serve one call (empty: it can).
`select` picks the first backend in the device's preference order with no reasons;
`measuring(backend)` lifts a backend's `lags` for a benchmark or a test of its numbers
(the backward of a 4-pass sigmoid loss selects again: run it inside too).
"""
import contextlib
import dataclasses
import types

import torch

from ..problem import warn_user

# Features a call may need beyond the InfoNCE core (every backend has that: rows and
# columns, self-masking, any target): a loss other than InfoNCE, or an option.
FEATURES = ("siglip", "shift", "teacher", "low_memory", "blocked", "tf32")
LOSSES = ("info_nce", "siglip")


@dataclasses.dataclass(frozen=True)
class Call:
    """What dispatch looks at: the device, dtype and sizes of one call."""
    device: torch.device
    dtype: torch.dtype
    n: int
    m: int
    d: int
    self_contrast: bool = False
    symmetric: bool = False
    loss: str = "info_nce"
    extra: tuple = ()        # features the call's variant needs ("shift")


def needed_features(options, loss="info_nce"):
    """The features a call of `loss` with `options` needs ("tf32" is a permission, never
    required)."""
    out = [] if loss == "info_nce" else [loss]
    if options.low_memory:
        out.append("low_memory")
    if options.algorithm in ("blocked", "epilogue"):
        out.append("blocked")
    return out


def capability(device):
    """(major, minor) of a CUDA device."""
    return torch.cuda.get_device_capability(device)


class Backend:
    """One backend: its declarations, `reasons`, and the contract's functions."""
    name = ""
    device_types = ()          # torch device types it runs on (empty: any)
    dtypes = ()                # input dtypes
    features = frozenset()     # of FEATURES
    min_capability = {}        # dtype -> (major, minor): the oldest CUDA GPU it runs on
    # {loss: reason}: computed correctly, but too slow to offer on GPUs (judged from
    # measurements): auto skips the backend for that loss on CUDA tensors, and naming it
    # raises the reason.
    lags = types.MappingProxyType({})

    def runs_on(self, device):
        return not self.device_types or torch.device(device).type in self.device_types

    def unavailable_reason(self, device):
        """Why it cannot run on `device` at all (not installed, not built), or None."""
        return None

    def call_reasons(self, call, options):
        """Reasons specific to this backend (e.g. a dtype needing a newer GPU)."""
        return []

    def reasons(self, call, options):
        """Every reason this backend cannot serve `call` with `options` ([]: it can)."""
        if not self.runs_on(call.device):
            return [f"runs on {' or '.join(self.device_types)} tensors, not {call.device.type}"]
        why = self.unavailable_reason(call.device)
        if why is not None:
            return [why]
        out = []
        if call.dtype not in self.dtypes:
            out.append(f"does not support {str(call.dtype).replace('torch.', '')}")
        need = self.min_capability.get(call.dtype)
        if need and call.device.type == "cuda" and capability(call.device) < need:
            out.append(f"{str(call.dtype).replace('torch.', '')} needs compute capability "
                       f"{need[0]}.{need[1]} or newer")
        out += [_missing(f) for f in needed_features(options, call.loss) + list(call.extra)
                if f not in self.features]
        if call.device.type == "cuda" and call.loss in self.lags:
            out.append(self.lags[call.loss])
        return out + self.call_reasons(call, options)

    def lse_forward(self, q, k, scale, self_mask, cols, options, shift=None):
        raise NotImplementedError

    def lse_backward(self, q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq, need_dk,
                     options, shift=None, need_dshift=False, prod=None):
        raise NotImplementedError

    def siglip_tiles(self, q, k, scale, bias, g_r, sums, need_dq, need_dk, options, pos):
        raise NotImplementedError


def key_ids(pos, k):
    """The keys' ids of a sigmoid-loss call's pos (int32 (M,)): cid, or each key's index."""
    cid = pos[1]
    return torch.arange(k.shape[0], dtype=torch.int32, device=k.device) if cid is None else cid


_UNSET = object()


@contextlib.contextmanager
def measuring(backend):
    """Lift `backend`'s `lags` (a Backend) while the block runs: what a benchmark that
    measures the lag, or a test of the lagging kernel's numbers, needs. Every call that
    selects the backend must run inside, the backward of a 4-pass sigmoid loss too."""
    before = backend.__dict__.get("lags", _UNSET)
    backend.lags = types.MappingProxyType({})
    try:
        yield backend
    finally:
        if before is _UNSET:
            del backend.lags
        else:
            backend.lags = before


def _missing(feature):
    if feature in LOSSES:
        return f"does not implement the {feature} loss"
    if feature == "low_memory":
        return "does not support low_memory=True"
    if feature == "shift":
        return "does not implement margin or decoupled (the positive shift)"
    if feature == "teacher":
        return "does not implement teacher soft targets"
    return f"does not have the {feature} algorithm"


class Registry:
    """The backends and their preference order per device type (fastest first)."""

    def __init__(self, backends, order, default_order, fallback="torch"):
        self.by_name = {b.name: b for b in backends}
        self.order = order
        self.default_order = default_order
        self.fallback = fallback      # the slow one: choosing it over a faster one warns once
        self._warned = set()

    def names(self):
        return sorted(self.by_name)

    def order_for(self, device):
        return self.order.get(torch.device(device).type, self.default_order)

    def available(self, device):
        """Names of the backends that can run on `device` (built, installed), fastest first."""
        device = torch.device(device)
        return [n for n in self.order_for(device)
                if self.by_name[n].runs_on(device)
                and self.by_name[n].unavailable_reason(device) is None]

    def explain(self, call, options):
        """{name: reasons} for every backend of the device's order."""
        return {n: self.by_name[n].reasons(call, options) for n in self.order_for(call.device)}

    def select(self, name, call, options):
        """The backend for this call: `name`, or with "auto" the first in the preference
        order that can serve it. ValueError with the reasons when none can."""
        if not isinstance(name, str):
            raise TypeError(f"backend must be a string, got {type(name).__name__}")
        if name != "auto" and name not in self.by_name:
            raise ValueError(f"backend must be 'auto' or one of {self.names()}, got {name!r}; "
                             f"available on {call.device}: {self.available(call.device)}")
        if name != "auto":
            why = self.by_name[name].reasons(call, options)
            if why:
                fits = [n for n, r in self.explain(call, options).items() if not r]
                raise ValueError(f"backend {name!r} cannot run this call on {call.device} "
                                 f"({_describe(call)}): {'; '.join(why)}. Available for this "
                                 f"call: {fits or 'none'}")
            return self.by_name[name]
        table = self.explain(call, options)
        for n, why in table.items():
            if not why:
                if n == self.fallback and list(table)[0] != n:
                    self._warn_fallback(call, table)
                return self.by_name[n]
        lines = "; ".join(f"{n!r}: {', '.join(r)}" for n, r in table.items())
        raise ValueError(f"no backend can run this call ({_describe(call)}): {lines}")

    def _warn_fallback(self, call, table):
        if call.device.type in self._warned:
            return
        self._warned.add(call.device.type)
        skipped = "; ".join(f"{n!r}: {', '.join(r)}" for n, r in table.items()
                            if n != self.fallback and r)
        warn_user(f"contrastive_kernels: no fused backend can run this call on "
                  f"{call.device} ({skipped}); falling back to the slower "
                  f"{self.fallback!r} backend", RuntimeWarning)


def _describe(call):
    return (f"{call.loss}, {str(call.dtype).replace('torch.', '')} on {call.device}, "
            f"N={call.n}, M={call.m}, D={call.d}")
