"""The public local loss: `info_nce`.

The loss splits into two parts (docs/DESIGN.md, "Decomposition"): the log-sum-exp over
rows (and columns), the only O(N*M*D) part, computed tile by tile by a backend, and the
target terms, linear in q and in k (targets.Targets). Both come out of one custom op
(ops.info_nce_stats) as per-row statistics; the row losses and the reduction are plain
torch ops (engine.side_losses, engine.reduce), so torch.compile traces the whole call.
The backend is chosen inside the op (backends.REGISTRY.select), per call.
"""
import torch

from . import engine, ops
from .options import make_options
from .problem import check_inputs


def info_nce(query, key=None, *, positive_index=None, labels=None, key_labels=None,
             temperature=None, logit_scale=None, logit_bias=None, symmetric=False,
             label_smoothing=0.0, reduction="mean", backend="auto", **options):
    """Fused InfoNCE / CLIP / NT-Xent / SupCon loss. See README.md and docs/DESIGN.md.

    Same values and gradients as the materializing `contrastive_kernels.reference.info_nce`,
    without ever holding the N x M logits. With reduction="none" it returns the
    per-row losses (N,); with symmetric=True, the row losses then the column
    losses, each weighted 1/2, shape (N + M,), so that .sum() equals reduction="sum".
    Rows with no positive have loss 0 and are left out of the mean.

    Kernel options (keyword arguments; None or absent: the environment's default):
    deterministic, precision ("ieee"/"tf32"), low_memory, algorithm
    ("auto"/"fused"/"blocked") and workspace (bytes); see contrastive_kernels.options.
    `backend` is "auto" (the fastest that can serve this call) or a name from
    `available_backends()`; one that cannot serve the call raises a ValueError with
    its reasons.
    """
    p = check_inputs(query, key, positive_index, labels, key_labels, temperature,
                     logit_scale, logit_bias, symmetric, label_smoothing, reduction)
    opts = make_options(**options)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    q = p.query
    acc = p.out_dtype
    scale_t = p.scale if torch.is_tensor(p.scale) else torch.tensor(p.scale, dtype=acc,
                                                                    device=q.device)
    bias_t = p.bias if torch.is_tensor(p.bias) else None
    stats = ops.info_nce_stats(q, p.key, scale_t, bias_t, p.positive_index, p.labels,
                               p.key_labels, p.scale_name, p.index_given, p.label_smoothing,
                               p.symmetric, backend, *opts.as_args())
    eps = p.label_smoothing
    sub = 1 if p.self_contrast else 0
    rows = engine.side_losses(*stats[:4], p.scale, p.bias, eps, p.n_keys - sub)
    col = None
    if p.symmetric:
        # Self-contrast: S is symmetric and so is its mask, so the columns' log-sum-exps
        # are the rows' (their targets may differ: a positive_index need not be symmetric).
        lse_c = stats[0] if p.self_contrast else stats[4]
        col = engine.side_losses(lse_c, *stats[5:], p.scale, p.bias, eps, q.shape[0] - sub)
    return engine.reduce(rows, col, p.reduction)
