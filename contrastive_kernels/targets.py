"""The target terms of the loss, as statistics that add up over blocks of keys.

For the local queries and one block of keys (all the keys for the local loss, one
rank's keys in the ring), per query row i

    A_i = sum_{j in block, positive} <q_i, k_j>,  P_i = #positives in the block,
    B_i = sum_{j in block, valid} <q_i, k_j>   (only with label smoothing),

and, when the loss needs columns, the same per key j of the block over the queries
(A^c_j, P^c_j, B^c_j). All of them add over blocks. The target dot of a row is
t_i = (1 - eps) A_i / P_i + eps B_i / V_i (V_i: its valid keys; engine.side_losses).
Positives come from labels (same class, classes numbered per block) or from a
positive_index into the keys (global indices; a block holds keys offset..offset+size).
A self-masked block (the keys are the queries, i == j is left out) holds the diagonal.

Backward: the gradient of sum_i (gA_i A_i + gB_i B_i) + sum_j (gAc_j A^c_j + gBc_j B^c_j)
with respect to <q_i, k_j> is

    W_ij = [pos_ij] (gA_i + gAc_j) + [valid_ij] (gB_i + gBc_j),

`weights` gives it as O(N + M) vectors (for kernels that fold W into dS) and `add_grads`
adds W k into dq and W^T q into dk. Everything works on row blocks of about `budget`
elements in the accumulation dtype: no float32 copy of a whole input.
"""
import torch

# Elements in one temporary: at least CHUNK_ELEMS (1 MiB of float32), and 1/32 of the
# inputs' elements for large problems, so that a step launches a few dozen small ops,
# not thousands, and each temporary stays ~3% of q + k.
CHUNK_ELEMS = 1 << 18
CHUNK_FRACTION = 32


def _blocks(size, step):
    return [(i, min(i + step, size)) for i in range(0, size, step)]


class Block:
    """One block of keys as the local queries see it. With a positive_index, its pairs
    (rows, keys) and the kernels' ids (rid, cid) are made when first asked for."""

    def __init__(self, size, self_mask, labels=None, offset=0, pi=None, whole=False):
        self.size, self.self_mask, self.labels, self.offset = size, self_mask, labels, offset
        self.classes = 0
        self._pi = pi
        self._whole = whole        # the block holds every key (the local loss)
        self._rid = self._cid = self._pairs = self._ids = None
        self.key_ids = False       # cid holds class ids (labels), not the keys' indices
        self.cols = self.col_pack = self.dk = None   # what the engine hands the transport

    @property
    def pairs(self):
        """(i, j): row i's positive is key j of the block (positive_index only)."""
        if self._pairs is None:
            pi, off = self._pi, self.offset
            i = torch.nonzero((pi >= off) & (pi < off + self.size)).flatten()
            self._pairs = (i, pi[i] - off)
        return self._pairs

    @property
    def rid(self):
        """Per row: its class (labels) or its positive key in the block, else -1."""
        if self._rid is None:
            pi, off = self._pi, self.offset
            if self._whole:
                self._rid = pi          # every positive is in the block (checked range)
            else:
                self._rid = torch.where((pi >= off) & (pi < off + self.size), pi - off,
                                        torch.full_like(pi, -1))
        return self._rid

    @property
    def ids(self):
        """(rid, cid) as the kernels take them: int32, contiguous (backends/base.py)."""
        if self._ids is None:
            self._ids = (self.rid.to(torch.int32).contiguous(),
                         self.cid.to(torch.int32).contiguous())
        return self._ids

    @property
    def positives(self):
        """The sigmoid loss's pos (backends/base.py): (rid, cid), cid None where each
        key's id is its index (no labels)."""
        rid, cid = self.ids
        return rid, (cid if self.key_ids else None)

    def shift(self, delta):
        """The kernels' positive shift of this block, (rid, cid, delta) with int32 ids
        (backends/base.py), or None without a delta."""
        return None if delta is None else self.ids + (delta,)

    @property
    def cid(self):
        """Per key of the block: its class (labels) or its own index (int32: for the
        kernels, which compare int32 ids)."""
        if self._cid is None:
            self._cid = torch.arange(self.size, device=self._pi.device, dtype=torch.int32)
        return self._cid


