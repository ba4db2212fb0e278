"""The small-problem path of `backend="auto"` on the CPU (docs/DESIGN.md, section 13).

Below DENSE_MAX logits the fused path's fixed cost (custom ops, target bookkeeping) is
larger than the arithmetic, and the materialized loss wins. There `auto` computes the
forward statistics of `ops.info_nce_stats` (the rows' and columns' log-sum-exps and
target dots) from one materialized N x M tile S: it and the backward's dS are N x M
buffers of at most DENSE_MAX elements (4 MiB in float32), so the memory contract
holds. The log-sum-exps and dS are one fused pass each (the C++ ops
contrastive_kernels::dense_lse and dense_grad; torch's logsumexp and exp without the
extension). The losses and the reduction after them are the shared stages
(engine.side_losses, engine.reduce), and the backward is their closed-form gradients
(engine.reduce_vjp, engine.side_losses_vjp) then the tile's: one autograd node per call.

The sigmoid loss (`siglip_loss`) has one too: S = s q k^T, then one fused pass
(contrastive_kernels::dense_siglip, with the positives' ids) gives the rows' losses and
their bias derivatives and leaves D = sigmoid(S + b) - [positive] in S; the backward is
two GEMMs with it, with no pass over N x M.

Not taken under torch.compile (the custom ops trace as one node there), nor for the
variants (margin, decoupled, per-query temperature, teacher), half types, scales
outside SCALE_RANGE, or options that ask for a kernel (low_memory, algorithm, passes).
Naming a backend skips it.
"""
import torch

from . import engine, extension

DENSE_MAX = 1 << 20          # N * M at or below which auto materializes (1024 x 1024)
# The scales served: S = s q k^T, then A = S_ii / s and d s = <dR, S> / s^2 stay far from
# float32's underflow and overflow (any s goes to the fused kernels, which keep R apart).
SCALE_RANGE = (1e-3, 1e5)
_OPS = extension.has_kernel("dense_lse", "CPU")      # else torch's log-sum-exp
_SIGLIP_OPS = extension.has_kernel("dense_siglip", "CPU")


def eligible(p, opts, backend):
    """Whether `auto` computes this info_nce call densely."""
    return (not (p.shifted or p.per_row or p.teacher is not None)     # (a scalar scale)
            and (p.key is not None or p.query.shape[0] > 1)      # every row has a valid key
            and _small(p, opts, backend))


def siglip_eligible(p, opts, backend, passes):
    """Whether `auto` computes this siglip_loss call densely (passes: a schedule asked
    for by name goes to the kernels)."""
    return passes is None and _small(p, opts, backend)


def _small(p, opts, backend):
    """The conditions both losses share."""
    q = p.query
    return (backend == "auto" and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.float64)
            and (p.key is None or p.key.dtype == q.dtype)
            and 0 < q.shape[0] * p.n_keys <= DENSE_MAX
            and not opts.low_memory and opts.algorithm == "auto"
            and not torch.compiler.is_compiling()
            and SCALE_RANGE[0] <= _value(p.scale) <= SCALE_RANGE[1])


def _value(scale):
    """A float or 0-dim CPU tensor's value (item(): float() warns when it requires grad)."""
    return scale.item() if torch.is_tensor(scale) else scale


def info_nce(p):
    """The loss of an eligible call, as one autograd node."""
    q, self_c = p.query, p.key is None
    pos = _positives(p)
    sub = 1 if self_c else 0
    bias = p.bias if torch.is_tensor(p.bias) else None
    scale = p.scale.to(q.dtype) if torch.is_tensor(p.scale) else p.scale     # 0-dim
    args = (q, p.key, scale, bias, pos, p.symmetric, p.label_smoothing, p.n_keys - sub,
            q.shape[0] - sub, p.reduction)
    return _full_precision(_Loss.apply, args)


def _positives(p):
    """The positives as the dense losses take them: a boolean N x M mask (labels; the
    diagonal False under self-contrast), the (N,) positive_index (given, or the
    self-contrast default), or None for the default diagonal."""
    self_c = p.key is None
    if p.labels is not None:
        pos = p.labels.view(-1, 1) == p.key_labels.view(1, -1)
        if self_c:
            pos.fill_diagonal_(False)
        return pos
    return p.positive_index if (p.index_given or self_c) else None


