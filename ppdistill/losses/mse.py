"""Plain feature imitation: mean squared error between (aligned) student and teacher features.

The neck-feature variant of YOLOv3 distillation (the seed's fifth variant), and a baseline for any
architecture's ``fpn`` role.
"""
from typing import Optional

import paddle
from ppdet.core.workspace import register

from .base import FeatureLoss

__all__ = ['FeatureMSELoss']


@register
class FeatureMSELoss(FeatureLoss):
    """``loss_weight * mean((align(S) - T)**2)`` over ``[N, C_t, H, W]``.

    Args:
        student_channels, teacher_channels: ``Cs``, ``Ct``; a 1x1 align conv maps ``Cs -> Ct`` if they differ.
        loss_weight: weight of the term.
    """

    def __init__(self, student_channels: int, teacher_channels: int, loss_weight: float = 1.0):
        super().__init__(student_channels, teacher_channels)
        self.loss_weight = float(loss_weight)

    def forward(self, student_feat: paddle.Tensor, teacher_feat: paddle.Tensor,
                inputs: Optional[dict] = None) -> paddle.Tensor:
        self.check_shapes(student_feat, teacher_feat)
        diff = self.align_student(student_feat) - teacher_feat.detach()
        return self.loss_weight * (diff ** 2).mean()
