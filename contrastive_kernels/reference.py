"""Materializing reference: the test oracle.

Builds the full N x M logit matrix, the full target distribution and the
masked log-softmax, exactly as the losses are defined, in float64, with plain torch
ops (so higher-order gradients work). It shares no code with the fused path except
argument checking. Memory O(N * M): use it for checks, small batches, or a gradient
penalty (create_graph=True), which the fused losses do not support.
"""
import math

import torch

from .problem import check_alignment, check_inputs, check_siglip, check_uniformity, check_values


def _teacher_weights(tq, tk, scale, valid, weighting, dim):
    """The teacher's target matrix over the valid entries, normalized along `dim` (1: the
    rows' targets, 0: the columns')."""
    dots = tq @ tk.T
    if weighting == "softmax":
        return torch.softmax((scale * dots).masked_fill(~valid, float("-inf")), dim=dim)
    f = torch.where(valid, (1 + dots) / 2, torch.zeros_like(dots))
    return f / f.sum(dim, keepdim=True)


def _row_losses(logits, valid, pos, smoothing, denom=None, teacher=None):
    """Loss of each row of `logits` (R x C): -sum_j w_ij (logits_ij - LSE_i).

    valid: bool R x C, the row's keys (the targets' support).
    pos:   bool R x C, positives (a subset of valid).
    denom: bool R x C, the entries of the log-sum-exp (default: valid). A row whose
           log-sum-exp is empty has no loss.
    teacher: (w_teacher R x C, alpha): the targets become (1 - alpha) w + alpha w_teacher;
           with alpha = 1 every row has a target.
    Returns (loss R, has_loss R).
    """
    denom = valid if denom is None else denom
    some = denom.any(1, keepdim=True)
    # (an empty row reads zeros: no loss, and no NaN from its gradient)
    masked = torch.where(some, logits.masked_fill(~denom, float("-inf")), torch.zeros_like(logits))
    lse = torch.logsumexp(masked, dim=1, keepdim=True)
    logp = torch.where(valid, logits - lse, torch.full_like(logits, float("-inf")))
    npos = pos.sum(1)
    nvalid = valid.sum(1)
    has_pos = (npos > 0) & denom.any(1)
    w = pos.to(logits.dtype) / npos.clamp_min(1).unsqueeze(1)
    if smoothing:
        u = valid.to(logits.dtype) / nvalid.clamp_min(1).unsqueeze(1)
        w = (1 - smoothing) * w + smoothing * u
    if teacher is not None:
        wt, alpha = teacher
        w = (1 - alpha) * w + alpha * wt
        if alpha == 1:
            has_pos = (nvalid > 0) & denom.any(1)
    # w is 0 wherever logp is -inf; keep 0 * -inf out of the sum (w may be negative: a
    # linear teacher weighting of non-unit teacher embeddings).
    terms = torch.where(w != 0, w * logp, torch.zeros_like(logp))
    loss = -terms.sum(1)
    return torch.where(has_pos, loss, torch.zeros_like(loss)), has_pos


