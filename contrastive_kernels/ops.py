"""The local fused loss as custom ops (torch.library), so that torch.compile traces it as
one call with a known output shape (no graph break, no host sync outside it).

    contrastive_kernels::info_nce_stats   forward: row and column statistics (stats_impl)
    contrastive_kernels::info_nce_grads   backward: the gradients of q, k and the scale
                                          (grads_impl)

Everything data-dependent (value checks, label classes, positive pairs) and the choice
of the backend (`backend` is the name asked for, "auto" included) happen inside them, in
eager mode. Both call the stages in engine.py with `LocalBlocks`.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import engine
from .backends import REGISTRY, Call
from .options import Options
from .problem import check_values
from .targets import Targets

def _setup(query, key, positive_index, labels, key_labels, label_smoothing, symmetric, masked,
           backend, options, shift=None):
    self_c = key is None
    k = query if self_c else key
    n, d = query.shape
    be = REGISTRY.select(backend, Call(query.device, query.dtype, n, k.shape[0], d, self_c,
                                       symmetric, extra=() if shift is None else ("shift",)),
                         options)
    spec = engine.Spec(be, options, self_c, symmetric and not self_c, masked and not self_c)
    targets = Targets(n, d, k.shape[0], labels, positive_index, label_smoothing, symmetric)
    kl = None if labels is None else (labels if self_c else key_labels)
    return spec, k, targets, engine.LocalBlocks(targets, kl, spec.self_mask)


def _scale(scale, query):
    return scale.detach().to(engine.acc_dtype(query.dtype)).reshape(())


def _delta(shift, query):
    return None if shift is None else shift.detach().to(engine.acc_dtype(query.dtype)).contiguous()


def _exact(x):
    """No autocast inside the ops: the backends choose their own precision (fp32
    accumulation); autocast must not turn their products into half precision."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def stats_impl(query: Tensor, key: Optional[Tensor], scale: Tensor, bias: Optional[Tensor],
                   shift: Optional[Tensor], positive_index: Optional[Tensor],
                   labels: Optional[Tensor],
                   key_labels: Optional[Tensor], scale_name: str, check_index: bool,
                   label_smoothing: float, symmetric: bool, masked: bool, backend: str,
                   deterministic: bool,
                   precision: str, low_memory: bool, algorithm: str,
                   workspace: int) -> List[Tensor]:
    """[lse, A, P, B] of the rows and [lse, A, P, B] of the columns: the column ones empty
    unless symmetric, the column lse also empty under self-contrast (it is the rows');
    B is zeros without label smoothing. shift (N,): each row's positive shift inside the
    log-sum-exps (margin, decoupled; engine.forward), or None. masked: the keys are the
    queries' own rows (given: the queries are scaled copies), the diagonal is masked."""
    options = Options(deterministic, precision, low_memory, algorithm, workspace)
    n_keys = query.shape[0] if key is None else key.shape[0]
    check_values(positive_index if check_index else None, n_keys, 0, key is None or masked,
                 scale, bias, scale_name)
    spec, k, targets, blocks = _setup(query, key, positive_index, labels, key_labels,
                                      label_smoothing, symmetric, masked, backend, options,
                                      shift)
    with torch.no_grad(), _exact(query):
        rows, col = engine.forward(spec, query.detach(), k.detach(), _scale(scale, query),
                                   targets, blocks, _delta(shift, query))
    acc = rows[0].dtype
    zeros = lambda n: torch.zeros(n, dtype=acc, device=query.device)
    lse, a, p, b = rows
    out = [lse, a, p, zeros(query.shape[0]) if b is None else b]
    if col is None:
        out += [zeros(0) for _ in range(4)]
    else:
        out += [zeros(0) if col[0] is None else col[0], col[1], col[2],
                zeros(n_keys) if col[3] is None else col[3]]
    return out


info_nce_stats = torch.library.custom_op("contrastive_kernels::info_nce_stats",
                                         mutates_args=())(stats_impl)


