"""pytorch-metric-learning's NTXentLoss and SupConLoss on the fused kernels.

Same constructor, call, value and gradients as `pytorch_metric_learning.losses` (2.9.0)
with its defaults (CosineSimilarity, which L2-normalizes, and the default reducer); the
N x M similarity matrix and PML's pair lists are never built. Switch by changing the
import:

    from contrastive_kernels.integrations.pytorch_metric_learning import NTXentLoss

This module does not import pytorch_metric_learning.

Pairs, as PML forms them from `labels` (indices_tuple, miners' output, is not supported):

- ref_emb=None: anchor i and row j != i form a positive pair when their labels match,
  a negative pair otherwise.
- ref_emb (M rows) with ref_labels: anchor i and ref j are positive when labels[i] ==
  ref_labels[j], negative otherwise (all M refs, (i, i) included).
- PML drops the pairs (i, i) when ref_labels is the very tensor object `labels` (and
  reuses `labels` for the refs when ref_labels is None, which needs M == N). NTXentLoss
  does the same; SupConLoss raises a ValueError there (the log-sum-exp would have to
  drop one key per row; pass ref_labels=labels.clone() for PML's other behaviour).
- ref_labels without ref_emb raises a ValueError (PML ignores it).

The loss is zero, `(embeddings * 0).sum()` (a zero gradient for embeddings, none for
ref_emb), when there is no positive pair or no negative pair, or at most one of each
(PML returns early in all three cases).

NTXentLoss scores EACH positive pair (a, p) against a's negatives only,
l_ap = softplus(LSE_neg(a) - s_ap) with s = cos / temperature, and takes the mean over
all positive pairs (MeanReducer). LSE_neg(a) comes from the fused kernel:
info_nce(decoupled=True, reduction="none") leaves the positives out of the log-sum-exp
and returns LSE_neg(a) - mean_p s_ap; the mean positive logit is added back from the
per-label sums of the refs (O((N + M) D)). A row with no negative gives pairs of loss 0
(counted in the mean, as in PML). The s_ap themselves are O(#positive pairs): with few
labels that is up to N * M, so they are visited in tiles of ROWS x COLS over rows and
refs sorted by label, in a custom autograd function that recomputes the tiles in
backward. Memory: O(ROWS * COLS) above the O((N + M) D) inputs, whatever the labels.
Time: O((P + 2 ROWS M) D) for the forward pass, P the number of positive pairs, and
about three times that in backward (recompute, then two products), on top of the
kernel's O(N M D).

SupConLoss is one fused call, info_nce(labels=..., key_labels=..., reduction="none"):
row i is LSE over all of i's pairs minus the mean positive logit, 0 for a row with no
positive; the mean over the rows with a loss > 0 (AvgNonZeroReducer). A row whose only
pair is a single positive has loss 0 in PML and is set to 0 here. A row whose loss
is below rounding (a single positive above every negative by more than about 16 in
logit units, float32) may be kept or dropped differently: PML's filter tests rounding
there.

The result has the embeddings' dtype, as PML's does (half inputs: the kernels
accumulate in float32). `temperature` may be a float or a 0-dim tensor (it then gets
its gradient). Constructor options other than the defaults (distance, reducer,
embedding_regularizer, collect_stats...) raise a ValueError naming them.
"""
import torch
import torch.nn.functional as F

from ..loss import info_nce

__all__ = ["NTXentLoss", "SupConLoss"]

# Tile of the per-pair pass of NTXentLoss (rows x refs).
ROWS = 256
COLS = 2048


def _is_pml(obj, name):
    cls = type(obj)
    return cls.__name__ == name and cls.__module__.startswith("pytorch_metric_learning.")


def _check_options(loss_name, reducer_name, kwargs):
    """Keyword options of PML's constructor: only values that change nothing pass."""
    bad = []
    for key, value in kwargs.items():
        if key == "distance":
            ok = value is None or (_is_pml(value, "CosineSimilarity")
                                   and getattr(value, "power", 1) == 1)
        elif key == "reducer":
            ok = value is None or _is_pml(value, reducer_name)
        elif key == "embedding_regularizer":
            ok = value is None
        elif key == "embedding_reg_weight":
            ok = value == 1 or kwargs.get("embedding_regularizer") is None
        elif key == "collect_stats":
            ok = not value
        else:
            ok = False
        if not ok:
            bad.append(key)
    if bad:
        raise ValueError(f"{loss_name}: {', '.join(bad)} not supported (the fused loss is "
                         f"PML's default: CosineSimilarity, {reducer_name}, no regularizer)")


def _zero(embeddings):
    return (embeddings * 0).sum()


