"""The public local loss: `info_nce`.

The loss splits into two parts (docs/DESIGN.md, "Decomposition"): the log-sum-exp over
rows (and columns), the only O(N*M*D) part, computed tile by tile by a backend, and the
target terms, linear in q and in k (targets.Targets). Both come out of one custom op
(ops.info_nce_stats) as per-row statistics; the row losses and the reduction are plain
torch ops (engine.side_losses, engine.reduce), so torch.compile traces the whole call.
The backend is chosen inside the op (backends.REGISTRY.select), per call.
"""
import math

import torch

from . import engine, ops
from .options import make_options
from .problem import (SIGLIP_BIAS, SIGLIP_SCALE, check_alignment, check_inputs, check_siglip,
                      check_uniformity, check_values)


def info_nce(query, key=None, *, positive_index=None, labels=None, key_labels=None,
             temperature=None, logit_scale=None, logit_bias=None, symmetric=False,
             label_smoothing=0.0, reduction="mean", margin=0.0, decoupled=False,
             teacher=None, teacher_logit_scale=None, teacher_weight=1.0,
             teacher_weighting="softmax", backend="auto", **options):
    """Fused InfoNCE / CLIP / NT-Xent / SupCon loss. See README.md and docs/DESIGN.md.

    Same values and gradients as the materializing `contrastive_kernels.reference.info_nce`,
    without ever holding the N x M logits. With reduction="none" it returns the
    per-row losses (N,); with symmetric=True, the row losses then the column
    losses, each weighted 1/2, shape (N + M,), so that .sum() equals reduction="sum".
    Rows with no positive have loss 0 and are left out of the mean.

    Kernel options (keyword arguments; None or absent: the environment's default):
    deterministic, precision ("ieee"/"tf32"), low_memory, algorithm
    ("auto"/"fused"/"blocked") and workspace (bytes); see contrastive_kernels.options.
    `backend` is "auto" (the fastest that can serve this call) or a name from
    `available_backends()`; one that cannot serve the call raises a ValueError with
    its reasons.

    Variants (docs/DESIGN.md): margin m subtracts m from every positive's cosine,
    S_ij = s (<q_i, k_j> - m [j positive]) + b, in the log-sum-exp and the target
    (AM-softmax); decoupled=True leaves the positives out of the log-sum-exp (DCL), and
    a row with no negative then has no loss. teacher: (teacher_query, teacher_key), or
    teacher_query under key=None, mixes soft targets into the row (and column) targets,
    (1 - teacher_weight) w_hard + teacher_weight w_teacher, with w_teacher the softmax of
    teacher_logit_scale <tq_i, tk_j> (default: the student's scale) or, with
    teacher_weighting="linear" (CWCL), (1 + <tq_i, tk_j>) / 2 normalized per row. The
    teacher gets no gradient.
    """
    p = check_inputs(query, key, positive_index, labels, key_labels, temperature,
                     logit_scale, logit_bias, symmetric, label_smoothing, reduction,
                     margin=margin, decoupled=decoupled, teacher=teacher,
                     teacher_logit_scale=teacher_logit_scale, teacher_weight=teacher_weight,
                     teacher_weighting=teacher_weighting)
    opts = make_options(**options)
    check_variant_options(p, opts)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    q_op, k_op, scale_t, side_scale = op_inputs(p)
    bias_t = p.bias if torch.is_tensor(p.bias) else None
    margin_t, shift = positive_shift(p, p.scale if p.per_row else scale_t)
    stats = ops.info_nce_stats(q_op, k_op, scale_t, bias_t, shift, p.positive_index, p.labels,
                               p.key_labels, p.scale_name, p.index_given, p.label_smoothing,
                               p.symmetric, p.per_row and p.self_contrast, backend,
                               *opts.as_args())
    eps = p.label_smoothing
    sub = 1 if p.self_contrast else 0
    x_r, x_c = teacher_dots(p, q_op, k_op, backend, opts)
    alpha = p.teacher_weight
    rows = engine.side_losses(*stats[:4], side_scale, p.bias, eps, p.n_keys - sub,
                              margin=margin_t, decoupled=p.decoupled,
                              teacher=None if x_r is None else (x_r, alpha))
    col = None
    if p.symmetric:
        # Self-contrast: S is symmetric and so is its mask, so the columns' log-sum-exps
        # are the rows' (their targets may differ: a positive_index need not be symmetric);
        # not with a per-query scale (the op then gets the keys and computes them).
        lse_c = stats[0] if (p.self_contrast and not p.per_row) else stats[4]
        col = engine.side_losses(lse_c, *stats[5:], side_scale, p.bias, eps,
                                 p.query.shape[0] - sub, margin=column_margin(p, margin_t),
                                 decoupled=p.decoupled,
                                 teacher=None if x_c is None else (x_c, alpha))
    return engine.reduce(rows, col, p.reduction)