@info_nce_stats.register_fake
def _(query, key, scale, bias, shift, positive_index, labels, key_labels, scale_name, check_index,
      label_smoothing, symmetric, masked, backend, deterministic, precision, low_memory,
      algorithm, workspace):
    acc = engine.acc_dtype(query.dtype)
    n = query.shape[0]
    m = (n if key is None else key.shape[0]) if symmetric else 0
    m_lse = m if key is not None else 0
    return [query.new_empty(n, dtype=acc) for _ in range(4)] + \
        [query.new_empty(m_lse, dtype=acc)] + [query.new_empty(m, dtype=acc) for _ in range(3)]


def grads_impl(query: Tensor, key: Optional[Tensor], scale: Tensor, shift: Optional[Tensor],
                   positive_index: Optional[Tensor], labels: Optional[Tensor],
                   key_labels: Optional[Tensor], stats: List[Tensor], grads: List[Tensor],
                   label_smoothing: float, symmetric: bool, masked: bool, backend: str,
                   deterministic: bool,
                   precision: str, low_memory: bool, algorithm: str, workspace: int,
                   need_q: bool, need_k: bool, need_s: bool,
                   need_shift: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, ds, dshift) in the dtypes of query, key, scale and shift; a gradient not
    needed is empty (ds: zero). stats = [lse_r, lse_c], grads = the gradients of [lse, A, B]
    of the rows and of the columns."""
    options = Options(deterministic, precision, low_memory, algorithm, workspace)
    spec, k, targets, blocks = _setup(query, key, positive_index, labels, key_labels,
                                      label_smoothing, symmetric, masked, backend, options,
                                      shift)
    lse_r, lse_c = stats
    # (an empty gradient: none came; the first two are always given)
    g_r, g_a, g_b, g_c, g_ac, g_bc = (g if g.numel() or i < 2 else None
                                      for i, g in enumerate(grads))
    if not spec.cols:
        lse_c = g_c = None
    elif g_c is None:
        g_c = torch.zeros_like(lse_c)
    if symmetric and g_ac is None:
        g_ac = torch.zeros(k.shape[0], dtype=lse_r.dtype, device=query.device)
    self_c = key is None
    # the scale's gradient reads dq (or dk); under self-contrast q is also the keys
    need_dq = need_q or (need_s and not need_k)
    need_dk = need_k or (self_c and need_q)
    need_shift = need_shift and shift is not None
    with torch.no_grad(), _exact(query):
        out = list(engine.backward(
            spec, query.detach(), k.detach(), _scale(scale, query), targets, blocks, lse_r, g_r,
            g_a, g_b, (lse_c, g_c, g_ac, g_bc) if symmetric else None, need_dq, need_dk,
            need_s, _delta(shift, query), need_shift))
    dsh = out.pop()
    dsh_out = dsh.to(shift.dtype) if (need_shift and dsh is not None) else query.new_empty(0)
    return _outputs(query, k, scale, out, need_q, need_k, need_s) + (dsh_out,)


info_nce_grads = torch.library.custom_op("contrastive_kernels::info_nce_grads",
                                         mutates_args=())(grads_impl)


@info_nce_grads.register_fake
def _(query, key, scale, shift, positive_index, labels, key_labels, stats, grads, label_smoothing,
      symmetric, masked, backend, deterministic, precision, low_memory, algorithm, workspace,
      need_q, need_k, need_s, need_shift):
    dq = torch.empty_like(query) if need_q else query.new_empty(0)
    dk = torch.empty_like(key) if (need_k and key is not None) else query.new_empty(0)
    dsh = torch.empty_like(shift) if (need_shift and shift is not None) else query.new_empty(0)
    return dq, dk, torch.empty_like(scale), dsh


def _setup_context(ctx, inputs, output):
    (query, key, scale, bias, shift, positive_index, labels, key_labels, scale_name, check_index,
     label_smoothing, symmetric, masked, backend, *opts) = inputs
    ctx.save_for_backward(query, key, scale, shift, positive_index, labels, key_labels,
                          output[0], output[4], output[5])
    ctx.config = (label_smoothing, symmetric, masked, backend, *opts)


def _backward(ctx, grads):
    (query, key, scale, shift, positive_index, labels, key_labels, lse_r, lse_c,
     a_c) = ctx.saved_tensors
    label_smoothing, symmetric, masked, backend, *opts = ctx.config
    like = [lse_r, lse_r, lse_r, lse_c, a_c, a_c]
    # gradients of [lse, A, B] of the rows and of the columns (P counts: none); one that
    # did not come is empty, but for the rows' lse and A
    picked = [grads[i] for i in (0, 1, 3, 4, 5, 7)]
    g = [(torch.zeros_like(x) if i < 2 else x.new_empty(0)) if gi is None else
         gi.to(x.dtype).contiguous() for i, (gi, x) in enumerate(zip(picked, like))]
    need_q, need_k, need_s, _, need_sh = ctx.needs_input_grad[:5]
    dq, dk, ds, dsh = info_nce_grads(query, key, scale, shift, positive_index, labels,
                                     key_labels, [lse_r, lse_c], g, label_smoothing, symmetric,
                                     masked, backend, *opts, need_q,
                                     need_k and key is not None, need_s, need_sh)
    return (dq if need_q else None, dk if (need_k and key is not None) else None,
            ds if need_s else None, None, dsh if need_sh else None) + (None,) * 14


info_nce_stats.register_autograd(engine.first_order(_backward), setup_context=_setup_context)


# The Python body of each op: a dispatch mode that wants to see the operations inside
# them (the test suite's poisoning, bench/peak_gpu.py's memory trace) runs the body under
# itself instead of the opaque op.
BODIES = {torch.ops.contrastive_kernels.info_nce_stats.default: stats_impl,
          torch.ops.contrastive_kernels.info_nce_grads.default: grads_impl}


# ---- the sigmoid loss (SigLIP)
#
#   contrastive_kernels::siglip_stats   4-pass forward: row statistics [R, T]
#   contrastive_kernels::siglip_grads   4-pass backward: the gradients of q, k and the scale
#   contrastive_kernels::siglip_fused   3-pass: the total loss and, in the same pass, its
#                                       gradients for an upstream gradient of 1
# (engine.siglip_forward / siglip_backward; docs/DESIGN.md, "The sigmoid loss").

def _siglip_setup(query, key, positive_index, labels, key_labels, backend, options):
    n, d = query.shape
    be = REGISTRY.select(backend, Call(query.device, query.dtype, n, key.shape[0], d,
                                       loss="siglip"), options)
    spec = engine.Spec(be, options, False, False)
    targets = Targets(n, d, key.shape[0], labels, positive_index)
    return spec, targets, engine.LocalBlocks(targets, key_labels, False)


def _check_siglip(query, key, scale, bias, positive_index, check_index):
    check_values(positive_index if check_index else None, key.shape[0], 0, False, scale, bias)


def siglip_stats_impl(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor,
                      positive_index: Optional[Tensor], labels: Optional[Tensor],
                      key_labels: Optional[Tensor], check_index: bool, backend: str,
                      deterministic: bool, precision: str, low_memory: bool, algorithm: str,
                      workspace: int) -> List[Tensor]:
    """[R, T] of the rows: their losses and bias derivatives (engine.siglip_forward)."""
    options = Options(deterministic, precision, low_memory, algorithm, workspace)
    _check_siglip(query, key, scale, bias, positive_index, check_index)
    spec, targets, blocks = _siglip_setup(query, key, positive_index, labels, key_labels,
                                          backend, options)
    with torch.no_grad(), _exact(query):
        stats, _ = engine.siglip_forward(spec, query.detach(), key.detach(),
                                         _scale(scale, query), _scale(bias, query), targets,
                                         blocks, False, False)
    return list(stats)


siglip_stats = torch.library.custom_op("contrastive_kernels::siglip_stats",
                                       mutates_args=())(siglip_stats_impl)


@siglip_stats.register_fake
def _(query, key, scale, bias, positive_index, labels, key_labels, check_index, backend,
      deterministic, precision, low_memory, algorithm, workspace):
    acc = engine.acc_dtype(query.dtype)
    return [query.new_empty(query.shape[0], dtype=acc) for _ in range(2)]


def siglip_grads_impl(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor,
                      positive_index: Optional[Tensor], labels: Optional[Tensor],
                      key_labels: Optional[Tensor], g_r: Tensor, backend: str,
                      deterministic: bool, precision: str, low_memory: bool, algorithm: str,
                      workspace: int, need_q: bool, need_k: bool,
                      need_s: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, ds) of sum_i g_r[i] R_i; one not needed is empty (ds: 0)."""
    options = Options(deterministic, precision, low_memory, algorithm, workspace)
    spec, targets, blocks = _siglip_setup(query, key, positive_index, labels, key_labels,
                                          backend, options)
    need_dq = need_q or (need_s and not need_k)
    with torch.no_grad(), _exact(query):
        out = list(engine.siglip_backward(
            spec, query.detach(), key.detach(), _scale(scale, query), _scale(bias, query),
            targets, blocks, g_r, need_dq, need_k, need_s))
    return _outputs(query, key, scale, out, need_q, need_k, need_s)