class _Batch:
    """The inputs of one call as PML pairs them (see the module docstring)."""

    def __init__(self, loss_name, embeddings, labels, indices_tuple, ref_emb, ref_labels,
                 allow_diag):
        if indices_tuple is not None:
            raise ValueError(f"{loss_name}: indices_tuple is not supported (the fused loss "
                             f"takes all pairs formed by labels)")
        if labels is None:
            raise ValueError(f"{loss_name}: labels is required (PML: labels and "
                             f"indices_tuple cannot both be None)")
        if not torch.is_tensor(embeddings) or embeddings.ndim != 2:
            raise ValueError(f"{loss_name}: embeddings must be a 2D tensor "
                             f"(batch_size, embedding_size)")
        if not torch.is_tensor(labels) or labels.ndim != 1 or (
                labels.shape[0] != embeddings.shape[0]):
            raise ValueError(f"{loss_name}: labels must be a 1D tensor of shape "
                             f"(batch_size,)")
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError(f"{loss_name}: ref_labels without ref_emb is not supported "
                                 f"(PML ignores it); pass ref_emb too, or neither")
            self.self_contrast, self.diag = True, True
            ref_labels = labels
        else:
            if not torch.is_tensor(ref_emb) or ref_emb.ndim != 2:
                raise ValueError(f"{loss_name}: ref_emb must be a 2D tensor")
            self.self_contrast = False
            if ref_labels is None:      # PML compares labels with themselves
                if ref_emb.shape[0] != embeddings.shape[0]:
                    raise ValueError(f"{loss_name}: ref_emb without ref_labels needs as "
                                     f"many rows as embeddings (PML then reuses labels)")
                ref_labels, self.diag = labels, True
            else:   # one tensor object (not moved to another device by PML): (i, i) out
                self.diag = ref_labels is labels and (
                    labels.device == embeddings.device == ref_emb.device)
            if not torch.is_tensor(ref_labels) or ref_labels.ndim != 1 or (
                    ref_labels.shape[0] != ref_emb.shape[0]):
                raise ValueError(f"{loss_name}: ref_labels must be a 1D tensor of shape "
                                 f"(ref_emb.shape[0],)")
            if self.diag and not allow_diag:
                raise ValueError(f"{loss_name}: ref_labels is labels (or None) with ref_emb: "
                                 f"PML then drops the pairs (i, i), which is not supported; "
                                 f"pass ref_labels=labels.clone() to keep them")
        dev = embeddings.device
        n, n_ref = embeddings.shape[0], ref_labels.shape[0]
        # class ids shared by both sides (any label dtype)
        _, inv = torch.unique(torch.cat([labels.to(dev), ref_labels.to(dev)]),
                              return_inverse=True)
        self.y, self.ry = inv[:n], inv[n:]
        self.classes = int(inv.max()) + 1 if inv.numel() else 1
        ref_count = torch.bincount(self.ry, minlength=self.classes)
        same = ref_count[self.y]                        # refs with my label, (i, i) too
        self.npos = same - (1 if self.diag else 0)      # PML's positives per row
        self.nneg = n_ref - same
        self.embeddings, self.ref_emb = embeddings, ref_emb

    def pair_counts(self):
        return int(self.npos.sum()), int(self.nneg.sum())

    def is_zero(self):
        """PML returns a zero loss: no positive pair, no negative pair, or <= 1 of each."""
        pos, neg = self.pair_counts()
        return pos == 0 or neg == 0 or (pos <= 1 and neg <= 1)

    def normalized(self):
        x = F.normalize(self.embeddings, dim=1)
        r = x if self.ref_emb is None else F.normalize(self.ref_emb, dim=1)
        return x, r

    def kernel(self, x, r, temperature, backend, **kw):
        """Row losses of the fused kernel over the same pairs ((i, i) a positive when the
        refs are given)."""
        if self.self_contrast:
            return info_nce(x, None, labels=self.y, temperature=temperature,
                            reduction="none", backend=backend, **kw)
        return info_nce(x, r, labels=self.y, key_labels=self.ry, temperature=temperature,
                        reduction="none", backend=backend, **kw)


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tiles(la, lr, ia, ir):
    """(rows, cols, mask) over rows and refs sorted by class: each row block against the
    refs of the classes it spans, in blocks of COLS; mask: same class, not (i, i)."""
    n = la.shape[0]
    starts = list(range(0, n, ROWS))
    if not starts:
        return
    ends = [min(s + ROWS, n) for s in starts]
    idx = torch.tensor(starts, device=la.device)
    last = torch.tensor(ends, device=la.device) - 1
    lo = torch.searchsorted(lr, la[idx]).tolist()
    hi = torch.searchsorted(lr, la[last], right=True).tolist()
    for a0, a1, c_lo, c_hi in zip(starts, ends, lo, hi):
        for c0 in range(c_lo, c_hi, COLS):
            c1 = min(c0 + COLS, c_hi)
            mask = la[a0:a1, None] == lr[None, c0:c1]
            if ia is not None:
                mask &= ia[a0:a1, None] != ir[None, c0:c1]
            yield slice(a0, a1), slice(c0, c1), mask


