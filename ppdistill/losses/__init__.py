"""Feature-distillation losses, registered with ppdet's workspace so configs can name them."""
from .base import FeatureLoss
from .mgd import MGDLoss
from .fgd import FGDLoss
from .fgfi import FGFILoss

__all__ = ['FeatureLoss', 'MGDLoss', 'FGDLoss', 'FGFILoss']