def _outputs(query, key, scale, grads, need_q, need_k, need_s):
    """(dq, dk, ds) of grads = [dq, dk, ds] (float32/64) in the dtypes of query, key and
    scale. The list is emptied as it goes: one cast at a time, each float32 buffer dropped
    once cast (the caller must hold no other reference)."""
    dq = grads.pop(0)
    dq_out = dq.to(query.dtype) if (need_q and dq is not None) else query.new_empty(0)
    del dq
    dk, ds = grads.pop(0), grads.pop(0)
    dk_out = dk.to(key.dtype) if (need_k and dk is not None) else query.new_empty(0)
    ds_out = (ds.to(scale.dtype).reshape(scale.shape) if (need_s and ds is not None)
              else torch.zeros_like(scale))
    return dq_out, dk_out, ds_out


siglip_grads = torch.library.custom_op("contrastive_kernels::siglip_grads",
                                       mutates_args=())(siglip_grads_impl)


@siglip_grads.register_fake
def _(query, key, scale, bias, positive_index, labels, key_labels, g_r, backend,
      deterministic, precision, low_memory, algorithm, workspace, need_q, need_k, need_s):
    dq = torch.empty_like(query) if need_q else query.new_empty(0)
    dk = torch.empty_like(key) if need_k else query.new_empty(0)
    return dq, dk, torch.empty_like(scale)


