"""nn.Module wrappers of the losses."""
import torch

from . import distributed
from .loss import info_nce, siglip_loss
from .options import make_options
from .problem import DEFAULT_TEMPERATURE, check_teacher, check_variants


class FusedInfoNCE(torch.nn.Module):
    """Drop-in contrastive loss module.

    FusedInfoNCE(temperature=0.07, symmetric=True)(image_emb, text_emb) equals
    (CE(s * I T^T, arange) + CE(s * T I^T, arange)) / 2 with s = 1 / temperature.
    A `logit_scale` passed to forward overrides the temperature (as open_clip does).
    distributed: None (local loss), "ring" or "gather" (global batch over
    torch.distributed; see contrastive_kernels.distributed). Kernel options
    (deterministic=, precision=, low_memory=, algorithm=, workspace=) are passed to
    every call. margin, decoupled, teacher_weight and teacher_weighting: the variants of
    `info_nce`; a teacher's embeddings (and teacher_logit_scale) go to forward.
    """

    def __init__(self, temperature=DEFAULT_TEMPERATURE, symmetric=True, label_smoothing=0.0,
                 reduction="mean", margin=0.0, decoupled=False, teacher_weight=1.0,
                 teacher_weighting="softmax", backend="auto", distributed=None, group=None,
                 **options):
        super().__init__()
        if distributed not in (None, "ring", "gather"):
            raise ValueError(f"distributed must be None, 'ring' or 'gather', got {distributed!r}")
        make_options(**options)       # unknown or invalid options fail here, not at forward
        self.margin, self.decoupled = check_variants(margin, decoupled)
        check_teacher(None, None, 0, 0, None, None, None, teacher_weight, teacher_weighting,
                      margin)
        self.teacher_weight, self.teacher_weighting = teacher_weight, teacher_weighting
        self.distributed = distributed
        self.group = group
        self.temperature = temperature
        self.symmetric = symmetric
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.backend = backend
        self.options = dict(options)

    def forward(self, query, key=None, *, positive_index=None, labels=None, key_labels=None,
                logit_scale=None, logit_bias=None, teacher=None, teacher_logit_scale=None):
        kwargs = dict(positive_index=positive_index, labels=labels, key_labels=key_labels,
                      temperature=self.temperature, logit_scale=logit_scale,
                      logit_bias=logit_bias, symmetric=self.symmetric,
                      label_smoothing=self.label_smoothing, reduction=self.reduction,
                      margin=self.margin, decoupled=self.decoupled, backend=self.backend,
                      **self.options)
        if teacher is not None or teacher_logit_scale is not None:
            kwargs.update(teacher=teacher, teacher_logit_scale=teacher_logit_scale,
                          teacher_weight=self.teacher_weight,
                          teacher_weighting=self.teacher_weighting)
        if self.distributed is None:
            return info_nce(query, key, **kwargs)
        fn = distributed.ring_info_nce if self.distributed == "ring" else distributed.gather_info_nce
        return fn(query, key, group=self.group, **kwargs)

    def extra_repr(self):
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, "
                f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
                f"margin={self.margin}, decoupled={self.decoupled}, "
                f"backend={self.backend!r}, distributed={self.distributed!r}{opts}")


class FusedSigLIPLoss(torch.nn.Module):
    """Drop-in sigmoid loss module with open_clip's call shape:

        FusedSigLIPLoss()(image_features, text_features, logit_scale, logit_bias)

    equals open_clip's SigLipLoss()(...) (the exponentiated logit_scale, the diagonal as
    positives, the sum over pairs divided by N) without the N x N logits; logit_bias=None
    means no bias, as there. distributed: None (local loss) or "ring" (the global batch
    over torch.distributed: contrastive_kernels.distributed.ring_siglip_loss). passes and
    the kernel options (deterministic=, precision=) are passed to every call.
    """

    def __init__(self, backend="auto", distributed=None, group=None, passes=None,
                 reduction="mean", **options):
        super().__init__()
        if distributed not in (None, "ring"):
            raise ValueError(f"distributed must be None or 'ring', got {distributed!r}")
        make_options(**options)
        self.backend, self.distributed, self.group = backend, distributed, group
        self.passes, self.reduction, self.options = passes, reduction, dict(options)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, *,
                positive_index=None, labels=None, key_labels=None, output_dict=False):
        kwargs = dict(logit_scale=logit_scale, logit_bias=0.0 if logit_bias is None else logit_bias,
                      positive_index=positive_index, labels=labels, key_labels=key_labels,
                      reduction=self.reduction, backend=self.backend, passes=self.passes,
                      **self.options)
        if self.distributed is None:
            loss = siglip_loss(image_features, text_features, **kwargs)
        else:
            loss = distributed.ring_siglip_loss(image_features, text_features, group=self.group,
                                                **kwargs)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self):
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (f"backend={self.backend!r}, distributed={self.distributed!r}, "
                f"passes={self.passes!r}, reduction={self.reduction!r}{opts}")
