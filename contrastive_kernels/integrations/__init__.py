"""Drop-in replacements for the contrastive losses of other libraries.

Each submodule mirrors one library's constructor and call, with the same values and
gradients, computed by the fused kernels:

- `integrations.open_clip`: ClipLoss, SigLipLoss, DistillClipLoss
- `integrations.sentence_transformers`: MultipleNegativesRankingLoss,
  CachedMultipleNegativesRankingLoss
- `integrations.pytorch_metric_learning`: NTXentLoss, SupConLoss
- `integrations.lightly`: NTXentLoss
- `integrations.transformers`: siglip_loss and SiglipLossModel for SiglipModel /
  Siglip2Model

Import the submodule you need; a submodule imports its library only where it needs it
(`import contrastive_kernels` never does). Options an adapter cannot honour raise a
ValueError that names them.
"""