def _siglip_setup_context(ctx, inputs, output):
    query, key, scale, bias, positive_index, labels, key_labels, _check, backend, *opts = inputs
    ctx.save_for_backward(query, key, scale, bias, positive_index, labels, key_labels,
                          output[1])
    ctx.config = (backend, *opts)


def _siglip_backward(ctx, grads):
    query, key, scale, bias, positive_index, labels, key_labels, t = ctx.saved_tensors
    # gradients of [R, T]: T comes with no gradient (it is the bias's derivative of R)
    g_r = torch.zeros_like(t) if grads[0] is None else grads[0].to(t.dtype).contiguous()
    need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
    dq = dk = ds = None
    if need_q or need_k or need_s:
        dq, dk, ds = siglip_grads(query, key, scale, bias, positive_index, labels, key_labels,
                                  g_r, *ctx.config, need_q, need_k, need_s)
    db = (g_r * t).sum().to(bias.dtype).reshape(bias.shape) if need_b else None
    return (dq if need_q else None, dk if need_k else None, ds if need_s else None,
            db) + (None,) * 10


siglip_stats.register_autograd(engine.first_order(_siglip_backward), setup_context=_siglip_setup_context)


def siglip_fused_impl(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor,
                      positive_index: Optional[Tensor], labels: Optional[Tensor],
                      key_labels: Optional[Tensor], check_index: bool, backend: str,
                      deterministic: bool, precision: str, low_memory: bool, algorithm: str,
                      workspace: int, need_q: bool, need_k: bool,
                      need_s: bool) -> List[Tensor]:
    """[total loss (1,), dq, dk, ds (1,), db (1,)]: the loss summed over rows and its
    gradients for an upstream gradient of 1 (dq/dk in the accumulation dtype; empty when
    not needed)."""
    options = Options(deterministic, precision, low_memory, algorithm, workspace)
    _check_siglip(query, key, scale, bias, positive_index, check_index)
    spec, targets, blocks = _siglip_setup(query, key, positive_index, labels, key_labels,
                                          backend, options)
    need_dq = need_q or (need_s and not need_k)
    s, b = _scale(scale, query), _scale(bias, query)
    with torch.no_grad(), _exact(query):
        (r, _), (dq, dk, ds, db) = engine.siglip_forward(
            spec, query.detach(), key.detach(), s, b, targets, blocks, need_dq, need_k)
        total = r.sum().reshape(1)
    empty = lambda: query.new_empty(0, dtype=total.dtype)     # outputs must not alias
    return [total, dq if need_q else empty(), dk if need_k else empty(), ds.reshape(1),
            db.reshape(1)]


