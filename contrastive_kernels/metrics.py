"""Retrieval metrics (recall@k, MRR, mean and median rank) without the N x M scores.

The rank of query i is 1 + the number of valid non-positive keys that score strictly
higher than its best positive. It takes two tiled passes over the keys: the best
positive score of each row, then the count.
"""
from typing import Dict, Optional, Sequence

import torch

from .backends import REGISTRY
from .problem import check_matrix, check_values, resolve_targets

# Rows and keys per tile: a 2048 x 2048 float32 tile is 16 MiB. Tests shrink them.
ROW_TILE = 2048
KEY_TILE = 2048


def retrieval_metrics(query: torch.Tensor, key: Optional[torch.Tensor] = None, *,
                      positive_index: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None,
                      key_labels: Optional[torch.Tensor] = None,
                      ks: Sequence[int] = (1, 5, 10),
                      backend: str = "auto") -> Dict[str, torch.Tensor]:
    """Recall@k, MRR, mean and median rank of retrieving each query's positive.

    Keys are ranked by the score s_ij = <q_i, k_j>, tile by tile, without holding the
    N x M scores. rank_i = 1 + #{valid non-positive j: s_ij > max over the positives p
    of s_ip}: 1-based, and ties go to the positive. Rows with no positive are left out.
    Scores are computed in float32 (float64 for float64 inputs) with autocast off; on
    CUDA a float32 GEMM follows torch.backends.cuda.matmul.allow_tf32. Memory: the
    inputs plus one 2048 x 2048 tile of scores (ROW_TILE x KEY_TILE). No gradient is recorded.

    Args:
        query: (N, D) float16, bfloat16, float32 or float64 tensor.
        key: (M, D) tensor, same dtype and device. None: the keys are the queries and
            j = i is never a candidate.
        positive_index: integer tensor (N,), each query's positive key. Default: the
            diagonal arange(N) (key given, M >= N) or the NT-Xent pairing
            (i + N/2) % N (key=None, N even).
        labels: integer tensor (N,): every same-label key is a positive. Not together
            with `positive_index`.
        key_labels: integer tensor (M,); default `labels` (needs M == N). Must be None
            when key is None.
        ks: the k of each recall@k, ints >= 1.
        backend: "auto" or a name from `contrastive_kernels.available_backends(device)`.
            Only checked: every backend shares one tiled torch routine (a GEMM and a
            compare per tile).

    Returns:
        A dict {"recall@k" for each k in ks, "mrr", "mean_rank", "median_rank"}, each a
        0-dim tensor on the inputs' device, float64 for float64 inputs, else float32.
        "median_rank" is the lower middle rank, as torch.median.

    Raises:
        TypeError: `query`/`key` not floating tensors or of different dtypes, index or
            label tensors not integer, `ks` not a tuple or list of ints, or a
            non-string `backend`.
        ValueError: wrong shapes or devices, `positive_index` out of range (or a query
            pointing at itself under key=None), empty `ks` or a k < 1, an unknown
            `backend`, an odd N under key=None without labels, or no row with a
            positive.

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> q = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        >>> m = ck.retrieval_metrics(q, q.clone(), ks=(1, 5))   # each key is its query
        >>> sorted(m)
        ['mean_rank', 'median_rank', 'mrr', 'recall@1', 'recall@5']
        >>> float(m["recall@1"]), float(m["mrr"]), float(m["median_rank"])
        (1.0, 1.0, 1.0)
    """
    q, k, pos_index, lab, key_lab, has_pos, ks = check_metrics(
        query, key, positive_index, labels, key_labels, ks, backend)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        ranks = tiled_ranks(q, k, pos_index, lab, key_lab)
    out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    r = ranks[has_pos].double()      # exact integers; means in float64, then cast
    out = {f"recall@{x}": (r <= x).double().mean() for x in ks}
    out["mrr"] = r.reciprocal().mean()
    out["mean_rank"] = r.mean()
    out["median_rank"] = torch.median(r)
    return {name: v.to(out_dtype) for name, v in out.items()}


