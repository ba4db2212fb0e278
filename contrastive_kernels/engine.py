"""The stages of a fused loss, shared by the local loss and the ring (docs/DESIGN.md).

    problem.check_inputs        validation -> Problem
    backends.REGISTRY.select    the backend that declares it can serve the call
    forward(...)                per key block: the backend's log-sum-exps and the target
                                statistics (targets.Targets), merged over blocks
    backward(...)               per key block: the backend's gradients (or, with
                                low_memory, its final ones) plus the target gradients
    side_losses / reduce        the per-row losses and the reduction
    reduce_vjp / side_losses_vjp  their gradients in closed form (the dense path's
                                one-node backward, dense.py)

Where the key blocks come from is a `Blocks` object: `LocalBlocks` (one block: the keys)
here, the ring's transport in distributed.py. `blocks.forward(k)` visits the blocks and
brings their column statistics home; `blocks.backward(k, col_pack, need_dk)` visits them
with their column pack and brings each block's `dk` home (the sigmoid loss's 3-pass
forward uses it too: its dk is known in the forward). The autograd node around forward and
backward is a custom op for the local loss (ops.py) and an autograd.Function for the
ring; both call these two functions.
"""
import dataclasses
import functools

import torch


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the stages need besides tensors."""
    backend: object          # backends.base.Backend
    options: object          # options.Options
    self_contrast: bool      # the keys are the queries (global diagonal masked)
    cols: bool               # column log-sum-exps from the backend (symmetric, and not
                             # self-contrast: there they are the rows'); the column target
                             # statistics come with every symmetric loss (Targets.cols)
    masked: bool = False     # the keys are given but are the queries' own rows: the
                             # diagonal is masked (per-query temperature under key=None)

    @property
    def self_mask(self):
        """Whether the block of the queries' own keys has its diagonal masked."""
        return self.self_contrast or self.masked


DOUBLE_BACKWARD = (
    "double backward (create_graph=True) through a contrastive_kernels loss is not "
    "supported: its gradients come from fused kernels, not from differentiable ops. For a "
    "gradient penalty or another higher-order gradient, compute the loss with "
    "contrastive_kernels.reference.info_nce / reference.siglip_loss (the same arguments; "
    "they materialize the N x M logits)")


