"""Tiled pure-PyTorch backend: runs on any device, never holds more than a tile."""
import torch

from .base import Backend, key_ids

TILE = 2048


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile(q, k, scale, self_mask, i0, j0):
    """scale * q k^T for one tile, accumulated in q's dtype (already upcast),
    with the diagonal of the full matrix set to -inf when self_mask."""
    s = (q @ k.T).mul_(scale)
    if self_mask:
        n, m = s.shape
        lo, hi = max(i0, j0), min(i0 + n, j0 + m)
        if lo < hi:
            idx = torch.arange(lo, hi, device=s.device)
            s[idx - i0, idx - j0] = float("-inf")
    return s


def _shift(s, shift, i0, j0):
    """The positive shift of one tile, in place: S_ij += delta[i] where rid[i] == cid[j]."""
    if shift is None:
        return None
    rid, cid, delta = shift
    n, m = s.shape
    pos = rid[i0:i0 + n, None] == cid[None, j0:j0 + m]
    s.add_(torch.where(pos, delta[i0:i0 + n, None], 0.0))
    return pos


def _finite_or_inf(lse):
    # A row with no valid entry has lse = -inf; make its probabilities 0, not NaN.
    return torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)


class TorchBackend(Backend):
    name = "torch"
    device_types = ()      # any
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    features = frozenset({"siglip", "shift", "teacher"})
    tile = TILE

    def lse_forward(self, q, k, scale, self_mask, cols, options, shift=None):
        acc, tile = _acc(q.dtype), self.tile
        n, m = q.shape[0], k.shape[0]
        lse_r = torch.full((n,), float("-inf"), dtype=acc, device=q.device)
        lse_c = torch.full((m,), float("-inf"), dtype=acc, device=q.device) if cols else None
        for j0 in range(0, m, tile):
            kb = k[j0:j0 + tile].to(acc)
            for i0 in range(0, n, tile):
                s = _tile(q[i0:i0 + tile].to(acc), kb, scale, self_mask, i0, j0)
                _shift(s, shift, i0, j0)
                # Online merge of log-sum-exp: logaddexp handles -inf on both sides.
                torch.logaddexp(lse_r[i0:i0 + tile], torch.logsumexp(s, 1), out=lse_r[i0:i0 + tile])
                if cols:
                    torch.logaddexp(lse_c[j0:j0 + tile], torch.logsumexp(s, 0),
                                    out=lse_c[j0:j0 + tile])
        return lse_r, lse_c

    def lse_backward(self, q, k, scale, self_mask, lse_r, lse_c, g_r, g_c, need_dq, need_dk,
                     options, shift=None, need_dshift=False, prod=None):
        acc, tile = lse_r.dtype, self.tile
        n, m = q.shape[0], k.shape[0]
        pq, pk = (q, k) if prod is None else prod      # the product operands
        dq = torch.zeros(n, pq.shape[1], dtype=acc, device=q.device) if need_dq else None
        dk = torch.zeros(m, pk.shape[1], dtype=acc, device=q.device) if need_dk else None
        need_dshift = need_dshift and shift is not None
        dshift = torch.zeros(n, dtype=acc, device=q.device) if need_dshift else None
        lr = _finite_or_inf(lse_r)
        lc = _finite_or_inf(lse_c) if g_c is not None else None
        for j0 in range(0, m, tile):
            kb = k[j0:j0 + tile].to(acc)
            for i0 in range(0, n, tile):
                qb = q[i0:i0 + tile].to(acc)
                s = _tile(qb, kb, scale, self_mask, i0, j0)
                pos = _shift(s, shift, i0, j0)
                # Two tile-sized buffers at most: s itself is reused for the column term.
                ds = (s - lr[i0:i0 + tile, None]).exp_().mul_(g_r[i0:i0 + tile, None])
                if lc is not None:
                    ds += s.sub_(lc[None, j0:j0 + tile]).exp_().mul_(g_c[None, j0:j0 + tile])
                if need_dshift:
                    dshift[i0:i0 + tile] += torch.where(pos, ds, 0.0).sum(1)
                if need_dq:
                    dq[i0:i0 + tile] += ds @ (kb if prod is None else pk[j0:j0 + tile].to(acc))
                if need_dk:
                    dk[j0:j0 + tile] += ds.T @ (qb if prod is None else pq[i0:i0 + tile].to(acc))
        return (dq, dk) if shift is None else (dq, dk, dshift)

    def siglip_tiles(self, q, k, scale, bias, g_r, sums, need_dq, need_dk, options, pos):
        acc, tile = _acc(q.dtype), self.tile
        n, m, d = q.shape[0], k.shape[0], q.shape[1]
        rid, cid = pos[0], key_ids(pos, k)
        zeros = lambda *shape: torch.zeros(*shape, dtype=acc, device=q.device)
        r, t = (zeros(n), zeros(n)) if sums else (None, None)
        dq = zeros(n, d) if need_dq else None
        dk = zeros(m, d) if need_dk else None
        for j0 in range(0, m, tile):
            kb = k[j0:j0 + tile].to(acc)
            for i0 in range(0, n, tile):
                qb = q[i0:i0 + tile].to(acc)
                # -y: +1 on the negatives, -1 on the positives
                minus_y = 1 - 2 * (rid[i0:i0 + tile, None] == cid[None, j0:j0 + tile]).to(acc)
                w = (qb @ kb.T).mul_(scale).add_(bias).mul_(minus_y)   # -y z
                if sums:
                    # softplus(w) = max(w, 0) + log1p(exp(-|w|)), exact at any |w|
                    r[i0:i0 + tile] += (w.clamp_min(0) + w.abs().neg_().exp_().log1p_()).sum(1)
                if not (sums or need_dq or need_dk):
                    continue
                dz = w.sigmoid_().mul_(minus_y)       # -y sigmoid(-y z) = sigmoid(z) - [pos]
                if sums:
                    t[i0:i0 + tile] += dz.sum(1)
                if g_r is not None:
                    dz.mul_(g_r[i0:i0 + tile, None])
                if need_dq:
                    dq[i0:i0 + tile] += dz @ kb
                if need_dk:
                    dk[j0:j0 + tile] += dz.T @ qb
        return r, t, dq, dk


BACKEND = TorchBackend()
