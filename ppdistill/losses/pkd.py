"""Pearson-correlation knowledge distillation (PKD).

Cao, Zhang, Gao, Cheng, Cheng, Cheng, "PKD: General Distillation Framework for Object Detectors via
Pearson Correlation Coefficient", NeurIPS 2022 (arXiv:2207.02039). Reference code: mmrazor ``PKDLoss``
(``mmrazor/models/losses/pkd_loss.py``).
"""
from typing import Optional

import paddle
import paddle.nn.functional as F
from ppdet.core.workspace import register

from .base import FeatureLoss

__all__ = ['PKDLoss', 'standardize_channels']


def standardize_channels(x: paddle.Tensor, eps: float = 1e-6) -> paddle.Tensor:
    """``[N, C, H, W]`` → each channel standardised over (N, H, W): ``(x - mean) / (std + eps)``,
    with the unbiased std (as mmrazor's ``PKDLoss.norm``)."""
    n, c, h, w = [int(v) for v in x.shape]
    flat = x.transpose([1, 0, 2, 3]).reshape([c, n * h * w])
    mean = flat.mean(axis=1, keepdim=True)
    # unbiased std written out: paddle 3's Tensor.std checks its degrees of freedom on the host (a sync)
    centred = flat - mean
    std = paddle.sqrt(paddle.sum(centred * centred, axis=1, keepdim=True) / max(n * h * w - 1, 1))
    return (centred / (std + eps)).reshape([c, n, h, w]).transpose([1, 0, 2, 3])


@register
class PKDLoss(FeatureLoss):
    """PKD loss (Cao et al., NeurIPS 2022): MSE between per-channel standardised features, halved.

    ``loss = loss_weight * mean((z(align(S)) - z(T))**2) / 2`` where ``z`` standardises every channel over
    the batch and positions. Equivalent to ``1 - r`` with ``r`` the Pearson correlation of the two
    features, so the teacher's feature magnitude (and a heterogeneous teacher's scale) does not matter —
    the method for heterogeneous pairs (e.g. RetinaNet teacher → PicoDet student, levels paired by stride).

    Args:
        student_channels (int): student channels ``Cs``.
        teacher_channels (int): teacher channels ``Ct``; a 1x1 align conv is added when they differ.
        loss_weight (float): weight. Default 1.0; mmrazor uses 6 (Faster R-CNN / Swin → RetinaNet) and 10
            (RetinaNet-X101 → RetinaNet-R50, FCOS → RetinaNet) per FPN level.
    """

    def __init__(self, student_channels: int, teacher_channels: int, loss_weight: float = 1.0):
        super().__init__(student_channels, teacher_channels)
        self.loss_weight = float(loss_weight)

    def forward(self, student_feat: paddle.Tensor, teacher_feat: paddle.Tensor,
                inputs: Optional[dict] = None) -> paddle.Tensor:
        """``student_feat`` ``[N, Cs, H, W]``, ``teacher_feat`` ``[N, Ct, H, W]`` → scalar loss."""
        self.check_shapes(student_feat, teacher_feat)
        student = standardize_channels(self.align_student(student_feat))
        teacher = standardize_channels(teacher_feat.detach())
        return self.loss_weight * F.mse_loss(student, teacher) / 2