def _full_precision(fn, args):
    """fn(*args) with CPU autocast off (the kernels' precision)."""
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return fn(*args)
    return fn(*args)


class _Loss(torch.autograd.Function):
    """The tile's statistics -> engine.side_losses -> engine.reduce in the forward, and
    their gradients in closed form (engine.reduce_vjp, engine.side_losses_vjp, then the
    tile's) in the backward: one autograd node, where the stages' own ops would be a few
    dozen small ones, which small problems see."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, pos, symmetric, eps, nvalid_r, nvalid_c, reduction):
        self_c = k is None
        kk = q if self_c else k
        alpha = float(scale)
        s, st_r, st_c = _stats(q, kk, self_c, alpha, pos, symmetric, bool(eps))
        side_bias = 0.0 if bias is None else bias
        rows = engine.side_losses(*st_r, scale, side_bias, eps, nvalid_r)
        cols = None
        if st_c is not None:
            cols = engine.side_losses(*st_c, scale, side_bias, eps, nvalid_c)
        ctx.options = (self_c, eps, nvalid_r, nvalid_c, reduction, alpha)
        ctx.scale = None if torch.is_tensor(scale) else scale
        ctx.bias = None if bias is None else (bias.shape, bias.dtype, bias.device)
        ctx.sides = (rows[0].shape[0], None if cols is None else cols[0].shape[0])
        ctx.save_for_backward(q, kk, scale if ctx.scale is None else None, s, pos,
                              *st_r, rows[1],
                              *((None,) * 5 if cols is None else (*st_c, cols[1])))
        return engine.reduce(rows, cols, reduction)

    @staticmethod
    @engine.first_order
    def backward(ctx, g):
        return _full_precision(_Loss._backward, (ctx, g))

    @staticmethod
    def _backward(ctx, g):
        self_c, eps, nvalid_r, nvalid_c, reduction, alpha = ctx.options
        (q, kk, scale_t, s, pos, lse, a, npos, b, ok,
         lse_c, a_c, npos_c, b_c, ok_c) = ctx.saved_tensors
        scale = ctx.scale if scale_t is None else scale_t
        n_r, n_c = ctx.sides
        cols = None if n_c is None else (n_c, ok_c)
        w_r, w_c = engine.reduce_vjp((n_r, ok), cols, reduction, g)
        need_scale = ctx.needs_input_grad[2]
        g_lse, g_a, g_b, d_scale = engine.side_losses_vjp(w_r, ok, a, npos, b, scale, eps,
                                                          nvalid_r, need_scale)
        g_lse_c = g_ac = g_bc = None
        if cols is not None:
            g_lse_c, g_ac, g_bc, d_scale_c = engine.side_losses_vjp(
                w_c, ok_c, a_c, npos_c, b_c, scale, eps, nvalid_c, need_scale)
            if need_scale:
                d_scale = d_scale + d_scale_c
            if self_c:                  # the columns' log-sum-exps are the rows'
                g_lse, g_lse_c = g_lse + g_lse_c, None
        dq, dk, d_scale_s = _stats_backward(q, kk, self_c, alpha, s, lse, lse_c, pos, g_lse,
                                            g_a, g_b, g_lse_c, g_ac, g_bc, need_scale,
                                            ctx.needs_input_grad[1])
        d_scale = (d_scale + d_scale_s).reshape(scale_t.shape) if need_scale else None
        d_bias = None
        if ctx.bias is not None and ctx.needs_input_grad[3]:     # the bias cancels
            shape, dtype, device = ctx.bias
            d_bias = torch.zeros(shape, dtype=dtype, device=device)
        return dq, dk, d_scale, d_bias, None, None, None, None, None, None


def _stats(q, kk, self_c, alpha, pos, symmetric, smoothing):
    """(S = alpha q kk^T, its diagonal 0 under self-contrast; the rows' statistics (lse,
    A, P, B); the columns' or None): A and B in raw dots (S / alpha), P None where every
    row has one positive, B None without smoothing. The scale is the GEMM's alpha, so S
    costs no pass of its own."""
    n, m = q.shape[0], kk.shape[0]
    s = q.new_empty(n, m).addmm_(q, kk.T, beta=0, alpha=alpha)     # beta=0: not read
    if self_c:
        s.fill_diagonal_(float("-inf"))
    lse, lse_c = _lse(s, symmetric and not self_c)
    if self_c:
        lse_c = lse if symmetric else None              # S is symmetric
        s.fill_diagonal_(0)         # (B and the backward's d scale see a zero there)
    inv = 1.0 / alpha
    a_c = npos_c = None
    if pos is None:                                     # positives on the diagonal
        a, npos = s.diagonal() * inv, None
        a_c = a
        if m > n:                                       # keys without a query
            a_c = torch.cat([a, s.new_zeros(m - n)])
            npos_c = torch.cat([s.new_ones(n), s.new_zeros(m - n)])
    elif pos.dim() == 1:                                # positive_index
        a, npos = s.gather(1, pos[:, None]).squeeze(1) * inv, None
        if symmetric:
            a_c = s.new_zeros(m).index_add_(0, pos, a)
            npos_c = s.new_zeros(m).index_add_(0, pos, s.new_ones(n))
    else:                                               # labels: a boolean mask
        posf = pos.to(q.dtype)
        sp = s * posf
        a, npos, a_c, npos_c = sp.sum(1) * inv, posf.sum(1), sp.sum(0) * inv, posf.sum(0)
    b = b_c = None
    if smoothing:
        b, b_c = s.sum(1) * inv, s.sum(0) * inv
    return s, (lse, a, npos, b), ((lse_c, a_c, npos_c, b_c) if symmetric else None)


def _lse(s, cols):
    """(the rows' log-sum-exps, the columns' or None) of the materialized S: the C++ op
    (one fused pass per side), else torch's."""
    if _OPS:
        lse, lse_c = torch.ops.contrastive_kernels.dense_lse(s, cols)
        return lse, (lse_c if cols else None)
    return s.logsumexp(1), (s.logsumexp(0) if cols else None)


