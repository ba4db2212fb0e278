"""The problem: the checked arguments of a loss call, shared by the fused loss, the ring
and the reference.

`check_inputs` checks what the tensors' metadata shows (types, shapes, devices, dtypes,
Python scalars): traceable by torch.compile. `check_values` checks what needs the data
(positive_index in range, a tensor scale's value): it runs inside the fused op, before
any kernel. Every error names the argument.
"""
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.autograd.forward_ad as forward_ad

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
DEFAULT_TEMPERATURE = 0.07

Scalar = Union[float, torch.Tensor]


@dataclass
class Problem:
    query: torch.Tensor                    # N x D
    key: Optional[torch.Tensor]            # M x D, None for self-contrast
    positive_index: Optional[torch.Tensor] # int64 (N,), or None when labels are used
    labels: Optional[torch.Tensor]         # (N,) or None
    key_labels: Optional[torch.Tensor]     # (M,) or None
    scale: Scalar                          # logit scale s
    bias: Scalar                           # logit bias b
    symmetric: bool
    label_smoothing: float
    reduction: str
    scale_name: str = "logit_scale"        # the argument the scale came from
    index_given: bool = False              # positive_index came from the caller (checked
                                           # by check_values; the defaults are in range)
    margin: float = 0.0                    # additive margin m of the positive logits
    decoupled: bool = False                # positives left out of the log-sum-exps (DCL)

    teacher: Optional[tuple] = None        # (teacher_query, teacher_key), detached, or None
    teacher_scale: Scalar = None           # the teacher's logit scale (None: the student's)
    teacher_weight: float = 1.0            # alpha: the teacher's share of the targets
    teacher_weighting: str = "softmax"     # "softmax" or "linear" (CWCL)

    @property
    def per_row(self):
        """Whether the scale is one per query row (per-query temperature)."""
        return torch.is_tensor(self.scale) and self.scale.dim() == 1

    @property
    def shifted(self):
        """Whether the kernels shift the positive logits (margin or decoupled)."""
        return bool(self.margin) or self.decoupled

    @property
    def softmax_teacher(self):
        """Whether the kernels compute a teacher's softmax targets (the "teacher" feature)."""
        return (self.teacher is not None and self.teacher_weighting == "softmax"
                and self.teacher_weight > 0)

    @property
    def n_keys(self):
        return self.query.shape[0] if self.key is None else self.key.shape[0]

    @property
    def self_contrast(self):
        return self.key is None

    @property
    def out_dtype(self):
        return torch.float64 if self.query.dtype == torch.float64 else torch.float32


def check_matrix(name, x, empty_ok=False):
    """A dense (rows, dim) float tensor with dim > 0, and rows > 0 unless `empty_ok` (a
    rank's shard in a distributed loss may have no rows)."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    _check_dense(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 and not empty_ok:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have a non-zero embedding dim, got shape {tuple(x.shape)}")


def _check_dense(name, x):
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; "
                        f"pass {name}.to_dense()")


FORWARD_AD = (
    "{name} carries a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad): "
    "not supported, since the fused kernels have no forward derivative and would drop it "
    "silently. Use reverse mode (backward, torch.func.grad), or "
    "contrastive_kernels.reference for a jvp (it materializes the N x M logits)")


def check_no_tangent(**tensors):
    """NotImplementedError (a RuntimeError) naming the first tensor with a forward-mode
    tangent: the custom ops would return a zero derivative."""
    if torch.compiler.is_compiling():
        return
    for name, x in tensors.items():
        if torch.is_tensor(x) and forward_ad.unpack_dual(x).tangent is not None:
            raise NotImplementedError(FORWARD_AD.format(name=name))


def check_int_vector(name, x, length, length_name, device):
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(x).__name__}")
    _check_dense(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.dim() != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) to match {length_name}, "
                         f"got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but query is on {device}")
    return x.long()


def _check_scalar(name, x, device, positive):
    """A float (finite, and > 0 if `positive`) or a 0-dim floating tensor. A tensor on the
    CPU is checked inside the op (check_values), or here when the inputs are on another
    device (in eager mode); on a GPU its value is not read (a device sync every step)."""
    if torch.is_tensor(x):
        if x.dim() != 0 and x.numel() != 1:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.device != device and x.device.type != "cpu":    # a CPU scalar is moved over
            raise ValueError(f"{name} is on {x.device} but query is on {device}")
        if x.device.type == "cpu" and device.type != "cpu" and not torch.compiler.is_compiling():
            _check_value(name, float(x.detach()), positive)
        return x.reshape(()).to(device)
    if isinstance(x, numbers.Real) and not isinstance(x, bool):   # numpy scalars too
        x = as_float(name, x)
        _check_value(name, x, positive)
        return x
    raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(x).__name__}")


def check_scale(name, x, n, device):
    """A scale or temperature: a scalar (_check_scalar), or a 1-D floating tensor of one
    value per query row (N,) on the queries' device (per-query temperature)."""
    if torch.is_tensor(x) and x.dim() == 1 and x.numel() != 1:
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.shape[0] != n:
            raise ValueError(f"{name} must be a float, a 0-dim tensor or a tensor of shape "
                             f"({n},) (one per query row), got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but query is on {device}")
        return x
    return _check_scalar(name, x, device, positive=True)


