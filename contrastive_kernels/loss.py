"""The public loss: argument checks, the fused log-sum-exp, and the target terms.

The loss splits into two parts (docs/DESIGN.md, "Decomposition"):
  * the log-sum-exp over rows (and columns), the only O(N*M*D) part, computed
    tile by tile by a backend through `FusedLSE`;
  * the target term sum_j w_ij S_ij, which is linear in S and costs O((N+M)*D):
    computed here once for every backend by `TargetDots`, which saves nothing but
    q and k and recomputes its O((N+M)*D) intermediates in backward.
"""
import torch
from torch.autograd.function import once_differentiable

from . import backends
from ._validate import DEFAULT_TEMPERATURE, check_inputs


def _no_autocast(x):
    # Backends choose their own precision (fp32 accumulation); autocast must not
    # turn their tile products into half precision.
    return torch.autocast(device_type=x.device.type, enabled=False)


class FusedLSE(torch.autograd.Function):
    """(q, k, scale) -> (lse_rows, lse_cols) of S = scale * q k^T, via a backend.

    Saves only q, k and the two O(N + M) statistics; backward recomputes tiles.
    """

    @staticmethod
    def forward(ctx, q, k, scale, backend, self_mask, cols):
        s = float(scale)
        with _no_autocast(q):
            lse_r, lse_c = backend.lse_forward(q, k, s, self_mask, cols)
        if lse_c is None:
            lse_c = lse_r.new_empty(0)
        ctx.save_for_backward(q, k, scale, lse_r, lse_c)
        ctx.backend, ctx.self_mask, ctx.cols, ctx.s = backend, self_mask, cols, s
        return lse_r, lse_c

    @staticmethod
    @once_differentiable
    def backward(ctx, g_r, g_c):
        q, k, scale, lse_r, lse_c = ctx.saved_tensors
        acc = lse_r.dtype
        g_r = torch.zeros_like(lse_r) if g_r is None else g_r.to(acc).contiguous()
        g_c = g_c.to(acc).contiguous() if (ctx.cols and g_c is not None) else None
        with _no_autocast(q):
            dq_raw, dk_raw = ctx.backend.lse_backward(
                q, k, ctx.s, ctx.self_mask, lse_r, lse_c if ctx.cols else None, g_r, g_c)
        # dL/ds = sum_ij dS_ij <q_i, k_j> = sum_i <q_i, (dS k)_i>
        ds = _inner(q, dq_raw).to(scale.dtype) if ctx.needs_input_grad[2] else None
        # dq_raw and dk_raw are the backend's own fresh buffers: scaled in place.
        dq = dq_raw.mul_(ctx.s).to(q.dtype) if ctx.needs_input_grad[0] else None
        dk = dk_raw.mul_(ctx.s).to(k.dtype) if ctx.needs_input_grad[1] else None
        return dq, dk, ds, None, None, None


def _inner(a, b, rows=4096):
    """sum(a * b) in b's dtype, over row chunks (no full-size temporary)."""
    out = b.new_zeros(())
    for i in range(0, a.shape[0], rows):
        out += (a[i:i + rows].to(b.dtype) * b[i:i + rows]).sum()
    return out


class TargetDots(torch.autograd.Function):
    """(q, k) -> (<q_i, t_i>, <k_j, u_j>) with t, u the target vectors of `target_terms`.

    The targets are linear in q and k, so backward recomputes them from the saved q
    and k instead of keeping the (N, D) and (M, D) target vectors (and float32 copies
    of half inputs) alive between forward and backward.
    Also returns row_ok and col_ok (not differentiable); col terms are empty unless
    the problem is symmetric.
    """

    @staticmethod
    def forward(ctx, q, k, p):
        acc = p.out_dtype
        with torch.no_grad():
            rdot, row_ok, cdot, col_ok = _target_dots(p, q.to(acc), k.to(acc))
        ctx.save_for_backward(q, k)
        ctx.p = p
        ctx.mark_non_differentiable(row_ok, col_ok)
        return rdot, cdot, row_ok, col_ok

    @staticmethod
    @once_differentiable
    def backward(ctx, g_r, g_c, _row_ok, _col_ok):
        q, k = ctx.saved_tensors
        acc = ctx.p.out_dtype
        with torch.enable_grad():
            qf = q.detach().to(acc).requires_grad_()
            kf = k.detach().to(acc).requires_grad_()
            rdot, _, cdot, _ = _target_dots(ctx.p, qf, kf)
            obj = (rdot * g_r).sum() + (cdot * g_c).sum()
            dq, dk = torch.autograd.grad(obj, (qf, kf))
        return dq.to(q.dtype), dk.to(k.dtype), None