def teacher_dots(p, q_op, k_op, backend, opts):
    """(X (N,), X^c (M,) or None) of a call with a teacher, (None, None) without one:
    X_i = sum_j w^T_ij <q_i, k_j> over the valid keys, and its column twin, with the
    queries and keys the op sees (so a per-query scale is in them)."""
    if p.teacher is None or p.teacher_weight == 0:
        return None, None
    masked = p.per_row and p.self_contrast
    tq_op, tk, ts = teacher_operands(p)
    if p.teacher_weighting == "linear":
        return linear_teacher_dots(q_op, q_op if k_op is None else k_op, p.teacher[0], tk,
                                   p.self_contrast, p.symmetric)
    key = None if (p.self_contrast and not masked) else k_op
    x = ops.teacher_dots(q_op, key, tq_op, tk, ts, p.symmetric, masked, backend,
                         *opts.as_args())
    return x[0], (x[1] if p.symmetric else None)


def teacher_operands(p):
    """(teacher queries, teacher keys, teacher scale (a tensor)) as the kernels see them:
    the student's per-row scale, the default, is folded into the teacher's queries."""
    tq, tk = p.teacher
    ts = p.teacher_scale
    if ts is None and p.per_row:
        return tq * p.scale.detach().to(tq.dtype)[:, None], tk, torch.ones(
            (), dtype=p.out_dtype, device=tq.device)
    if ts is None:
        ts = p.scale.detach() if torch.is_tensor(p.scale) else p.scale
    if not torch.is_tensor(ts):
        ts = torch.tensor(ts, dtype=p.out_dtype, device=tq.device)
    return tq, tk, ts