def info_nce(query, key=None, *, positive_index=None, labels=None, key_labels=None,
             temperature=None, logit_scale=None, logit_bias=None, symmetric=False,
             label_smoothing=0.0, reduction="mean", margin=0.0, decoupled=False,
             teacher=None, teacher_logit_scale=None, teacher_weight=1.0,
             teacher_weighting="softmax", normalize=False, backend="auto", **options):
    """`contrastive_kernels.info_nce` computed from the materialized N x M logits.

    Args:
        query, key, positive_index, labels, key_labels, temperature, logit_scale,
            logit_bias, symmetric, label_smoothing, reduction, margin, decoupled,
            teacher, teacher_logit_scale, teacher_weight, teacher_weighting,
            normalize: as for `contrastive_kernels.info_nce` (normalize=True applies
            torch.nn.functional.normalize(x, dim=-1) to query and key in their own
            dtype, before the float64 logits; not to the teacher).
        backend, **options: accepted and ignored.

    Returns:
        The loss as `contrastive_kernels.info_nce` returns it (computed in float64,
        returned in float32, or float64 for float64 inputs).

    Raises:
        TypeError, ValueError: the argument errors of `contrastive_kernels.info_nce`.

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> q = torch.randn(4, 8, requires_grad=True)
        >>> loss = ck.reference.info_nce(q, torch.randn(4, 8), symmetric=True)
        >>> g, = torch.autograd.grad(loss, q, create_graph=True)   # double backward works
        >>> g.shape
        torch.Size([4, 8])
    """
    p = check_inputs(query, key, positive_index, labels, key_labels, temperature,
                     logit_scale, logit_bias, symmetric, label_smoothing, reduction,
                     margin=margin, decoupled=decoupled, teacher=teacher,
                     teacher_logit_scale=teacher_logit_scale, teacher_weight=teacher_weight,
                     teacher_weighting=teacher_weighting, normalize=normalize, fused=False)
    check_values(p.positive_index if p.index_given else None, p.n_keys, 0, p.self_contrast,
                 p.scale, p.bias, p.scale_name)
    q = p.query.to(torch.float64) if p.query.dtype != torch.float64 else p.query
    k = q if p.self_contrast else (p.key.to(torch.float64) if p.key.dtype != torch.float64 else p.key)
    scale = p.scale.to(torch.float64) if torch.is_tensor(p.scale) else p.scale
    if p.per_row:                   # per-query temperature: row i's logits scale by s_i
        scale = scale[:, None]
    bias = p.bias.to(torch.float64) if torch.is_tensor(p.bias) else p.bias
    logits = scale * (q @ k.T) + bias
    n, m = logits.shape
    dev = logits.device
    valid = torch.ones(n, m, dtype=torch.bool, device=dev)
    if p.self_contrast:
        valid &= ~torch.eye(n, dtype=torch.bool, device=dev)
    if p.labels is not None:
        pos = p.labels.view(-1, 1) == p.key_labels.view(1, -1)
    else:
        pos = torch.zeros(n, m, dtype=torch.bool, device=dev)
        pos[torch.arange(n, device=dev), p.positive_index] = True
    pos &= valid
    # additive margin: every positive logit is s (<q, k> - m) + b
    logits = logits - scale * p.margin * pos.to(logits.dtype)
    # decoupled: the positives are left out of the log-sum-exp
    denom = valid & ~pos if p.decoupled else valid

    # teacher soft targets: the teacher's similarities normalized per row (the rows'
    # targets) and per column (the columns') over the valid entries
    t_rows = t_cols = None
    if p.teacher is not None and p.teacher_weight > 0:
        tq, tk = (x.to(torch.float64) for x in p.teacher)
        ts = p.teacher_scale if p.teacher_scale is not None else scale
        ts = ts.detach().to(torch.float64) if torch.is_tensor(ts) else ts
        wt = lambda dim: _teacher_weights(tq, tk, ts, valid, p.teacher_weighting, dim)
        t_rows, t_cols = (wt(1), p.teacher_weight), (wt(0).T, p.teacher_weight)

    row, row_ok = _row_losses(logits, valid, pos, p.label_smoothing, denom, t_rows)
    if not p.symmetric:
        losses, oks = [row], [row_ok]
    else:
        col, col_ok = _row_losses(logits.T, valid.T, pos.T, p.label_smoothing, denom.T,
                                  t_cols)
        losses, oks = [0.5 * row, 0.5 * col], [row_ok, col_ok]

    if p.reduction == "none":
        return torch.cat(losses).to(p.out_dtype)
    if p.reduction == "sum":
        return sum(l.sum() for l in losses).to(p.out_dtype)
    return sum(l.sum() / ok.sum().clamp_min(1) for l, ok in zip(losses, oks)).to(p.out_dtype)


