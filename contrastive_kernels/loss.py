"""The public local losses: `info_nce`, `siglip_loss`, `uniformity_loss`, `alignment_loss`.

The InfoNCE loss splits into two parts: the log-sum-exp over rows (and columns), the only
O(N*M*D) part, computed tile by tile by a backend, and the target terms, linear in q and
in k (targets.Targets). Both come out of one custom op (ops.info_nce_stats) as per-row
statistics; the row losses and the reduction are plain torch ops (engine.side_losses,
engine.reduce), so torch.compile traces the whole call. The backend is chosen inside
the op (backends.REGISTRY.select), per call.
"""
import math
from typing import Any, Optional, Tuple, Union

import torch

from . import dense, engine, ops
from .backends import REGISTRY
from .options import make_options, needs_feature, prefer
from .problem import (SIGLIP_BIAS, SIGLIP_SCALE, check_alignment, check_inputs, check_siglip,
                      check_uniformity, check_values)


def info_nce(query: torch.Tensor, key: Optional[torch.Tensor] = None, *,
             positive_index: Optional[torch.Tensor] = None,
             labels: Optional[torch.Tensor] = None,
             key_labels: Optional[torch.Tensor] = None,
             temperature: Optional[Union[float, torch.Tensor]] = None,
             logit_scale: Optional[Union[float, torch.Tensor]] = None,
             logit_bias: Optional[Union[float, torch.Tensor]] = None,
             symmetric: bool = False, label_smoothing: float = 0.0, reduction: str = "mean",
             margin: float = 0.0, decoupled: bool = False,
             teacher: Optional[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]] = None,
             teacher_logit_scale: Optional[Union[float, torch.Tensor]] = None,
             teacher_weight: float = 1.0, teacher_weighting: str = "softmax",
             normalize: bool = False, backend: str = "auto",
             **options: Any) -> torch.Tensor:
    """Fused InfoNCE loss (CLIP, NT-Xent / SimCLR, SupCon) without the N x M logits.

    With logits S_ij = s <q_i, k_j> + b (s = 1 / temperature, or logit_scale), row i's loss
    is the cross-entropy -sum_j w_ij log softmax_j(S_ij), w_i the target distribution over
    the keys (uniform over row i's positives, then label smoothing and a teacher mixed in).
    Values and gradients are those of the materializing
    `contrastive_kernels.reference.info_nce`; the logits are only ever held one tile at a
    time. The embeddings are used as given unless normalize=True.

    NOTE: symmetric defaults to False here: the one-sided loss, queries against keys.
    `FusedInfoNCE` defaults to symmetric=True (the CLIP loss, as open_clip's ClipLoss).
    Pass symmetric=True for CLIP.

    Args:
        query: (N, D) float16, bfloat16, float32 or float64 tensor of query embeddings.
        key: (M, D) tensor of key embeddings, same dtype and device as `query`. None:
            self-contrast, the keys are the queries and key j = i is never a candidate
            (NT-Xent: the two views stacked, rows i and (i + N/2) % N positives).
        positive_index: integer tensor (N,): the index of each query's positive key.
            Default: arange(N) (needs M >= N; extra keys are negatives), or with
            key=None the pairing (i + N/2) % N (needs an even N).
        labels: integer tensor (N,): every key with the same label is a positive
            (SupCon). Not together with `positive_index`.
        key_labels: integer tensor (M,), the keys' labels; default `labels` (needs
            M == N). Must be None when key is None.
        temperature: float > 0, 0-dim tensor, or (N,) tensor (one per query row); the
            logit scale is 1 / temperature. Default 0.07 when neither it nor
            `logit_scale` is given. A tensor gets a gradient.
        logit_scale: the scale s itself (open_clip's logit_scale.exp()): float > 0,
            0-dim tensor or (N,) tensor. Not together with `temperature`.
        logit_bias: float or 0-dim tensor b added to every logit. It cancels in the
            softmax: no effect on the loss, and a tensor requiring grad warns once.
        symmetric: False (default): the row (query -> key) loss. True: the average of
            the row loss and the column (key -> query) loss, the CLIP loss. With
            M != N the columns whose key is no query's positive (e.g. hard negatives
            M > N) are left out of the column mean.
        label_smoothing: eps in [0, 1): targets (1 - eps) w + eps * uniform over the
            row's valid keys.
        reduction: "mean" (over the rows with a positive; with symmetric=True the mean
            of the two sides), "sum", or "none".
        margin: m, subtracted from each positive's cosine, S_ij = s (<q_i, k_j> - m) + b
            on positives, in both the log-sum-exp and the target (AM-softmax).
        decoupled: True leaves the positives out of the log-sum-exp (DCL); a row with
            no negative then has no loss.
        teacher: soft targets, (teacher_query (N, D_t), teacher_key (M, D_t)), or the
            teacher's query embeddings alone when key is None. No gradient flows to
            the teacher. The row (and column) targets become
            (1 - teacher_weight) w + teacher_weight w_teacher. Not with a `margin`.
        teacher_logit_scale: the scale of the teacher's softmax (float or 0-dim
            tensor); default the student's scale. Needs `teacher`.
        teacher_weight: in [0, 1], the teacher's share of the targets.
        teacher_weighting: "softmax" (w_teacher = softmax of teacher_logit_scale
            <tq_i, tk_j>) or "linear" (CWCL: (1 + <tq_i, tk_j>) / 2, normalized per row).
        normalize: True L2-normalizes `query` and `key` first,
            torch.nn.functional.normalize(x, dim=-1) (eps 1e-12); the gradients flow
            through it. The teacher is not normalized. Default False.
        backend: "auto" (the fastest backend that can serve this call; on the CPU a
            plain call with N * M <= 2^20 logits is computed from one materialized
            tile, faster there) or a name from `contrastive_kernels.available_backends()`.
        **options: kernel options, each None for the environment's default:
            deterministic (bool), precision ("ieee" or "tf32"), low_memory (bool),
            algorithm ("auto", "fused", "blocked" or "epilogue") and workspace
            (bytes); see `contrastive_kernels.make_options`.

    Returns:
        The loss, float32 (float64 for float64 inputs): a 0-dim tensor for "mean" and
        "sum"; for "none" the row losses (N,), or with symmetric=True the row losses then
        the column losses, each weighted 1/2, shape (N + M,), so that .sum() equals
        reduction="sum". A row (or column) with no positive has loss 0 and is left out
        of the mean.

    Raises:
        TypeError: an argument of the wrong type: a non-tensor or non-floating
            `query`/`key`, `key` of another dtype, non-integer index or label tensors,
            a non-bool `symmetric`/`decoupled`/`normalize`, a non-string `backend`, or
            an unknown keyword option.
        ValueError: wrong shapes or devices, out-of-range values (temperature <= 0,
            label_smoothing outside [0, 1), positive_index out of range, an unknown
            reduction), `temperature` together with `logit_scale`, `positive_index`
            together with `labels`, an odd N under key=None without labels, a
            `backend` that cannot serve the call (the message gives its reasons), a
            `margin` with a teacher, `teacher_logit_scale` without one, or a variant
            with an option it does not support (margin or decoupled with
            low_memory=True or the blocked algorithm, a softmax teacher with
            low_memory=True).
        RuntimeError: in backward with create_graph=True (double backward is not
            supported); compute higher-order gradients with
            `contrastive_kernels.reference.info_nce`, which takes the same arguments.

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> q = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> k = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> loss = ck.info_nce(q, k, temperature=0.1)      # one-sided (symmetric=False)
        >>> loss.shape
        torch.Size([])
        >>> torch.allclose(loss, ck.reference.info_nce(q, k, temperature=0.1), atol=1e-5)
        True
        >>> clip = ck.info_nce(q, k, temperature=0.1, symmetric=True)   # the CLIP loss
        >>> ck.info_nce(q, k, symmetric=True, reduction="none").shape
        torch.Size([16])
        >>> views = torch.randn(8, 16)          # NT-Xent: 2 views of 4 samples, stacked
        >>> bool(torch.isfinite(ck.info_nce(views)))
        True
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])       # SupCon
        >>> ck.info_nce(q, k, labels=labels, reduction="none").shape
        torch.Size([8])
        >>> raw = torch.randn(8, 16)                 # not unit vectors: normalize=True
        >>> torch.allclose(ck.info_nce(raw, k, normalize=True),
        ...                ck.info_nce(torch.nn.functional.normalize(raw, dim=-1), k))
        True
    """
    p = check_inputs(query, key, positive_index, labels, key_labels, temperature,
                     logit_scale, logit_bias, symmetric, label_smoothing, reduction,
                     margin=margin, decoupled=decoupled, teacher=teacher,
                     teacher_logit_scale=teacher_logit_scale, teacher_weight=teacher_weight,
                     teacher_weighting=teacher_weighting, normalize=normalize)
    opts = call_options(options, backend, p.query.device, variant_refuses(p))
    check_variant_options(p, opts)
    if dense.eligible(p, opts, backend):     # small problems on the CPU: one tile
        check_values(p.positive_index if p.index_given else None, p.n_keys, 0,
                     p.self_contrast, p.scale, p.bias, p.scale_name)
        return dense.info_nce(p)
    q_op, k_op, scale_t, side_scale = op_inputs(p)
    bias_t = p.bias if torch.is_tensor(p.bias) else None
    margin_t, shift = positive_shift(p, p.scale if p.per_row else scale_t)
    stats = ops.info_nce_stats(q_op, k_op, scale_t, bias_t, shift, p.positive_index,
                               p.labels, p.key_labels, p.scale_name, p.index_given,
                               p.label_smoothing, p.symmetric,
                               p.per_row and p.self_contrast, backend, *opts.as_args())
    eps = p.label_smoothing
    sub = 1 if p.self_contrast else 0
    x_r, x_c = teacher_dots(p, q_op, k_op, backend, opts)
    alpha = p.teacher_weight
    rows = engine.side_losses(*stats[:4], side_scale, p.bias, eps, p.n_keys - sub,
                              margin=margin_t, decoupled=p.decoupled,
                              teacher=None if x_r is None else (x_r, alpha))
    col = None
    if p.symmetric:
        # Self-contrast: S is symmetric and so is its mask, so the columns' log-sum-exps
        # are the rows' (their targets may differ: a positive_index need not be symmetric);
        # not with a per-query scale (the op then gets the keys and computes them).
        lse_c = stats[0] if (p.self_contrast and not p.per_row) else stats[4]
        col = engine.side_losses(lse_c, *stats[5:], side_scale, p.bias, eps,
                                 p.query.shape[0] - sub, margin=column_margin(p, margin_t),
                                 decoupled=p.decoupled,
                                 teacher=None if x_c is None else (x_c, alpha))
    return engine.reduce(rows, col, p.reduction)