siglip_fused = torch.library.custom_op("contrastive_kernels::siglip_fused",
                                       mutates_args=())(siglip_fused_impl)


@siglip_fused.register_fake
def _(query, key, scale, bias, positive_index, labels, key_labels, check_index, backend,
      deterministic, precision, low_memory, algorithm, workspace, need_q, need_k, need_s):
    acc = engine.acc_dtype(query.dtype)
    one = lambda: query.new_empty(1, dtype=acc)
    dq = query.new_empty(query.shape if need_q else (0,), dtype=acc)
    dk = query.new_empty(key.shape if need_k else (0,), dtype=acc)
    return [one(), dq, dk, one(), one()]


def _fused_setup_context(ctx, inputs, output):
    query, key, scale, bias = inputs[:4]
    ctx.save_for_backward(output[1], output[2], output[3], output[4])
    ctx.like = (query.dtype, key.dtype, scale.dtype, scale.shape, bias.dtype, bias.shape)


def _fused_backward(ctx, grads):
    dq, dk, ds, db = ctx.saved_tensors
    qt, kt, st, ss, bt, bs = ctx.like
    c = grads[0]
    need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
    if c is None:
        c = torch.zeros_like(ds)
    return ((dq * c).to(qt) if need_q else None, (dk * c).to(kt) if need_k else None,
            (ds * c).to(st).reshape(ss) if need_s else None,
            (db * c).to(bt).reshape(bs) if need_b else None) + (None,) * 13


siglip_fused.register_autograd(engine.first_order(_fused_backward), setup_context=_fused_setup_context)

BODIES.update({torch.ops.contrastive_kernels.siglip_stats.default: siglip_stats_impl,
               torch.ops.contrastive_kernels.siglip_grads.default: siglip_grads_impl,
               torch.ops.contrastive_kernels.siglip_fused.default: siglip_fused_impl})


# ---- teacher soft targets (the softmax weighting)
#
#   contrastive_kernels::teacher_dots    forward: [X (N,), X^c (M,) or (0,), LSE^T, LSE^Tc]
#   contrastive_kernels::teacher_grads   backward: the gradients of q and k
# (engine.teacher_forward / teacher_backward; docs/DESIGN.md, section 9). The teacher's
# embeddings and scale get no gradient.

def _teacher_setup(query, key, tq, tk, symmetric, masked, backend, options):
    self_c = key is None
    k = query if self_c else key
    n, d = query.shape
    be = REGISTRY.select(backend, Call(query.device, query.dtype, n, k.shape[0], d, self_c,
                                       symmetric, extra=("teacher",)), options)
    spec = engine.Spec(be, options, self_c, symmetric, masked and not self_c)
    rows = Targets(n, max(d, tq.shape[1]), k.shape[0])
    return spec, k, rows.rowdots


def teacher_dots_impl(query: Tensor, key: Optional[Tensor], tq: Tensor, tk: Tensor,
                      ts: Tensor, symmetric: bool, masked: bool, backend: str,
                      deterministic: bool, precision: str, low_memory: bool, algorithm: str,
                      workspace: int) -> List[Tensor]:
    """[X, X^c (empty unless symmetric), LSE^T, LSE^Tc (empty unless symmetric)]."""
    options = Options(deterministic, precision, low_memory, algorithm, workspace)
    spec, k, rowdots = _teacher_setup(query, key, tq, tk, symmetric, masked, backend, options)
    with torch.no_grad(), _exact(query):
        x_r, x_c, lse_t, lse_tc = engine.teacher_forward(
            spec, query.detach(), k.detach(), tq, tk, _scale(ts, query), symmetric, rowdots)
    return [x_r, x_r.new_empty(0) if x_c is None else x_c, lse_t,
            x_r.new_empty(0) if lse_tc is None else lse_tc]