def _softmax_grad(s, lse, g, lse_c, g_c, alpha, self_c):
    """alpha dS, dS = g_i exp(S_ij - lse_i) + g_c_j exp(S_ij - lse_c_j) (g_c None: rows
    only), the diagonal 0 under self-contrast: the C++ op (one fused pass), else torch's."""
    if _OPS:
        empty = s.new_empty(0)
        return torch.ops.contrastive_kernels.dense_grad(
            s, lse, g, empty if g_c is None else lse_c, empty if g_c is None else g_c, alpha,
            self_c)
    ds = torch.exp(s - lse[:, None]).mul_(g[:, None] * alpha)
    if g_c is not None:
        ds.add_(torch.exp(s - lse_c[None, :]).mul_(g_c[None, :] * alpha))
    if self_c:
        ds.fill_diagonal_(0)
    return ds


def _stats_backward(q, kk, self_c, alpha, s, lse, lse_c, pos, g_lse, g_a, g_b, g_lse_c,
                    g_ac, g_bc, need_scale, need_k):
    """(dq, dk, d scale or None) of sum g * statistics; the column terms None when not
    symmetric, g_lse_c None under self-contrast (folded into g_lse by the caller). dR =
    alpha dL/dS plus the target terms (A and B are raw dots), then dR kk and dR^T q."""
    sym = g_ac is not None
    dr = _softmax_grad(s, lse, g_lse, lse_c, g_lse_c, alpha, self_c)
    d_scale = torch.vdot(dr.view(-1), s.view(-1)) * alpha ** -2 if need_scale else None
    n, m = dr.shape
    if pos is None:
        dr.diagonal().add_((g_a + (g_ac if m == n else g_ac[:n])) if sym else g_a)
    elif pos.dim() == 1:
        dr[torch.arange(n, device=pos.device), pos] += g_a + g_ac[pos] if sym else g_a
    else:
        dr.add_(pos.to(dr.dtype) * (g_a[:, None] + g_ac[None, :] if sym else g_a[:, None]))
    if g_b is not None:
        dr.add_(g_b[:, None] + g_bc[None, :] if sym else g_b[:, None])
        if self_c:
            dr.fill_diagonal_(0)
    if self_c:
        return torch.addmm(dr @ kk, dr.T, q), None, d_scale
    return dr @ kk, (dr.T @ q if need_k else None), d_scale


