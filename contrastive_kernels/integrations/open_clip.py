"""open_clip's ClipLoss, SigLipLoss and DistillClipLoss on the fused kernels.

Same constructors, calls, values and gradients as `open_clip.loss`; the N x N logits
are never built. Switch by changing the import:

    from contrastive_kernels.integrations.open_clip import ClipLoss   # was: open_clip.loss

This module does not import open_clip.

world_size == 1: the local loss (`contrastive_kernels.info_nce` / `siglip_loss`).
world_size > 1: the ring over the default process group (`ring_info_nce`,
`ring_siglip_loss`); `rank` and `world_size` must be torch.distributed's. Per rank, the
loss value and the gradients of the local features are open_clip's for the same flags;
the logit scale's (and bias') per-rank gradients differ but their mean over ranks, what
DDP applies, is the same. Every ClipLoss / DistillClipLoss flag combination is matched:

- local_loss=True, gather_with_grad=True (open_clip's recommended setting): one
  symmetric ring call; rank r returns the loss of its own rows and columns.
- local_loss=False, gather_with_grad=True: the same call; the value is the global loss
  (the mean over ranks, one all_reduce of a scalar), the gradient that of the local one.
  open_clip's gradients are the same in both settings.
- local_loss=True, gather_with_grad=False: open_clip's gathered features carry no
  gradient, so each side's loss reaches only its own queries: two one-sided ring calls
  (images against detached texts, texts against detached images).
- local_loss=False, gather_with_grad=False: the global loss, but each rank's features
  get only the gradient of their own copy, 1/world_size of the above: the symmetric
  call with the features' gradients scaled by 1/world_size.

use_horovod=True raises a ValueError. cache_labels has no effect on the values (open_clip
caches its label tensor only). Shards must be equal in size for open_clip's all_gather;
the ring also takes unequal ones, and then follows its own contract (the mean over ranks
is the global loss; see contrastive_kernels.distributed).

DistillClipLoss: two fused calls per step, the contrastive loss (hard targets) and the
distillation loss (info_nce's teacher soft targets, teacher_weight=1): both terms share
the student's log-sum-exps, but the public API returns one mixed target per call. The
teacher gets no gradient; teacher features or scale that require one raise.
"""
import torch
import torch.distributed as dist

from .. import distributed as ckd
from ..backends import REGISTRY
from ..loss import info_nce, siglip_loss

__all__ = ["ClipLoss", "SigLipLoss", "DistillClipLoss"]

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _check_ranks(rank, world_size):
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _check_backend(backend):
    if not isinstance(backend, str) or (backend != "auto" and backend not in REGISTRY.by_name):
        raise ValueError(f"backend must be 'auto' or one of {sorted(REGISTRY.by_name)}, "
                         f"got {backend!r}")
    return backend


def _check_group(rank, world_size, when_missing=True):
    """world_size > 1: torch.distributed must be initialized with this rank and size."""
    if not (dist.is_available() and dist.is_initialized()):
        if when_missing:
            raise ValueError(f"world_size={world_size} needs an initialized torch.distributed "
                             f"process group (the ring runs over the default group); none is")
        return
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the default process group has "
                         f"{dist.get_world_size()} processes")
    if dist.get_rank() != rank:
        raise ValueError(f"rank={rank} but this process is rank {dist.get_rank()} of the "
                         f"default process group")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _global_value(loss, world_size):
    """The value of the mean of the ranks' losses, the gradient of this rank's loss."""
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total / world_size + (loss - loss.detach())


