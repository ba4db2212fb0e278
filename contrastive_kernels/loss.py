"""The public loss: argument checks, the fused log-sum-exp, and the target terms.

The loss splits into two parts (docs/DESIGN.md, "Decomposition"):
  * the log-sum-exp over rows (and columns), the only O(N*M*D) part, computed
    tile by tile by a backend;
  * the target term sum_j w_ij <q_i, k_j>, linear in q and in k and given by O(N + M)
    label vectors (`Targets`): O((N + M) * D) work, done here once for every backend.
`FusedLoss` is one autograd node for both, so backward writes each gradient once: the
target gradient is added in place into the backend's float32 (float64) buffers.
"""
import torch
from torch.autograd.function import once_differentiable

from . import backends
from ._validate import DEFAULT_TEMPERATURE, check_inputs

# Elements in one temporary of the target terms (1 MiB of float32): they work on
# (rows x dim) and (classes x dim) blocks of at most about this size.
CHUNK_ELEMS = 1 << 18


def _no_autocast(x):
    # Backends choose their own precision (fp32 accumulation); autocast must not
    # turn their tile products into half precision.
    return torch.autocast(device_type=x.device.type, enabled=False)


def _blocks(size, step):
    return [(i, min(i + step, size)) for i in range(0, size, step)]