# ---- the sigmoid loss

def siglip_loss(p):
    """The sigmoid loss of an eligible call, as one autograd node."""
    q = p.query
    to = lambda x: x.to(q.dtype) if torch.is_tensor(x) else x         # 0-dim
    return _full_precision(_SigLoss.apply, (q, p.key, to(p.scale), to(p.bias),
                                            *siglip_ids(p), p.reduction))


def siglip_ids(p):
    """(rid, cid), int32: entry (i, j) is a positive pair where rid[i] == cid[j] (class
    ids with labels, else each query's positive key and each key's index)."""
    n, m, dev = p.query.shape[0], p.key.shape[0], p.query.device
    if p.labels is not None:
        _, inv = torch.unique(torch.cat([p.labels.reshape(-1), p.key_labels.reshape(-1)]),
                              return_inverse=True)
        rid, cid = inv[:n], inv[n:]
    else:
        rid = p.positive_index if p.index_given else torch.arange(n, device=dev)
        cid = torch.arange(m, device=dev)
    return rid.to(torch.int32).contiguous(), cid.to(torch.int32).contiguous()


class _SigLoss(torch.autograd.Function):
    """rows_i = sum_j softplus(-y_ij z_ij), z = S + b, S = s q k^T, y = +1 on the
    positives (rid[i] == cid[j]) and -1 elsewhere; then the reduction. The pass that gives
    the rows also leaves D = sigmoid(z) - [positive] in S, which is all the backward
    needs: with w the rows' upstream gradients, dq = s w * (D k), dk = s D^T (w * q),
    d s = sum_i w_i <q_i, (D k)_i>, d b = sum_i w_i T_i, T_i = sum_j D_ij."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, rid, cid, reduction):
        alpha, beta = float(scale), float(bias)
        n, m = q.shape[0], k.shape[0]
        s = q.new_empty(n, m).addmm_(q, k.T, beta=0, alpha=alpha)     # beta=0: not read
        rows, t = _siglip_pass(s, beta, rid, cid)            # s <- sigmoid(z) - [positive]
        ctx.options = (alpha, reduction)
        ctx.save_for_backward(q, k, s, t)
        if reduction == "none":
            return rows
        total = rows.sum()
        return total if reduction == "sum" else total / n

    @staticmethod
    @engine.first_order
    def backward(ctx, g):
        return _full_precision(_SigLoss._backward, (ctx, g))

    @staticmethod
    def _backward(ctx, g):
        alpha, reduction = ctx.options
        q, k, d, t = ctx.saved_tensors
        n = q.shape[0]
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        rows = reduction == "none"
        w = g / n if reduction == "mean" else g             # the rows' gradients
        c = None if rows else w.item() * alpha              # uniform: into the GEMMs
        dq = dk = ds = db = None
        if need_q or need_s:
            dkk = d @ k
            if need_s:
                ds = ((q * dkk).sum(1) @ w if rows
                      else torch.vdot(q.reshape(-1), dkk.view(-1)) * w)
            if need_q:
                dq = dkk.mul_(w[:, None] * alpha if rows else c)
        if need_k:
            dk = d.T @ (q * (w[:, None] * alpha)) if rows else (d.T @ q).mul_(c)
        if need_b:
            db = t @ w if rows else t.sum() * w
        return dq, dk, ds, db, None, None, None


def _siglip_pass(s, bias, rid, cid):
    """(rows, T) of z = s + bias with positives where rid[i] == cid[j]: the rows' losses
    sum_j softplus(-y_ij z_ij) and sums of D = sigmoid(z) - [positive], leaving D in s:
    the C++ op (one fused pass), else torch's."""
    if _SIGLIP_OPS:
        return torch.ops.contrastive_kernels.dense_siglip(s, bias, rid, cid)
    minus_y = 1 - 2 * (rid[:, None] == cid[None, :]).to(s.dtype)
    s.add_(bias).mul_(minus_y)                                  # -y z
    rows = torch.nn.functional.logsigmoid(-s).sum(1).neg_()   # softplus, without a threshold
    s.sigmoid_().mul_(minus_y)                                  # -y sigmoid(-y z)
    return rows, s.sum(1)