def teacher_dots(p, q_op, k_op, backend, opts):
    """(X (N,), X^c (M,) or None) of a call with a teacher, (None, None) without one:
    X_i = sum_j w^T_ij <q_i, k_j> over the valid keys, and its column twin, with the
    queries and keys the op sees (so a per-query scale is in them)."""
    if p.teacher is None or p.teacher_weight == 0:
        return None, None
    masked = p.per_row and p.self_contrast
    tq_op, tk, ts = teacher_operands(p)
    if p.teacher_weighting == "linear":
        return linear_teacher_dots(q_op, q_op if k_op is None else k_op, p.teacher[0], tk,
                                   p.self_contrast, p.symmetric)
    key = None if (p.self_contrast and not masked) else k_op
    x = ops.teacher_dots(q_op, key, tq_op, tk, ts, p.symmetric, masked, backend,
                         *opts.as_args())
    return x[0], (x[1] if p.symmetric else None)


def teacher_operands(p):
    """(teacher queries, teacher keys, teacher scale (a tensor)) as the kernels see them:
    the student's per-row scale, the default, is folded into the teacher's queries."""
    tq, tk = p.teacher
    ts = p.teacher_scale
    if ts is None and p.per_row:
        return tq * p.scale.detach().to(tq.dtype)[:, None], tk, torch.ones(
            (), dtype=p.out_dtype, device=tq.device)
    if ts is None:
        ts = p.scale.detach() if torch.is_tensor(p.scale) else p.scale
    if not torch.is_tensor(ts):
        ts = torch.tensor(ts, dtype=p.out_dtype, device=tq.device)
    return tq, tk, ts


