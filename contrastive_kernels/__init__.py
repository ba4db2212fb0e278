"""contrastive_kernels: fused contrastive losses that never materialize N x M logits."""
from . import reference
from .backends import available_backends
from .distributed import gather_info_nce, ring_info_nce
from .loss import info_nce
from .modules import FusedInfoNCE
from .options import Options, make_options

__all__ = ["info_nce", "FusedInfoNCE", "ring_info_nce", "gather_info_nce", "available_backends",
           "Options", "make_options", "reference"]
__version__ = "0.1.0"