teacher_dots = torch.library.custom_op("contrastive_kernels::teacher_dots",
                                       mutates_args=())(teacher_dots_impl)


@teacher_dots.register_fake
def _(query, key, tq, tk, ts, symmetric, masked, backend, deterministic, precision,
      low_memory, algorithm, workspace):
    acc = engine.acc_dtype(query.dtype)
    n = query.shape[0]
    m = (n if key is None else key.shape[0]) if symmetric else 0
    return [query.new_empty(n, dtype=acc), query.new_empty(m, dtype=acc),
            query.new_empty(n, dtype=acc), query.new_empty(m, dtype=acc)]


def teacher_grads_impl(query: Tensor, key: Optional[Tensor], tq: Tensor, tk: Tensor,
                       ts: Tensor, lse_t: Tensor, lse_tc: Tensor, c_r: Tensor, c_c: Tensor,
                       symmetric: bool, masked: bool, backend: str, deterministic: bool,
                       precision: str, low_memory: bool, algorithm: str, workspace: int,
                       need_q: bool, need_k: bool) -> Tuple[Tensor, Tensor]:
    """(dq, dk) of sum_i c_r[i] X_i + sum_j c_c[j] X^c_j; one not needed is empty."""
    options = Options(deterministic, precision, low_memory, algorithm, workspace)
    spec, k, _ = _teacher_setup(query, key, tq, tk, symmetric, masked, backend, options)
    with torch.no_grad(), _exact(query):
        dq, dk = engine.teacher_backward(
            spec, query.detach(), k.detach(), tq, tk, _scale(ts, query), lse_t,
            lse_tc if symmetric else None, c_r, c_c if symmetric else None, need_q,
            need_k and key is not None)
    dq_out = dq.to(query.dtype) if (need_q and dq is not None) else query.new_empty(0)
    del dq
    dk_out = dk.to(key.dtype) if (need_k and dk is not None) else query.new_empty(0)
    return dq_out, dk_out


teacher_grads = torch.library.custom_op("contrastive_kernels::teacher_grads",
                                        mutates_args=())(teacher_grads_impl)


@teacher_grads.register_fake
def _(query, key, tq, tk, ts, lse_t, lse_tc, c_r, c_c, symmetric, masked, backend,
      deterministic, precision, low_memory, algorithm, workspace, need_q, need_k):
    dq = torch.empty_like(query) if need_q else query.new_empty(0)
    dk = torch.empty_like(key) if (need_k and key is not None) else query.new_empty(0)
    return dq, dk


def _teacher_setup_context(ctx, inputs, output):
    query, key, tq, tk, ts, symmetric, masked, backend, *opts = inputs
    ctx.save_for_backward(query, key, tq, tk, ts, output[2], output[3])
    ctx.config = (symmetric, masked, backend, *opts)


def _teacher_backward(ctx, grads):
    query, key, tq, tk, ts, lse_t, lse_tc = ctx.saved_tensors
    symmetric = ctx.config[0]
    c_r = torch.zeros_like(lse_t) if grads[0] is None else grads[0].to(lse_t.dtype).contiguous()
    c_c = lse_tc.new_empty(0)
    if symmetric:
        c_c = (torch.zeros_like(lse_tc) if grads[1] is None
               else grads[1].to(lse_tc.dtype).contiguous())
    need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq, dk = teacher_grads(query, key, tq, tk, ts, lse_t, lse_tc, c_r, c_c, *ctx.config,
                           need_q, need_k and key is not None)
    return (dq if need_q else None, dk if (need_k and key is not None) else None) + (None,) * 11


teacher_dots.register_autograd(engine.first_order(_teacher_backward), setup_context=_teacher_setup_context)

BODIES.update({torch.ops.contrastive_kernels.teacher_dots.default: teacher_dots_impl,
               torch.ops.contrastive_kernels.teacher_grads.default: teacher_grads_impl})