def first_order(backward):
    """Wrap an autograd backward so that backward(create_graph=True) raises instead of
    returning gradients without their second-order terms."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD)
        return backward(ctx, *grads)
    return run


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class LocalBlocks:
    """The local loss: one block, all the keys."""

    def __init__(self, targets, key_labels, self_contrast):
        self.targets, self.key_labels, self.self_contrast = targets, key_labels, self_contrast
        self.cols_home = self.dk_home = None

    def _block(self, k):
        return self.targets.block(k.shape[0], self.self_contrast, self.key_labels, 0)

    def forward(self, k):
        blk = self._block(k)
        yield blk, k
        self.cols_home = blk.cols

    def backward(self, k, col_pack, need_dk):
        blk = self._block(k)
        blk.col_pack = col_pack
        yield blk, k
        self.dk_home = blk.dk


def forward(spec, q, k, scale, targets, blocks, delta=None):
    """Row statistics (lse, A, P, B) of the local queries over every key block, and the
    column statistics (lse, A, P, B) of the local keys (None unless symmetric; their lse
    None without spec.cols). B is None without label smoothing. delta (N,): the positive
    shift of each query row inside the log-sum-exps (margin, decoupled), or None."""
    acc = acc_dtype(q.dtype)
    n = q.shape[0]
    lse = torch.full((n,), float("-inf"), dtype=acc, device=q.device)
    a, p = (torch.zeros(n, dtype=acc, device=q.device) for _ in range(2))
    b = torch.zeros(n, dtype=acc, device=q.device) if targets.eps else None
    for blk, kb in blocks.forward(k):
        shift = blk.shift(delta)
        kw = {} if shift is None else dict(shift=shift)
        lse_b, lse_cb = spec.backend.lse_forward(q, kb, scale, blk.self_mask, spec.cols,
                                                 options=spec.options, **kw)
        (a_b, p_b, b_b), (ac_b, pc_b, bc_b) = targets.stats(blk, q, kb, acc)
        torch.logaddexp(lse, lse_b, out=lse)
        a += a_b
        p += p_b
        if b is not None:
            b += b_b
        blk.cols = (lse_cb, ac_b, pc_b, bc_b) if targets.cols else None
    return (lse, a, p, b), blocks.cols_home


def merge_cols(x, y):
    """Column statistics (lse, A, P, B) of the same keys over two sets of queries."""
    lse = None if x[0] is None else torch.logaddexp(x[0], y[0])
    return (lse,) + tuple(None if u is None else u + v for u, v in zip(x[1:], y[1:]))


def block_grads(spec, q, kb, blk, scale, targets, lse_r, g_r, g_a, g_b, need_dq, need_dk,
                need_ds, delta=None, need_dshift=False):
    """(dq, dk, ds, dshift) of one block: dq's and kb's gradient contributions (float32/64,
    or the input dtype with low_memory), its share of sum_ij dS_ij <q_i, k_j> (the scale)
    and, with the shift delta, its share of the gradient of delta (None unless
    need_dshift)."""
    be, opt = spec.backend, spec.options
    lse_c = g_c = g_ac = g_bc = None
    if blk.col_pack is not None:
        lse_c, g_c, g_ac, g_bc = blk.col_pack
    if not spec.cols:
        lse_c = g_c = None
    if opt.low_memory:
        def w():
            return targets.weights(blk, g_a, g_b, g_ac, g_bc)
        return be.input_grads(q, kb, scale, blk.self_mask, lse_r, lse_c, g_r, g_c, w,
                              need_dq=need_dq, need_dk=need_dk, need_ds=need_ds,
                              options=opt) + (None,)
    shift = blk.shift(delta)
    dshift = None
    if shift is None:
        dq, dk = be.lse_backward(q, kb, scale, blk.self_mask, lse_r, lse_c, g_r, g_c,
                                 need_dq=need_dq, need_dk=need_dk, options=opt)
    else:
        dq, dk, dshift = be.lse_backward(q, kb, scale, blk.self_mask, lse_r, lse_c, g_r, g_c,
                                         need_dq=need_dq, need_dk=need_dk, options=opt,
                                         shift=shift, need_dshift=need_dshift)
    return _finish(q, kb, blk, scale, targets, dq, dk, need_ds, g_a, g_b, g_ac,
                   g_bc) + (dshift,)


def _finish(q, kb, blk, scale, targets, dq, dk, need_ds, g_a, g_b=None, g_ac=None, g_bc=None):
    """A block's gradients from the backend's raw dS k and dS^T q: the scale's share
    sum_ij dS_ij <q_i, k_j>, the scale applied, and the target terms added (g_a None:
    none, the sigmoid loss's dS has them)."""
    ds = None
    if need_ds:
        rows, grads = (q, dq) if dq is not None else (kb, dk)
        ds = targets.rowdots(rows, grads, grads.dtype).sum()
    s = scale.to((dq if dq is not None else dk).dtype) if (dq is not None or dk is not None) \
        else None
    for g in (dq, dk):
        if g is not None:
            g.mul_(s)
    if g_a is not None and (dq is not None or dk is not None):
        targets.add_grads(blk, q, kb, g_a, g_b, g_ac, g_bc, dq, dk)
    return dq, dk, ds


# ---- the sigmoid loss (SigLIP): sum_ij softplus(-y_ij z_ij)

def siglip_forward(spec, q, k, scale, bias, targets, blocks, need_dq, need_dk):
    """Row statistics (R, T) of the local queries over every key block from the backend:
    R_i = sum_j softplus(-y_ij z_ij), the row's loss, and T_i = sum_j (sigmoid(z_ij) -
    [positive]), its derivative in the bias, each entry computed with its target (the
    blocks' positive ids). With need_dq or need_dk (the 3-pass schedule) also the
    gradients of the total loss sum_i R_i for an upstream gradient of 1, computed in the
    same pass: (dq, dk, ds, db), dk brought home by `blocks`; else None."""
    acc = acc_dtype(q.dtype)
    r, t = (torch.zeros(q.shape[0], dtype=acc, device=q.device) for _ in range(2))
    grads = need_dq or need_dk

    def block(blk, kb):
        r_b, t_b, dq_b, dk_b = spec.backend.siglip_tiles(
            q, kb, scale, bias, None, True, need_dq, need_dk, options=spec.options,
            pos=blk.positives)
        r.add_(r_b)
        t.add_(t_b)
        if not grads:
            return None, None, None
        return _finish(q, kb, blk, scale, targets, dq_b, dk_b, True, None)

    if not grads:
        for blk, kb in blocks.forward(k):
            block(blk, kb)
        return (r, t), None
    dq, dk, ds, _ = _accumulate(spec, blocks.backward(k, None, need_dk), block, blocks)
    return (r, t), (dq, dk, ds, t.sum())


def siglip_backward(spec, q, k, scale, bias, targets, blocks, g_r, need_dq, need_dk, need_ds):
    """(dq, dk, ds) of sum_i g_r[i] R_i (the 4-pass schedule); the bias's gradient needs
    no pass: sum_i g_r[i] T_i."""
    def grads(blk, kb):
        _, _, dq, dk = spec.backend.siglip_tiles(q, kb, scale, bias, g_r, False, need_dq,
                                                 need_dk, options=spec.options, pos=blk.positives)
        return _finish(q, kb, blk, scale, targets, dq, dk, need_ds, None)
    return _accumulate(spec, blocks.backward(k, None, need_dk), grads, blocks)[:3]


def backward(spec, q, k, scale, targets, blocks, lse_r, g_r, g_a, g_b, col_pack, need_dq,
             need_dk, need_ds, delta=None, need_dshift=False):
    """(dq, dk, ds, dshift): the gradients of the statistics' consumers with respect to q,
    the local keys (None under self-contrast: folded into dq), the scale and the shift
    delta (None unless need_dshift). col_pack is (lse_c, g_c, g_ac, g_bc) of the local
    keys (lse_c, g_c None without spec.cols), or None unless symmetric."""
    def grads(blk, kb):
        return block_grads(spec, q, kb, blk, scale, targets, lse_r, g_r, g_a, g_b, need_dq,
                           need_dk, need_ds, delta, need_dshift)
    return _accumulate(spec, blocks.backward(k, col_pack, need_dk), grads, blocks)


def _accumulate(spec, visits, grads, blocks):
    """Sum grads(blk, kb) = (dq, dk, ds[, dshift]) over the visited blocks: dq, ds and
    dshift here, each block's dk sent home by `blocks` (blocks.dk_home)."""
    dq = ds = dsh = None
    for blk, kb in visits:
        dq_b, dk_b, ds_b, *more = grads(blk, kb)
        if dq_b is not None:
            dq = dq_b if dq is None else dq.add_(dq_b)
        if ds_b is not None:
            ds = ds_b if ds is None else ds + ds_b
        if more and more[0] is not None:
            dsh = more[0] if dsh is None else dsh.add_(more[0])
        blk.dk = dk_b
    dk = blocks.dk_home
    if spec.self_contrast and dk is not None:
        # the keys are the queries: their gradient as keys belongs to q
        if dk is not None:
            dq = dk if dq is None else dq.add_(dk)
        dk = None
    return dq, dk, ds, dsh


def side_losses(lse, a, p, b, scale, bias, eps, nvalid, margin=None, decoupled=False,
                teacher=None):
    """The loss of each row (or column) from its statistics: (LSE + b) - (target + b) with
    target = s ((1 - eps) A / P + eps B / nvalid), 0 where P = 0; and the mask P > 0 (and,
    decoupled, a non-empty log-sum-exp). margin: the shift of a positive logit (-s m),
    which the target's positive terms carry, or None. teacher: (X, alpha), the
    teacher-weighted dots: target = (1 - alpha) target + alpha s X, and with alpha = 1
    every row has a target. The bias cancels but keeps its (zero) gradient.
    p None: every row has exactly one positive (P = 1); the mask is then None (all)."""
    ok = None if p is None else p > 0
    if teacher is not None and teacher[1] == 1.0:
        ok = None
    if decoupled:
        live = lse != float("-inf")         # a row with no negative has no loss
        ok = live if ok is None else ok & live
    if nvalid == 0:         # no key at all: nothing to predict
        ok = torch.zeros(lse.shape, dtype=torch.bool, device=lse.device)
    # (each op costs a few microseconds, which small batches see: the no-op ones are skipped)
    t = a if p is None else a / p.clamp_min(1)
    if eps:
        t = (1 - eps) * t + eps * b / max(nvalid, 1)
    target = scale * t
    if margin is not None:
        target = target + margin * ((1 - eps) + (eps / max(nvalid, 1)) * (1 if p is None else p))
    if teacher is not None:
        x, alpha = teacher
        target = (1 - alpha) * target + alpha * (scale * x)
    loss = (lse + bias) - (target + bias) if torch.is_tensor(bias) else lse - target
    return (loss if ok is None else torch.where(ok, loss, 0.0)), ok


def _count(side):
    """The rows of a side (loss, ok) with a loss: a tensor, or an int when all have one."""
    loss, ok = side
    return loss.shape[0] if ok is None else ok.sum()


def reduce(rows, cols, reduction, counts=None):
    """The reduction of the row losses and (symmetric) the column losses, each a pair
    (loss, ok). "mean" divides each side by its number of rows with a positive (given by
    counts(local counts) in the ring, where the global counts are summed over ranks) and
    averages the two sides; "none" returns the rows then the columns, each weighted 1/2."""
    if reduction == "none":
        return rows[0] if cols is None else torch.cat([rows[0], cols[0]]) * 0.5
    if reduction == "sum":
        return rows[0].sum() if cols is None else (rows[0].sum() + cols[0].sum()) * 0.5
    sides = [rows] if cols is None else [rows, cols]
    if counts is None and all(ok is None and loss.shape[0] == rows[0].shape[0] > 0
                              for loss, ok in sides):
        # every loss counts, both sides alike: one mean (ops on 0-dim tensors cost a few
        # microseconds each, which small batches see)
        return rows[0].mean() if cols is None else torch.cat([rows[0], cols[0]]).mean()
    if counts is None:
        sides = [loss.sum() / max(loss.shape[0], 1) if ok is None
                 else loss.sum() / ok.sum().clamp_min(1) for loss, ok in sides]
    else:
        local = torch.stack([torch.as_tensor(_count(s), device=s[0].device) for s in sides])
        cnt = counts(local).clamp_min(1).to(rows[0].dtype)
        sides = [loss.sum() / c for (loss, _), c in zip(sides, cnt.unbind(0))]
    return sides[0] if cols is None else (sides[0] + sides[1]) * 0.5


def reduce_vjp(rows, cols, reduction, g):
    """The gradient of reduce(rows, cols, reduction) (local counts) with respect to each
    row loss and (cols given) each column loss, for the upstream gradient g; rows and
    cols are pairs (number of losses, ok) of the sides."""
    half = 0.5 if cols is not None else 1.0
    if reduction == "none":
        return (g, None) if cols is None else (g[:rows[0]] * half, g[rows[0]:] * half)
    out, by_factor = [], {}          # (sides with the same factor share one product)
    for side in (rows, cols):
        if side is not None:
            n, ok = side
            if reduction == "sum" or ok is None:
                c = half / (1 if reduction == "sum" else max(n, 1))
                w = by_factor[c] if c in by_factor else by_factor.setdefault(c, g * c)
            else:
                w = g * half / ok.sum().clamp_min(1)
            side = w.expand(n)
        out.append(side)
    return tuple(out)


def side_losses_vjp(w, ok, a, p, b, scale, eps, nvalid, need_scale=True):
    """The gradient of side_losses (without margin, decoupled or teacher) with respect to
    its statistics (lse, A, B) and (need_scale) its scale, for the upstream gradient w of
    each loss: d/dLSE = w, d/dA = -w s (1 - eps) / P, d/dB = -w s eps / nvalid,
    d/ds = -sum w t, where the row has a loss (ok; None: all), 0 elsewhere; B's None
    without smoothing. The bias has gradient 0."""
    if ok is not None:
        w = torch.where(ok, w, 0.0)
    inv_p = None if p is None else 1 / p.clamp_min(1)
    ws = w * (-scale)
    g_a = ws if p is None else ws * inv_p
    if eps:
        g_a = g_a * (1 - eps)
    g_b = ws * (eps / max(nvalid, 1)) if eps else None
    d_scale = None
    if need_scale:
        t = a if p is None else a * inv_p
        if eps:
            t = (1 - eps) * t + eps * b / max(nvalid, 1)
        d_scale = -torch.dot(w.reshape(-1), t)
    return w, g_a, g_b, d_scale


# ---- teacher soft targets, the softmax weighting: X_i = sum_j w^T_ij <q_i, k_j> with
# w^T_ij = exp(T_ij - LSE^T_i), T = s_t tq tk^T (docs/DESIGN.md, section 9)

def teacher_forward(spec, q, k, tq, tk, ts, cols, rowdots):
    """(x_r (N,), x_c (M,) or None, lse_t, lse_tc or None): the rows' teacher-weighted
    dots and (cols) the columns' X^c_j = sum_i w^Tc_ij <q_i, k_j>, w^Tc the column softmax
    of T. Three passes over T: its log-sum-exps, then dS = w^T with the student's keys as
    the product (Y = w^T k, X_i = <q_i, Y_i>), and (cols) the same on T^T."""
    be, opt, sm = spec.backend, spec.options, spec.self_mask
    acc = acc_dtype(q.dtype)
    lse_t, lse_tc = be.lse_forward(tq, tk, ts, sm, cols, options=opt)
    ones = lambda n: torch.ones(n, dtype=acc, device=q.device)
    y, _ = be.lse_backward(tq, tk, ts, sm, lse_t, None, ones(q.shape[0]), None, need_dq=True,
                           need_dk=False, options=opt, prod=(q, k))
    x_r = rowdots(q, y, acc)
    del y
    x_c = None
    if cols:
        z, _ = be.lse_backward(tk, tq, ts, sm, lse_tc, None, ones(k.shape[0]), None,
                               need_dq=True, need_dk=False, options=opt, prod=(k, q))
        x_c = rowdots(k, z, acc)
    return x_r, x_c, lse_t, lse_tc


def teacher_backward(spec, q, k, tq, tk, ts, lse_t, lse_tc, c_r, c_c, need_dq, need_dk):
    """(dq, dk) of sum_i c_r[i] X_i + sum_j c_c[j] X^c_j: one pass over T with
    dS = c_r w^T + c_c w^Tc and the student's embeddings as the product operands. Under
    self-contrast (k is q) dk is folded into dq."""
    if spec.self_contrast:
        need_dq = need_dk = need_dq or need_dk
    dq, dk = spec.backend.lse_backward(tq, tk, ts, spec.self_mask, lse_t,
                                       lse_tc if c_c is not None else None, c_r, c_c,
                                       need_dq=need_dq, need_dk=need_dk, options=spec.options,
                                       prod=(q, k))
    if spec.self_contrast:
        dq, dk = dq.add_(dk), None
    return dq, dk
