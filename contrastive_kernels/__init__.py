"""contrastive_kernels: fused contrastive losses that never materialize N x M logits."""
from . import reference
from .backends import available_backends
from .distributed import gather_info_nce, gather_siglip_loss, ring_info_nce, ring_siglip_loss
from .gradcache import GradCache
from .loss import alignment_loss, info_nce, siglip_loss, uniformity_loss
from .metrics import retrieval_metrics
from .modules import FusedInfoNCE, FusedSigLIPLoss
from .options import Options, make_options

__all__ = ["info_nce", "uniformity_loss", "alignment_loss", "retrieval_metrics", "FusedInfoNCE", "siglip_loss", "FusedSigLIPLoss", "ring_info_nce", "gather_info_nce", "ring_siglip_loss", "gather_siglip_loss", "GradCache", "available_backends",
           "Options", "make_options", "reference"]
__version__ = "0.1.0"