def _check_reciprocal(t, scale):
    """A temperature > 0 whose reciprocal overflows: a float beyond float32's range (the
    kernels' scale), or a CPU tensor in its own dtype (a GPU one is not read: a sync)."""
    if torch.is_tensor(t):
        if t.device.type != "cpu" or torch.compiler.is_compiling():
            return
        dtype, tv = t.dtype, t.detach().double()
        bad = torch.isfinite(tv) & (tv > 0) & ~torch.isfinite(scale.detach())
        if not bool(bad.any()):
            return
        value = float(tv[bad][0])
    elif 0 < t and 1.0 / t > torch.finfo(torch.float32).max:
        dtype, value = torch.float32, t
    else:
        return
    raise ValueError(f"temperature must be > 0 with a finite reciprocal in {dtype}, got "
                     f"{value} (1 / temperature overflows)")


def as_float(name, x):
    """float(x) for a real number; a ValueError naming `name` when it overflows (an int
    beyond the float range)."""
    try:
        return float(x)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an integer of {len(str(abs(int(x))))} "
                         f"digits") from None


def _check_value(name, value, positive):
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if abs(value) > torch.finfo(torch.float32).max:
        # the kernels hold scalars in the accumulation dtype: float32 unless inputs are fp64
        raise ValueError(f"{name} must be finite in float32 (the kernels' scalars), got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_normalize(normalize):
    """The `normalize` flag of a loss: a bool (TypeError naming it otherwise)."""
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    return normalize


def normalize_inputs(query, key=None):
    """(query, key) L2-normalized along the embedding dim, as
    torch.nn.functional.normalize(x, dim=-1) (eps 1e-12) in the inputs' dtype; plain
    torch ops, so autograd carries the gradients through (O(N D)). key None stays None.
    A teacher is not normalized by this."""
    query = torch.nn.functional.normalize(query, dim=-1)
    if key is not None:
        key = torch.nn.functional.normalize(key, dim=-1)
    return query, key


def check_variants(margin, decoupled):
    """(margin, decoupled) of info_nce: a finite float and a bool."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise TypeError(f"margin must be a float, got {type(margin).__name__}")
    margin = as_float("margin", margin)
    if not math.isfinite(margin):
        raise ValueError(f"margin must be finite, got {margin}")
    if not isinstance(decoupled, bool):
        raise TypeError(f"decoupled must be a bool, got {type(decoupled).__name__}")
    return float(margin), decoupled


WEIGHTINGS = ("softmax", "linear")


def check_teacher(teacher, key, n, m, device, dtype, scale, weight, weighting, margin,
                  empty_ok=False):
    """The teacher arguments of info_nce: (teacher_query, teacher_key) with a key, or
    teacher_query alone under key=None (the teacher keys are its rows); matrices of N and
    M rows of any width, on the queries' device, treated as detached (cast to the
    queries' dtype; empty_ok: as check_matrix). Returns (teacher pair, scale, weight,
    weighting)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"teacher_weight must be a float, got {type(weight).__name__}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"teacher_weight must be in [0, 1], got {weight}")
    if not isinstance(weighting, str) or weighting not in WEIGHTINGS:
        raise ValueError(f"teacher_weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if teacher is None:
        if scale is not None:
            raise ValueError("teacher_logit_scale needs a teacher")
        return None, None, float(weight), weighting
    if key is None:
        if not torch.is_tensor(teacher):
            raise TypeError("teacher must be the teacher's query embeddings (a tensor) when "
                            f"key is None, got {type(teacher).__name__}")
        tq, tk = teacher, None
    else:
        if not (isinstance(teacher, (tuple, list)) and len(teacher) == 2):
            raise TypeError("teacher must be a pair (teacher_query, teacher_key) when key is "
                            f"given, got {type(teacher).__name__}")
        tq, tk = teacher
    check_matrix("teacher query", tq, empty_ok)
    if tq.shape[0] != n:
        raise ValueError(f"teacher query must have {n} rows (one per query), got "
                         f"{tq.shape[0]}")
    if tq.device != device:
        raise ValueError(f"teacher query is on {tq.device} but query is on {device}")
    if tk is not None:
        check_matrix("teacher key", tk, empty_ok)
        if tk.shape[0] != m:
            raise ValueError(f"teacher key must have {m} rows (one per key), got {tk.shape[0]}")
        if tk.shape[1] != tq.shape[1]:
            raise ValueError(f"teacher key has embedding dim {tk.shape[1]} but teacher query "
                             f"has {tq.shape[1]}")
        if tk.device != device:
            raise ValueError(f"teacher key is on {tk.device} but query is on {device}")
    if margin and weight > 0:
        raise ValueError("margin with a teacher is not supported (the target's margin term "
                         "needs the teacher's mass on each row's positives)")
    tq = tq.detach().to(dtype)
    tk = tq if tk is None else tk.detach().to(dtype)
    if scale is not None:
        scale = _check_scalar("teacher_logit_scale", scale, device, positive=True)
        if torch.is_tensor(scale):
            scale = scale.detach()
    return (tq, tk), scale, float(weight), weighting


def resolve_targets(self_contrast, n, m, positive_index, labels, key_labels, device):
    """(positive_index, labels, key_labels) of n queries against m keys, checked, with the
    defaults filled in: key_labels = labels when the keys are the queries or m == n;
    without labels, positive_index defaults to arange(n) (m >= n) or, for self-contrast,
    to NT-Xent's pairing i <-> i + n/2. A given positive_index's values are checked by
    check_values (a shard's may point at another rank's keys)."""
    if positive_index is not None and labels is not None:
        raise ValueError("give either positive_index or labels, not both")
    if key_labels is not None and labels is None:
        raise ValueError("key_labels needs labels as well")
    if labels is not None:
        labels = check_int_vector("labels", labels, n, "query rows", device)
        if self_contrast:
            if key_labels is not None:
                raise ValueError("key_labels must be None when key is None (the keys are the "
                                 "queries)")
            key_labels = labels
        elif key_labels is None:
            if m != n:
                raise ValueError(f"key_labels is required when key has a different row count "
                                 f"({m}) than query ({n})")
            key_labels = labels
        else:
            key_labels = check_int_vector("key_labels", key_labels, m, "key rows", device)
    elif positive_index is not None:
        positive_index = check_int_vector("positive_index", positive_index, n, "query rows",
                                          device)
    elif self_contrast:
        if n % 2:
            raise ValueError(f"NT-Xent (key=None, no labels) needs an even number of query "
                             f"rows (two views stacked), got {n}")
        positive_index = (torch.arange(n, device=device) + n // 2) % n
    else:
        if m < n:
            raise ValueError(f"the default positive_index arange(N) needs key rows >= query "
                             f"rows, got query rows {n} and key rows {m}")
        positive_index = torch.arange(n, device=device)
    return positive_index, labels, key_labels


def check_inputs(query, key, positive_index, labels, key_labels, temperature,
                 logit_scale, logit_bias, symmetric, label_smoothing, reduction,
                 shard=False, margin=0.0, decoupled=False, teacher=None,
                 teacher_logit_scale=None, teacher_weight=1.0,
                 teacher_weighting="softmax", softmax=True, normalize=False,
                 fused=True) -> Problem:
    """The Problem of one call (module docstring). shard: one rank's shard of a
    distributed loss, which may have no query or key rows; its positive_index points
    into the keys of every rank (the caller checks it against the global sizes), and
    the default one is arange(N) within the shard. softmax: an InfoNCE
    loss (a learnable logit_bias warns: it cancels). normalize: the Problem holds the
    L2-normalized query and key (`normalize_inputs`). fused: the call runs the fused
    ops, which refuse forward-mode AD (the reference's plain ops support it)."""
    check_normalize(normalize)
    margin, decoupled = check_variants(margin, decoupled)
    check_matrix("query", query, shard)
    teachers = teacher if isinstance(teacher, (tuple, list)) else (teacher,)
    if fused:
        check_no_tangent(query=query, key=key, temperature=temperature,
                         logit_scale=logit_scale, logit_bias=logit_bias,
                         **{f"teacher[{i}]": t for i, t in enumerate(teachers)})
    n, d = query.shape
    dev = query.device
    if key is not None:
        check_matrix("key", key, shard)
        if key.shape[1] != d:
            raise ValueError(f"key has embedding dim {key.shape[1]} but query has {d}")
        if key.device != dev:
            raise ValueError(f"key is on {key.device} but query is on {dev}")
        if key.dtype != query.dtype:
            raise TypeError(f"key has dtype {key.dtype} but query has {query.dtype}")
    m = n if key is None else key.shape[0]
    if normalize:
        query, key = normalize_inputs(query, key)

    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

    if temperature is not None and logit_scale is not None:
        raise ValueError("give either temperature or logit_scale, not both (logit_scale is "
                         "1 / temperature)")
    scale_name = "logit_scale"
    if logit_scale is not None:
        scale = check_scale("logit_scale", logit_scale, n, dev)
    else:
        scale_name = "temperature"
        t = DEFAULT_TEMPERATURE if temperature is None else temperature
        t = check_scale("temperature", t, n, dev)
        scale = 1.0 / t
        _check_reciprocal(t, scale)
    bias = 0.0 if logit_bias is None else _check_scalar("logit_bias", logit_bias, dev, positive=False)
    if softmax:
        warn_bias(logit_bias)

    given_index = positive_index is not None
    positive_index, labels, key_labels = resolve_targets(
        key is None, n, m, positive_index, labels, key_labels, dev)

    per_row = torch.is_tensor(scale) and scale.dim() == 1
    if (margin or decoupled) and symmetric and key is None and given_index and not per_row:
        # the columns reuse the rows' log-sum-exps, which needs a symmetric shifted S
        raise ValueError("margin/decoupled with key=None and symmetric=True needs symmetric "
                         "positives (labels or the default NT-Xent pairing), not a "
                         "positive_index")
    pair, t_scale, t_weight, t_weighting = check_teacher(
        teacher, key, n, m, dev, query.dtype, teacher_logit_scale, teacher_weight,
        teacher_weighting, margin, shard)
    return Problem(query, key, positive_index, labels, key_labels, scale, bias,
                   symmetric, float(label_smoothing), reduction, scale_name,
                   index_given=given_index, margin=margin, decoupled=decoupled,
                   teacher=pair, teacher_scale=t_scale, teacher_weight=t_weight,
                   teacher_weighting=t_weighting)


SIGLIP_SCALE = 10.0       # SigLIP's initialisation: t' = log 10, s = exp(t') = 10
SIGLIP_BIAS = -10.0


def check_siglip(query, key, positive_index, labels, key_labels, logit_scale, logit_bias,
                 reduction, shard=False, normalize=False, fused=True) -> Problem:
    """The Problem of a sigmoid-loss call: the InfoNCE checks with a required key, a
    required (exponentiated) logit_scale and a logit_bias (shard, normalize, fused: as
    check_inputs)."""
    check_normalize(normalize)
    if key is None:
        raise TypeError("siglip_loss needs key (the second tower's embeddings), got None")
    if logit_scale is None:
        raise TypeError("logit_scale must be a float or a 0-dim tensor, got None")
    if logit_bias is None:
        raise TypeError("logit_bias must be a float or a 0-dim tensor, got None")
    p = check_inputs(query, key, positive_index, labels, key_labels, None, logit_scale,
                     logit_bias, False, 0.0, reduction, shard=shard,
                     softmax=False, normalize=normalize, fused=fused)
    if p.per_row:
        raise ValueError(f"logit_scale must be a float or a 0-dim tensor for siglip_loss, got "
                         f"shape {tuple(logit_scale.shape)}")
    return p


def check_uniformity(x, t, fused=True):
    """(x, t) of uniformity_loss: x (N, D) with N >= 2, t a float > 0 or a 0-dim tensor
    (fused: as check_inputs)."""
    check_matrix("x", x)
    if fused:
        check_no_tangent(x=x, t=t)
    if x.shape[0] < 2:
        raise ValueError(f"x must have at least 2 rows (pairs i != j), got shape {tuple(x.shape)}")
    return x, _check_scalar("t", t, x.device, positive=True)


def check_alignment(x, y, alpha):
    """(x, y, alpha) of alignment_loss: two (N, D) matrices of one dtype and device."""
    check_matrix("x", x)
    check_matrix("y", y)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"y has dtype {y.dtype} but x has {x.dtype}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
    alpha = as_float("alpha", alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be finite and > 0, got {alpha}")
    return x, y, float(alpha)


def check_values(positive_index, n_keys, self_offset, self_contrast, scale, bias,
                 scale_name="logit_scale", where=""):
    """The checks that read data: positive_index within [0, n_keys) and (self-contrast)
    never at the query itself (query i is key i + self_offset); a tensor scale finite and
    > 0 and a tensor bias finite, when on the CPU (on a GPU reading them would cost a
    device sync every step: they are not checked there) and not empty (a per-row scale
    of a shard without rows)."""
    if positive_index is not None and positive_index.numel():
        lo, hi = int(positive_index.min()), int(positive_index.max())
        if lo < 0 or hi >= n_keys:
            raise ValueError(f"positive_index values must be in [0, {n_keys}){where}, got range "
                             f"[{lo}, {hi}]")
        if self_contrast:
            own = torch.arange(positive_index.numel(), device=positive_index.device) + self_offset
            if bool((positive_index == own).any()):
                raise ValueError(f"positive_index must not point a query at itself when key is "
                                 f"None{where}")
    for name, x, positive in ((scale_name, scale, True), ("logit_bias", bias, False)):
        if torch.is_tensor(x) and x.device.type == "cpu" and x.numel():
            v = x.detach().double().reshape(-1)
            if name == "temperature":          # the scale is 1 / temperature
                v = torch.where(v != 0, 1.0 / v, torch.full_like(v, float("inf")))
            # the worst value: a non-finite one, else the smallest
            bad = v[~torch.isfinite(v)]
            _check_value(name, float(bad[0] if bad.numel() else v.min()), positive)
            # the kernels hold the scale (1 / temperature) and bias in float32
            big = float((1.0 / v if name == "temperature" else v).abs().max())
            if big > torch.finfo(torch.float32).max:
                if name == "temperature":
                    raise ValueError(f"temperature must be > 0 with a finite reciprocal in "
                                     f"float32 (the kernels' scale), got {1 / big}")
                raise ValueError(f"{name} must be finite in float32 (the kernels' scalars), "
                                 f"got {big}")


_WARNED = set()
_INTERNAL = (os.path.dirname(os.path.abspath(__file__)),
             os.path.dirname(os.path.abspath(torch.__file__)))


def warn_user(message, category=UserWarning):
    """Warn, attributed to the user's line: the first frame outside this package and
    torch (a module call, a custom op)."""
    level, f = 1, sys._getframe(0)
    while f is not None and f.f_code.co_filename.startswith(_INTERNAL):
        f, level = f.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def warn_once(key, message, category=UserWarning):
    """warn_user once per process for `key`."""
    if key in _WARNED or torch.compiler.is_compiling():
        return
    _WARNED.add(key)
    warn_user(message, category)


def warn_bias(logit_bias):
    """logit_bias in a softmax loss: a constant added to every logit of a row cancels in
    its log-sum-exp, so a learned one gets a zero gradient."""
    if torch.is_tensor(logit_bias) and logit_bias.requires_grad:
        warn_once("bias", "contrastive_kernels: logit_bias has no effect on a softmax "
                  "(InfoNCE) loss: it is added to every logit of a row and cancels in the "
                  "softmax, so its gradient is always 0. A learned bias matters for the "
                  "sigmoid loss (siglip_loss) only.")
