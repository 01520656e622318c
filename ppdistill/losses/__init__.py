"""Feature-distillation losses, registered with ppdet's workspace so configs can name them."""
from .base import FeatureLoss
from .mgd import MGDLoss
from .fgd import FGDLoss
from .cwd import CWDLoss
from .pkd import PKDLoss
from .kd import LogitKDLoss

__all__ = ['FeatureLoss', 'MGDLoss', 'FGDLoss', 'CWDLoss', 'PKDLoss', 'LogitKDLoss']