class _PairSoftplus(torch.autograd.Function):
    """sum over the positive pairs (a, p) of softplus(lse_a - <xs_a, rs_p>), rows and refs
    sorted by class; tile by tile, recomputed in backward (nothing N x M is kept)."""

    @staticmethod
    def forward(ctx, lse, xs, rs, la, lr, ia, ir):
        ctx.save_for_backward(lse, xs, rs, la, lr, ia, ir)
        total = lse.new_zeros(())
        for rows, cols, mask in _tiles(la, lr, ia, ir):
            s = xs[rows] @ rs[cols].T
            total += torch.where(mask, F.softplus(lse[rows, None] - s), 0).sum()
        return total

    @staticmethod
    def backward(ctx, grad):
        lse, xs, rs, la, lr, ia, ir = ctx.saved_tensors
        d_lse, d_xs, d_rs = torch.zeros_like(lse), torch.zeros_like(xs), torch.zeros_like(rs)
        for rows, cols, mask in _tiles(la, lr, ia, ir):
            x, r = xs[rows], rs[cols]
            w = torch.where(mask, torch.sigmoid(lse[rows, None] - x @ r.T), 0) * grad
            d_lse[rows] += w.sum(1)
            d_xs[rows] -= w @ r
            d_rs[cols] -= w.T @ x
        return d_lse, d_xs, d_rs, None, None, None, None


class NTXentLoss(torch.nn.Module):
    """pytorch_metric_learning.losses.NTXentLoss on the fused kernels (module docstring).

    forward(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)
    -> 0-dim loss.
    """

    def __init__(self, temperature=0.07, *, backend="auto", **kwargs):
        super().__init__()
        _check_options("NTXentLoss", "MeanReducer", kwargs)
        self.temperature = temperature
        self.backend = backend

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None):
        b = _Batch("NTXentLoss", embeddings, labels, indices_tuple, ref_emb, ref_labels,
                   allow_diag=True)
        if b.is_zero():
            return _zero(embeddings)
        t = self.temperature
        x, r = b.normalized()
        acc = _acc(x)
        # negatives-only log-sum-exp: the decoupled row loss plus the mean positive logit
        row = b.kernel(x, r, t, self.backend, decoupled=True)
        xa, ra = x.to(acc), r.to(acc)
        pos_sum = ra.new_zeros(b.classes, ra.shape[1]).index_add(0, b.ry, ra)[b.y]
        kernel_pos = b.npos     # the kernel's positives per row: (i, i) too with refs
        if b.self_contrast:
            pos_sum = pos_sum - xa
        elif b.diag:
            kernel_pos = kernel_pos + 1
        mean_pos = (xa * pos_sum).sum(1) / kernel_pos.clamp_min(1) / t
        lse = row.to(acc) + mean_pos
        lse = torch.where(b.nneg > 0, lse, float("-inf"))   # no negative: pairs of loss 0
        # the pairs, tile by tile over rows and refs sorted by class
        oa, orr = torch.sort(b.y, stable=True)[1], torch.sort(b.ry, stable=True)[1]
        ia, ir = (oa, orr) if b.diag else (None, None)
        total = _PairSoftplus.apply(lse[oa], (xa / t)[oa], ra[orr], b.y[oa], b.ry[orr],
                                    ia, ir)
        pos, _ = b.pair_counts()
        return (total / pos).to(embeddings.dtype)


class SupConLoss(torch.nn.Module):
    """pytorch_metric_learning.losses.SupConLoss on the fused kernels (module docstring).

    forward(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)
    -> 0-dim loss.
    """

    def __init__(self, temperature=0.1, *, backend="auto", **kwargs):
        super().__init__()
        _check_options("SupConLoss", "AvgNonZeroReducer", kwargs)
        self.temperature = temperature
        self.backend = backend

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None):
        b = _Batch("SupConLoss", embeddings, labels, indices_tuple, ref_emb, ref_labels,
                   allow_diag=False)
        if b.is_zero():
            return _zero(embeddings)
        x, r = b.normalized()
        row = b.kernel(x, r, self.temperature, self.backend)
        row = torch.where((b.npos == 1) & (b.nneg == 0), 0, row)   # exactly 0 in PML
        keep = row > 0                                             # AvgNonZeroReducer
        count = int(keep.sum())
        if count == 0:
            return _zero(embeddings)
        return (torch.where(keep, row, 0).sum() / count).to(embeddings.dtype)
