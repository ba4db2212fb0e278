"""nn.Module wrappers of the losses."""
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import distributed
from .loss import info_nce, siglip_loss
from .options import make_options
from .problem import DEFAULT_TEMPERATURE, check_normalize, check_teacher, check_variants


class FusedInfoNCE(torch.nn.Module):
    """Drop-in contrastive loss module: the fused `info_nce` with fixed settings.

    FusedInfoNCE(temperature=0.07)(image_emb, text_emb) equals open_clip's CLIP loss,
    (CE(s * I T^T, arange) + CE(s * T I^T, arange)) / 2 with s = 1 / temperature,
    without the N x N logits. A `logit_scale` passed to forward overrides the
    temperature (as open_clip passes its learned scale).

    NOTE: symmetric defaults to True here (the CLIP loss, both directions), while the
    function `contrastive_kernels.info_nce` defaults to symmetric=False (queries
    against keys only). Pass symmetric=False for the one-sided loss.

    Args:
        temperature: float > 0 or tensor (0-dim, or (N,) per query row); the logit
            scale is 1 / temperature. Default 0.07. Not used by a forward call that
            passes `logit_scale`.
        symmetric: True (default): the mean of the row and column losses (CLIP).
            False: the row (query -> key) loss only.
        label_smoothing: eps in [0, 1), as for `info_nce`.
        reduction: "mean", "sum" or "none", as for `info_nce`.
        margin: additive margin of the positive cosines (AM-softmax), as for
            `info_nce`.
        decoupled: leave the positives out of the log-sum-exp (DCL).
        teacher_weight: in [0, 1], the teacher's share of the targets when forward
            gets a `teacher`.
        teacher_weighting: "softmax" or "linear" (CWCL), as for `info_nce`.
        backend: "auto" or a name from `contrastive_kernels.available_backends()`.
        distributed: None (the local loss), "ring" (`ring_info_nce`) or "gather"
            (`gather_info_nce`): the loss over the global batch of torch.distributed.
        group: the process group of the distributed loss (None: the default group).
        normalize: True L2-normalizes query and key in every forward,
            torch.nn.functional.normalize(x, dim=-1) (eps 1e-12), gradients flowing
            through it; the teacher is not normalized. Default False.
        **options: kernel options (deterministic, precision, low_memory, algorithm,
            workspace) passed to every call; see `contrastive_kernels.make_options`.

    Returns:
        Calling the module returns the loss, see `FusedInfoNCE.forward`.

    Raises:
        TypeError: an unknown or ill-typed kernel option, a non-float `margin`, a
            non-bool `decoupled` or `normalize`, or a non-float `teacher_weight`.
        ValueError: `distributed` not None, "ring" or "gather", an invalid option
            value, a non-finite `margin`, `teacher_weight` outside [0, 1] or an unknown
            `teacher_weighting`. The other settings are checked at the first forward
            (as `info_nce` checks them).

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> image = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> text = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> loss_fn = ck.FusedInfoNCE(temperature=0.07)      # symmetric=True: CLIP
        >>> loss = loss_fn(image, text)
        >>> ref = ck.reference.info_nce(image, text, temperature=0.07, symmetric=True)
        >>> torch.allclose(loss, ref, atol=1e-5)
        True
    """

    def __init__(self, temperature: Union[float, torch.Tensor] = DEFAULT_TEMPERATURE,
                 symmetric: bool = True, label_smoothing: float = 0.0,
                 reduction: str = "mean", margin: float = 0.0, decoupled: bool = False,
                 teacher_weight: float = 1.0, teacher_weighting: str = "softmax",
                 backend: str = "auto", distributed: Optional[str] = None,
                 group: Optional[Any] = None, normalize: bool = False,
                 **options: Any) -> None:
        super().__init__()
        if distributed not in (None, "ring", "gather"):
            raise ValueError(f"distributed must be None, 'ring' or 'gather', got {distributed!r}")
        make_options(**options)       # unknown or invalid options fail here, not at forward
        self.normalize = check_normalize(normalize)
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

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, *,
                positive_index: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                key_labels: Optional[torch.Tensor] = None,
                logit_scale: Optional[Union[float, torch.Tensor]] = None,
                logit_bias: Optional[Union[float, torch.Tensor]] = None,
                teacher: Optional[Union[torch.Tensor,
                                        Tuple[torch.Tensor, torch.Tensor]]] = None,
                teacher_logit_scale: Optional[Union[float, torch.Tensor]] = None
                ) -> torch.Tensor:
        """The loss of one batch: `info_nce` (or the distributed loss) with the module's
        settings.

        The module's symmetric setting applies; it defaults to True (the CLIP loss),
        unlike `contrastive_kernels.info_nce`, whose default is symmetric=False.

        Args:
            query: (N, D) float16, bfloat16, float32 or float64 tensor (e.g. image
                embeddings).
            key: (M, D) tensor, same dtype and device (e.g. text embeddings). None:
                self-contrast (NT-Xent, the two views stacked in `query`).
            positive_index: integer tensor (N,), each query's positive key. Default:
                the diagonal (or (i + N/2) % N when key is None).
            labels: integer tensor (N,): same-label keys are positives (SupCon). Not
                together with `positive_index`.
            key_labels: integer tensor (M,); default `labels`.
            logit_scale: the logit scale s (float, 0-dim or (N,) tensor, e.g. open_clip's
                logit_scale.exp()). When given it overrides the module's temperature.
            logit_bias: float or 0-dim tensor; cancels in the softmax (see `info_nce`).
            teacher: soft targets, (teacher_query, teacher_key), or the teacher's
                query embeddings alone when key is None; weighted by the module's
                teacher_weight and teacher_weighting.
            teacher_logit_scale: the teacher softmax's scale; default the student's.

        Returns:
            The loss, float32 (float64 for float64 inputs): 0-dim for "mean" and "sum";
            for reduction="none" the row losses (N,), with symmetric=True followed by
            the column losses, each weighted 1/2 ((N + M,)). With distributed=
            "ring"/"gather" this rank's share of the global loss (see `ring_info_nce`).

        Raises:
            TypeError: arguments of the wrong type or dtype (see `info_nce`).
            ValueError: wrong shapes, devices or values (see `info_nce`), e.g. an odd N
                under key=None, M < N without labels or positive_index, or a `backend`
                that cannot serve the call.
            RuntimeError: in backward with create_graph=True (double backward is not
                supported); use `contrastive_kernels.reference.info_nce` for that.

        Example:
            >>> import torch, contrastive_kernels as ck
            >>> loss_fn = ck.FusedInfoNCE()                        # symmetric=True
            >>> image = torch.randn(8, 16, requires_grad=True)
            >>> text = torch.randn(8, 16, requires_grad=True)
            >>> scale = torch.tensor(2.6593, requires_grad=True)   # log(1 / 0.07)
            >>> loss = loss_fn(image, text, logit_scale=scale.exp())  # overrides temperature
            >>> loss.backward()
            >>> image.grad.shape, scale.grad.shape
            (torch.Size([8, 16]), torch.Size([]))
            >>> ck.FusedInfoNCE(reduction="none")(image, text).shape   # rows then columns
            torch.Size([16])
        """
        kwargs = dict(positive_index=positive_index, labels=labels, key_labels=key_labels,
                      temperature=self.temperature if logit_scale is None else None,
                      logit_scale=logit_scale,
                      logit_bias=logit_bias, symmetric=self.symmetric,
                      label_smoothing=self.label_smoothing, reduction=self.reduction,
                      margin=self.margin, decoupled=self.decoupled, backend=self.backend,
                      **self.options)
        if self.normalize:      # (passed only when set: the distributed losses take it too)
            kwargs["normalize"] = True
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
                f"normalize={self.normalize}, backend={self.backend!r}, "
                f"distributed={self.distributed!r}{opts}")


