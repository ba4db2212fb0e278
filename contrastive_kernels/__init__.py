"""contrastive_kernels: fused contrastive losses that never materialize N x M logits."""
from . import reference
from .backends import available_backends
from .loss import FusedInfoNCE, info_nce

__all__ = ["info_nce", "FusedInfoNCE", "available_backends", "reference"]
__version__ = "0.1.0"