class Targets:
    """The target weights of the loss as O(N + M) vectors.

    Row i's target weights over the keys j are
        w_ij = (1 - eps) [rid_i == cid_j] / npos_i + eps / nvalid_r,
    for valid j (all j, or j != i under self-contrast); the columns' weights are
    the same with rows and keys swapped (npos_c, nvalid_c). positive_index is the
    case rid = positive_index, cid = arange(M). So the row target term is
    <q_i, t_i> with t_i = sum_j w_ij k_j, computed from per-class sums of k.
    """

    def __init__(self, p, n, m, device):
        self.self_c, self.eps, self.symmetric = p.self_contrast, p.label_smoothing, p.symmetric
        if p.labels is not None:
            _, inv = torch.unique(torch.cat([p.labels, p.key_labels]), return_inverse=True)
            self.rid, self.cid = inv[:n], inv[n:]
            self.classes = int(inv.max()) + 1
        else:
            self.rid, self.cid = p.positive_index, torch.arange(m, device=device)
            self.classes = m
        rcount = torch.bincount(self.rid, minlength=self.classes)
        ccount = torch.bincount(self.cid, minlength=self.classes)
        sub = 1 if self.self_c else 0
        # Under self-contrast j = i is not a candidate: drop it where it was a positive.
        self.same = (self.rid == self.cid) if self.self_c else None
        drop = self.same.long() if self.self_c else 0
        self.npos_r = ccount[self.rid] - drop
        self.npos_c = rcount[self.cid] - drop
        self.nvalid_r, self.nvalid_c = max(m - sub, 1), max(n - sub, 1)
        self.row_ok = self.npos_r > 0
        self.col_ok = self.npos_c > 0 if self.symmetric else self.row_ok.new_zeros(0)

    def _sizes(self, d):
        dc = max(1, min(d, CHUNK_ELEMS // max(self.classes, 1)))
        return dc, max(1, CHUNK_ELEMS // dc)

    def _class_sum(self, x, ids, d0, d1, acc, weight=None, rows=1):
        out = torch.zeros(self.classes, d1 - d0, dtype=acc, device=x.device)
        for i0, i1 in _blocks(x.shape[0], rows):
            xc = x[i0:i1, d0:d1].to(acc)
            out.index_add_(0, ids[i0:i1], xc if weight is None else xc * weight[i0:i1, None])
        return out

    def _weigh(self, pos, all_, npos, nvalid):
        return (1 - self.eps) * pos / npos.clamp_min(1).to(pos.dtype) + self.eps * all_ / nvalid

    def dots(self, q, k, acc):
        """(<q_i, t_i>, <k_j, u_j>), the row and column target dots; the column ones are
        empty unless symmetric. k is q under self-contrast."""
        n, d = q.shape
        m = k.shape[0]
        dc, rows = self._sizes(d)
        rpos, rall = q.new_zeros(n, dtype=acc), q.new_zeros(n, dtype=acc)
        cpos, call = q.new_zeros(m, dtype=acc), q.new_zeros(m, dtype=acc)
        for d0, d1 in _blocks(d, dc):
            ks = self._class_sum(k, self.cid, d0, d1, acc, rows=rows)
            qs = self._class_sum(q, self.rid, d0, d1, acc, rows=rows) if self.symmetric else None
            for x, pos, all_, sums, ids, lo in ((q, rpos, rall, ks, self.rid, True),
                                                (k, cpos, call, qs, self.cid, False)):
                if sums is None:
                    continue
                total = sums.sum(0)
                for i0, i1 in _blocks(x.shape[0], rows):
                    xc = x[i0:i1, d0:d1].to(acc)
                    p_ = (xc * sums[ids[i0:i1]]).sum(1)
                    a_ = xc @ total
                    if self.self_c:
                        own = (xc * xc).sum(1)
                        p_ -= own * self.same[i0:i1]
                        a_ -= own
                    pos[i0:i1] += p_
                    all_[i0:i1] += a_
        rdot = self._weigh(rpos, rall, self.npos_r, self.nvalid_r)
        if not self.symmetric:
            return rdot, rdot.new_zeros(0)
        return rdot, self._weigh(cpos, call, self.npos_c, self.nvalid_c)

    def add_grads(self, q, k, g_r, g_c, dq, dk):
        """Adds the gradient of sum_i g_r[i] <q_i, t_i> + sum_j g_c[j] <k_j, u_j> into dq
        and dk in place; either may be None (not wanted). Under self-contrast k is q and
        dk is dq."""
        d = q.shape[1]
        acc = (dq if dq is not None else dk).dtype
        # d/d<q_i, k_j> is W_ij = [rid_i == cid_j] (a_i + b_j) + e_i + f_j on valid (i, j).
        a = g_r * (1 - self.eps) / self.npos_r.clamp_min(1).to(acc)
        e = g_r * (self.eps / self.nvalid_r)
        if g_c is not None and g_c.numel():
            b = g_c * (1 - self.eps) / self.npos_c.clamp_min(1).to(acc)
            f = g_c * (self.eps / self.nvalid_c)
        else:
            b = f = None
        # dq_i += a_i K[rid_i] + Kb[rid_i] + e_i sum_j k_j + sum_j f_j k_j
        # dk_j += b_j Q[cid_j] + Qa[cid_j] + f_j sum_i q_i + sum_i e_i q_i
        # with K, Q the per-class sums and Kb, Qa the weighted ones. A side is
        # (rows x, their grad, own coefficients c1 c2, ids, other rows y, other ids,
        #  other side's coefficients o1 o2).
        sides = [(q, dq, a, e, self.rid, k, self.cid, b, f),
                 (k, dk, b, f, self.cid, q, self.rid, a, e)]
        dc, rows = self._sizes(d)
        for d0, d1 in _blocks(d, dc):
            for x, dx, c1, c2, ids, y, yids, o1, o2 in sides:
                if dx is None:
                    continue
                ysum = self._class_sum(y, yids, d0, d1, acc, rows=rows) if c1 is not None else None
                ywsum = self._class_sum(y, yids, d0, d1, acc, o1, rows) if o1 is not None else None
                total = ysum.sum(0) if ysum is not None else None
                wtotal = None
                if o2 is not None:
                    wtotal = torch.zeros(d1 - d0, dtype=acc, device=x.device)
                    for j0, j1 in _blocks(y.shape[0], rows):
                        wtotal += o2[j0:j1] @ y[j0:j1, d0:d1].to(acc)
                for i0, i1 in _blocks(x.shape[0], rows):
                    ix = ids[i0:i1]
                    upd = torch.zeros(i1 - i0, d1 - d0, dtype=acc, device=x.device)
                    if c1 is not None:
                        upd += c1[i0:i1, None] * ysum[ix] + c2[i0:i1, None] * total
                    if ywsum is not None:
                        upd += ywsum[ix]
                    if wtotal is not None:
                        upd += wtotal
                    if self.self_c:
                        # Take out j = i: its weight W_ii counted where rid_i == cid_i, plus e_i + f_i.
                        w = (self.same[i0:i1] * (a[i0:i1] + (b[i0:i1] if b is not None else 0))
                             + e[i0:i1] + (f[i0:i1] if f is not None else 0))
                        upd -= w[:, None] * y[i0:i1, d0:d1].to(acc)
                    dx[i0:i1, d0:d1] += upd


class FusedLoss(torch.autograd.Function):
    """(q, k, scale) -> (lse_r, lse_c, rdot, cdot): the log-sum-exps of S = scale * q k^T
    over rows (and columns) from a backend, and the raw target dots of `Targets`.
    k is None under self-contrast (the keys are the queries).

    Saves q, k, and O(N + M) vectors. Backward recomputes tiles in the backend, adds the
    target gradient into the backend's own float32 (float64) buffers in place, and casts
    each gradient once.
    """

    @staticmethod
    def forward(ctx, q, k, scale, backend, p, cols):
        s = float(scale)
        kk = q if k is None else k
        targets = Targets(p, q.shape[0], kk.shape[0], q.device)
        with _no_autocast(q):
            lse_r, lse_c = backend.lse_forward(q, kk, s, p.self_contrast, cols)
            rdot, cdot = targets.dots(q, kk, p.out_dtype)
        if lse_c is None:
            lse_c = lse_r.new_empty(0)
        ctx.save_for_backward(q, k, scale, lse_r, lse_c)
        ctx.backend, ctx.targets, ctx.p, ctx.cols, ctx.s = backend, targets, p, cols, s
        ctx.mark_non_differentiable(targets.row_ok, targets.col_ok)
        return lse_r, lse_c, rdot, cdot, targets.row_ok, targets.col_ok

    @staticmethod
    @once_differentiable
    def backward(ctx, g_r, g_c, g_rdot, g_cdot, _row_ok, _col_ok):
        q, k, scale, lse_r, lse_c = ctx.saved_tensors
        kk = q if k is None else k
        acc = lse_r.dtype
        zeros = lambda g, like: torch.zeros_like(like) if g is None else g.to(acc).contiguous()
        g_r = zeros(g_r, lse_r)
        g_c = g_c.to(acc).contiguous() if (ctx.cols and g_c is not None) else None
        g_rdot = zeros(g_rdot, lse_r)
        g_cdot = g_cdot.to(acc) if (g_cdot is not None and g_cdot.numel()) else None
        # Only the gradients someone wants: frozen keys (a memory bank, a locked tower)
        # skip dk_raw, its buffer and its GEMM. Under self-contrast q's gradient needs both.
        want_q, want_k = ctx.needs_input_grad[0], k is not None and ctx.needs_input_grad[1]
        need_dq, need_dk = (want_q, want_q) if k is None else (want_q, want_k)
        if ctx.needs_input_grad[2] and not (need_dq or need_dk):
            need_dq = True   # for dL/ds
        with _no_autocast(q):
            dq, dk = ctx.backend.lse_backward(q, kk, ctx.s, ctx.p.self_contrast, lse_r,
                                              lse_c if ctx.cols else None, g_r, g_c,
                                              need_dq=need_dq, need_dk=need_dk)
            # dL/ds of the log-sum-exp part = sum_ij dS_ij <q_i, k_j> = sum_i <q_i, (dS k)_i>
            # (= sum_j <k_j, (dS^T q)_j>); the target part reaches scale through s * rdot.
            ds = None
            if ctx.needs_input_grad[2]:
                ds = (_inner(q, dq) if dq is not None else _inner(kk, dk)).to(scale.dtype)
            # dq and dk are the backend's own fresh buffers: scaled and completed in place.
            for g in (dq, dk):
                if g is not None:
                    g.mul_(ctx.s)
            if k is None and want_q:
                dq += dk
                dk = dq
            if want_q or want_k:
                ctx.targets.add_grads(q, kk, g_rdot, g_cdot, dq if want_q else None,
                                      dk if want_k or k is None else None)
        # One cast at a time, each float32 buffer dropped once cast.
        dq_out = dq.to(q.dtype) if want_q else None
        dq = None
        if k is None:
            dk = None
        dk_out = dk.to(k.dtype) if want_k else None
        return dq_out, dk_out, ds, None, None, None


def _inner(a, b, rows=4096):
    """sum(a * b) in b's dtype, over row chunks (no full-size temporary)."""
    out = b.new_zeros(())
    for i in range(0, a.shape[0], rows):
        out += (a[i:i + rows].to(b.dtype) * b[i:i + rows]).sum()
    return out


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
    acc = p.out_dtype
    scale_t = p.scale if torch.is_tensor(p.scale) else torch.tensor(p.scale, dtype=acc, device=q.device)
    # Self-contrast: S is symmetric and so is its mask, so column LSEs equal row LSEs.
    cols = p.symmetric and not p.self_contrast
    lse_r, lse_c, rdot, cdot, row_ok, col_ok = FusedLoss.apply(q, p.key, scale_t, be, p, cols)
    if p.symmetric and p.self_contrast:
        lse_c = lse_r
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