def check_metrics(query, key, positive_index, labels, key_labels, ks, backend):
    """The checked arguments (errors name the argument), before any computation:
    (query, key or None, positive_index or None, labels or None, key_labels or None,
    has_pos: bool (N,), ks as a tuple)."""
    check_matrix("query", query)
    n, d = query.shape
    dev = query.device
    if key is not None:
        check_matrix("key", key)
        if key.shape[1] != d:
            raise ValueError(f"key has embedding dim {key.shape[1]} but query has {d}")
        if key.device != dev:
            raise ValueError(f"key is on {key.device} but query is on {dev}")
        if key.dtype != query.dtype:
            raise TypeError(f"key has dtype {key.dtype} but query has {query.dtype}")
    m = n if key is None else key.shape[0]

    if not isinstance(ks, (tuple, list)):
        raise TypeError(f"ks must be a tuple or list of ints, got {type(ks).__name__}")
    if not ks:
        raise ValueError("ks must not be empty")
    for x in ks:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"ks must hold ints, got {x!r} ({type(x).__name__})")
        if x < 1:
            raise ValueError(f"ks values must be >= 1, got {x}")

    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    avail = REGISTRY.available(dev)
    if backend != "auto" and backend not in avail:
        raise ValueError(f"backend must be 'auto' or one of {avail} (available on {dev}), "
                         f"got {backend!r}")

    given_index = positive_index is not None
    positive_index, labels, key_labels = resolve_targets(
        key is None, n, m, positive_index, labels, key_labels, dev)
    if given_index:
        check_values(positive_index, m, 0, key is None, None, None)

    if labels is None:
        has_pos = torch.ones(n, dtype=torch.bool, device=dev)
    elif key is None:
        # self-retrieval: a positive is another query with the same label
        _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        has_pos = counts[inverse] >= 2
    else:
        has_pos = torch.isin(labels, key_labels)
    if not bool(has_pos.any()):
        raise ValueError("no query row has a positive (labels: no key shares a query's label)")
    return query, key, positive_index, labels, key_labels, has_pos, tuple(ks)


def tile_scores(qb, keys, i0, j0, j1, self_mask, acc):
    """<q_i, k_j> in acc for the row block qb (rows i0.., already in acc) and keys j0..j1;
    with self_mask (key=None) the diagonal j = i is -inf (never valid). Both passes call
    this on the same blocks, so a score is bitwise the same in both."""
    s = qb @ keys[j0:j1].to(acc).T
    if self_mask:
        lo, hi = max(i0, j0), min(i0 + qb.shape[0], j1)
        if lo < hi:
            idx = torch.arange(lo, hi, device=s.device)
            s[idx - i0, idx - j0] = float("-inf")
    return s


def tiled_ranks(q, key, positive_index, labels, key_labels):
    """rank_i (int64, (N,)) by the definition; meaningless for rows without a positive."""
    n, dev = q.shape[0], q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys, self_mask = (q, True) if key is None else (key, False)
    m = keys.shape[0]
    rt, kt = ROW_TILE, KEY_TILE
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=dev)
    ranks = torch.ones(n, dtype=torch.long, device=dev)
    pi_cpu = None if positive_index is None else positive_index.cpu()
    for i0 in range(0, n, rt):
        i1 = min(i0 + rt, n)
        qb = q[i0:i1].to(acc)
        # Pass 1: the best positive score of each row.
        best = torch.full((i1 - i0,), float("-inf"), dtype=acc, device=dev)
        if positive_index is not None:
            pb = positive_index[i0:i1]
            for t in torch.unique(pi_cpu[i0:i1] // kt).tolist():   # only tiles holding a positive
                j0 = t * kt
                j1 = min(j0 + kt, m)
                s = tile_scores(qb, keys, i0, j0, j1, self_mask, acc)
                inside = (pb >= j0) & (pb < j1)
                col = (pb - j0).clamp(0, j1 - j0 - 1)
                best = torch.where(inside, s.gather(1, col[:, None]).squeeze(1), best)
        else:
            lb = labels[i0:i1, None]
            for j0 in range(0, m, kt):
                j1 = min(j0 + kt, m)
                s = tile_scores(qb, keys, i0, j0, j1, self_mask, acc)
                # the diagonal is -inf in s, so it never raises the max
                s = torch.where(lb == key_labels[None, j0:j1], s, neg_inf)
                best = torch.maximum(best, s.amax(1))
        # Pass 2: count the keys that score strictly higher. A positive scores at most
        # `best` (the same bits as in pass 1) and the diagonal is -inf, so neither counts.
        above = torch.zeros(i1 - i0, dtype=torch.long, device=dev)
        for j0 in range(0, m, kt):
            j1 = min(j0 + kt, m)
            s = tile_scores(qb, keys, i0, j0, j1, self_mask, acc)
            above += (s > best[:, None]).sum(1)
        ranks[i0:i1] += above
    return ranks
