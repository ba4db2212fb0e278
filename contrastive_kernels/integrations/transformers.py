"""Hugging Face transformers' SigLIP and SigLIP 2 (`SiglipModel`, `Siglip2Model`) on the
fused sigmoid loss.

`model(**inputs, return_loss=True)` builds the N x N logits in its forward (and returns
them). `siglip_loss(model, **inputs)` gives the same loss and the same gradients (the
towers, logit_scale and logit_bias) from the model's two towers, without them:

    from contrastive_kernels.integrations.transformers import siglip_loss
    inputs = processor(text=texts, images=images, padding="max_length", return_tensors="pt")
    loss = siglip_loss(model, **inputs)          # was: model(**inputs, return_loss=True).loss
    loss.backward()

The texts are the rows (as in the model's `logits_per_text`), the loss is their mean.
distributed="ring": the global batch over torch.distributed (`ring_siglip_loss`), which
transformers' forward does not have: each rank passes its shard and returns its share (the
mean over ranks is the loss of the concatenated batch). Under DDP the loss must be
computed inside the wrapped module's forward, or DDP never averages the gradients: wrap
`SiglipLossModel(model)`, whose forward is this loss, then the averaged gradients equal
a single-process step on the concatenated batch:

    ddp = DistributedDataParallel(SiglipLossModel(model, distributed="ring"))
    loss = ddp(**inputs)
    loss.backward()

This module does not import transformers.
"""
from typing import Any, Optional

import torch

from .. import distributed as ckd
from ..loss import siglip_loss as _siglip_loss

__all__ = ["siglip_loss", "SiglipLossModel"]

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")
IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes",
                "interpolate_pos_encoding")
# accepted as the model's forward accepts them; they change no loss
IGNORED_INPUTS = ("return_loss", "token_type_ids", "output_attentions",
                  "output_hidden_states", "return_dict")
_MODEL_PARTS = ("get_text_features", "get_image_features", "logit_scale", "logit_bias")


def _pooled(out):
    """A tower's embedding: transformers 5 returns the tower's output (its pooler_output;
    a tuple (last_hidden_state, pooler_output, ...) with return_dict=False), earlier
    versions the tensor."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "pooler_output"):
        return out.pooler_output
    return out[1]


def siglip_loss(model: Any, *, distributed: Optional[str] = None, group: Optional[Any] = None,
                backend: str = "auto", passes: Optional[int] = None,
                **inputs: Any) -> torch.Tensor:
    """The loss of `model(**inputs, return_loss=True)` for a SigLIP model, fused.

    Args:
        model: a transformers SigLIP model (`SiglipModel`, `Siglip2Model`): it needs
            get_text_features, get_image_features, logit_scale and logit_bias.
        distributed: None (this process's batch) or "ring" (the global batch of a
            torch.distributed job; every rank calls it, and calls backward).
        group: the process group of the ring (None: the default group).
        backend, passes: as `contrastive_kernels.siglip_loss`.
        **inputs: the model's inputs, as its processor returns them: input_ids
            (required), attention_mask, position_ids for the text tower; pixel_values
            (required), pixel_attention_mask, spatial_shapes (SigLIP 2),
            interpolate_pos_encoding for the vision tower; N texts and N images. As
            the model's forward, it ignores return_loss, token_type_ids,
            output_attentions, output_hidden_states and return_dict.

    Returns:
        The mean over texts of -sum_j log sigmoid(y_ij (exp(logit_scale) <t_i, v_j> +
        logit_bias)) on the normalized embeddings, y = +1 for i == j, float32 (float64
        for a float64 model); with distributed="ring", this rank's share.

    Raises:
        TypeError: `model` is not a SigLIP model, or is wrapped (DDP, FSDP: use
            `SiglipLossModel`).
        ValueError: a missing or unknown input, N texts and M != N images, or a bad
            `distributed`.
    """
    missing = [p for p in _MODEL_PARTS if not hasattr(model, p)]
    if missing and all(hasattr(getattr(model, "module", None), p) for p in _MODEL_PARTS):
        raise TypeError(f"model is wrapped ({type(model).__name__}): calling its towers "
                        f"directly would skip the wrapper's gradient averaging; wrap "
                        f"SiglipLossModel(model) instead and call that")
    if missing:
        raise TypeError(f"model must be a transformers SigLIP model (SiglipModel, "
                        f"Siglip2Model); {type(model).__name__} has no {', '.join(missing)}")
    if distributed not in (None, "ring"):
        raise ValueError(f"distributed must be None or 'ring', got {distributed!r}")
    for name in IGNORED_INPUTS:
        inputs.pop(name, None)
    unknown = sorted(set(inputs) - set(TEXT_INPUTS) - set(IMAGE_INPUTS))
    if unknown:
        raise ValueError(f"unknown model inputs {unknown}; siglip_loss takes "
                         f"{', '.join(TEXT_INPUTS + IMAGE_INPUTS)} (and ignores "
                         f"{', '.join(IGNORED_INPUTS)})")
    for name in ("input_ids", "pixel_values"):
        if inputs.get(name) is None:
            raise ValueError(f"{name} is required (the model's inputs, as its processor "
                             f"returns them)")
    n_text, n_image = len(inputs["input_ids"]), len(inputs["pixel_values"])
    if n_text != n_image:
        raise ValueError(f"input_ids and pixel_values must hold the same number of pairs "
                         f"(text i goes with image i), got {n_text} and {n_image}")
    text = _pooled(model.get_text_features(
        **{k: inputs[k] for k in TEXT_INPUTS if inputs.get(k) is not None}))
    image = _pooled(model.get_image_features(
        **{k: inputs[k] for k in IMAGE_INPUTS if inputs.get(k) is not None}))
    image = image.to(text.device)
    kw = dict(logit_scale=model.logit_scale.to(text.device).exp(),
              logit_bias=model.logit_bias.to(text.device), normalize=True, backend=backend,
              passes=passes)
    if distributed == "ring":
        return ckd.ring_siglip_loss(text, image, group=group, **kw)
    return _siglip_loss(text, image, **kw)


class SiglipLossModel(torch.nn.Module):
    """`model` whose forward(**inputs) is `siglip_loss(model, **inputs)`: the module to
    wrap in DistributedDataParallel (or FSDP), so that the wrapper sees the forward and
    averages the gradients.

    Args:
        model: a transformers SigLIP model (its parameters become this module's).
        distributed, group, backend, passes: as `siglip_loss`.
    """

    def __init__(self, model: Any, distributed: Optional[str] = None,
                 group: Optional[Any] = None, backend: str = "auto",
                 passes: Optional[int] = None):
        super().__init__()
        self.model = model
        self.distributed, self.group, self.backend, self.passes = (distributed, group,
                                                                     backend, passes)

    def forward(self, **inputs: Any) -> torch.Tensor:
        return siglip_loss(self.model, distributed=self.distributed, group=self.group,
                           backend=self.backend, passes=self.passes, **inputs)