def _target_dots(p, qf, kf):
    t, row_ok, u, col_ok = target_terms(p, qf, kf)
    rdot = (qf * t).sum(1)
    if u is None:
        return rdot, row_ok, rdot.new_zeros(0), row_ok.new_zeros(0)
    return rdot, row_ok, (kf * u).sum(1), col_ok


def _mean_of_rows(x, index, count):
    """sum over rows r with index[r] == c of x[r], divided by count[c]: (C, D)."""
    out = torch.zeros(count.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    out.index_add_(0, index, x)
    return out / count.clamp_min(1).unsqueeze(1).to(x.dtype)


def target_terms(p, qf, kf):
    """Target vectors t (rows) and u (columns) with sum_j w_ij S_ij = s <q_i, t_i> + b.

    Returns (t, row_ok, u, col_ok); u and col_ok are None unless symmetric.
    t_i = (1 - eps) * mean of the positive keys of i + eps * mean of the valid keys of i.
    Rows with no positive have row_ok False (they are left out of the loss).
    """
    n, m = qf.shape[0], kf.shape[0]
    eps, self_c = p.label_smoothing, p.self_contrast
    dev = qf.device
    if p.labels is not None:
        ids, inv = torch.unique(torch.cat([p.labels, p.key_labels]), return_inverse=True)
        rid, cid = inv[:n], inv[n:]
        ccount = torch.bincount(cid, minlength=ids.numel())
        rcount = torch.bincount(rid, minlength=ids.numel())
        # sum of the keys that share each row's label, minus the row itself under self-contrast
        kpos = _mean_of_rows(kf, cid, torch.ones_like(ccount))[rid]
        npos_r = ccount[rid]
        if self_c:
            kpos, npos_r = kpos - kf, npos_r - 1
        t = kpos / npos_r.clamp_min(1).unsqueeze(1).to(kf.dtype)
        row_ok = npos_r > 0
        if p.symmetric:
            qpos = _mean_of_rows(qf, rid, torch.ones_like(rcount))[cid]
            npos_c = rcount[cid]
            if self_c:
                qpos, npos_c = qpos - qf, npos_c - 1
            u = qpos / npos_c.clamp_min(1).unsqueeze(1).to(qf.dtype)
            col_ok = npos_c > 0
    else:
        pi = p.positive_index
        t = kf[pi]
        row_ok = torch.ones(n, dtype=torch.bool, device=dev)
        if p.symmetric:
            cnt = torch.bincount(pi, minlength=m)
            u = _mean_of_rows(qf, pi, cnt)
            col_ok = cnt > 0
    if eps:
        sub = 1 if self_c else 0
        kmean = (kf.sum(0, keepdim=True) - (kf if self_c else 0)) / max(m - sub, 1)
        t = (1 - eps) * t + eps * kmean
        if p.symmetric:
            qmean = (qf.sum(0, keepdim=True) - (qf if self_c else 0)) / max(n - sub, 1)
            u = (1 - eps) * u + eps * qmean
    if not p.symmetric:
        return t, row_ok, None, None
    return t, row_ok, u, col_ok


def _reduce(losses, oks, reduction):
    if reduction == "none":
        return torch.cat(losses)
    if reduction == "sum":
        return sum(l.sum() for l in losses)
    return sum(l.sum() / ok.sum().clamp_min(1) for l, ok in zip(losses, oks))


def info_nce(query, key=None, *, positive_index=None, labels=None, key_labels=None,
             temperature=None, logit_scale=None, logit_bias=None, symmetric=False,
             label_smoothing=0.0, reduction="mean", backend="auto"):
    """Fused InfoNCE / CLIP / NT-Xent / SupCon loss. See README.md and docs/DESIGN.md.

    Same values and gradients as the materializing `contrastive_kernels.reference.info_nce`,
    without ever holding the N x M logits. With reduction="none" it returns the
    per-row losses (N,); with symmetric=True, the row losses then the column
    losses, each weighted 1/2, shape (N + M,), so that .sum() equals reduction="sum".
    Rows with no positive have loss 0 and are left out of the mean.
    """
    p = check_inputs(query, key, positive_index, labels, key_labels, temperature,
                     logit_scale, logit_bias, symmetric, label_smoothing, reduction)
    be = backends.get_backend(backend, query.device)
    q = p.query
    k = q if p.self_contrast else p.key
    acc = p.out_dtype
    scale_t = p.scale if torch.is_tensor(p.scale) else torch.tensor(p.scale, dtype=acc, device=q.device)
    # Self-contrast: S is symmetric and so is its mask, so column LSEs equal row LSEs.
    cols = p.symmetric and not p.self_contrast
    lse_r, lse_c = FusedLSE.apply(q, k, scale_t, be, p.self_contrast, cols)
    if p.symmetric and p.self_contrast:
        lse_c = lse_r

    rdot, cdot, row_ok, col_ok = TargetDots.apply(q, k, p)
    s, b = p.scale, p.bias
    zero = lse_r.new_zeros(())
    # l_i = (LSE_i + b) - (s <q_i, t_i> + b); the bias cancels but keeps its (zero) gradient.
    row = torch.where(row_ok, (lse_r + b) - (s * rdot + b), zero)
    if not p.symmetric:
        return _reduce([row], [row_ok], p.reduction)
    col = torch.where(col_ok, (lse_c + b) - (s * cdot + b), zero)
    return _reduce([0.5 * row, 0.5 * col], [row_ok, col_ok], p.reduction)


class FusedInfoNCE(torch.nn.Module):
    """Drop-in contrastive loss module.

    FusedInfoNCE(temperature=0.07, symmetric=True)(image_emb, text_emb) equals
    (CE(s * I T^T, arange) + CE(s * T I^T, arange)) / 2 with s = 1 / temperature.
    A `logit_scale` passed to forward overrides the temperature (as open_clip does).
    distributed: None (local loss), "ring" or "gather" (global batch over
    torch.distributed; see contrastive_kernels.distributed).
    """

    def __init__(self, temperature=DEFAULT_TEMPERATURE, symmetric=True, label_smoothing=0.0,
                 reduction="mean", backend="auto", distributed=None, group=None):
        super().__init__()
        if distributed not in (None, "ring", "gather"):
            raise ValueError(f"distributed must be None, 'ring' or 'gather', got {distributed!r}")
        self.distributed = distributed
        self.group = group
        self.temperature = temperature
        self.symmetric = symmetric
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.backend = backend

    def forward(self, query, key=None, *, positive_index=None, labels=None, key_labels=None,
                logit_scale=None, logit_bias=None):
        kwargs = dict(positive_index=positive_index, labels=labels, key_labels=key_labels,
                      temperature=self.temperature, logit_scale=logit_scale,
                      logit_bias=logit_bias, symmetric=self.symmetric,
                      label_smoothing=self.label_smoothing, reduction=self.reduction,
                      backend=self.backend)
        if self.distributed is None:
            return info_nce(query, key, **kwargs)
        from . import distributed
        fn = distributed.ring_info_nce if self.distributed == "ring" else distributed.gather_info_nce
        return fn(query, key, group=self.group, **kwargs)

    def extra_repr(self):
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, "
                f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}, distributed={self.distributed!r}")
