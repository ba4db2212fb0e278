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

# Elements in one temporary of the target terms: at least CHUNK_ELEMS (1 MiB of
# float32), and 1/32 of the inputs' elements for large problems, so that a step
# launches a few dozen small ops, not thousands, and each temporary stays ~3% of q + k.
CHUNK_ELEMS = 1 << 18
CHUNK_FRACTION = 32


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
    case rid = positive_index, cid = arange(M), done by gathers (`_pi_*`); labels
    go through per-class sums of the rows (`_class_*`). The eps part is rank one.
    Everything works on blocks of about `budget` elements.
    """

    def __init__(self, p, q, k):
        n, d = q.shape
        m = k.shape[0]
        self.self_c, self.eps, self.symmetric = p.self_contrast, p.label_smoothing, p.symmetric
        self.budget = max(CHUNK_ELEMS, (n + m) * d // CHUNK_FRACTION)
        self.pi = None
        if p.labels is not None:
            _, inv = torch.unique(torch.cat([p.labels, p.key_labels]), return_inverse=True)
            self.rid, self.cid = inv[:n], inv[n:]
            self.classes = int(inv.max()) + 1
        else:
            self.pi = p.positive_index
            self.rid, self.cid = self.pi, torch.arange(m, device=q.device)
            self.classes = m
        rcount = torch.bincount(self.rid, minlength=self.classes)
        ccount = torch.bincount(self.cid, minlength=self.classes)
        sub = 1 if self.self_c else 0
        # Under self-contrast j = i is not a candidate: drop it where it was a positive
        # (never for positive_index, which may not point a query at itself).
        self.same = (self.rid == self.cid) if self.self_c else None
        drop = self.same.long() if self.self_c else 0
        self.npos_r = ccount[self.rid] - drop
        self.npos_c = rcount[self.cid] - drop
        self.nvalid_r, self.nvalid_c = max(m - sub, 1), max(n - sub, 1)
        self.row_ok = self.npos_r > 0
        self.col_ok = self.npos_c > 0 if self.symmetric else self.row_ok.new_zeros(0)

    # ---- helpers on row blocks of about `budget` elements, in the accumulation dtype

    def _rows(self, d):
        return max(1, self.budget // max(d, 1))

    def _wsum(self, x, w, acc):
        """sum_i w_i x_i (or sum_i x_i), shape (D,)."""
        out = torch.zeros(x.shape[1], dtype=acc, device=x.device)
        for i0, i1 in _blocks(x.shape[0], self._rows(x.shape[1])):
            xc = x[i0:i1].to(acc)
            out += xc.sum(0) if w is None else w[i0:i1] @ xc
        return out

    def _rowdots(self, x, y, acc, idx=None):
        """<x_i, y_i> (or <x_i, y_idx[i]>), shape (rows of x,)."""
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        for i0, i1 in _blocks(x.shape[0], self._rows(x.shape[1])):
            yc = y[i0:i1] if idx is None else y[idx[i0:i1]]
            out[i0:i1] = (x[i0:i1].to(acc) * yc.to(acc)).sum(1)
        return out

    def _matvec(self, x, v, acc):
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        for i0, i1 in _blocks(x.shape[0], self._rows(x.shape[1])):
            out[i0:i1] = x[i0:i1].to(acc) @ v
        return out

    def _weigh(self, pos, all_, npos, nvalid):
        out = (1 - self.eps) * pos / npos.clamp_min(1).to(pos.dtype)
        return out + self.eps * all_ / nvalid if self.eps else out

    # ---- forward

    def dots(self, q, k, acc):
        """(<q_i, t_i>, <k_j, u_j>), the row and column target dots; the column ones are
        empty unless symmetric. k is q under self-contrast."""
        if self.pi is not None:
            rpos = self._rowdots(q, k, acc, self.pi)
            cpos = rpos.new_zeros(k.shape[0]).index_add_(0, self.pi, rpos) if self.symmetric else None
        else:
            rpos, cpos = self._class_dots(q, k, acc)
        rall = call = None
        if self.eps:
            rall = self._matvec(q, self._wsum(k, None, acc), acc)
            call = self._matvec(k, self._wsum(q, None, acc), acc) if self.symmetric else None
            if self.self_c:
                own = self._rowdots(q, q, acc)
                rall -= own
                if call is not None:
                    call -= own
        rdot = self._weigh(rpos, rall, self.npos_r, self.nvalid_r)
        if not self.symmetric:
            return rdot, rdot.new_zeros(0)
        return rdot, self._weigh(cpos, call, self.npos_c, self.nvalid_c)

    def _class_dots(self, q, k, acc):
        """sum_{j: cid_j = rid_i} <q_i, k_j> and its column twin (j = i left out under
        self-contrast), over blocks of the embedding dim."""
        n, d = q.shape
        dc, rows = self._class_sizes(d)
        rpos = q.new_zeros(n, dtype=acc)
        cpos = q.new_zeros(k.shape[0], dtype=acc) if self.symmetric else None
        for d0, d1 in _blocks(d, dc):
            sides = [(q, rpos, self._class_sum(k, self.cid, d0, d1, acc), self.rid)]
            if self.symmetric:
                sides.append((k, cpos, self._class_sum(q, self.rid, d0, d1, acc), self.cid))
            for x, pos, sums, ids in sides:
                for i0, i1 in _blocks(x.shape[0], rows):
                    xc = x[i0:i1, d0:d1].to(acc)
                    p_ = (xc * sums[ids[i0:i1]]).sum(1)
                    if self.self_c:
                        p_ -= (xc * xc).sum(1) * self.same[i0:i1]
                    pos[i0:i1] += p_
        return rpos, cpos

    def _class_sizes(self, d):
        dc = max(1, min(d, self.budget // max(self.classes, 1)))
        return dc, max(1, self.budget // dc)

    def _class_sum(self, x, ids, d0, d1, acc, weight=None):
        """(classes, d1 - d0): sum of the rows of x[:, d0:d1] (times weight) per class id."""
        out = torch.zeros(self.classes, d1 - d0, dtype=acc, device=x.device)
        for i0, i1 in _blocks(x.shape[0], max(1, self.budget // (d1 - d0))):
            xc = x[i0:i1, d0:d1].to(acc)
            out.index_add_(0, ids[i0:i1], xc if weight is None else xc * weight[i0:i1, None])
        return out

    # ---- backward

    def weights(self, g_r, g_c):
        """(a, e, b, f): the gradient of sum_i g_r[i] <q_i, t_i> + sum_j g_c[j] <k_j, u_j>
        with respect to <q_i, k_j> is
            W_ij = [rid_i == cid_j] (a_i + b_j) + e_i + f_j   on valid (i, j).
        b and f are None without column targets (g_c None or empty), e and f without
        label smoothing."""
        acc = g_r.dtype
        a = g_r * (1 - self.eps) / self.npos_r.clamp_min(1).to(acc)
        e = g_r * (self.eps / self.nvalid_r) if self.eps else None
        b = f = None
        if g_c is not None and g_c.numel():
            b = g_c * (1 - self.eps) / self.npos_c.clamp_min(1).to(acc)
            f = g_c * (self.eps / self.nvalid_c) if self.eps else None
        return a, e, b, f

    def add_grads(self, q, k, g_r, g_c, dq, dk):
        """Adds the gradient of sum_i g_r[i] <q_i, t_i> + sum_j g_c[j] <k_j, u_j> into dq
        and dk in place; either may be None (not wanted). Under self-contrast k is q and
        dk is dq."""
        acc = (dq if dq is not None else dk).dtype
        a, e, b, f = self.weights(g_r.to(acc), None if g_c is None else g_c.to(acc))
        if self.pi is not None:
            self._pi_grads(q, k, a, b, dq, dk, acc)
        else:
            self._class_grads(q, k, a, b, dq, dk, acc)
        if self.eps:
            # dq_i += e_i sum_j k_j + sum_j f_j k_j, dk_j += f_j sum_i q_i + sum_i e_i q_i,
            # less the j = i term under self-contrast (its weight there: e_i + f_i).
            for x, dx, c2, y, o2 in ((q, dq, e, k, f), (k, dk, f, q, e)):
                if dx is None:
                    continue
                if c2 is not None:
                    dx.addr_(c2, self._wsum(y, None, acc))
                if o2 is not None:
                    dx += self._wsum(y, o2, acc)
                if self.self_c:
                    ef = e + f if f is not None else e
                    for i0, i1 in _blocks(x.shape[0], self._rows(x.shape[1])):
                        dx[i0:i1] -= ef[i0:i1, None] * y[i0:i1].to(acc)

    def _pi_grads(self, q, k, a, b, dq, dk, acc):
        # W_ij = a_i + b_j on j = pi_i: dq_i += w_i k_{pi_i}, dk_{pi_i} += w_i q_i.
        pi = self.pi
        w = a + b[pi] if b is not None else a
        for i0, i1 in _blocks(q.shape[0], self._rows(q.shape[1])):
            wi = w[i0:i1, None]
            if dq is not None:
                dq[i0:i1] += wi * k[pi[i0:i1]].to(acc)
            if dk is not None:
                dk.index_add_(0, pi[i0:i1], wi * q[i0:i1].to(acc))

    def _class_grads(self, q, k, a, b, dq, dk, acc):
        # dq_i += a_i K[rid_i] + Kb[rid_i],  dk_j += b_j Q[cid_j] + Qa[cid_j]
        # with K, Q the per-class sums of the rows and Kb, Qa the weighted ones, less
        # the j = i term (weight a_i + b_i where rid_i == cid_i) under self-contrast.
        d = q.shape[1]
        dc, rows = self._class_sizes(d)
        sides = [(q, dq, a, self.rid, k, self.cid, b), (k, dk, b, self.cid, q, self.rid, a)]
        for d0, d1 in _blocks(d, dc):
            for x, dx, c1, ids, y, yids, o1 in sides:
                if dx is None or (c1 is None and o1 is None):
                    continue
                ysum = self._class_sum(y, yids, d0, d1, acc) if c1 is not None else None
                ywsum = self._class_sum(y, yids, d0, d1, acc, o1) if o1 is not None else None
                for i0, i1 in _blocks(x.shape[0], rows):
                    ix = ids[i0:i1]
                    upd = ywsum[ix] if ywsum is not None else None
                    if c1 is not None:
                        part = c1[i0:i1, None] * ysum[ix]
                        upd = part if upd is None else upd.add_(part)
                    if self.self_c:
                        ab = a[i0:i1] + (b[i0:i1] if b is not None else 0)
                        upd -= (self.same[i0:i1] * ab)[:, None] * y[i0:i1, d0:d1].to(acc)
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
        targets = Targets(p, q, kk)
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
        fused = getattr(ctx.backend, "input_grads", None)
        if fused is not None:
            # A backend that writes the final gradients itself (Triton's low-memory
            # mode): the target weights go in as O(N + M) vectors.
            t = ctx.targets
            with _no_autocast(q):
                res = fused(q, kk, ctx.s, ctx.p.self_contrast, lse_r, lse_c if ctx.cols else None,
                            g_r, g_c, lambda: (t.rid, t.cid) + t.weights(g_rdot, g_cdot),
                            need_dq=need_dq, need_dk=need_dk, need_ds=ctx.needs_input_grad[2])
            if res is not None:
                dq, dk, ds = res
                return (dq if want_q else None, dk if want_k else None,
                        None if ds is None else ds.to(scale.dtype), None, None, None)
        with _no_autocast(q):
            dq, dk = ctx.backend.lse_backward(q, kk, ctx.s, ctx.p.self_contrast, lse_r,
                                              lse_c if ctx.cols else None, g_r, g_c,
                                              need_dq=need_dq, need_dk=need_dk)
            # dL/ds of the log-sum-exp part = sum_ij dS_ij <q_i, k_j> = sum_i <q_i, (dS k)_i>
            # (= sum_j <k_j, (dS^T q)_j>); the target part reaches scale through s * rdot.
            ds = None
            if ctx.needs_input_grad[2]:
                rows, grads = (q, dq) if dq is not None else (kk, dk)
                ds = ctx.targets._rowdots(rows, grads, acc).sum().to(scale.dtype)
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


def _reduce(losses, oks, reduction):
    if reduction == "none":
        return torch.cat(losses)
    if reduction == "sum":
        return sum(l.sum() for l in losses)
    return sum(l.sum() / ok.sum().clamp_min(1) for l, ok in zip(losses, oks))


def not_traced(fn):
    """torch.compile: `fn` is one opaque call (one graph break, then the fused kernels run
    as in eager mode); tracing into it would break on its data-dependent parts.
    torch._disable_dynamo imports dynamo on the first call only (torch.compiler.disable
    would import it, ~1 s, with the package)."""
    return getattr(torch, "_disable_dynamo", torch.compiler.disable)(fn)


@not_traced
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