def linear_teacher_dots(q, k, tq, tk, self_c, cols, total=None):
    """The CWCL weighting, w_ij = f_ij / sum_{j valid} f_ij with f = (1 + <tq_i, tk_j>) / 2:
    X_i = sum_j w_ij <q_i, k_j> is (<q_i, sum_j k_j> + q_i^T C tq_i) / (2 F_i) with
    C = sum_j k_j tk_j^T (D x D_t) and F_i = sum_j f_ij, so O((N + M) D D_t), no tile;
    the diagonal taken out under self-contrast. Autograd gives the gradients. total: sums
    a list of tensors over the global batch (the ring's all_reduce), else local."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, tq, tk = (x.to(acc) for x in (q, k, tq, tk))
    total = total or (lambda xs: xs)

    def sums(b, tb):
        one = torch.ones(1, dtype=acc, device=b.device)
        return [b.sum(0), b.T @ tb, tb.sum(0), one * b.shape[0]]

    parts = total(sums(k, tk) + (sums(q, tq) if cols else []))

    def side(a, b, ta, tb, bsum, c, tbsum, count):
        num = a @ bsum + ((a @ c) * ta).sum(1)
        den = count + ta @ tbsum
        if self_c:              # j = i is not a valid key
            own, town = (a * b).sum(1), (ta * tb).sum(1)
            num = num - own * (1 + town)
            den = den - (1 + town)
        return num / den
    x_r = side(q, k, tq, tk, *parts[:4])
    return x_r, (side(k, q, tk, tq, *parts[4:]) if cols else None)


def op_inputs(p):
    """(queries, keys, scale, the side losses' scale) of the fused op. A per-query scale
    s (N,) is folded into the queries, q_i s_i, so that the kernels see S = (s q) k^T at
    scale 1 and autograd carries the gradients to q and s; under key=None the keys are
    then the unscaled queries, diagonal masked (the op's `masked`)."""
    q = p.query
    if not p.per_row:
        scale_t = p.scale if torch.is_tensor(p.scale) else torch.tensor(
            p.scale, dtype=p.out_dtype, device=q.device)
        return q, p.key, scale_t, p.scale
    check_values(None, 0, 0, False, p.scale, None, p.scale_name)
    q_op = q * p.scale.to(q.dtype)[:, None]
    k_op = q if p.self_contrast else p.key
    return q_op, k_op, torch.ones((), dtype=p.out_dtype, device=q.device), 1.0


def column_margin(p, margin):
    """The margin of each column's target: the mean of its positive rows' margins (the
    rows' own one for a scalar scale)."""
    if margin is None or not p.per_row:
        return margin
    n, m = p.query.shape[0], p.n_keys
    ones = torch.ones_like(margin)
    if p.labels is not None:
        _, inv = torch.unique(torch.cat([p.labels, p.key_labels]), return_inverse=True)
        c = int(inv.max()) + 1
        total = margin.new_zeros(c).index_add(0, inv[:n], margin)[inv[n:]]
        count = margin.new_zeros(c).index_add(0, inv[:n], ones)[inv[n:]]
        if p.self_contrast:         # key j is query j: not its own positive
            total, count = total - margin, count - 1
    else:
        total = margin.new_zeros(m).index_add(0, p.positive_index, margin)
        count = margin.new_zeros(m).index_add(0, p.positive_index, ones)
    return total / count.clamp_min(1)


def positive_shift(p, scale_t):
    """(margin, shift) of a call: the shift of a positive logit in the targets (-s m, a
    tensor with the scale's gradient, (N,) for a per-query scale; None without a margin)
    and the per-row shift inside the log-sum-exps ((N,): -s m, or -inf when decoupled;
    None for neither)."""
    n = p.query.shape[0]
    margin = -p.margin * scale_t if p.margin else None
    if p.decoupled:
        shift = torch.full((n,), float("-inf"), dtype=scale_t.dtype, device=scale_t.device)
    elif margin is not None:
        shift = margin.expand(n).contiguous()
    else:
        shift = None
    return margin, shift


def call_options(options, backend, device, refused=()):
    """The kernel options of one call (make_options), without the environment's
    preferences (CK_LOW_MEMORY, CK_ALGORITHM) that it cannot take: refused by its loss or
    variant (`refused`), or a feature that `backend` (under "auto": every backend
    available on `device`) lacks. Also checks that `backend` is a string."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    def features():
        names = REGISTRY.available(device) if backend == "auto" else [backend]
        return set().union(*(REGISTRY.by_name[n].features for n in names
                             if n in REGISTRY.by_name))
    return prefer(make_options(**options), options, features, refused)


def variant_refuses(p):
    """{option name: the error} for the kernel options the call's variant cannot take
    (at the values that need a backend feature; options.needs_feature)."""
    out = {}
    if p.softmax_teacher:
        out["low_memory"] = ("a teacher (softmax weighting) does not support low_memory=True "
                             "(its backward makes float32 N x D gradients)")
    if p.shifted:
        what = "decoupled=True" if p.decoupled else "margin"
        out["low_memory"] = (f"{what} does not support low_memory=True (the low-memory "
                             f"backward kernels have no positive shift)")
        out["algorithm"] = (f"{what} does not support algorithm={{!r}} (use 'auto' or "
                            f"'fused')")
    return out


def check_variant_options(p, opts):
    """The kernel options a variant cannot take (ValueError before any kernel)."""
    for name, why in variant_refuses(p).items():
        if needs_feature(opts, name):
            raise ValueError(why.format(getattr(opts, name)))


def siglip_loss(query: torch.Tensor, key: torch.Tensor, *,
                logit_scale: Union[float, torch.Tensor] = SIGLIP_SCALE,
                logit_bias: Union[float, torch.Tensor] = SIGLIP_BIAS,
                positive_index: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                key_labels: Optional[torch.Tensor] = None, reduction: str = "mean",
                normalize: bool = False, backend: str = "auto",
                passes: Optional[int] = None, **options: Any) -> torch.Tensor:
    """Fused sigmoid contrastive loss (SigLIP) without the N x M logits.

    The loss is -sum_ij log sigmoid(y_ij z_ij) with z_ij = logit_scale <q_i, k_j> +
    logit_bias and y_ij = +1 on positive pairs, -1 elsewhere. Values and gradients are
    those of `contrastive_kernels.reference.siglip_loss`. The embeddings are used as
    given unless normalize=True.

    Args:
        query: (N, D) float16, bfloat16, float32 or float64 tensor (the first tower).
        key: (M, D) tensor, same dtype and device (the second tower). Required.
        logit_scale: the exponentiated scale (as open_clip passes it), a float > 0 or a
            0-dim tensor, which gets a gradient. Default 10.0 (SigLIP's initialization).
        logit_bias: a float or a 0-dim tensor (gets a gradient). Default -10.0.
        positive_index: integer tensor (N,): each query's positive key. Default: the
            diagonal, arange(N) (needs M >= N; extra keys are negatives).
        labels: integer tensor (N,): every same-label pair is positive. Not together
            with `positive_index`.
        key_labels: integer tensor (M,); default `labels` (needs M == N).
        reduction: "mean" (the sum over pairs divided by N, as open_clip and
            big_vision), "sum", or "none" (the per-query row sums, shape (N,)).
        normalize: True L2-normalizes `query` and `key` first,
            torch.nn.functional.normalize(x, dim=-1) (eps 1e-12); the gradients flow
            through it. Default False.
        backend: "auto" (the fastest backend that can serve this call; on the CPU a
            call with N * M <= 2^20 logits and no `passes` is computed from one
            materialized tile, faster there) or a name from
            `contrastive_kernels.available_backends()`.
        passes: 3 computes the gradients during forward (one pass over the tiles
            fewer; holds float32 dq and dk until backward), 4 recomputes the tiles in
            backward and holds nothing. None: 3 for "mean"/"sum" when a gradient is
            needed, else 4 ("none" always takes 4); giving it runs the kernels.
        **options: kernel options deterministic (bool), precision ("ieee" or
            "tf32"), algorithm ("auto", "fused", "blocked": `triton` computes S in
            cuBLAS blocks and its tiles in Triton, by default for CUDA fp16/bf16 with
            D above 256, or "epilogue": the same blocks, S computed in the Triton
            kernel) and workspace (bytes of the blocked path's blocks), None for the
            environment's default; see `contrastive_kernels.make_options`.

    Returns:
        The loss, float32 (float64 for float64 inputs): a 0-dim tensor for "mean" and
        "sum", the (N,) row sums for "none".

    Raises:
        TypeError: `key`, `logit_scale` or `logit_bias` None, an argument of the wrong
            type or dtype, a non-bool `normalize`, a non-string `backend`, or an unknown
            keyword option.
        ValueError: wrong shapes or devices, a non-finite or non-positive
            `logit_scale`, a (N,) `logit_scale`, `positive_index` together with
            `labels`, `passes` not None, 3 or 4, the info_nce-only option
            low_memory=True, or a `backend` that cannot serve the call.
        RuntimeError: in backward with create_graph=True (double backward is not
            supported); use `contrastive_kernels.reference.siglip_loss` for that.

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> q = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> k = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> loss = ck.siglip_loss(q, k, logit_scale=10.0, logit_bias=-10.0)
        >>> torch.allclose(loss, ck.reference.siglip_loss(q, k), atol=1e-5)
        True
        >>> q, k = q.requires_grad_(), k.requires_grad_()
        >>> t = torch.tensor(2.3, requires_grad=True)         # log of the scale
        >>> b = torch.tensor(-10.0, requires_grad=True)
        >>> ck.siglip_loss(q, k, logit_scale=t.exp(), logit_bias=b).backward()
        >>> q.grad.shape, t.grad.shape, b.grad.shape
        (torch.Size([8, 16]), torch.Size([]), torch.Size([]))
    """
    p = check_siglip(query, key, positive_index, labels, key_labels, logit_scale,
                     logit_bias, reduction, normalize=normalize)
    opts = siglip_options(backend, passes, options, p.query.device)
    if dense.siglip_eligible(p, opts, backend, passes):     # small problems on the CPU
        check_values(p.positive_index if p.index_given else None, p.n_keys, 0, False,
                     p.scale, p.bias)
        return dense.siglip_loss(p)
    q, k = p.query, p.key
    acc = p.out_dtype
    as_tensor = lambda x: x if torch.is_tensor(x) else torch.tensor(x, dtype=acc,
                                                                    device=q.device)
    scale_t, bias_t = as_tensor(p.scale), as_tensor(p.bias)
    grad = torch.is_grad_enabled()
    need_q, need_k = grad and q.requires_grad, grad and k.requires_grad
    need_s = grad and torch.is_tensor(p.scale) and p.scale.requires_grad
    args = (q, k, scale_t, bias_t, p.positive_index, p.labels, p.key_labels)
    if (passes or 3) == 3 and p.reduction != "none" and (need_q or need_k or need_s):
        out = ops.siglip_fused(*args, p.index_given, backend, *opts.as_args(), need_q, need_k,
                               need_s)
        total = out[0].reshape(())
        return total if p.reduction == "sum" else total / q.shape[0]
    rows, _ = ops.siglip_stats(*args, p.index_given, backend, *opts.as_args())
    if p.reduction == "none":
        return rows
    return rows.sum() if p.reduction == "sum" else rows.sum() / q.shape[0]


def siglip_options(backend, passes, options, device):
    """The kernel options of a sigmoid-loss call (call_options; errors name the
    argument)."""
    opts = call_options(options, backend, device, ("low_memory",))
    if opts.low_memory:
        raise ValueError("low_memory=True is an info_nce option; for siglip_loss use passes=4, "
                         "which holds nothing between forward and backward")
    if passes is not None and (isinstance(passes, bool) or not isinstance(passes, int)):
        raise TypeError(f"passes must be None, 3 or 4, got {type(passes).__name__} {passes!r}")
    if passes not in (None, 3, 4):
        raise ValueError(f"passes must be None, 3 or 4, got {passes!r}")
    return opts



def uniformity_loss(x: torch.Tensor, t: Union[float, torch.Tensor] = 2.0, *,
                    backend: str = "auto", **options: Any) -> torch.Tensor:
    """Wang & Isola's uniformity loss without the N x N distances.

    log mean_{i != j} exp(-t ||x_i - x_j||^2) over the L2-normalized rows of x. On unit
    vectors ||x_i - x_j||^2 = 2 - 2 <x_i, x_j>, so it equals
    -2t + log sum_i exp(L_i) - log(N (N - 1)), with L_i the log-sum-exp of row i of
    2t <x_i, x_j> over j != i: the fused kernel's row statistic, with its gradient.

    Args:
        x: (N, D) float16, bfloat16, float32 or float64 tensor, N >= 2; its rows are
            normalized here.
        t: float > 0 or 0-dim tensor (which gets a gradient). Default 2.0.
        backend: "auto" or a name from `contrastive_kernels.available_backends()`.
        **options: kernel options as for `info_nce`.

    Returns:
        0-dim tensor, float32 (float64 for float64 input).

    Raises:
        TypeError: `x` not a floating tensor, `t` not a float or floating tensor, a
            non-string `backend`, or an unknown keyword option.
        ValueError: `x` not 2-D or with fewer than 2 rows, `t` not finite and > 0, or a
            `backend` that cannot serve the call.
        RuntimeError: in backward with create_graph=True (double backward is not
            supported); use `contrastive_kernels.reference.uniformity_loss` for that.

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> x = torch.randn(10, 8)
        >>> u = ck.uniformity_loss(x, t=2.0)
        >>> torch.allclose(u, ck.reference.uniformity_loss(x, t=2.0), atol=1e-5)
        True
        >>> bool(u <= 0)
        True
    """
    x, t = check_uniformity(x, t)
    opts = call_options(options, backend, x.device)
    xn = torch.nn.functional.normalize(x, dim=1)
    n = x.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    t_t = t if torch.is_tensor(t) else torch.tensor(t, dtype=acc, device=x.device)
    # any valid positive will do: only the log-sum-exps are used
    other = (torch.arange(n, device=x.device) + 1) % n
    stats = ops.info_nce_stats(xn, None, 2 * t_t, None, None, other, None, None, "2t", False,
                               0.0, False, False, backend, *opts.as_args())
    return torch.logsumexp(stats[0], 0) - 2 * t_t - math.log(n * (n - 1))


def alignment_loss(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Wang & Isola's alignment loss: mean_i ||x_i - y_i||^alpha.

    Computed over the L2-normalized rows of x and y (row i of each is a positive pair)
    with plain torch ops, O(N D); higher-order gradients work.

    Args:
        x: (N, D) float16, bfloat16, float32 or float64 tensor.
        y: tensor of the same shape, dtype and device as `x`.
        alpha: float > 0, the exponent. Default 2.0.

    Returns:
        0-dim tensor, float32 (float64 for float64 inputs).

    Raises:
        TypeError: `x` or `y` not a floating tensor, `y` of another dtype, or `alpha`
            not a float.
        ValueError: `x` not 2-D, `y` of another shape or device, or `alpha` not finite
            and > 0.

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> x, y = torch.randn(6, 8), torch.randn(6, 8)
        >>> a = ck.alignment_loss(x, y)
        >>> torch.allclose(a, ck.reference.alignment_loss(x, y), atol=1e-5)
        True
        >>> bool(ck.alignment_loss(x, 3 * x) < 1e-6)     # same directions
        True
    """
    x, y, alpha = check_alignment(x, y, alpha)
    xn = torch.nn.functional.normalize(x, dim=1)
    yn = torch.nn.functional.normalize(y, dim=1)
    d = (xn - yn).float() if xn.dtype in (torch.float16, torch.bfloat16) else xn - yn
    return d.norm(dim=1).pow(alpha).mean()