def siglip_loss(query, key, *, logit_scale=10.0, logit_bias=-10.0, positive_index=None,
                labels=None, key_labels=None, reduction="mean", normalize=False,
                backend="auto"):
    """`contrastive_kernels.siglip_loss` computed from the materialized N x M logits.

    The sigmoid loss -sum_ij log sigmoid(y_ij z_ij), z = s <q_i, k_j> + b, y = +1 on
    positives and -1 elsewhere, in float64.

    Args:
        query, key, logit_scale, logit_bias, positive_index, labels, key_labels,
            reduction, normalize: as for `contrastive_kernels.siglip_loss`.
        backend: accepted and ignored.

    Returns:
        The loss as `contrastive_kernels.siglip_loss` returns it.

    Raises:
        TypeError, ValueError: the argument errors of `contrastive_kernels.siglip_loss`.

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> loss = ck.reference.siglip_loss(torch.randn(4, 8), torch.randn(6, 8))
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
    """
    p = check_siglip(query, key, positive_index, labels, key_labels, logit_scale,
                     logit_bias, reduction, normalize=normalize, fused=False)
    check_values(p.positive_index if p.index_given else None, p.n_keys, 0, False,
                 p.scale, p.bias, p.scale_name)
    f64 = lambda x: x.to(torch.float64) if torch.is_tensor(x) else x
    q, k = f64(p.query), f64(p.key)
    z = f64(p.scale) * (q @ k.T) + f64(p.bias)
    n, m = z.shape
    if p.labels is not None:
        pos = p.labels.view(-1, 1) == p.key_labels.view(1, -1)
    else:
        pos = torch.zeros(n, m, dtype=torch.bool, device=z.device)
        pos[torch.arange(n, device=z.device), p.positive_index] = True
    y = pos.to(z.dtype) * 2 - 1
    rows = -torch.nn.functional.logsigmoid(y * z).sum(1)
    if p.reduction == "none":
        return rows.to(p.out_dtype)
    total = rows.sum()
    return (total if p.reduction == "sum" else total / n).to(p.out_dtype)


def uniformity_loss(x, t=2.0, backend="auto"):
    """`contrastive_kernels.uniformity_loss` from the full N x N squared distances.

    log mean_{i != j} exp(-t ||x_i - x_j||^2) of the normalized rows, in float64.

    Args:
        x, t: as for `contrastive_kernels.uniformity_loss`.
        backend: accepted and ignored.

    Returns:
        0-dim tensor, float32 (float64 for float64 input).

    Raises:
        TypeError, ValueError: the argument errors of
            `contrastive_kernels.uniformity_loss`.

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> bool(ck.reference.uniformity_loss(torch.randn(5, 3)) <= 0)
        True
    """
    x, t = check_uniformity(x, t, fused=False)
    xn = torch.nn.functional.normalize(x.to(torch.float64), dim=1)
    sq = torch.cdist(xn, xn).pow(2)
    off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    t64 = t.to(torch.float64) if torch.is_tensor(t) else t
    out = torch.logsumexp(-t64 * sq[off], 0) - math.log(int(off.sum()))
    return out.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def alignment_loss(x, y, alpha=2.0):
    """`contrastive_kernels.alignment_loss` in float64.

    mean_i ||x_i - y_i||^alpha of the normalized rows.

    Args:
        x, y, alpha: as for `contrastive_kernels.alignment_loss`.

    Returns:
        0-dim tensor, float32 (float64 for float64 inputs).

    Raises:
        TypeError, ValueError: the argument errors of
            `contrastive_kernels.alignment_loss`.

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> x = torch.randn(5, 3)
        >>> bool(ck.reference.alignment_loss(x, 2 * x) < 1e-6)
        True
    """
    x, y, alpha = check_alignment(x, y, alpha)
    xn = torch.nn.functional.normalize(x.to(torch.float64), dim=1)
    yn = torch.nn.functional.normalize(y.to(torch.float64), dim=1)
    out = (xn - yn).norm(dim=1).pow(alpha).mean()
    return out.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