class FusedSigLIPLoss(torch.nn.Module):
    """Drop-in sigmoid loss module (SigLIP) with open_clip's call shape.

    FusedSigLIPLoss()(image_features, text_features, logit_scale, logit_bias) equals
    open_clip's SigLipLoss()(...) (the exponentiated logit_scale, the diagonal as
    positives, the sum over pairs divided by N) without the N x N logits;
    logit_bias=None means no bias, as there.

    Args:
        backend: "auto" or a name from `contrastive_kernels.available_backends()`.
        distributed: None (the local loss) or "ring" (the global batch over
            torch.distributed: `contrastive_kernels.ring_siglip_loss`).
        group: the process group of the ring (None: the default group).
        passes: None, 3 or 4, the schedule of `siglip_loss`.
        reduction: "mean" (sum over pairs / N), "sum" or "none" (row sums, (N,)).
        normalize: True L2-normalizes both towers' features in every forward,
            torch.nn.functional.normalize(x, dim=-1) (eps 1e-12), gradients flowing
            through it. Default False (open_clip normalizes in the model).
        **options: kernel options (deterministic, precision) passed to every call.

    Returns:
        Calling the module returns the loss, see `FusedSigLIPLoss.forward`.

    Raises:
        TypeError: an unknown or ill-typed kernel option, or a non-bool `normalize`.
        ValueError: `distributed` not None or "ring", or an invalid option value. The
            other settings are checked at the first forward.

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> image = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> text = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> loss = ck.FusedSigLIPLoss()(image, text, 10.0, -10.0)
        >>> ref = ck.reference.siglip_loss(image, text, logit_scale=10.0, logit_bias=-10.0)
        >>> torch.allclose(loss, ref, atol=1e-5)
        True
    """

    def __init__(self, backend: str = "auto", distributed: Optional[str] = None,
                 group: Optional[Any] = None, passes: Optional[int] = None,
                 reduction: str = "mean", normalize: bool = False,
                 **options: Any) -> None:
        super().__init__()
        if distributed not in (None, "ring"):
            raise ValueError(f"distributed must be None or 'ring', got {distributed!r}")
        make_options(**options)
        self.normalize = check_normalize(normalize)
        self.backend, self.distributed, self.group = backend, distributed, group
        self.passes, self.reduction, self.options = passes, reduction, dict(options)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: Union[float, torch.Tensor],
                logit_bias: Optional[Union[float, torch.Tensor]] = None, *,
                positive_index: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                key_labels: Optional[torch.Tensor] = None,
                output_dict: bool = False
                ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """The sigmoid loss of one batch: `siglip_loss` with the module's settings.

        Args:
            image_features: (N, D) float16, bfloat16, float32 or float64 tensor.
            text_features: (M, D) tensor, same dtype and device.
            logit_scale: the exponentiated scale, a float > 0 or a 0-dim tensor (gets
                a gradient).
            logit_bias: a float or a 0-dim tensor; None: no bias (0).
            positive_index: integer tensor (N,), each image's positive text. Default:
                the diagonal (needs M >= N).
            labels: integer tensor (N,): same-label pairs are positives.
            key_labels: integer tensor (M,); default `labels`.
            output_dict: True returns {"contrastive_loss": loss}, as open_clip.

        Returns:
            The loss (float32, float64 for float64 inputs; 0-dim, or (N,) for
            reduction="none"), or {"contrastive_loss": loss} with output_dict=True.

        Raises:
            TypeError: arguments of the wrong type or dtype, or logit_scale None.
            ValueError: wrong shapes, devices or values (see `siglip_loss`).
            RuntimeError: in backward with create_graph=True (double backward is not
                supported); use `contrastive_kernels.reference.siglip_loss` for that.

        Example:
            >>> import torch, contrastive_kernels as ck
            >>> loss_fn = ck.FusedSigLIPLoss()
            >>> image = torch.randn(8, 16, requires_grad=True)
            >>> text = torch.randn(8, 16, requires_grad=True)
            >>> out = loss_fn(image, text, torch.tensor(10.0), torch.tensor(-10.0),
            ...               output_dict=True)
            >>> sorted(out), out["contrastive_loss"].shape
            (['contrastive_loss'], torch.Size([]))
            >>> out["contrastive_loss"].backward()
            >>> text.grad.shape
            torch.Size([8, 16])
        """
        kwargs = dict(logit_scale=logit_scale, logit_bias=0.0 if logit_bias is None else logit_bias,
                      positive_index=positive_index, labels=labels, key_labels=key_labels,
                      reduction=self.reduction, backend=self.backend, passes=self.passes,
                      **self.options)
        if self.normalize:      # (passed only when set: the distributed loss takes it too)
            kwargs["normalize"] = True
        if self.distributed is None:
            loss = siglip_loss(image_features, text_features, **kwargs)
        else:
            loss = distributed.ring_siglip_loss(image_features, text_features, group=self.group,
                                                **kwargs)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self):
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (f"backend={self.backend!r}, distributed={self.distributed!r}, "
                f"passes={self.passes!r}, reduction={self.reduction!r}, "
                f"normalize={self.normalize}{opts}")