class ClipLoss(torch.nn.Module):
    """open_clip.loss.ClipLoss on the fused kernels (see the module docstring).

    forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)
    -> the loss, or {"contrastive_loss": loss} with output_dict=True.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
                 world_size=1, use_horovod=False, backend="auto"):
        super().__init__()
        self.local_loss = _check_bool("local_loss", local_loss)
        self.gather_with_grad = _check_bool("gather_with_grad", gather_with_grad)
        self.cache_labels = _check_bool("cache_labels", cache_labels)
        if _check_bool("use_horovod", use_horovod):
            raise ValueError("use_horovod=True is not supported: the ring runs over "
                             "torch.distributed (use_horovod=False)")
        self.use_horovod = False
        _check_ranks(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.backend = _check_backend(backend)
        if world_size > 1:
            _check_group(rank, world_size, when_missing=False)

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None,
              teacher=None, teacher_logit_scale=None):
        kw = dict(logit_scale=logit_scale, logit_bias=logit_bias, backend=self.backend)
        if teacher is not None:
            kw.update(teacher_logit_scale=teacher_logit_scale, teacher_weight=1.0)
        if self.world_size == 1:
            return info_nce(image_features, text_features, symmetric=True, teacher=teacher,
                            **kw)
        _check_group(self.rank, self.world_size)
        if self.local_loss and not self.gather_with_grad:
            # each side against the other side's detached features
            rev = None if teacher is None else teacher[::-1]
            rows = ckd.ring_info_nce(image_features, text_features.detach(), teacher=teacher,
                                     **kw)
            cols = ckd.ring_info_nce(text_features, image_features.detach(), teacher=rev,
                                     **kw)
            return (rows + cols) / 2
        if not self.gather_with_grad:
            f = 1.0 / self.world_size
            image_features = _ScaleGrad.apply(image_features, f)
            text_features = _ScaleGrad.apply(text_features, f)
        loss = ckd.ring_info_nce(image_features, text_features, symmetric=True,
                                 teacher=teacher, **kw)
        return loss if self.local_loss else _global_value(loss, self.world_size)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None,
                output_dict=False):
        loss = self._loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self):
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
                f"rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}")


class DistillClipLoss(ClipLoss):
    """open_clip.loss.DistillClipLoss on the fused kernels (see the module docstring).

    forward(image_features, text_features, logit_scale, dist_image_features,
    dist_text_features, dist_logit_scale, output_dict=False) -> (contrastive_loss,
    distill_loss), or {"contrastive_loss": ..., "distill_loss": ...}.
    """

    def forward(self, image_features, text_features, logit_scale, dist_image_features,
                dist_text_features, dist_logit_scale, output_dict=False):
        if torch.is_grad_enabled():
            for name, x in (("dist_image_features", dist_image_features),
                            ("dist_text_features", dist_text_features),
                            ("dist_logit_scale", dist_logit_scale)):
                if torch.is_tensor(x) and x.requires_grad:
                    raise ValueError(f"{name} requires grad, but the teacher gets no gradient "
                                     f"here; compute it under torch.no_grad() or detach it")
        contrastive = self._loss(image_features, text_features, logit_scale)
        distill = self._loss(image_features, text_features, logit_scale,
                             teacher=(dist_image_features, dist_text_features),
                             teacher_logit_scale=dist_logit_scale)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class SigLipLoss(torch.nn.Module):
    """open_clip.loss.SigLipLoss on the fused kernels.

    forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)
    -> the loss, or {"contrastive_loss": loss}; logit_bias=None means no bias. With
    world_size > 1 every dist_impl (None = "bidir", "shift", "reduce", "gather") gives
    the same values and gradients in open_clip; here they all run ring_siglip_loss.
    Its default schedule needs the same upstream gradient on every rank (as a plain
    loss.backward() gives).
    """

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None,
                 backend="auto"):
        super().__init__()
        self.cache_labels = _check_bool("cache_labels", cache_labels)
        _check_ranks(rank, world_size)
        self.rank, self.world_size = rank, world_size
        if dist_impl is not None and dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {DIST_IMPLS}, got {dist_impl!r}")
        self.dist_impl = dist_impl or "bidir"
        self.backend = _check_backend(backend)
        if world_size > 1:
            _check_group(rank, world_size, when_missing=False)

    def forward(self, image_features, text_features, logit_scale, logit_bias,
                output_dict=False):
        kw = dict(logit_scale=logit_scale, logit_bias=0.0 if logit_bias is None else logit_bias,
                  backend=self.backend)
        if self.world_size == 1:
            loss = siglip_loss(image_features, text_features, **kw)
        else:
            _check_group(self.rank, self.world_size)
            loss = ckd.ring_siglip_loss(image_features, text_features, **kw)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self):
        return (f"rank={self.rank}, world_size={self.world_size}, "
                f"dist_impl={self.dist_impl!r}, backend={self.backend!r}")
