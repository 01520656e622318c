"""Feature-distillation losses, registered with ppdet's workspace so configs can name them."""
from .base import FeatureLoss
from .mgd import MGDLoss
from .fgd import FGDLoss

__all__ = ['FeatureLoss', 'MGDLoss', 'FGDLoss']