def linear_teacher_dots(q, k, tq, tk, self_c, cols, total=None):
    """The CWCL weighting, w_ij = f_ij / sum_{j valid} f_ij with f = (1 + <tq_i, tk_j>) / 2:
    X_i = sum_j w_ij <q_i, k_j> is (<q_i, sum_j k_j> + q_i^T C tq_i) / (2 F_i) with
    C = sum_j k_j tk_j^T (D x D_t) and F_i = sum_j f_ij, so O((N + M) D D_t), no tile;
    the diagonal taken out under self-contrast. Autograd gives the gradients. total: sums
    a list of tensors over the global batch (the ring's all_reduce), else local."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, tq, tk = (x.to(acc) for x in (q, k, tq, tk))
    total = total or (lambda xs: xs)

    def sums(b, tb):
        one = torch.ones(1, dtype=acc, device=b.device)
        return [b.sum(0), b.T @ tb, tb.sum(0), one * b.shape[0]]

    parts = total(sums(k, tk) + (sums(q, tq) if cols else []))

    def side(a, b, ta, tb, bsum, c, tbsum, count):
        num = a @ bsum + ((a @ c) * ta).sum(1)
        den = count + ta @ tbsum
        if self_c:              # j = i is not a valid key
            own, town = (a * b).sum(1), (ta * tb).sum(1)
            num = num - own * (1 + town)
            den = den - (1 + town)
        return num / den
    x_r = side(q, k, tq, tk, *parts[:4])
    return x_r, (side(k, q, tk, tq, *parts[4:]) if cols else None)


def op_inputs(p):
    """(queries, keys, scale, the side losses' scale) of the fused op. A per-query scale
    s (N,) is folded into the queries, q_i s_i, so that the kernels see S = (s q) k^T at
    scale 1 and autograd carries the gradients to q and s; under key=None the keys are
    then the unscaled queries, diagonal masked (the op's `masked`)."""
    q = p.query
    if not p.per_row:
        scale_t = p.scale if torch.is_tensor(p.scale) else torch.tensor(
            p.scale, dtype=p.out_dtype, device=q.device)
        return q, p.key, scale_t, p.scale
    check_values(None, 0, 0, False, p.scale, None, p.scale_name)
    q_op = q * p.scale.to(q.dtype)[:, None]
    k_op = q if p.self_contrast else p.key
    return q_op, k_op, torch.ones((), dtype=p.out_dtype, device=q.device), 1.0


def column_margin(p, margin):
    """The margin of each column's target: the mean of its positive rows' margins (the
    rows' own one for a scalar scale)."""
    if margin is None or not p.per_row:
        return margin
    n, m = p.query.shape[0], p.n_keys
    ones = torch.ones_like(margin)
    if p.labels is not None:
        _, inv = torch.unique(torch.cat([p.labels, p.key_labels]), return_inverse=True)
        c = int(inv.max()) + 1
        total = margin.new_zeros(c).index_add(0, inv[:n], margin)[inv[n:]]
        count = margin.new_zeros(c).index_add(0, inv[:n], ones)[inv[n:]]
        if p.self_contrast:         # key j is query j: not its own positive
            total, count = total - margin, count - 1
    else:
        total = margin.new_zeros(m).index_add(0, p.positive_index, margin)
        count = margin.new_zeros(m).index_add(0, p.positive_index, ones)
    return total / count.clamp_min(1)


def positive_shift(p, scale_t):
    """(margin, shift) of a call: the shift of a positive logit in the targets (-s m, a
    tensor with the scale's gradient, (N,) for a per-query scale; None without a margin)
    and the per-row shift inside the log-sum-exps ((N,): -s m, or -inf when decoupled;
    None for neither)."""
    n = p.query.shape[0]
    margin = -p.margin * scale_t if p.margin else None
    if p.decoupled:
        shift = torch.full((n,), float("-inf"), dtype=scale_t.dtype, device=scale_t.device)
    elif margin is not None:
        shift = margin.expand(n).contiguous()
    else:
        shift = None
    return margin, shift


def check_variant_options(p, opts):
    """The kernel options a variant cannot take (ValueError before any kernel)."""
    if (p.teacher is not None and p.teacher_weighting == "softmax" and p.teacher_weight > 0
            and opts.low_memory):
        raise ValueError("a teacher (softmax weighting) does not support low_memory=True (its "
                         "backward makes float32 N x D gradients)")
    if not p.shifted:
        return
    what = "decoupled=True" if p.decoupled else "margin"
    if opts.low_memory:
        raise ValueError(f"{what} does not support low_memory=True (the low-memory backward "
                         f"kernels have no positive shift)")
    if opts.algorithm == "blocked":
        raise ValueError(f"{what} does not support algorithm='blocked' (use 'auto' or "
                         f"'fused')")


def siglip_loss(query, key, *, logit_scale=SIGLIP_SCALE, logit_bias=SIGLIP_BIAS,
                positive_index=None, labels=None, key_labels=None, reduction="mean",
                backend="auto", passes=None, **options):
    """Fused sigmoid contrastive loss (SigLIP): -sum_ij log sigmoid(y_ij z_ij) with
    z_ij = logit_scale <q_i, k_j> + logit_bias, y_ij = +1 on positive pairs and -1
    elsewhere, never holding the N x M logits. See README.md and docs/DESIGN.md.

    logit_scale is the exponentiated scale (as open_clip passes it) and logit_bias the
    bias, each a float or a 0-dim tensor that gets its gradient. Positives: the diagonal
    by default (M >= N; extra keys are negatives), `positive_index`, or every same-label
    pair (`labels`, `key_labels`). reduction: "mean" divides by N (as open_clip and
    big_vision do), "sum", or "none": the per-query row sums, shape (N,).

    passes: 3 computes the gradients in the forward pass (one GEMM pass fewer, and holds
    float32 dq and dk between forward and backward); 4 recomputes the tiles in backward
    and holds nothing; None picks 3 for "mean"/"sum" when a gradient is needed (measured
    faster, docs/DESIGN.md) and 4 otherwise ("none" always takes 4).
    Kernel options: deterministic, precision (see contrastive_kernels.options).
    """
    p = check_siglip(query, key, positive_index, labels, key_labels, logit_scale,
                     logit_bias, reduction)
    opts = siglip_options(backend, passes, options)
    q, k = p.query, p.key
    acc = p.out_dtype
    as_tensor = lambda x: x if torch.is_tensor(x) else torch.tensor(x, dtype=acc,
                                                                    device=q.device)
    scale_t, bias_t = as_tensor(p.scale), as_tensor(p.bias)
    grad = torch.is_grad_enabled()
    need_q, need_k = grad and q.requires_grad, grad and k.requires_grad
    need_s = grad and torch.is_tensor(p.scale) and p.scale.requires_grad
    args = (q, k, scale_t, bias_t, p.positive_index, p.labels, p.key_labels)
    if (passes or 3) == 3 and p.reduction != "none" and (need_q or need_k or need_s):
        out = ops.siglip_fused(*args, p.index_given, backend, *opts.as_args(), need_q, need_k,
                               need_s)
        total = out[0].reshape(())
        return total if p.reduction == "sum" else total / q.shape[0]
    r, _, a, npos = ops.siglip_stats(*args, p.index_given, backend, *opts.as_args())
    rows = r - p.scale * a - p.bias * npos
    if p.reduction == "none":
        return rows
    return rows.sum() if p.reduction == "sum" else rows.sum() / q.shape[0]


def siglip_options(backend, passes, options):
    """The kernel options of a sigmoid-loss call (errors name the argument)."""
    opts = make_options(**options)
    if opts.low_memory:
        raise ValueError("low_memory=True is an info_nce option; for siglip_loss use passes=4, "
                         "which holds nothing between forward and backward")
    if opts.algorithm == "blocked":
        raise ValueError("algorithm='blocked' is an info_nce option (siglip_loss has the fused "
                         "kernels only)")
    if isinstance(passes, bool) or passes not in (None, 3, 4):
        raise ValueError(f"passes must be None, 3 or 4, got {passes!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return opts



def uniformity_loss(x, t=2.0, *, backend="auto", **options):
    """Wang & Isola's uniformity, log mean_{i != j} exp(-t ||x_i - x_j||^2) over the
    L2-normalized rows of x, without the N x N distances. On unit vectors
    ||x_i - x_j||^2 = 2 - 2 <x_i, x_j>, so it is -2t + log sum_i exp(L_i) - log(N (N - 1))
    with L_i the self-masked row log-sum-exp of 2t <x_i, x_j>: the fused kernel's row
    statistic, with its gradient. t: a float > 0 or a 0-dim tensor (gets a gradient).
    Kernel options and `backend` as for info_nce."""
    x, t = check_uniformity(x, t)
    opts = make_options(**options)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    xn = torch.nn.functional.normalize(x, dim=1)
    n = x.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    t_t = t if torch.is_tensor(t) else torch.tensor(t, dtype=acc, device=x.device)
    # any valid positive will do: only the log-sum-exps are used
    other = (torch.arange(n, device=x.device) + 1) % n
    stats = ops.info_nce_stats(xn, None, 2 * t_t, None, None, other, None, None, "2t", False,
                               0.0, False, False, backend, *opts.as_args())
    return torch.logsumexp(stats[0], 0) - 2 * t_t - math.log(n * (n - 1))


def alignment_loss(x, y, alpha=2.0):
    """Wang & Isola's alignment, mean_i ||x_i - y_i||^alpha over the L2-normalized rows
    of x and y (positive pairs). O(N D): plain torch ops."""
    x, y, alpha = check_alignment(x, y, alpha)
    xn = torch.nn.functional.normalize(x, dim=1)
    yn = torch.nn.functional.normalize(y, dim=1)
    d = (xn - yn).float() if xn.dtype in (torch.float16, torch.bfloat16) else xn - yn
    return d.norm(dim=1).pow(alpha).mean()