class Targets:
    """Block statistics and gradients of the target terms (module docstring)."""

    def __init__(self, n, d, m_total, labels=None, positive_index=None, eps=0.0, cols=False):
        self.labels, self.pi, self.eps, self.cols = labels, positive_index, eps, cols
        self.m_total = m_total
        self.budget = max(CHUNK_ELEMS, (n + m_total) * d // CHUNK_FRACTION)

    def block(self, size, self_mask, labels=None, offset=0):
        """The block of `size` keys starting at global key `offset` (labels: its key
        labels); class ids or positive pairs are worked out here, once per block."""
        b = Block(size, self_mask, labels, offset, self.pi,
                  whole=offset == 0 and size == self.m_total)
        if self.labels is not None:
            n = self.labels.numel()
            _, inv = torch.unique(torch.cat([self.labels, labels]), return_inverse=True)
            b._rid, b._cid = inv[:n], inv[n:]
            b.key_ids = True
            b.classes = int(inv.max()) + 1 if inv.numel() else 0
        return b

    # ---- helpers on row blocks of about `budget` elements

    def _rows(self, d):
        return max(1, self.budget // max(d, 1))

    def _wsum(self, x, w, acc):
        """sum_i w_i x_i (or sum_i x_i), shape (D,)."""
        out = torch.zeros(x.shape[1], dtype=acc, device=x.device)
        for i0, i1 in _blocks(x.shape[0], self._rows(x.shape[1])):
            xc = x[i0:i1].to(acc)
            out += xc.sum(0) if w is None else w[i0:i1] @ xc
        return out

    def rowdots(self, x, y, acc, idx=None, idy=None):
        """<x_i, y_i> (or <x_idx[i], y_idy[i]>), one per row (of idx if given)."""
        rows = x.shape[0] if idx is None else idx.numel()
        out = torch.empty(rows, dtype=acc, device=x.device)
        for i0, i1 in _blocks(rows, self._rows(x.shape[1])):
            xc = x[i0:i1] if idx is None else x[idx[i0:i1]]
            yc = y[i0:i1] if idy is None else y[idy[i0:i1]]
            out[i0:i1] = (xc.to(acc) * yc.to(acc)).sum(1)
        return out

    def _matvec(self, x, v, acc):
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        for i0, i1 in _blocks(x.shape[0], self._rows(x.shape[1])):
            out[i0:i1] = x[i0:i1].to(acc) @ v
        return out

    def _class_sizes(self, d, classes):
        dc = max(1, min(d, self.budget // max(classes, 1)))
        return dc, max(1, self.budget // dc)

    def _class_sum(self, x, ids, classes, d0, d1, acc, weight=None):
        """(classes, d1 - d0): sum of the rows of x[:, d0:d1] (times weight) per class id."""
        out = torch.zeros(classes, d1 - d0, dtype=acc, device=x.device)
        for i0, i1 in _blocks(x.shape[0], max(1, self.budget // (d1 - d0))):
            xc = x[i0:i1, d0:d1].to(acc)
            out.index_add_(0, ids[i0:i1], xc if weight is None else xc * weight[i0:i1, None])
        return out

    # ---- forward

    def stats(self, b, q, kb, acc):
        """(A, P, B) of the rows and (A^c, P^c, B^c) of the block's keys; B is None without
        label smoothing and the column ones are None without columns."""
        n, dev = q.shape[0], q.device
        cols = self.cols
        if self.labels is not None:
            a_r, a_c = self._class_dots(b, q, kb, acc)
            p_r = torch.bincount(b.cid, minlength=b.classes)[b.rid].to(acc)
            p_c = torch.bincount(b.rid, minlength=b.classes)[b.cid].to(acc) if cols else None
            if b.self_mask:  # a row's own label always matches: leave the diagonal out
                own = self.rowdots(q, kb, acc)
                a_r, p_r = a_r - own, p_r - 1
                if cols:
                    a_c, p_c = a_c - own, p_c - 1
        else:
            i, j = b.pairs
            dots = self.rowdots(q, kb, acc, i, j)
            a_r = torch.zeros(n, dtype=acc, device=dev).index_put_((i,), dots)
            p_r = torch.zeros(n, dtype=acc, device=dev).index_put_((i,), torch.ones_like(dots))
            a_c = p_c = None
            if cols:
                a_c = torch.zeros(b.size, dtype=acc, device=dev).index_add_(0, j, dots)
                p_c = torch.zeros(b.size, dtype=acc, device=dev).index_add_(0, j, torch.ones_like(dots))
        b_r = b_c = None
        if self.eps:
            b_r = self._matvec(q, self._wsum(kb, None, acc), acc)
            b_c = self._matvec(kb, self._wsum(q, None, acc), acc) if cols else None
            if b.self_mask:
                own = self.rowdots(q, kb, acc)
                b_r = b_r - own
                if cols:
                    b_c = b_c - own
        return (a_r, p_r, b_r), (a_c, p_c, b_c)

    def _class_dots(self, b, q, kb, acc):
        """sum_{j: cid_j = rid_i} <q_i, k_j> and (cols) its column twin, over blocks of the
        embedding dim."""
        n, d = q.shape
        dc, rows = self._class_sizes(d, b.classes)
        a_r = q.new_zeros(n, dtype=acc)
        a_c = q.new_zeros(kb.shape[0], dtype=acc) if self.cols else None
        for d0, d1 in _blocks(d, dc):
            sides = [(q, a_r, self._class_sum(kb, b.cid, b.classes, d0, d1, acc), b.rid)]
            if self.cols:
                sides.append((kb, a_c, self._class_sum(q, b.rid, b.classes, d0, d1, acc), b.cid))
            for x, out, sums, ids in sides:
                for i0, i1 in _blocks(x.shape[0], rows):
                    out[i0:i1] += (x[i0:i1, d0:d1].to(acc) * sums[ids[i0:i1]]).sum(1)
        return a_r, a_c

    # ---- backward

    def weights(self, b, g_a, g_b, g_ac, g_bc):
        """(rid, cid, a, e, b, f) with W_ij = [rid_i == cid_j] (a_i + b_j) + e_i + f_j on
        the valid entries of block b: a = gA, e = gB (None without smoothing), b = gAc and
        f = gBc (None without columns)."""
        eps = bool(self.eps)
        return (b.rid, b.cid, g_a, g_b if eps else None, g_ac if self.cols else None,
                g_bc if (eps and self.cols) else None)

    def add_grads(self, b, q, kb, g_a, g_b, g_ac, g_bc, dq, dk):
        """dq += W kb and dk += W^T q in place (either may be None: not wanted)."""
        acc = (dq if dq is not None else dk).dtype
        if not self.cols:
            g_ac = g_bc = None
        if not self.eps:
            g_b = g_bc = None
        if self.labels is not None:
            self._class_grads(b, q, kb, g_a, g_ac, dq, dk, acc)
        else:
            i, j = b.pairs
            w = g_a[i] + (g_ac[j] if g_ac is not None else 0)
            for r0, r1 in _blocks(i.numel(), self._rows(q.shape[1])):
                ii, jj, ww = i[r0:r1], j[r0:r1], w[r0:r1, None]
                if dq is not None:
                    dq.index_add_(0, ii, ww * kb[jj].to(acc))
                if dk is not None:
                    dk.index_add_(0, jj, ww * q[ii].to(acc))
        if g_b is not None:
            # dq_i += gB_i sum_j k_j + sum_j gBc_j k_j, dk_j += gBc_j sum_i q_i + sum_i gB_i q_i
            for x, dx, c2, y, o2 in ((q, dq, g_b, kb, g_bc), (kb, dk, g_bc, q, g_b)):
                if dx is None:
                    continue
                if c2 is not None:
                    dx.addr_(c2, self._wsum(y, None, acc))
                if o2 is not None:
                    dx += self._wsum(y, o2, acc)
        if b.self_mask:
            # the diagonal is neither valid nor positive: take its weight back out
            diag = torch.zeros_like(g_a)
            if self.labels is not None:
                diag += g_a + (g_ac if g_ac is not None else 0)
            if g_b is not None:
                diag += g_b + (g_bc if g_bc is not None else 0)
            for x, dx, y in ((q, dq, kb), (kb, dk, q)):
                if dx is None:
                    continue
                for i0, i1 in _blocks(x.shape[0], self._rows(x.shape[1])):
                    dx[i0:i1] -= diag[i0:i1, None] * y[i0:i1].to(acc)

    def _class_grads(self, b, q, kb, g_a, g_ac, dq, dk, acc):
        # dq_i += gA_i K[rid_i] + K_gAc[rid_i],  dk_j += gAc_j Q[cid_j] + Q_gA[cid_j]
        # with K, Q the per-class sums of the rows and K_gAc, Q_gA the weighted ones.
        d = q.shape[1]
        dc, rows = self._class_sizes(d, b.classes)
        sides = [(q, dq, g_a, b.rid, kb, b.cid, g_ac), (kb, dk, g_ac, b.cid, q, b.rid, g_a)]
        for d0, d1 in _blocks(d, dc):
            for x, dx, c1, ids, y, yids, o1 in sides:
                if dx is None or (c1 is None and o1 is None):
                    continue
                ysum = self._class_sum(y, yids, b.classes, d0, d1, acc) if c1 is not None else None
                ywsum = (self._class_sum(y, yids, b.classes, d0, d1, acc, o1)
                         if o1 is not None else None)
                for i0, i1 in _blocks(x.shape[0], rows):
                    ix = ids[i0:i1]
                    upd = ywsum[ix] if ywsum is not None else None
                    if c1 is not None:
                        part = c1[i0:i1, None] * ysum[ix]
                        upd = part if upd is None else upd.add_(part)
                    dx[i0:i1, d0:d1] += upd
