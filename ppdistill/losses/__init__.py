"""Feature-distillation losses, registered with ppdet's workspace so configs can name them."""
from .base import DistillLoss, FeatureLoss
from .mgd import MGDLoss
from .fgd import FGDLoss
from .fgfi import FGFILoss
from .mse import FeatureMSELoss
from .ssd_kd import SSDOutputLoss
from .yolo_kd import YOLOv3OutputLoss
from .cwd import CWDLoss
from .pkd import PKDLoss
from .kd import LogitKDLoss
from .binary_kd import BinaryKDLoss
from .box_kd import BoxKDLoss
from .ld import LDLoss
from .hungarian_kd import HungarianKDLoss
from .shared_query_kd import SharedQueryKDLoss

__all__ = ['DistillLoss', 'FeatureLoss', 'MGDLoss', 'FGDLoss', 'FGFILoss', 'FeatureMSELoss', 'SSDOutputLoss',
           'YOLOv3OutputLoss', 'CWDLoss', 'PKDLoss', 'LogitKDLoss', 'BinaryKDLoss', 'BoxKDLoss', 'LDLoss',
           'HungarianKDLoss', 'SharedQueryKDLoss']
