"""The small-problem path of `backend="auto"` on the CPU (docs/DESIGN.md, section 13).

Below DENSE_MAX logits the fused path's fixed cost (custom ops, target bookkeeping) is
larger than the arithmetic, and the materialized loss wins. There `auto` computes the
forward statistics of `ops.info_nce_stats` (the rows' and columns' log-sum-exps and
target dots) from one materialized N x M tile: a few small N x M buffers, at most
DENSE_MAX elements each (4 MiB in float32), so the memory contract holds. The losses
and the reduction after them are the shared stages (engine.side_losses, engine.reduce).

Not taken under torch.compile (the custom ops trace as one node there), nor for the
variants (margin, decoupled, per-query temperature, teacher), half types, or options
that ask for a kernel (low_memory, algorithm). Naming a backend skips it.
"""
import torch

from . import engine

DENSE_MAX = 1 << 20          # N * M at or below which auto materializes (1024 x 1024)


def eligible(p, opts, backend):
    """Whether `auto` computes this call densely."""
    q = p.query
    return (backend == "auto" and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.float64)
            and (p.key is None or p.key.dtype == q.dtype)
            and 0 < q.shape[0] * p.n_keys <= DENSE_MAX
            and (p.key is not None or q.shape[0] > 1)      # every row has a valid key
            and not (p.shifted or p.per_row or p.teacher is not None)
            and not opts.low_memory and opts.algorithm == "auto"
            and not torch.compiler.is_compiling())


def info_nce_stats(p, scale):
    """The 8 statistics of ops.info_nce_stats ([lse, A, P, B] of the rows, then of the
    columns; column ones empty unless symmetric, column lse empty under self-contrast),
    differentiable in q, k and `scale` (a 0-dim tensor)."""
    q, self_c = p.query, p.key is None
    if p.labels is not None:
        pos = p.labels.view(-1, 1) == p.key_labels.view(1, -1)
        if self_c:
            pos.fill_diagonal_(False)
    elif p.index_given or self_c:
        pos = p.positive_index              # (N,): one positive per row
    else:
        pos = None                          # the default: key i is query i's positive
    args = (q, p.key, scale.to(q.dtype).reshape(()), pos, p.symmetric, bool(p.label_smoothing))
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):      # full precision, as the kernels
            return list(_Stats.apply(*args))
    return list(_Stats.apply(*args))


class _Stats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, pos, symmetric, smoothing):
        self_c = k is None
        kk = q if self_c else k
        n, m = q.shape[0], kk.shape[0]
        r = q @ kk.T                                        # raw dots
        s = r * scale
        if self_c:
            s.fill_diagonal_(float("-inf"))
        pr, lse = _softmax(s, 1)
        pc = lse_c = None
        if symmetric and not self_c:
            pc, lse_c = _softmax(s, 0)
        del s
        zeros = q.new_zeros
        if pos is None:                                     # positives on the diagonal
            a = r.diagonal().clone()
            npos = torch.ones_like(a)
            a_c = a if m == n else torch.cat([a, zeros(m - n)])
            npos_c = npos if m == n else torch.cat([npos, zeros(m - n)])
        elif pos.dim() == 1:                                # positive_index
            a = r.gather(1, pos[:, None]).squeeze(1)
            npos = torch.ones_like(a)
            a_c = zeros(m).index_add_(0, pos, a)
            npos_c = zeros(m).index_add_(0, pos, npos)
        else:                                               # labels: a boolean mask
            posf = pos.to(q.dtype)
            rp = r * posf
            a, npos, a_c, npos_c = rp.sum(1), posf.sum(1), rp.sum(0), posf.sum(0)
        b = b_c = None
        if smoothing:
            if self_c:
                r.fill_diagonal_(0)
            b, b_c = r.sum(1), r.sum(0)
        out = [lse, a, npos, zeros(n) if b is None else b]
        if symmetric:
            out += [zeros(0) if self_c else lse_c, a_c, npos_c, zeros(m) if b_c is None else b_c]
        else:
            out += [zeros(0) for _ in range(4)]
        ctx.symmetric, ctx.self_c, ctx.smoothing = symmetric, self_c, smoothing
        ctx.save_for_backward(q, kk, scale, r, pr, pc, pos)
        ctx.mark_non_differentiable(out[2], out[6])
        return tuple(out)

    @staticmethod
    @engine.first_order
    def backward(ctx, *grads):
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return _Stats._backward(ctx, *grads)
        return _Stats._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, g_lse, g_a, _gp, g_b, g_lse_c, g_ac, _gpc, g_bc):
        q, kk, scale, r, pr, pc, pos = ctx.saved_tensors
        sym, self_c = ctx.symmetric, ctx.self_c
        # (saved tensors stay unchanged: backward may run again under retain_graph)
        ds = pr * g_lse[:, None]                            # d loss / d S
        if pc is not None:
            ds.addcmul_(pc, g_lse_c[None, :])
        d_scale = torch.vdot(ds.view(-1), r.view(-1)) if ctx.needs_input_grad[2] else None
        dr = ds.mul_(scale)
        if pos is None:
            n = q.shape[0]
            dr.diagonal().add_(g_a + g_ac[:n] if sym else g_a)
        elif pos.dim() == 1:
            g = g_a + g_ac[pos] if sym else g_a
            dr[torch.arange(pos.shape[0], device=pos.device), pos] += g
        else:
            dr.add_(pos.to(dr.dtype) * (g_a[:, None] + g_ac[None, :] if sym else g_a[:, None]))
        if ctx.smoothing:
            dr.add_(g_b[:, None] + g_bc[None, :] if sym else g_b[:, None])
            if self_c:
                dr.fill_diagonal_(0)
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if self_c:
            return torch.addmm(dr @ kk, dr.T, q), None, d_scale, None, None, None
        return (dr @ kk if need_q else None), (dr.T @ q if need_k else None), d_scale, \
            None, None, None


def _softmax(s, dim):
    """(softmax of s along dim, its log-sum-exp), from torch's fused softmax: the largest
    weight of a line is exp(max - lse) >= 1 / length, so lse = max - log(largest weight)."""
    p = torch.softmax(s, dim)
    return p, s.amax(dim) - p.amax(dim).log()
