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
mean over ranks is the loss of the concatenated batch), and DDP's gradient average equals
a single-process step on it.

This module does not import transformers.
"""
from typing import Any, Optional

import torch

from .. import distributed as ckd
from ..loss import siglip_loss as _siglip_loss

__all__ = ["siglip_loss"]

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")
IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes",
                "interpolate_pos_encoding")
_MODEL_PARTS = ("get_text_features", "get_image_features", "logit_scale", "logit_bias")


def _pooled(out):
    """A tower's embedding: transformers 5 returns the tower's output (pooler_output),
    earlier versions the tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


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
            interpolate_pos_encoding for the vision tower. return_loss is ignored.

    Returns:
        The mean over texts of -sum_j log sigmoid(y_ij (exp(logit_scale) <t_i, v_j> +
        logit_bias)) on the normalized embeddings, y = +1 for i == j, float32 (float64
        for a float64 model); with distributed="ring", this rank's share.

    Raises:
        TypeError: `model` is not a SigLIP model.
        ValueError: a missing or unknown input, or a bad `distributed`.
    """
    missing = [p for p in _MODEL_PARTS if not hasattr(model, p)]
    if missing:
        raise TypeError(f"model must be a transformers SigLIP model (SiglipModel, "
                        f"Siglip2Model); {type(model).__name__} has no {', '.join(missing)}")
    if distributed not in (None, "ring"):
        raise ValueError(f"distributed must be None or 'ring', got {distributed!r}")
    inputs.pop("return_loss", None)
    unknown = sorted(set(inputs) - set(TEXT_INPUTS) - set(IMAGE_INPUTS))
    if unknown:
        raise ValueError(f"unknown model inputs {unknown}; siglip_loss takes "
                         f"{', '.join(TEXT_INPUTS + IMAGE_INPUTS)}")
    for name in ("input_ids", "pixel_values"):
        if inputs.get(name) is None:
            raise ValueError(f"{name} is required (the model's inputs, as its processor "
                             f"returns them)")
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
